"""Batching: an endpoint with batch_size > 1 gets JSON arrays of events, each POST signed as
one body (verified with the independent `standardwebhooks` package), every event once at
least, a failed batch retried, and a batch never larger than batch_size."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from sluice.tenants import new_webhook_secret
from sluice.v1 import messages_pb2, tenant_pb2
from tests.api import add_tenant, call
from tests.conftest import Stack, wait_for
from tests.servers import start_hook_server

RECIPIENTS = 25
BATCH = 10


async def _tenant_with_endpoint(stack: Stack, url: str, secret: str, batch_size: int) -> str:
    """A tenant whose one endpoint gets delivered events in batches; returns its API key."""
    endpoint = tenant_pb2.WebhookEndpoint(
        id="b1",
        url=url,
        secrets=[secret],
        event_types=[messages_pb2.EVENT_TYPE_DELIVERED],
        batch_size=batch_size,
    )
    return await add_tenant(stack, "batchco", ["batchco.test"], webhooks=[endpoint])


def _message(recipients: int) -> dict[str, Any]:
    return {
        "from": {"email": "news@batchco.test"},
        "to": [{"email": f"user{i}@mail.test"} for i in range(recipients)],
        "subject": "hello",
        "text": "hello",
        "tier": "transactional",
    }


async def test_an_endpoint_with_batch_size_gets_signed_arrays_of_events(stack: Stack) -> None:
    secret = new_webhook_secret()
    posts: list[list[dict[str, Any]]] = []
    attempts = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal attempts
        body = await request.read()
        attempts += 1
        if attempts == 1:
            return web.Response(status=503)  # the first batch must be retried
        events = Webhook(secret).verify(body, dict(request.headers))
        assert isinstance(events, list)
        posts.append(events)
        return web.Response(status=204)

    runner, url = await start_hook_server(handler)
    try:
        key = await _tenant_with_endpoint(stack, url, secret, batch_size=BATCH)
        status, body, _ = await call(stack, "POST", "/v1/send", _message(RECIPIENTS), key=key)
        assert status == 202, body

        def delivered() -> set[str]:
            return {e["data"]["recipient"] for p in posts for e in p}

        await wait_for(
            lambda: len(delivered()) == RECIPIENTS, 60, "every delivered event in a batch"
        )
    finally:
        await runner.cleanup()
    assert attempts > len(posts), "the failed batch was not retried"
    assert all(1 <= len(p) <= BATCH for p in posts), [len(p) for p in posts]
    assert any(len(p) > 1 for p in posts), "no POST carried more than one event"
    assert {e["type"] for p in posts for e in p} == {"message.delivered"}
    assert all(e["data"]["job_id"] == body["job_id"] for p in posts for e in p)


async def test_batch_posts_to_one_endpoint_respect_its_concurrency(stack: Stack) -> None:
    secret = new_webhook_secret()
    events: list[dict[str, Any]] = []
    in_flight = most = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            body = await request.read()
            await asyncio.sleep(0.3)  # a slow endpoint: batches pile up behind it
            events.extend(Webhook(secret).verify(body, dict(request.headers)))
            return web.Response(status=204)
        finally:
            in_flight -= 1

    runner, url = await start_hook_server(handler)
    try:
        key = await _tenant_with_endpoint(stack, url, secret, batch_size=2)
        status, body, _ = await call(stack, "POST", "/v1/send", _message(RECIPIENTS), key=key)
        assert status == 202, body
        await wait_for(lambda: len(events) >= RECIPIENTS, 60, "every delivered event")
    finally:
        await runner.cleanup()
    limit = stack.cfg.webhooks.per_endpoint_concurrency
    assert 1 < most <= limit, f"{most} batch POSTs at once (limit {limit})"
    assert {e["data"]["recipient"] for e in events} == {
        f"user{i}@mail.test" for i in range(RECIPIENTS)
    }
