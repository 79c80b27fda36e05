"""Reading a KV bucket completely (`kv_current`) and following it (`KvMirror`), against a real
nats-server. nats-py's own watch can report "no more values" before one still in flight
(nats-io/nats.py#842), which once made a test's suppression listing come back empty."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from sluice import config as config_mod
from sluice import names
from sluice.config import Config
from sluice.kvmirror import KvMirror, kv_current
from sluice.nats_layout import connect, ensure_layout, kv_put_ttl
from sluice.natsserver import NatsServer
from tests.conftest import wait_for


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    cfg = config_mod.replace(Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test-kvmirror")
    js = nc.jetstream()
    await ensure_layout(js, cfg)
    yield js
    await nc.close()


async def _consumers(js: JetStreamContext, bucket: str) -> int:
    return (await js.stream_info(f"KV_{bucket}")).state.consumer_count


async def test_kv_current_reads_every_live_key_and_no_removed_one(js: JetStreamContext) -> None:
    bucket = names.SUPPRESSIONS_BUCKET
    assert await kv_current(js, bucket) == {}, "an empty bucket reads as empty, at once"
    kv = await js.key_value(bucket)
    # More keys than one fetch brings, in two "tenants", some rewritten, deleted or purged.
    for i in range(2500):
        await kv.put(f"a.k{i}", b"old")
    for i in range(0, 2500, 10):
        await kv.put(f"a.k{i}", b"new")
    await kv.delete("a.k1")
    await kv.purge("a.k2")
    await kv.put("b.k1", b"other tenant")
    await kv_put_ttl(js, bucket, "a.short", b"lapses", 1)

    values = await kv_current(js, bucket, "a.*")
    assert len(values) == 2500 - 2 + 1
    assert values["a.k0"] == b"new" and values["a.k3"] == b"old" and values["a.short"] == b"lapses"
    assert "a.k1" not in values and "a.k2" not in values and "b.k1" not in values
    assert set(await kv_current(js, bucket, "b.*", keys_only=True)) == {"b.k1"}
    assert (await kv_current(js, bucket, "b.*", keys_only=True))["b.k1"] == b""

    # The server removes the TTL'd entry (no marker): it is no longer read.
    async def lapsed() -> bool:
        return "a.short" not in await kv_current(js, bucket, "a.*", keys_only=True)

    await wait_for(lapsed, 10, "the TTL'd entry to go")
    assert await _consumers(js, bucket) == 0, "each read deletes its consumer"


async def test_mirror_loads_everything_then_follows_changes(js: JetStreamContext) -> None:
    bucket = names.LANES_BUCKET
    kv = await js.key_value(bucket)
    for i in range(50):
        await kv.put(f"k{i}", str(i).encode())
    await kv.delete("k7")
    mirror = KvMirror(js, bucket)
    # Writes racing the start land either in the snapshot or in the changes after it.
    racing = asyncio.create_task(kv.put("k49", b"raced"))
    await mirror.start()
    await racing
    try:
        assert mirror.ready.is_set()
        await wait_for(lambda: mirror.values.get("k49") == b"raced", 5, "the racing write")
        assert len(mirror.values) == 49 and "k7" not in mirror.values
        assert mirror.values["k3"] == b"3"

        await kv.put("k3", b"three")
        await kv.put("new", b"n")
        await kv.delete("k4")
        await kv.purge("k5")
        await wait_for(
            lambda: (
                mirror.values.get("k3") == b"three"
                and "new" in mirror.values
                and "k4" not in mirror.values
                and "k5" not in mirror.values
            ),
            5,
            "the changes after the start",
        )
        assert len(mirror.values) == 49 + 1 - 2
    finally:
        await mirror.stop()
