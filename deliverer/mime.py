"""Message assembly: a Payload plus a pointer becomes RFC 5322 bytes."""

from __future__ import annotations

from datetime import UTC
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from sluice.v1 import messages_pb2

__all__ = ["build_message"]


def _fmt(addr: messages_pb2.Address) -> str:
    if not addr.name:
        return addr.email
    local, _, domain = addr.email.rpartition("@")
    return str(HeaderAddress(display_name=addr.name, username=local, domain=domain))


def build_message(payload: messages_pb2.Payload, pointer: messages_pb2.DeliveryPointer) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _fmt(getattr(payload, "from"))
    if payload.to:
        msg["To"] = ", ".join(_fmt(a) for a in payload.to)
    if payload.cc:
        msg["Cc"] = ", ".join(_fmt(a) for a in payload.cc)
    if payload.reply_to:
        msg["Reply-To"] = ", ".join(_fmt(a) for a in payload.reply_to)
    msg["Subject"] = payload.subject
    msg["Date"] = format_datetime(pointer.accepted_at.ToDatetime(tzinfo=UTC))
    msg["Message-ID"] = f"<{pointer.message_id}>"
    for name, value in payload.headers.items():
        msg[name] = value
    if payload.text and payload.html:
        msg.set_content(payload.text)
        msg.add_alternative(payload.html, subtype="html")
    elif payload.html:
        msg.set_content(payload.html, subtype="html")
    else:
        msg.set_content(payload.text)
    return msg.as_bytes()
