"""The payload stores against real servers: nats-server's object store and moto's S3 server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest

from sluice import config as config_mod
from sluice.config import StoreConfig
from sluice.nats_layout import connect
from sluice.natsserver import NatsServer, free_ports
from sluice.store import PayloadNotFound, S3ObjectStore, StoreError, open_store
from tests.api import call
from tests.conftest import Stack, wait_for

BUCKET = "sluice-payloads"


@dataclass
class S3Server:
    endpoint: str

    def store_config(self, **overrides: Any) -> StoreConfig:
        values: dict[str, Any] = {
            "url": f"s3://{BUCKET}",
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
            "s3_path_style": True,
            **overrides,
        }
        return config_mod.replace(config_mod.Config(), store=values).store


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone S3-compatible server in its own process, with one bucket."""
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_s3_put_get_roundtrip(s3_server: S3Server) -> None:
    cfg = s3_server.store_config()
    store = S3ObjectStore(
        BUCKET,
        endpoint_url=cfg.s3_endpoint_url,
        access_key_id=cfg.s3_access_key_id,
        secret_access_key=cfg.s3_secret_access_key,
        path_style=True,
    )
    try:
        data = bytes(range(256)) * 1000
        uri = await store.put("job_abc", data)
        assert uri == f"s3://{BUCKET}/job_abc"
        assert await store.get(uri) == data
        # Keys with dots and a recipients suffix, as ingest writes them.
        uri2 = await store.put("job_abc.recipients", b"[]")
        assert await store.get(uri2) == b"[]"
        await store.delete(uri)
        with pytest.raises(PayloadNotFound):
            await store.get(uri)
        await store.delete(uri)  # already gone: no error
    finally:
        await store.close()


async def test_s3_missing_key_and_bucket(s3_server: S3Server) -> None:
    store = open_store(s3_server.store_config(), js=None)  # type: ignore[arg-type]
    try:
        with pytest.raises(PayloadNotFound) as missing:
            await store.get(f"s3://{BUCKET}/never-written")
        assert missing.value.args == (f"s3://{BUCKET}/never-written",)
        with pytest.raises(StoreError, match="bucket does not exist") as no_bucket:
            await store.get("s3://no-such-bucket/x")
        assert not isinstance(no_bucket.value, PayloadNotFound)
    finally:
        await store.close()


async def test_s3_wrong_endpoint_is_a_clear_store_error() -> None:
    (port,) = free_ports(1)  # nothing listens here
    endpoint = f"http://127.0.0.1:{port}"
    cfg = config_mod.replace(
        config_mod.Config(),
        store={
            "url": f"s3://{BUCKET}",
            "s3_endpoint_url": endpoint,
            "s3_access_key_id": "k",
            "s3_secret_access_key": "s",
        },
    ).store
    store = open_store(cfg, js=None)  # type: ignore[arg-type]
    try:
        with pytest.raises(StoreError, match=f"cannot reach {endpoint}") as put_err:
            await store.put("job_x", b"x")
        assert not isinstance(put_err.value, PayloadNotFound)
        assert put_err.value.__cause__ is not None  # raised from the library's error
        with pytest.raises(StoreError, match=f"cannot reach {endpoint}"):
            await store.get(f"s3://{BUCKET}/job_x")
    finally:
        await store.close()


def test_unsupported_store_url() -> None:
    for url in ("file:///tmp/x", "s3://", "nats-os://bucket/extra"):
        cfg = config_mod.replace(config_mod.Config(), store={"url": url}).store
        with pytest.raises(StoreError, match="unsupported"):
            open_store(cfg, js=None)  # type: ignore[arg-type]


async def test_reads_follow_the_uri_across_a_store_switch(
    s3_server: S3Server, nats_server: NatsServer
) -> None:
    """Payloads written before a switch (either way) stay readable by their URI."""
    cfg = config_mod.replace(config_mod.Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test")
    js = nc.jetstream()
    nats_cfg = s3_server.store_config(url="nats-os://sluice_payloads")
    s3_cfg = s3_server.store_config()
    on_nats = open_store(nats_cfg, js)
    on_s3 = open_store(s3_cfg, js)
    try:
        nats_uri = await on_nats.put("job_1", b"written to nats")
        s3_uri = await on_s3.put("job_2", b"written to s3")
        assert nats_uri == "nats-os://sluice_payloads/job_1"
        assert s3_uri == f"s3://{BUCKET}/job_2"
        assert await on_s3.get(nats_uri) == b"written to nats"
        assert await on_nats.get(s3_uri) == b"written to s3"
        with pytest.raises(PayloadNotFound):
            await on_s3.get("nats-os://sluice_payloads/job_missing")
        # A bucket nobody writes to is not created by a read.
        with pytest.raises(PayloadNotFound):
            await on_s3.get("nats-os://other_bucket/job_1")
        assert "other_bucket" not in [b async for b in _object_buckets(js)]
        await on_s3.delete(nats_uri)
        with pytest.raises(PayloadNotFound):
            await on_nats.get(nats_uri)
    finally:
        await on_nats.close()
        await on_s3.close()
        await nc.close()


async def _object_buckets(js: Any) -> Any:
    for info in await js.streams_info():
        if info.config.name.startswith("OBJ_"):
            yield info.config.name.removeprefix("OBJ_")


async def test_nats_bucket_gets_the_configured_max_age(nats_server: NatsServer) -> None:
    cfg = config_mod.replace(config_mod.Config(), nats={"url": nats_server.url})
    nc = await connect(cfg, "test")
    js = nc.jetstream()
    try:
        first = open_store(
            config_mod.replace(cfg, store={"max_age": "10d"}).store, js, cfg.nats.replicas
        )
        await first.put("job_1", b"x")
        assert (await js.stream_info("OBJ_sluice_payloads")).config.max_age == 10 * 86400
        # A later version (or operator) with another max_age brings the bucket to it.
        second = open_store(config_mod.replace(cfg, store={"max_age": "2h"}).store, js)
        await second.put("job_2", b"y")
        assert (await js.stream_info("OBJ_sluice_payloads")).config.max_age == 7200
        assert await second.get("nats-os://sluice_payloads/job_1") == b"x"
    finally:
        await nc.close()


@pytest.fixture
def stack_overrides(s3_server: S3Server) -> dict[str, dict[str, Any]]:
    """The e2e stack of tests/conftest.py with payloads in S3."""
    cfg = s3_server.store_config()
    return {
        "store": {
            "url": cfg.url,
            "s3_endpoint_url": cfg.s3_endpoint_url,
            "s3_access_key_id": cfg.s3_access_key_id,
            "s3_secret_access_key": cfg.s3_secret_access_key,
            "s3_path_style": True,
        }
    }


async def test_message_is_delivered_with_payloads_in_s3(stack: Stack, s3_server: S3Server) -> None:
    body = {
        "from": {"email": "alerts@acme.test"},
        "to": [{"email": "bob@mail.test"}],
        "subject": "Stored in S3",
        "text": "The payload went through moto.",
        "tier": "critical",
    }
    status, sent, _ = await call(stack, "POST", "/v1/send", body)
    assert status == 202, sent
    job_id = sent["job_id"]
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="delivery")
    received = stack.smtp.to("bob@mail.test")
    assert len(received) == 1
    assert received[0].message["Subject"] == "Stored in S3"
    assert received[0].message.get_content().strip() == "The payload went through moto."
    # The payload is in the S3 bucket, not in the NATS object store.
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert job_id in keys
    nc = await connect(stack.cfg, "test")
    try:
        assert "sluice_payloads" not in [b async for b in _object_buckets(nc.jetstream())]
    finally:
        await nc.close()
