"""The Python SDK against a real stack: typed errors, automatic retry with the same
idempotency key across a NATS outage, blasts, status, the streaming sender, the sync client."""

from __future__ import annotations

import asyncio

import pytest

from sluice.client import (
    AsyncClient,
    Client,
    InvalidRequest,
    PermissionDenied,
    SluiceError,
    build_send,
)
from tests.conftest import Stack, wait_for


async def test_send_blast_status_and_typed_errors(stack: Stack) -> None:
    async with AsyncClient(stack.cfg.ingest.grpc_listen, stack.api_key) as client:
        sent = await client.send(
            from_=("app@acme.test", "App"),
            to=["bob@mail.test"],
            subject="sdk",
            text="hello",
            tier="critical",
        )
        assert sent.message_id.endswith("@acme.test")
        blast = await client.send_blast(
            from_="news@acme.test",
            subject="Hi {{n}}",
            text="x",
            recipients=[
                {"email": f"b{i}@mail.test", "substitutions": {"n": str(i)}} for i in range(3)
            ],
        )
        assert blast.recipient_count == 3
        with pytest.raises(InvalidRequest) as bad:
            await client.send(from_="app@acme.test", to=["nope"], text="x")
        assert bad.value.violations == [
            ("to[0].email", "must be an address of the form local@domain")
        ]
        with pytest.raises(PermissionDenied) as denied:
            await client.send(from_="app@evil.test", to=["bob@mail.test"], text="x")
        assert denied.value.reason == "FROM_DOMAIN_NOT_ALLOWED"
        await wait_for(lambda: len(stack.smtp.received) == 4, what="4 messages")

        async def delivered() -> bool:
            status = await client.get_message(sent.message_id)
            return status.state == 2  # MESSAGE_STATE_DELIVERED

        await wait_for(delivered, what="status delivered")


async def test_retries_across_a_nats_outage_without_duplicates(stack: Stack) -> None:
    async with AsyncClient(stack.cfg.ingest.grpc_listen, stack.api_key, retries=20) as client:
        stack.nats.stop()
        task = asyncio.create_task(
            client.send(
                from_="app@acme.test",
                to=["bob@mail.test"],
                subject="retried",
                text="x",
                request_id="retry-me",
            )
        )
        await asyncio.sleep(1.0)
        assert not task.done(), "the send should be retrying while NATS is down"
        stack.nats.start()
        sent = await asyncio.wait_for(task, 60)
        again = await client.send(
            from_="app@acme.test",
            to=["bob@mail.test"],
            subject="retried",
            text="x",
            request_id="retry-me",
        )
        assert again.job_id == sent.job_id
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), 60, "the retried send")
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to("bob@mail.test")) == 1


async def test_streaming_sender(stack: Stack) -> None:
    async with AsyncClient(stack.cfg.ingest.grpc_listen, stack.api_key) as client:
        async with client.stream(window=50) as sender:
            futures = [
                await sender.send(
                    from_="app@acme.test", to=[f"s{i}@mail.test"], subject=f"s{i}", text="x"
                )
                for i in range(200)
            ]
            bad = await sender.send(from_="app@acme.test", to=["broken"], text="x")
            # One request object changed and sent again: each send goes as it was then.
            reused = build_send("app@acme.test", ["r0@mail.test"], subject="r", text="x")
            for i in range(3):
                reused.to[0].email = f"r{i}@mail.test"
                futures.append(await sender.send(reused))
        results = [f.result() for f in futures]
        assert len({r.job_id for r in results}) == 203
        assert isinstance(bad.exception(), InvalidRequest)
    await wait_for(lambda: len(stack.smtp.received) == 203, 60, "203 streamed messages")
    assert all(len(stack.smtp.to(f"r{i}@mail.test")) == 1 for i in range(3))


async def test_sync_client(stack: Stack) -> None:
    def work() -> tuple[str, list[object]]:
        with Client(stack.cfg.ingest.grpc_listen, stack.api_key) as client:
            sent = client.send(from_="app@acme.test", to=["sync@mail.test"], text="x")
            from sluice.client import build_send

            many = client.send_many(
                [build_send("app@acme.test", [f"m{i}@mail.test"], text="x") for i in range(5)]
                + [build_send("app@acme.test", ["bad"], text="x")]
            )
            return sent.job_id, list(many)

    job_id, many = await asyncio.to_thread(work)
    assert job_id.startswith("job_")
    assert [isinstance(r, SluiceError) for r in many] == [False] * 5 + [True]
    await wait_for(lambda: len(stack.smtp.received) == 6, what="6 sync messages")


def test_build_send_sets_every_argument_given_and_nothing_else() -> None:
    """Addresses in all three forms, each field where it belongs; fields not given unset."""
    from sluice.client import build_send
    from sluice.v1 import ingest_pb2, messages_pb2

    attachment = messages_pb2.Attachment(filename="a.txt", content=b"x")
    req = build_send(
        ("app@acme.test", "App"),
        ["c@mail.test", ("e@mail.test", "E"), messages_pb2.Address(email="g@mail.test", name="G")],
        subject="S",
        text="t",
        html="<p>h</p>",
        cc=["x@mail.test"],
        bcc=[("z@mail.test", "Z")],
        reply_to=["r@acme.test"],
        headers={"X-A": "1"},
        tier="bulk",
        tags=["t1"],
        metadata={"k": "v"},
        attachments=[attachment],
        request_id="rid",
    )
    addr = messages_pb2.Address
    expected = ingest_pb2.SendRequest(
        to=[
            addr(email="c@mail.test"),
            addr(email="e@mail.test", name="E"),
            addr(email="g@mail.test", name="G"),
        ],
        cc=[addr(email="x@mail.test")],
        bcc=[addr(email="z@mail.test", name="Z")],
        reply_to=[addr(email="r@acme.test")],
        subject="S",
        text="t",
        html="<p>h</p>",
        headers={"X-A": "1"},
        tier=messages_pb2.TIER_BULK,
        tags=["t1"],
        metadata={"k": "v"},
        attachments=[attachment],
        request_id="rid",
    )
    getattr(expected, "from").CopyFrom(addr(email="app@acme.test", name="App"))
    assert req == expected
    # (an untyped caller's name of None is no name, as before)
    no_name = build_send(("app@acme.test", None), [])  # type: ignore[arg-type]
    assert getattr(no_name, "from") == addr(email="app@acme.test")
    bare = build_send("app@acme.test", ["c@mail.test"], text="t")
    assert bare.ListFields() == [
        (ingest_pb2.SendRequest.DESCRIPTOR.fields_by_name["from"], addr(email="app@acme.test")),
        (ingest_pb2.SendRequest.DESCRIPTOR.fields_by_name["to"], [addr(email="c@mail.test")]),
        (ingest_pb2.SendRequest.DESCRIPTOR.fields_by_name["text"], "t"),
    ]
