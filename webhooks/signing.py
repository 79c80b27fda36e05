"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

Signed content is "<webhook-id>.<webhook-timestamp>.<body>"; the signature is
"v1,<base64 HMAC-SHA256>" keyed with the base64 part of a "whsec_" secret. During a secret
rotation every listed secret signs, space-separated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["sign", "signature_headers"]


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secrets: list[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets),
    }
