"""JSON at the HTTP edge: proto field names (snake_case) and short lower-case enum names.

`parse` turns a JSON value into a message, collecting every problem as a (dotted path,
reason) violation, e.g. ("to[3].email", "must be a string"); unknown fields are errors.
Enums are accepted as "critical" or "TIER_CRITICAL" and written as "critical".
"""

from __future__ import annotations

import base64
import re
from typing import Any, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["JsonError", "enum_short_name", "parse", "to_dict"]

M = TypeVar("M", bound=Message)

_WKT_AS_STRING = {"google.protobuf.Timestamp", "google.protobuf.Duration"}
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}


class JsonError(ValueError):
    """The JSON does not match the message; `violations` lists (field path, reason)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in violations))
        self.violations = violations


def _enum_prefix(enum: EnumDescriptor) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """ "critical" for Tier.TIER_CRITICAL; the number as text if unknown."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(_enum_prefix(enum)).lower()


def _enum_from_json(enum: EnumDescriptor, value: Any) -> str:
    if isinstance(value, str):
        if value in enum.values_by_name:
            return value
        full = _enum_prefix(enum) + value.upper()
        if value == value.lower() and full in enum.values_by_name:
            return full
    choices = ", ".join(
        f'"{enum_short_name(enum, v.number)}"' for v in enum.values if v.number != 0
    )
    raise ValueError(f"must be one of {choices}")


def _path(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    if t == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if t in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("must be an integer")
        if isinstance(value, str) and not re.fullmatch(r"-?\d+", value):
            raise ValueError("must be an integer")
        return value
    if t in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        return value
    if t == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, str):
            raise ValueError("must be a base64 string")
        try:
            base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError("must be valid base64") from exc
        return value
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return _enum_from_json(field.enum_type, value)
    raise ValueError("unsupported field type")  # pragma: no cover


def _value(field: FieldDescriptor, value: Any, path: str, out: list[tuple[str, str]]) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        if field.message_type.full_name in _WKT_AS_STRING:
            if not isinstance(value, str):
                out.append((path, "must be an RFC 3339 string"))
            return value
        return _message(field.message_type, value, path, out)
    try:
        return _scalar(field, value)
    except ValueError as exc:
        out.append((path, str(exc)))
        return None


def _message(desc: Descriptor, data: Any, base: str, out: list[tuple[str, str]]) -> Any:
    if not isinstance(data, dict):
        out.append((base or "body", "must be a JSON object"))
        return None
    result: dict[str, Any] = {}
    for key, value in data.items():
        path = _path(base, key)
        field = desc.fields_by_name.get(key)
        if field is None:
            out.append((path, "unknown field"))
            continue
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                out.append((path, "must be a JSON object"))
                continue
            vfield = field.message_type.fields_by_name["value"]
            result[key] = {k: _value(vfield, v, f"{path}.{k}", out) for k, v in value.items()}
        elif field.is_repeated:
            if not isinstance(value, list):
                out.append((path, "must be a JSON array"))
                continue
            result[key] = [_value(field, v, f"{path}[{i}]", out) for i, v in enumerate(value)]
        else:
            result[key] = _value(field, value, path, out)
    return result


def parse(data: Any, message_cls: type[M]) -> M:
    """A message from decoded JSON, or JsonError listing every violation."""
    violations: list[tuple[str, str]] = []
    normalised = _message(cast(Descriptor, message_cls.DESCRIPTOR), data, "", violations)
    if violations:
        raise JsonError(violations)
    msg = message_cls()
    try:
        json_format.ParseDict(normalised, msg)
    except json_format.ParseError as exc:
        raise JsonError([("body", str(exc))]) from exc
    return msg


def _shorten(desc: Descriptor, data: dict[str, Any]) -> None:
    for key, value in data.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            enum = field.enum_type
            assert enum is not None

            def short(v: Any, enum: EnumDescriptor = enum) -> Any:
                return (
                    enum_short_name(enum, enum.values_by_name[v].number)
                    if isinstance(v, str) and v in enum.values_by_name
                    else v
                )

            data[key] = [short(v) for v in value] if isinstance(value, list) else short(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            mdesc = field.message_type
            assert mdesc is not None
            if mdesc.GetOptions().map_entry:
                vfield = mdesc.fields_by_name["value"]
                if vfield.type == FieldDescriptor.TYPE_MESSAGE:
                    assert vfield.message_type is not None
                    for v in value.values():
                        _shorten(vfield.message_type, v)
            elif isinstance(value, list):
                for v in value:
                    if isinstance(v, dict):
                        _shorten(mdesc, v)
            elif isinstance(value, dict):
                _shorten(mdesc, value)


# Field types whose JSON form is the Python value itself.
_PLAIN = {
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON form of a message: snake_case names, short enum names."""
    fields = msg.ListFields()
    if all(f.type in _PLAIN and not f.message_type for f, _ in fields):
        # Flat messages (e.g. 100,000 message ids) skip json_format's per-value Python work.
        return {f.name: list(v) if f.is_repeated else v for f, v in fields}
    data: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    _shorten(cast(Descriptor, msg.DESCRIPTOR), data)
    return data
