"""Message assembly: a Payload plus a pointer becomes RFC 5322 bytes.

Blast personalisation happens here: {{name}} placeholders in the subject, text and html take
the recipient's substitution values (HTML-escaped in the html part); a placeholder without
a value is left empty.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from datetime import UTC
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from urllib.parse import quote

from sluice.v1 import messages_pb2

__all__ = ["build_message", "render"]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")


def render(template: str, values: Mapping[str, str], escape: bool = False) -> str:
    if "{{" not in template:
        return template

    def value(m: re.Match[str]) -> str:
        v = values.get(m.group(1), "")
        return html.escape(v) if escape else v

    return _PLACEHOLDER.sub(value, template)


def _fmt(addr: messages_pb2.Address) -> str:
    if not addr.name:
        return addr.email
    local, _, domain = addr.email.rpartition("@")
    return str(HeaderAddress(display_name=addr.name, username=local, domain=domain))


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


def build_message(
    payload: messages_pb2.Payload,
    pointer: messages_pb2.DeliveryPointer,
    unsubscribe_url: str = "",
) -> bytes:
    """RFC 5322 bytes for one recipient. With an unsubscribe URL (bulk mail of a tenant that
    has one), List-Unsubscribe and RFC 8058 one-click List-Unsubscribe-Post are added."""
    subs = pointer.substitutions
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _fmt(getattr(payload, "from"))
    if payload.to:
        msg["To"] = ", ".join(_fmt(a) for a in payload.to)
    elif not payload.cc:  # a blast: each recipient is addressed alone
        msg["To"] = _fmt(messages_pb2.Address(email=pointer.recipient, name=pointer.recipient_name))
    if payload.cc:
        msg["Cc"] = ", ".join(_fmt(a) for a in payload.cc)
    if payload.reply_to:
        msg["Reply-To"] = ", ".join(_fmt(a) for a in payload.reply_to)
    msg["Subject"] = render(payload.subject, subs)
    msg["Date"] = format_datetime(pointer.accepted_at.ToDatetime(tzinfo=UTC))
    msg["Message-ID"] = f"<{pointer.message_id}>"
    for name, value in payload.headers.items():
        msg[name] = value
    if unsubscribe_url:
        msg["List-Unsubscribe"] = f"<{unsubscribe_link(unsubscribe_url, pointer)}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text = render(payload.text, subs)
    body_html = render(payload.html, subs, escape=True)
    if text and body_html:
        msg.set_content(text)
        msg.add_alternative(body_html, subtype="html")
    elif body_html:
        msg.set_content(body_html, subtype="html")
    else:
        msg.set_content(text)
    for att in payload.attachments:
        maintype, _, subtype = (att.content_type or "application/octet-stream").partition("/")
        if att.content_id:
            msg.add_attachment(
                att.content,
                maintype=maintype,
                subtype=subtype,
                filename=att.filename,
                cid=f"<{att.content_id}>",
                disposition="inline",
            )
        else:
            msg.add_attachment(
                att.content, maintype=maintype, subtype=subtype, filename=att.filename
            )
    return msg.as_bytes()
