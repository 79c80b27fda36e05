"""Message assembly: a Payload plus a pointer becomes RFC 5322 bytes.

A `MessageTemplate` is built once per payload: every header and MIME part that does not
depend on the recipient is encoded then, so a blast's 100,000 recipients cost a byte join
each. Per recipient come the To header of a blast, Date, Message-ID, List-Unsubscribe and,
when the payload has {{name}} placeholders, the personalised subject and bodies (values are
HTML-escaped in the html part; a placeholder without a value is left empty).

The encoding is written out here rather than left to `email.message.EmailMessage`, which
spent about 1 ms per message (more than everything else the deliverer does) re-parsing the
headers it had just been given (its `Header` class, too, cost 140 us a subject). What it
produces, checked by tests that parse it back with the `email` package: CRLF line ends;
header lines folded to 78 characters where the syntax allows; ASCII header values as they
are, others as RFC 2047 encoded words of at most 75 characters (display names word by word,
ASCII words left plain); bodies 7bit when ASCII with short lines, else quoted-printable
UTF-8; attachments base64, file names that are not ASCII or too long for a line in RFC 2231
form (with continuations); multipart/alternative for text plus html, inside multipart/mixed
with attachments.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from email.utils import formataddr
from urllib.parse import quote

from sluice.v1 import messages_pb2

__all__ = [
    "MessageTemplate",
    "ascii_email",
    "build_message",
    "encoded_words",
    "render",
    "unsubscribe_link",
]

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# RFC 5322 atext: a display-name word that may stand unquoted and unencoded.
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# RFC 5322 2.1.1: lines SHOULD be at most 78 characters, MUST be at most 998.
_FOLD_AT = 78
_MAX_LINE = 998
# RFC 2045 6.7: quoted-printable lines are at most 76 characters.
_QP_LINE = 76
# What quoted-printable carries as it is (in text with LF line ends).
_QP_LITERAL = bytes(range(0x20, 0x7F)) + b"\t\n"
# RFC 2047 2: an encoded word is at most 75 characters; "B" encoding of UTF-8.
_EW_MAX = 75
_EW_PREFIX = "=?utf-8?b?"
_EW_OVERHEAD = len(_EW_PREFIX) + len("?=")
# Room for a 4-byte character: 8 base64 characters.
_EW_MIN = _EW_OVERHEAD + 8
# RFC 2231 attribute-char: letters, digits and these; everything else is %XX.
_ATTR_SAFE = "!#$&+-.^_`|~"


def render(template: str, values: Mapping[str, str], escape: bool = False) -> str:
    if "{{" not in template:
        return template

    def value(m: re.Match[str]) -> str:
        v = values.get(m.group(1), "")
        return html.escape(v) if escape else v

    return _PLACEHOLDER.sub(value, template)


def unsubscribe_link(template: str, pointer: messages_pb2.DeliveryPointer) -> str:
    """The tenant's unsubscribe URL for this recipient: {{recipient}} and {{message_id}}
    are filled in URL-encoded; without placeholders they are appended as query parameters."""
    values = {
        "recipient": quote(pointer.recipient, safe=""),
        "message_id": quote(pointer.message_id, safe=""),
    }
    if "{{" in template:
        return render(template, values)
    sep = "&" if "?" in template else "?"
    return f"{template}{sep}recipient={values['recipient']}&message_id={values['message_id']}"


# -- headers ---------------------------------------------------------------------------------


def _clean(value: str) -> str:
    """No CR or LF may reach a header value (ingest refuses them; this is the backstop)."""
    return value.replace("\r", " ").replace("\n", " ") if "\r" in value or "\n" in value else value


def encoded_words(text: str, first: int = _EW_MAX) -> list[str]:
    """`text` as RFC 2047 encoded words ("B", UTF-8) of at most 75 characters, each holding
    whole characters (RFC 2047 5: a character is never split between words); the first at
    most `first` characters (the room left on a header's first line, at least 20). Adjacent
    encoded words decode as one text: the white space that separates them is dropped."""
    data = text.encode()
    words: list[str] = []
    room = max(min(first, _EW_MAX), _EW_MIN)
    start, end = 0, len(data)
    while start < end:
        stop = start + (room - _EW_OVERHEAD) // 4 * 3
        if stop >= end:
            stop = end
        else:
            # Cut after a space in the second half of the chunk if there is one (readers
            # that wrongly keep the space between encoded words then show two spaces, not a
            # word cut in two), else at a character's first byte.
            space = data.rfind(b" ", (start + stop) // 2, stop)
            if space >= 0:
                stop = space + 1
            else:
                while data[stop] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                    stop -= 1
        words.append(_EW_PREFIX + base64.b64encode(data[start:stop]).decode("ascii") + "?=")
        start, room = stop, _EW_MAX
    return words


def _fold(name: str, tokens: Iterable[str]) -> bytes:
    """A header field of space-separated tokens, CRLF-terminated, folded before a token
    that would take the line past 78 characters. Unfolding takes out the CRLF only, so the
    space that starts a folded line is the one that stood between the tokens."""
    lines: list[str] = []
    current = f"{name}:"
    for token in tokens:
        # Never fold before the first token, nor before an empty one: a line of white
        # space alone is not allowed.
        if token and len(current) + 1 + len(token) > _FOLD_AT and current != f"{name}:":
            lines.append(current)
            current = " " + token
        else:
            current += " " + token
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode()


def _first_room(name: str) -> int:
    """How long the first token of a header may be to stay on its first line."""
    return _FOLD_AT - len(name) - 2


def header(name: str, value: str, sep: str = " ") -> bytes:
    """One header field, CRLF-terminated: folded at `sep` (", " for address lists) when
    longer than 78 characters; non-ASCII values as RFC 2047 encoded words."""
    value = _clean(value)
    if not value.isascii():
        return _fold(name, encoded_words(value, _first_room(name)))
    line = f"{name}: {value}"
    if len(line) <= _FOLD_AT:
        return f"{line}\r\n".encode()
    if sep == ", ":  # fold after the commas of an address list
        words = value.split(", ")
        tokens = [w + "," for w in words[:-1]] + [words[-1]]
    else:
        tokens = value.split(" ")
    if max(map(len, tokens)) + 1 > _MAX_LINE:
        # A word too long to fold (a long URL, say): encoded words can be split anywhere.
        return _fold(name, encoded_words(value, _first_room(name)))
    return _fold(name, tokens)


def ascii_email(email: str) -> str:
    """The address with its domain as IDNA A-labels ("bücher.example" becomes
    "xn--bcher-kva.example"): ingest accepts internationalised domains, but without SMTPUTF8
    the envelope and the headers carry only ASCII (local parts are ASCII already)."""
    if email.isascii():
        return email
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.encode('idna').decode('ascii')}"


def _phrase(name: str, first: int) -> list[str]:
    """A non-ASCII display name as phrase tokens: words of plain atext as they are, each run
    of other words as encoded words holding the spaces between them (the first at most
    `first` characters). The space between an encoded word and a plain one is kept by every
    reader; the one between two encoded words is dropped by RFC 2047 6.2 readers but kept
    by some (Python's address parser before gh-128110), so fewer of those is better."""
    words = name.split(" ")
    if words != name.split():  # other white space, or not single spaces: one run
        return encoded_words(name, first)
    tokens: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:  # "" ends the last run
        if word and _ATOM.fullmatch(word) and "=?" not in word:
            if run:
                tokens.extend(encoded_words(" ".join(run), _EW_MAX if tokens else first))
                run.clear()
            tokens.append(word)
        elif word:
            run.append(word)
    if run:
        tokens.extend(encoded_words(" ".join(run), _EW_MAX if tokens else first))
    return tokens


def _address_tokens(addr: messages_pb2.Address, first: int) -> list[str]:
    """An address as a header shows it, "Name <local@domain>", as tokens the header may be
    folded between: a non-ASCII name as a phrase of encoded and plain words (the first at
    most `first` characters), an ASCII one quoted as needed."""
    email = ascii_email(addr.email)
    name = _clean(addr.name)
    if not name:
        return [email]
    if name.isascii():
        return formataddr((name, email)).split(" ")
    return [*_phrase(name, first), f"<{email}>"]


def address_header(name: str, addrs: Iterable[messages_pb2.Address]) -> bytes:
    """An address-list header field (From, To, Cc, Reply-To), folded between its tokens."""
    if len(addrs := list(addrs)) == 1 and not (addr := addrs[0]).name:
        # One bare address, the usual From and a blast's To: no tokens to fold between.
        return f"{name}: {ascii_email(addr.email)}\r\n".encode()
    tokens: list[str] = []
    for addr in addrs:
        if tokens:
            tokens[-1] += ","
        room = _first_room(name) if not tokens else _EW_MAX
        tokens.extend(_address_tokens(addr, room))
    return _fold(name, tokens)


@functools.lru_cache(maxsize=256)  # (messages accepted in the same second share it)
def _date(seconds: int) -> str:
    """RFC 5322 date-time in UTC, independent of the locale."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def _param(attribute: str, value: str) -> list[str]:
    """A MIME parameter as header tokens (each to stand on a line of its own if need be):
    a quoted string when ASCII and short; else RFC 2231, `name*=utf-8''%XX...`, split into
    `name*0*=`, `name*1*=`, ... continuations of whole characters when longer than a line."""
    value = _clean(value)
    if value.isascii():
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(attribute) + len(quoted) + 3 <= _FOLD_AT:  # " name=...;"
            return [f"{attribute}={quoted}"]
    single = f"{attribute}*=utf-8''{quote(value, safe=_ATTR_SAFE)}"
    if len(single) + 2 <= _FOLD_AT:
        return [single]
    # Each section is decoded on its own (Python's email does so), so none splits a
    # character; a section's line is " name*N*=...;".
    sections: list[str] = []
    current = f"{attribute}*0*=utf-8''"
    for char in value:
        piece = quote(char, safe=_ATTR_SAFE)
        if len(current) + len(piece) + 2 > _FOLD_AT:
            sections.append(current)
            current = f"{attribute}*{len(sections)}*="
        current += piece
    sections.append(current)
    return sections


def _content_header(name: str, value: str, params: list[tuple[str, str]]) -> bytes:
    """A Content-Type or Content-Disposition field with its parameters, folded."""
    tokens = [value]
    for attribute, v in params:
        for token in _param(attribute, v):
            tokens[-1] += ";"
            tokens.append(token)
    return _fold(name, tokens)


# -- bodies ----------------------------------------------------------------------------------


def _text_part(content: str, subtype: str) -> bytes:
    """A text part (its headers, a blank line, the body): 7bit when ASCII with short
    lines, else quoted-printable UTF-8 (lines of at most 76 characters)."""
    lf = content.replace("\r\n", "\n").replace("\r", "\n") if "\r" in content else content
    if not lf.endswith("\n"):
        lf += "\n"
    if lf.isascii() and max(map(len, lf.split("\n"))) <= _MAX_LINE:
        cte, body = "7bit", lf.encode().replace(b"\n", b"\r\n")
    else:
        cte, body = "quoted-printable", _quoted_printable(lf)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode() + body


def _quoted_printable(lf: str) -> bytes:
    """Text with LF line ends as UTF-8 quoted-printable (RFC 2045 6.7) with CRLF line ends.
    Printable ASCII (tabs too) is done here: "=" and white space at a line's end escaped,
    lines longer than 76 characters cut with soft line breaks, never inside an escape, in a
    fraction of the time binascii.b2a_qp takes (it looks at every character one by one);
    other text (not ASCII, or with control characters) goes to b2a_qp."""
    data = lf.encode()
    if data.translate(None, _QP_LITERAL):  # something other than printable ASCII, tab, LF
        return binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
    out: list[bytes] = []
    for line in data.split(b"\n"):
        if b"=" in line:
            line = line.replace(b"=", b"=3D")
        if line.endswith(b" "):
            line = line[:-1] + b"=20"
        elif line.endswith(b"\t"):
            line = line[:-1] + b"=09"
        if len(line) <= _QP_LINE:
            out.append(line)
        elif b"=" not in line:  # no escape to keep whole: cut every 75 characters
            step = _QP_LINE - 1
            out.append(b"=\r\n".join([line[i : i + step] for i in range(0, len(line), step)]))
        else:
            while len(line) > _QP_LINE:
                cut = _QP_LINE - 1  # and the "=" of the soft line break
                if line[cut - 1 : cut] == b"=":
                    cut -= 1
                elif line[cut - 2 : cut - 1] == b"=":
                    cut -= 2
                out.append(line[:cut] + b"=")
                line = line[cut:]
            out.append(line)
    return b"\r\n".join(out)


def _attachment(att: messages_pb2.Attachment) -> bytes:
    ctype = _clean(att.content_type or "application/octet-stream")
    disposition = "inline" if att.content_id else "attachment"
    names = [("name", att.filename)] if att.filename else []
    filenames = [("filename", att.filename)] if att.filename else []
    head = [
        _content_header("Content-Type", ctype, names),
        _content_header("Content-Disposition", disposition, filenames),
    ]
    if att.content_id:
        head.append(f"Content-ID: <{_clean(att.content_id)}>\r\n".encode())
    head.append(b"Content-Transfer-Encoding: base64\r\n\r\n")
    return b"".join(head) + base64.encodebytes(att.content).replace(b"\n", b"\r\n")


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    while True:
        boundary = f"===============sluice{secrets.token_hex(12)}=="
        marker = boundary.encode()
        if not any(marker in p for p in parts):
            break
    out = [f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'.encode()]
    for p in parts:
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1), so each
        # part keeps its own final line end.
        out.append(b"--" + marker + b"\r\n" + p + b"\r\n")
    out.append(b"--" + marker + b"--\r\n")
    return b"".join(out)


# -- the template ----------------------------------------------------------------------------


class MessageTemplate:
    """The recipient-independent part of a payload's message, encoded once."""

    def __init__(self, payload: messages_pb2.Payload, unsubscribe_url: str = "") -> None:
        self._unsubscribe = unsubscribe_url
        # RFC 8058 one-click needs an HTTPS URI (a mailto or http one gets no -Post header).
        self._one_click = unsubscribe_url[:6].lower() == "https:"
        # (each read of a string field makes a new str: read once)
        self._subject = subject = payload.subject
        self._text = text = payload.text
        self._html = html_ = payload.html
        self._personal = "{{" in subject or "{{" in text or "{{" in html_
        self._blast = not payload.to and not payload.cc  # each recipient addressed alone
        head = [address_header("From", [getattr(payload, "from")])]
        if payload.to:
            head.append(address_header("To", payload.to))
        if payload.cc:
            head.append(address_header("Cc", payload.cc))
        if payload.reply_to:
            head.append(address_header("Reply-To", payload.reply_to))
        self._head = b"".join(head)
        headers, attachments = payload.headers, payload.attachments
        self._extra = b"".join(header(n, v) for n, v in headers.items()) if headers else b""
        self._attachments = [_attachment(a) for a in attachments] if attachments else []
        self._subject_line = b"" if self._personal else header("Subject", subject)
        self._mime = b"" if self._personal else self._body({})

    def _body(self, subs: Mapping[str, str]) -> bytes:
        """MIME-Version, the content headers and the body."""
        text = render(self._text, subs)
        body_html = render(self._html, subs, escape=True)
        if text and body_html:
            content = _multipart(
                "alternative", [_text_part(text, "plain"), _text_part(body_html, "html")]
            )
        elif body_html:
            content = _text_part(body_html, "html")
        else:
            content = _text_part(text, "plain")
        if self._attachments:
            content = _multipart("mixed", [content, *self._attachments])
        return b"MIME-Version: 1.0\r\n" + content

    def render(self, pointer: messages_pb2.DeliveryPointer) -> bytes:
        """The message for one recipient. With an unsubscribe URL (bulk mail of a tenant that
        has one), List-Unsubscribe and, for an https one, RFC 8058 one-click
        List-Unsubscribe-Post are added."""
        out = [self._head]
        if self._blast:
            out.append(
                address_header(
                    "To",
                    [messages_pb2.Address(email=pointer.recipient, name=pointer.recipient_name)],
                )
            )
        subs = pointer.substitutions
        out.append(header("Subject", render(self._subject, subs)) if self._personal else b"")
        out.append(self._subject_line)
        out.append(f"Date: {_date(pointer.accepted_at.seconds)}\r\n".encode())
        out.append(f"Message-ID: <{pointer.message_id}>\r\n".encode())
        out.append(self._extra)
        if self._unsubscribe:
            # RFC 2369 allows no white space inside the brackets, so no folding: a link too
            # long for one line is left out rather than sent broken (tenants' URLs are
            # bounded; only very long addresses or message ids get here).
            line = f"List-Unsubscribe: <{_clean(unsubscribe_link(self._unsubscribe, pointer))}>"
            if len(line) <= _MAX_LINE:
                out.append(f"{line}\r\n".encode())
                if self._one_click:
                    out.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
            else:
                log.warning(
                    "List-Unsubscribe left out of %s: %d characters", pointer.message_id, len(line)
                )
        out.append(self._body(subs) if self._personal else self._mime)
        return b"".join(out)


def build_message(
    payload: messages_pb2.Payload,
    pointer: messages_pb2.DeliveryPointer,
    unsubscribe_url: str = "",
) -> bytes:
    """RFC 5322 bytes for one recipient (a template used once; see MessageTemplate)."""
    return MessageTemplate(payload, unsubscribe_url).render(pointer)
