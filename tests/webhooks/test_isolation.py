"""One hanging endpoint never delays another endpoint's events, and never holds more than
its share of the webhook workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from sluice.tenants import new_webhook_secret
from sluice.v1 import tenant_pb2
from tests.api import add_tenant, call
from tests.conftest import Stack, wait_for
from tests.servers import start_hook_server


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {"webhooks": {"timeout": "60s", "concurrency": 8, "per_endpoint_concurrency": 2}}


class Hanging:
    def __init__(self) -> None:
        self.started = 0
        self.active = 0
        self.most_active = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.started += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(3600)
        finally:
            self.active -= 1
        return web.Response(status=204)


@pytest.fixture
async def hanging() -> AsyncIterator[tuple[Hanging, str]]:
    h = Hanging()
    runner, url = await start_hook_server(h.handle)
    yield h, url
    await runner.cleanup()


async def test_a_hanging_endpoint_does_not_delay_another(
    stack: Stack, hanging: tuple[Hanging, str]
) -> None:
    h, url = hanging
    slow_key = await add_tenant(
        stack,
        "slowco",
        ["slowco.test"],
        webhooks=[tenant_pb2.WebhookEndpoint(id="hang", url=url, secrets=[new_webhook_secret()])],
    )
    for i in range(20):
        status, _, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {"from": {"email": "a@slowco.test"}, "to": [{"email": f"s{i}@mail.test"}], "text": "x"},
            key=slow_key,
        )
        assert status == 202
    await wait_for(lambda: h.started >= 2, 30, "the hanging endpoint to be called")
    for i in range(5):
        status, _, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {"from": {"email": "a@acme.test"}, "to": [{"email": f"ok{i}@mail.test"}], "text": "x"},
        )
        assert status == 202
    await wait_for(
        lambda: len(stack.hooks.of_type("message.delivered")) >= 5,
        30,
        "the healthy endpoint's webhooks",
    )
    # Nothing from the hanging endpoint has completed, yet the other tenant's events went
    # through, and the hanging endpoint never held more than its share of workers.
    assert h.active >= 1
    assert h.most_active <= 2, h.most_active
