"""Small helpers for tests that talk to a running stack."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import Any

import aiohttp

from sluice.nats_layout import connect
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import messages_pb2, tenant_pb2
from tests.conftest import Stack


async def call(
    stack: Stack,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = "default",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, Any, Any]:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {stack.api_key if key == 'default' else key}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            f"{stack.http}{path}",
            json=body if data is None else None,
            data=io.BytesIO(data) if data is not None else None,
            headers=h,
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None), resp.headers


async def add_tenant(
    stack: Stack,
    tenant_id: str,
    domains: list[str],
    rate_limit: int = 0,
    tiers: list[messages_pb2.Tier.ValueType] | None = None,
    webhooks: list[tenant_pb2.WebhookEndpoint] | None = None,
) -> str:
    """Create a tenant (with these webhook endpoints) and return a fresh API key for it."""
    nc = await connect(stack.cfg, "test-tenants")
    try:
        store = TenantStore(nc.jetstream())
        await store.put_tenant(
            tenant_pb2.Tenant(
                tenant_id=tenant_id,
                allowed_from_domains=domains,
                rate_limit=rate_limit,
                created_at=now_ts(),
                webhooks=webhooks or [],
            )
        )
        key, _ = await store.create_key(tenant_id, tiers)
        return key
    finally:
        await nc.close()


async def stream_messages(stack: Stack, stream: str) -> int:
    nc = await connect(stack.cfg, "test")
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


def violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    for d in body.get("details", []):
        if d.get("@type", "").endswith("BadRequest"):
            return [(v["field"], v["description"]) for v in d["field_violations"]]
    return []


def reason(body: dict[str, Any]) -> str:
    return str(body["details"][0]["reason"])


async def blast(
    stack: Stack,
    emails: list[str],
    tier: str = "bulk",
    key: str = "default",
    sender: str = "news@acme.test",
) -> None:
    """A small blast to these addresses; it must be accepted."""
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/blasts",
        {
            "from": {"email": sender},
            "subject": "s",
            "text": "t",
            "tier": tier,
            "recipients": [{"email": e} for e in emails],
        },
        key=key,
    )
    assert status == 202, body


def sluice_cli(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `sluice` CLI against a NATS server, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "--log-level", "WARNING", *args],
        env=dict(os.environ, SLUICE_NATS__URL=nats_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
