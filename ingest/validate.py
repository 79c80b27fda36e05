"""Schema and RFC 5321/5322 checks on a SendRequest; every problem names its field path."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from typing import Any

from sluice.config import IngestConfig
from sluice.v1 import ingest_pb2, messages_pb2

__all__ = [
    "all_valid",
    "check_address",
    "check_blast_recipient",
    "domain_problem",
    "normalise_domain",
    "validate_blast_content",
    "validate_send",
]

# RFC 5322 atext, for a dot-atom local part.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5322 field name: printable ASCII except ':'.
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# Headers Sluice writes itself; a client may not set them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "Return-Path",
        "Sender",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "DKIM-Signature",
        "Received",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    )
)

_MIME_TYPE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]*/[a-zA-Z0-9][a-zA-Z0-9!#$&^_.+-]*$")
# Container types: as an attachment's type they would nest MIME structure Sluice does not build.
_CONTAINER_TYPES = ("multipart/", "message/")
_CONTENT_ID = re.compile(r"^[\x21-\x3b\x3d\x3f-\x7e]{1,250}$")

_TIERS = frozenset(messages_pb2.Tier.values())

MAX_SUBSTITUTION = 1000
MAX_SUBJECT = 998
MAX_HEADER_VALUE = 998
MAX_TAGS = 20
MAX_METADATA = 50


@functools.lru_cache(maxsize=65536)
def normalise_domain(domain: str) -> str:
    """The lower-case IDNA A-label form of a domain; ValueError if it is not a mail domain.
    Cached: the same domains come again and again."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError("domain is not a valid IDNA name") from exc
    if len(ascii_domain) > 253:
        raise ValueError("domain is longer than 253 characters")
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        raise ValueError("domain needs at least two labels")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"domain label {label!r} is not a valid hostname label")
    if labels[-1].isdigit():
        raise ValueError("domain's last label cannot be numeric")
    return ascii_domain


@functools.lru_cache(maxsize=65536)
def domain_problem(domain: str) -> str | None:
    """Why domain is not a mail domain, or None; cached, bad domains included."""
    try:
        normalise_domain(domain)
    except ValueError as exc:
        return str(exc)
    return None


def check_address(email: str) -> str | None:
    """Why email is not a deliverable RFC 5321 mailbox, or None if it is."""
    m = _FAST_ADDRESS.fullmatch(email)
    if m is not None and len(email) <= 254 and len(m.group(1)) <= 64:
        # The common case: a plain ASCII address, checked with one regex.
        return domain_problem(m.group(2))
    return _check_address_slow(email)


def _check_address_slow(email: str) -> str | None:
    if not email:
        return "is required"
    if _CONTROL.search(email) or "\r" in email or "\n" in email:
        return "must not contain control characters (CR/LF)"
    if any(c.isspace() for c in email) and not email.startswith('"'):
        return "must not contain whitespace"
    local, sep, domain = email.rpartition("@")
    if not sep or not local or not domain:
        return "must be an address of the form local@domain"
    if len(local.encode()) > 64:
        return "local part is longer than 64 octets"
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        if not local.isascii() and _DOT_ATOM.match(re.sub(r"[^\x00-\x7f]", "a", local)):
            return "non-ASCII local parts need SMTPUTF8, which Sluice does not offer yet"
        return "local part is not a valid dot-atom or quoted string"
    try:
        ascii_domain = normalise_domain(domain)
    except ValueError as exc:
        return str(exc)
    if len(local.encode()) + 1 + len(ascii_domain) > 254:
        return "address is longer than 254 octets"
    return None


# The common case, checked with one regex; anything else takes the full path above.
_FAST_ADDRESS = re.compile(
    rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
)


# All addresses of a list at once: a simple character-class pass over the newline-joined
# list (the nested dot-atom regex costs 6x more); dot placement and each distinct domain are
# checked separately below.
_FAST_LINES = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253}$", re.MULTILINE
)
_BAD_DOTS = ("..", ".@", "@.", "\n.", ".\n")


def all_valid(emails: list[Any], names: list[Any], values: list[Any]) -> bool:
    """True when every address, display name and substitution value is valid; checked in
    bulk (a few C-level passes instead of per-item Python). False means "look closer": the
    caller then checks item by item to name each violation."""
    if not all(type(x) is str for x in emails):
        return False
    joined = "\n".join(emails)
    if (
        joined.count("\n") != len(emails) - 1
        or len(_FAST_LINES.findall(joined)) != len(emails)
        or any(bad in joined for bad in _BAD_DOTS)
        or joined.startswith(".")
        or joined.endswith(".")
        or max(map(len, emails)) > 254
    ):
        return False
    if any(domain_problem(d) for d in {e[e.rindex("@") + 1 :] for e in emails}):
        return False
    if names and (
        not all(type(x) is str for x in names)
        or _CONTROL.search("".join(names))
        or max(map(len, names)) > 256
    ):
        return False
    return not values or (
        all(type(x) is str for x in values) and max(map(len, values)) <= MAX_SUBSTITUTION
    )


def _check_name(name: str) -> str | None:
    if _CONTROL.search(name):
        return "must not contain control characters (CR/LF)"
    if len(name) > 256:
        return "is longer than 256 characters"
    return None


def _addresses(field: str, addrs: list[messages_pb2.Address], out: list[tuple[str, str]]) -> None:
    for i, a in enumerate(addrs):
        if (why := check_address(a.email)) is not None:
            out.append((f"{field}[{i}].email", why))
        if (why := _check_name(a.name)) is not None:
            out.append((f"{field}[{i}].name", why))


Content = ingest_pb2.SendRequest | ingest_pb2.SendBlastRequest


def validate_send(req: ingest_pb2.SendRequest, cfg: IngestConfig) -> list[tuple[str, str]]:
    """Every schema violation of req as (field path, reason); empty if valid."""
    out: list[tuple[str, str]] = []
    to, cc, bcc = req.to, req.cc, req.bcc
    count = len(to) + len(cc) + len(bcc)
    if count == 0:
        out.append(("to", "at least one recipient is required in to, cc or bcc"))
    elif count > cfg.max_recipients:
        out.append(("to", f"{count} recipients; at most {cfg.max_recipients} per message"))
    for field, addrs in (("to", to), ("cc", cc), ("bcc", bcc)):
        if addrs:
            _addresses(field, list(addrs), out)
    _content(req, cfg, out)
    return out


def validate_blast_content(
    req: ingest_pb2.SendBlastRequest, cfg: IngestConfig
) -> list[tuple[str, str]]:
    """Violations of a blast's shared content (its recipients are checked separately)."""
    out: list[tuple[str, str]] = []
    _content(req, cfg, out)
    return out


def check_blast_recipient(
    i: int,
    email: Any,
    name: Any,
    substitutions: Any,
    out: list[tuple[str, str]],
) -> None:
    """One blast recipient, as decoded JSON or proto fields; problems appended to out."""
    if not isinstance(email, str):
        out.append((f"recipients[{i}].email", "must be a string"))
    elif (why := check_address(email)) is not None:
        out.append((f"recipients[{i}].email", why))
    if name:
        if not isinstance(name, str):
            out.append((f"recipients[{i}].name", "must be a string"))
        elif (why := _check_name(name)) is not None:
            out.append((f"recipients[{i}].name", why))
    if substitutions:
        if not isinstance(substitutions, dict | Mapping):
            out.append((f"recipients[{i}].substitutions", "must be a JSON object"))
            return
        for key, value in substitutions.items():
            if not isinstance(value, str):
                out.append((f"recipients[{i}].substitutions.{key}", "must be a string"))
            elif len(value) > MAX_SUBSTITUTION:
                out.append(
                    (
                        f"recipients[{i}].substitutions.{key}",
                        f"is longer than {MAX_SUBSTITUTION} characters",
                    )
                )


def _content(req: Content, cfg: IngestConfig, out: list[tuple[str, str]]) -> None:
    sender = getattr(req, "from")
    if not req.HasField("from"):
        out.append(("from", "is required"))
    else:
        if (why := check_address(sender.email)) is not None:
            out.append(("from.email", why))
        if (why := _check_name(sender.name)) is not None:
            out.append(("from.name", why))
    if req.reply_to:
        _addresses("reply_to", list(req.reply_to), out)
    # (each read of a string field makes a new str: read once)
    subject, text, html = req.subject, req.text, req.html
    if _CONTROL.search(subject):
        out.append(("subject", "must not contain control characters (CR/LF)"))
    elif len(subject) > MAX_SUBJECT:
        out.append(("subject", f"is longer than {MAX_SUBJECT} characters"))
    if not text and not html:
        out.append(("text", "text or html is required"))
    for name, value in req.headers.items() if req.headers else ():
        path = f"headers.{name}"
        if not _HEADER_NAME.match(name):
            out.append((path, "is not a valid header name"))
        elif name.lower() in RESERVED_HEADERS:
            out.append((path, "is set by Sluice and cannot be overridden"))
        if _CONTROL.search(value):
            out.append((path, "must not contain control characters (CR/LF)"))
        elif len(value) > MAX_HEADER_VALUE:
            out.append((path, f"is longer than {MAX_HEADER_VALUE} characters"))
    tags = req.tags
    if len(tags) > MAX_TAGS:
        out.append(("tags", f"at most {MAX_TAGS} tags"))
    for i, tag in enumerate(tags) if tags else ():
        if not tag or len(tag) > 128 or _CONTROL.search(tag):
            out.append((f"tags[{i}]", "must be 1-128 characters without control characters"))
    if len(req.metadata) > MAX_METADATA:
        out.append(("metadata", f"at most {MAX_METADATA} entries"))
    if req.tier not in _TIERS:
        out.append(("tier", "unknown tier"))
    # (an ASCII str's length is its UTF-8 size; isascii is a flag CPython keeps)
    size = len(subject) + sum(len(t) if t.isascii() else len(t.encode()) for t in (text, html))
    for i, att in enumerate(req.attachments) if req.attachments else ():
        path = f"attachments[{i}]"
        size += len(att.content)
        if not att.filename or _CONTROL.search(att.filename) or len(att.filename) > 255:
            out.append((f"{path}.filename", "is required: 1-255 characters, no control characters"))
        if att.content_type and not _MIME_TYPE.match(att.content_type):
            out.append((f"{path}.content_type", "is not a MIME type like application/pdf"))
        elif att.content_type.lower().startswith(_CONTAINER_TYPES):
            # Sluice base64-encodes attachments; a multipart/* or message/* part must be
            # 7bit/8bit/binary (RFC 2046 5.1, 5.2) and holds its own MIME structure.
            out.append(
                (
                    f"{path}.content_type",
                    "multipart/* and message/* cannot be attachments (send a message as "
                    "application/octet-stream)",
                )
            )
        if att.content_id and not _CONTENT_ID.match(att.content_id):
            out.append((f"{path}.content_id", "must be printable ASCII without <>, spaces"))
        if not att.content:
            out.append((f"{path}.content", "is empty"))
        elif len(att.content) > cfg.max_attachment_bytes:
            out.append(
                (f"{path}.content", f"{len(att.content)} bytes; at most {cfg.max_attachment_bytes}")
            )
    if size > cfg.max_message_bytes:
        out.append(
            (
                "attachments" if req.attachments else "html",
                f"message is {size} bytes; at most {cfg.max_message_bytes}",
            )
        )
    if req.HasField("send_at"):
        ahead = req.send_at.ToNanoseconds() / 1e9 - time.time()
        if ahead > cfg.max_schedule_ahead:
            out.append(("send_at", f"is more than {cfg.max_schedule_ahead / 3600:g} hours ahead"))
