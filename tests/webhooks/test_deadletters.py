"""A webhook delivery that keeps failing is dead-lettered at the horizon, listed by
`sluice dlq webhooks`, and delivered (signed) once replayed to a healthy endpoint."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from sluice.tenants import new_webhook_secret
from sluice.v1 import messages_pb2, tenant_pb2
from tests.api import add_tenant, call, sluice_cli
from tests.conftest import Stack, wait_for
from tests.servers import start_hook_server


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"webhooks": {"ladder": ["200ms"], "horizon": "2s"}}


class Flaky:
    def __init__(self) -> None:
        self.healthy = False
        self.failures = 0
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        if not self.healthy:
            self.failures += 1
            return web.Response(status=503)
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    f = Flaky()
    runner, url = await start_hook_server(f.handle)
    yield f, url
    await runner.cleanup()


def _sluice(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return sluice_cli(stack.cfg.nats.url, *args)


async def test_failing_webhook_is_dead_lettered_and_replayable(
    stack: Stack, flaky: tuple[Flaky, str]
) -> None:
    f, url = flaky
    secret = new_webhook_secret()
    key = await add_tenant(
        stack,
        "flaky",
        ["flaky.test"],
        webhooks=[
            tenant_pb2.WebhookEndpoint(
                id="main",
                url=url,
                secrets=[secret],
                event_types=[messages_pb2.EVENT_TYPE_DELIVERED],
            )
        ],
    )
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        {"from": {"email": "a@flaky.test"}, "to": [{"email": "x@mail.test"}], "text": "x"},
        key=key,
    )
    assert status == 202

    async def dead() -> list[str]:
        out = await asyncio.to_thread(_sluice, stack, "dlq", "webhooks", "--tenant", "flaky")
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    (line,) = await wait_for(dead, 30, "the webhook dead letter")
    dead_id, endpoint_id, event_id, event_type = line.split("\t")
    assert (endpoint_id, event_type) == ("main", "delivered")
    assert f.failures >= 2, "it was not retried before being dead-lettered"
    failures = f.failures
    await asyncio.sleep(0.6)
    assert f.failures == failures, "retried after it was dead-lettered"
    f.healthy = True
    out = await asyncio.to_thread(
        _sluice, stack, "dlq", "webhooks", "--tenant", "flaky", "--replay", dead_id
    )
    assert out.returncode == 0, out.stderr
    await wait_for(lambda: f.received, 20, "the replayed webhook")
    headers, payload = f.received[0]
    verified = Webhook(secret).verify(payload, headers)
    assert verified["data"]["event_id"] == event_id == headers["webhook-id"]
    assert json.loads(payload)["data"]["message_id"] == body["message_id"]
    assert await dead() == [], "the replayed dead letter is still listed"
