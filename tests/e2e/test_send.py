"""End to end through every component: HTTP/gRPC -> ingest -> JetStream -> expander ->
scheduler lease -> deliverer (real DNS, real SMTP) -> events -> signed webhooks."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2

from sluice import names
from sluice.nats_layout import connect
from sluice.services import service
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, messages_pb2
from tests.api import stream_messages
from tests.conftest import Stack, wait_for


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": {"email": "alerts@acme.test", "name": "Acme Alerts"},
        "to": [{"email": "bob@mail.test", "name": "Bob"}],
        "subject": "Your code is 123456",
        "text": "Use 123456 to sign in.",
        "tier": "critical",
    }
    body.update(overrides)
    return body


async def post(stack: Stack, body: Any, key: str | None = "default") -> tuple[int, Any, Any]:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {stack.api_key if key == 'default' else key}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{stack.http}/v1/send", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers


async def test_send_is_accepted_and_delivered_with_right_headers(stack: Stack) -> None:
    status, body, _ = await post(
        stack,
        message(cc=[{"email": "carol@other.test"}], tags=["otp"], metadata={"user": "42"}),
    )
    assert status == 202, body
    assert body["job_id"].startswith("job_")
    assert body["message_id"] == f"{body['job_id']}@acme.test"

    await wait_for(lambda: len(stack.smtp.received) == 2, what="both recipients delivered")
    bob = stack.smtp.to("bob@mail.test")
    carol = stack.smtp.to("carol@other.test")
    assert len(bob) == 1 and len(carol) == 1
    for r in (bob[0], carol[0]):
        m = r.message
        assert r.mail_from == "alerts@acme.test"
        assert m["From"] == "Acme Alerts <alerts@acme.test>"
        assert m["To"] == "Bob <bob@mail.test>"
        assert m["Cc"] == "carol@other.test"
        assert m["Subject"] == "Your code is 123456"
        assert m["Message-ID"] == f"<{body['message_id']}>"
        assert m.get_content().strip() == "Use 123456 to sign in."
    assert stack.smtp.ehlo_names and set(stack.smtp.ehlo_names) == {"deliverer.test"}

    delivered = await wait_for(
        lambda: (
            len(stack.hooks.of_type("message.delivered")) == 2
            and stack.hooks.of_type("message.delivered")
        ),
        what="two delivered webhooks",
    )
    recipients = {c.verified["data"]["recipient"] for c in delivered if c.verified}
    assert recipients == {"bob@mail.test", "carol@other.test"}
    assert all(c.verified and c.verified["data"]["tier"] == "critical" for c in delivered)
    # The job's tags and metadata ride on its accepted event.
    [accepted] = await wait_for(
        lambda: stack.hooks.of_type("message.accepted"), what="the accepted webhook"
    )
    assert accepted.verified is not None
    assert accepted.verified["data"]["tags"] == ["otp"]
    assert accepted.verified["data"]["metadata"] == {"user": "42"}
    assert accepted.verified["data"]["recipients"] == ["bob@mail.test", "carol@other.test"]
    # Work-queue streams are empty once everything is settled.
    assert await stream_messages(stack, names.JOBS_STREAM) == 0
    assert await wait_for(_mail_empty(stack), what="MAIL drained")


def _mail_empty(stack: Stack) -> Any:
    async def check() -> bool:
        return await stream_messages(stack, names.MAIL_STREAM) == 0

    return check


async def test_temporary_failure_is_retried_then_delivered(stack: Stack) -> None:
    stack.smtp.script["bob@mail.test"] = ["450 4.2.1 Mailbox busy"]
    status, body, _ = await post(stack, message(tier="transactional"))
    assert status == 202, body

    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="delivery after retry")
    assert stack.smtp.rcpt_attempts["bob@mail.test"] == 2
    assert len(stack.smtp.to("bob@mail.test")) == 1
    deferred = await wait_for(
        lambda: stack.hooks.of_type("message.deferred"), what="deferred webhook"
    )
    data = deferred[0].verified["data"] if deferred[0].verified else {}
    assert data["smtp_reply"]["code"] == 450
    assert data["smtp_reply"]["enhanced_code"] == "4.2.1"
    await wait_for(lambda: stack.hooks.of_type("message.delivered"), what="delivered webhook")
    assert await stream_messages(stack, names.DLQ_STREAM) == 0


async def test_permanent_failure_dead_letters_and_signs_webhook(stack: Stack) -> None:
    stack.smtp.script["bob@mail.test"] = ["550 5.1.1 User unknown"]
    status, body, _ = await post(stack, message(tier="bulk"))
    assert status == 202, body

    bounced = await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="bounced webhook")
    call = bounced[0]
    assert call.error is None and call.verified is not None
    assert call.headers["webhook-id"] == call.verified["data"]["event_id"]
    data = call.verified["data"]
    assert data["recipient"] == "bob@mail.test"
    assert data["message_id"] == body["message_id"]
    assert data["bounce_category"] == "bad_mailbox"
    assert data["smtp_reply"]["code"] == 550
    # A tampered body fails verification at an independent verifier.
    from standardwebhooks.webhooks import Webhook

    tampered = call.body.replace(b"bob@mail.test", b"eve@mail.test")
    try:
        Webhook(stack.hooks.secret).verify(tampered, call.headers)
        raise AssertionError("tampered body verified")
    except Exception as exc:
        assert "signature" in str(exc).lower()

    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        raw = await js.get_last_msg(
            names.DLQ_STREAM, names.dlq_subject("acme", f"{body['job_id']}-0")
        )
        assert raw.data is not None
        dead = messages_pb2.DeadLetter.FromString(raw.data)
    finally:
        await nc.close()
    assert dead.reason == messages_pb2.DEAD_LETTER_REASON_BOUNCED
    assert dead.pointer.recipient == "bob@mail.test"
    assert dead.last_reply.code == 550
    assert stack.smtp.received == []
    assert await wait_for(_mail_empty(stack), what="MAIL drained")


async def test_bad_token_and_bad_body_are_refused_and_enqueue_nothing(stack: Stack) -> None:
    status, body, headers = await post(stack, message(), key="sk_nope_nope")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert body["details"][0]["reason"] == "UNAUTHENTICATED"

    status, body, headers = await post(stack, message(), key=None)
    assert status == 401

    status, body, _ = await post(
        stack, message(to=[{"email": "bob@mail.test"}, {"email": "not-an-address"}])
    )
    assert status == 400
    violations = body["details"][1]["field_violations"]
    assert violations == [
        {"field": "to[1].email", "description": "must be an address of the form local@domain"}
    ]

    status, body, _ = await post(stack, message(subject="hi\r\nBcc: victim@mail.test"))
    assert status == 400
    assert body["details"][1]["field_violations"][0]["field"] == "subject"

    status, body, _ = await post(stack, message(priority="high"))
    assert status == 400
    assert body["details"][1]["field_violations"][0] == {
        "field": "priority",
        "description": "unknown field",
    }

    status, body, _ = await post(stack, message(**{"from": {"email": "x@evil.test"}}))
    assert status == 403
    assert body["details"][0]["reason"] == "FROM_DOMAIN_NOT_ALLOWED"

    for stream in (names.JOBS_STREAM, names.MAIL_STREAM):
        assert await stream_messages(stack, stream) == 0
    assert stack.smtp.received == []


async def test_grpc_send_and_errors(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        req = ingest_pb2.SendRequest(
            to=[messages_pb2.Address(email="bob@mail.test")],
            subject="via gRPC",
            text="hi",
            tier=messages_pb2.TIER_TRANSACTIONAL,
        )
        getattr(req, "from").email = "app@acme.test"
        resp = await stub.Send(req, metadata=(("authorization", f"Bearer {stack.api_key}"),))
        assert resp.job_id.startswith("job_")

        bad = ingest_pb2.SendRequest()
        bad.CopyFrom(req)
        bad.to[0].email = "nope"
        try:
            await stub.Send(bad, metadata=(("authorization", f"Bearer {stack.api_key}"),))
            raise AssertionError("expected INVALID_ARGUMENT")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            trailers: dict[str, Any] = dict(exc.trailing_metadata() or ())  # type: ignore[arg-type]
            details = trailers["grpc-status-details-bin"]
            assert isinstance(details, bytes)
            st = status_pb2.Status.FromString(details)
            br = error_details_pb2.BadRequest()
            assert st.details[1].Unpack(br)
            assert br.field_violations[0].field == "to[0].email"
        try:
            await stub.Send(req)
            raise AssertionError("expected UNAUTHENTICATED")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED

    received = await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="gRPC mail")
    assert received[0].message["Subject"] == "via gRPC"


async def test_send_with_nats_down_answers_503_never_202(stack: Stack) -> None:
    stack.nats.stop()
    status, body, _ = await post(stack, message())
    assert status == 503, body
    assert body["details"][0]["reason"] == "NOT_DURABLE"


async def test_a_hard_bounce_suppresses_the_address_for_later_sends(stack: Stack) -> None:
    stack.smtp.script["bob@mail.test"] = ["550 5.1.1 User unknown"]
    status, first, _ = await post(stack, message(tier="transactional"))
    assert status == 202
    bounced = await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="the bounce")
    assert bounced[0].verified and bounced[0].verified["data"]["job_id"] == first["job_id"]
    status, second, _ = await post(stack, message(tier="transactional"))
    assert status == 202
    suppressed = await wait_for(
        lambda: stack.hooks.of_type("message.suppressed"),
        what="a suppressed event for the second send",
    )
    assert suppressed[0].verified and suppressed[0].verified["data"]["job_id"] == second["job_id"]
    assert stack.smtp.rcpt_attempts["bob@mail.test"] == 1, "the suppressed send reached SMTP"


async def test_recipients_of_one_message_share_a_transaction(stack: Stack) -> None:
    # Queue the message before any deliverer pulls (concurrent pulls may split a message's
    # pointers between connections; grouping is an optimisation, not a guarantee).
    stack.tasks[2].cancel()  # the scheduler
    await asyncio.gather(stack.tasks[2], return_exceptions=True)
    stack.smtp.script["nobody@mail.test"] = ["550 5.1.1 User unknown"]
    status, body, _ = await post(
        stack,
        message(
            tier="transactional",
            to=[{"email": "bob@mail.test"}, {"email": "nobody@mail.test"}],
            cc=[{"email": "carol@mail.test"}],
            bcc=[{"email": "dave@other.test"}],
        ),
    )
    assert status == 202, body
    await wait_for(_mail_count(stack, 4), what="4 pointers queued")
    stack.tasks[2] = asyncio.create_task(service("scheduler")(stack.cfg, stack.stop))
    await wait_for(lambda: len(stack.smtp.received) >= 2, what="two transactions")
    await asyncio.sleep(0.5)
    mail_test = [r for r in stack.smtp.received if r.rcpt_tos[0].endswith("@mail.test")]
    assert len(mail_test) == 1, "one transaction for the mail.test recipients"
    assert sorted(mail_test[0].rcpt_tos) == ["bob@mail.test", "carol@mail.test"]
    assert stack.smtp.to("dave@other.test")
    bounced = await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="a bounce")
    assert bounced[0].verified and bounced[0].verified["data"]["recipient"] == "nobody@mail.test"
    delivered = await wait_for(
        lambda: (
            len(stack.hooks.of_type("message.delivered")) == 3
            and stack.hooks.of_type("message.delivered")
        ),
        what="3 delivered",
    )
    assert {c.verified["data"]["recipient"] for c in delivered if c.verified} == {
        "bob@mail.test",
        "carol@mail.test",
        "dave@other.test",
    }


def _mail_count(stack: Stack, n: int) -> Any:
    async def check() -> bool:
        return await stream_messages(stack, names.MAIL_STREAM) == n

    return check


async def test_dead_letters_can_be_listed_and_replayed(stack: Stack) -> None:
    stack.smtp.script["bob@mail.test"] = ["550 5.2.1 Mailbox disabled"]  # not a suppressor
    status, body, _ = await post(stack, message(tier="transactional"))
    assert status == 202
    await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="the bounce")
    delivery_id = f"{body['job_id']}-0"
    async with aiohttp.ClientSession() as s:
        auth = {"Authorization": f"Bearer {stack.api_key}"}
        async with s.get(f"{stack.http}/v1/dead-letters", headers=auth) as r:
            listed = await r.json()
        assert r.status == 200, listed
        (entry,) = listed["dead_letters"]
        assert entry["delivery_id"] == delivery_id
        assert entry["dead_letter"]["reason"] == "bounced"
        assert entry["dead_letter"]["pointer"]["recipient"] == "bob@mail.test"
        async with s.post(
            f"{stack.http}/v1/dead-letters/{delivery_id}:replay", json={}, headers=auth
        ) as r:
            assert r.status == 200, await r.text()
        (got,) = await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="the replay")
        assert got.message["Message-ID"] == f"<{body['message_id']}>"
        async with s.get(f"{stack.http}/v1/dead-letters", headers=auth) as r:
            assert (await r.json()).get("dead_letters", []) == []
        async with s.post(
            f"{stack.http}/v1/dead-letters/{delivery_id}:replay", json={}, headers=auth
        ) as r:
            assert r.status == 404
