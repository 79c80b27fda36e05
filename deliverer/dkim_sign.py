"""DKIM signing (RFC 6376) with dkimpy, per sending domain, from keys kept on the tenant.

Relaxed/relaxed canonicalisation (robust to the header folding relays do) and rsa-sha256;
the signed headers are the ones receivers check (From, To, Subject, Date, Message-ID, …).
dkimpy errors become `DkimError` — a message is then sent unsigned rather than not at all,
and the failure is logged.
"""

from __future__ import annotations

import dkim

from sluice.v1 import tenant_pb2

__all__ = ["DkimError", "sign"]

_HEADERS = [
    b"from",
    b"to",
    b"cc",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
]


class DkimError(Exception):
    """The message could not be signed."""


def key_for(tenant: tenant_pb2.Tenant | None, from_domain: str) -> tenant_pb2.DkimKey | None:
    if tenant is None:
        return None
    for key in tenant.dkim_keys:
        if key.domain.lower() == from_domain:
            return key
    return None


def sign(message: bytes, key: tenant_pb2.DkimKey) -> bytes:
    """The message with a DKIM-Signature header prepended."""
    try:
        header = dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            key.private_key_pem.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=_HEADERS,
        )
    except Exception as exc:  # dkimpy raises several unrelated types
        raise DkimError(f"DKIM signing for {key.domain} failed: {exc}") from exc
    return bytes(header) + message
