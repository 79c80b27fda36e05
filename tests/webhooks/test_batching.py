"""Batching: an endpoint with batch_size > 1 gets JSON arrays of events, each POST signed as
one body (verified with the independent `standardwebhooks` package), every event once at
least, a failed batch retried, and a batch never larger than batch_size."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from sluice.nats_layout import connect
from sluice.tenants import TenantStore, new_webhook_secret, now_ts
from sluice.v1 import messages_pb2, tenant_pb2
from tests.api import call
from tests.conftest import Stack, wait_for
from tests.servers import start_hook_server

RECIPIENTS = 25
BATCH = 10


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
        nc = await connect(stack.cfg, "test")
        store = TenantStore(nc.jetstream())
        await store.put_tenant(
            tenant_pb2.Tenant(
                tenant_id="batchco",
                allowed_from_domains=["batchco.test"],
                created_at=now_ts(),
                webhooks=[
                    tenant_pb2.WebhookEndpoint(
                        id="b1",
                        url=url,
                        secrets=[secret],
                        event_types=[messages_pb2.EVENT_TYPE_DELIVERED],
                        batch_size=BATCH,
                    )
                ],
            )
        )
        key, _ = await store.create_key("batchco")
        await nc.close()
        status, body, _ = await call(
            stack,
            "POST",
            "/v1/send",
            {
                "from": {"email": "news@batchco.test"},
                "to": [{"email": f"user{i}@mail.test"} for i in range(RECIPIENTS)],
                "subject": "hello",
                "text": "hello",
                "tier": "transactional",
            },
            key=key,
        )
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
