"""Our signatures verify with the independent standardwebhooks implementation."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sluice.tenants import new_webhook_secret
from webhooks.signing import signature_headers


def test_signature_verifies_and_rotation_lists_both() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    body = b'{"type":"message.bounced","data":{}}'
    headers = signature_headers([new, old], "evt_1", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "message.bounced", "data": {}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(body, headers)
