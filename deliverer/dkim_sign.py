"""DKIM signing (RFC 6376), per sending domain, from keys kept on the tenant.

Relaxed/relaxed canonicalisation (robust to the header folding relays do); rsa-sha256 for RSA
keys and ed25519-sha256 (RFC 8463) for Ed25519 keys. The signed headers are the ones receivers
check (From, To, Subject, Date, Message-ID, …) that the message has.

The signing is written out here on top of `cryptography` (OpenSSL) rather than done by
dkimpy, whose pure-Python RSA took about 10 ms per message, ten times everything else the
deliverer does; parsed keys are cached. dkimpy still verifies in the tests, as an
independent implementation. Failures become `DkimError`: a message is then sent unsigned
rather than not at all, and the failure is logged.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from functools import lru_cache

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from sluice.v1 import tenant_pb2

__all__ = ["DkimError", "key_for", "sign"]

_HEADERS = (
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
)

_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb"[ \t]+\r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")

Key = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimError(Exception):
    """The message could not be signed."""


def key_for(tenant: tenant_pb2.Tenant | None, from_domain: str) -> tenant_pb2.DkimKey | None:
    if tenant is None:
        return None
    for key in tenant.dkim_keys:
        if key.domain.lower() == from_domain:
            return key
    return None


@lru_cache(maxsize=256)
def _load(pem: str) -> Key:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DkimError(f"not a usable private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise DkimError(f"unsupported key type {type(key).__name__} (use RSA or Ed25519)")
    return key


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, runs of WSP as one space, none at
    the ends."""
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip().lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: runs of WSP as one space, none at line ends, no empty lines at the
    end, a final CRLF if the body is not empty."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _TRAILING_WSP.sub(b"\r\n", _WSP_RUN.sub(b" ", body))
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


# Bodies up to this size have their hash cached: a blast's recipients mostly share the
# body (personalisation is usually in the headers), and canonicalising and hashing a body
# was a third of the work besides the RSA signature itself.
_CACHED_BODY = 256 * 1024


@lru_cache(maxsize=64)
def _cached_body_hash(body: bytes) -> str:
    return _body_hash(body)


def _body_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode()


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields as (name, raw value with its folding), in order."""
    fields: list[tuple[bytes, bytes]] = []
    for line in re.split(rb"\r\n(?![ \t])", head):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name, value))
    return fields


def sign(message: bytes, key: tenant_pb2.DkimKey, now: int | None = None) -> bytes:
    """The message with a DKIM-Signature header prepended."""
    private = _load(key.private_key_pem)
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        raise DkimError("the message has no header/body separator")
    fields = _fields(head + b"\r\n")
    # Each listed header the message has; several instances are signed from the bottom up.
    by_name: dict[bytes, list[bytes]] = {}
    for field_name, field_value in fields:
        by_name.setdefault(field_name.strip().lower(), []).append(field_value)
    signed: list[str] = []
    canon: list[bytes] = []
    for name in _HEADERS:
        for value in reversed(by_name.get(name.encode(), [])):
            signed.append(name)
            canon.append(_relaxed_header(name.encode(), value) + b"\r\n")
    body_hash = _cached_body_hash(body) if len(body) <= _CACHED_BODY else _body_hash(body)
    algorithm = "rsa-sha256" if isinstance(private, rsa.RSAPrivateKey) else "ed25519-sha256"
    stamp = int(time.time()) if now is None else now
    value = (
        f" v=1; a={algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector};\r\n"
        f" t={stamp}; h={':'.join(signed)};\r\n bh={body_hash};\r\n b="
    ).encode()
    data = b"".join(canon) + _relaxed_header(b"DKIM-Signature", value)
    try:
        if isinstance(private, rsa.RSAPrivateKey):
            signature = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:  # RFC 8463: Ed25519 over the SHA-256 of the data
            signature = private.sign(hashlib.sha256(data).digest())
    except Exception as exc:  # OpenSSL errors come as several types
        raise DkimError(f"DKIM signing for {key.domain} failed: {exc}") from exc
    b = base64.b64encode(signature)
    # Folded: white space inside b= is ignored by verifiers (RFC 6376 3.5).
    folded = b"\r\n ".join(b[i : i + 72] for i in range(0, len(b), 72))
    return b"DKIM-Signature:" + value + folded + b"\r\n" + message
