"""The ingest API end to end against real NATS, SMTP and DNS: blasts, attachments,
scheduled sends, idempotency, status lookups, and every error case with its HTTP code."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from sluice import names
from sluice.v1 import ingest_pb2, ingest_pb2_grpc, messages_pb2
from tests.api import add_tenant, call, reason, stream_messages, violations
from tests.conftest import Stack, wait_for


@pytest.fixture
def stack_overrides() -> dict[str, dict[str, Any]]:
    return {
        "ingest": {
            "max_blast_recipients": 50,
            "max_attachment_bytes": 2048,
            "max_request_bytes": 1024 * 1024,
        }
    }


def send_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": {"email": "news@acme.test"},
        "to": [{"email": "bob@mail.test"}],
        "subject": "Hello",
        "text": "Hi there",
    }
    body.update(overrides)
    return body


def blast_body(n: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": {"email": "news@acme.test", "name": "Acme News"},
        "subject": "Hi {{first_name}}, your code is {{code}}",
        "text": "Dear {{first_name}}, code {{code}}.",
        "html": "<p>Dear {{first_name}}</p>",
        "recipients": [
            {
                "email": f"user{i}@{'mail' if i % 2 else 'other'}.test",
                "substitutions": {"first_name": f"U{i}", "code": str(1000 + i)},
            }
            for i in range(n)
        ],
    }
    body.update(overrides)
    return body


async def test_http_blast_personalises_each_recipient(stack: Stack) -> None:
    blast = blast_body(12)
    blast["recipients"][3]["substitutions"]["first_name"] = "<Ann & Co>"
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast)
    assert status == 202, body
    job_id = body["job_id"]
    assert body["recipient_count"] == 12
    assert body["message_ids"] == [f"{job_id}.{i}@acme.test" for i in range(12)]

    await wait_for(lambda: len(stack.smtp.received) == 12, what="12 blast messages")
    for i in range(12):
        (got,) = stack.smtp.to(f"user{i}@{'mail' if i % 2 else 'other'}.test")
        m = got.message
        name = "<Ann & Co>" if i == 3 else f"U{i}"
        assert m["Subject"] == f"Hi {name}, your code is {1000 + i}"
        assert m["Message-ID"] == f"<{job_id}.{i}@acme.test>"
        assert m["To"] == got.rcpt_tos[0]
        plain = m.get_body(("plain",))
        html = m.get_body(("html",))
        assert plain is not None and html is not None
        assert plain.get_content().strip() == f"Dear {name}, code {1000 + i}."
        if i == 3:
            assert "&lt;Ann &amp; Co&gt;" in html.get_content()

    # The delivered events are written just after the SMTP transactions end (settling runs
    # in the background): poll the job until the last one is in.
    async def job_state() -> Any:
        status, job, _ = await call(stack, "GET", f"/v1/jobs/{job_id}")
        assert status == 200, job
        return job if job.get("delivered") == 12 else None

    job = await wait_for(job_state, what="12 delivered events")
    assert job["recipient_count"] == 12 and job.get("queued", 0) == 0 and job["tier"] == "bulk"


async def test_grpc_blast_and_errors(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.cfg.ingest.grpc_listen) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        req = ingest_pb2.SendBlastRequest(
            subject="Hello {{name}}",
            text="Body for {{name}}",
            recipients=[
                messages_pb2.BlastRecipient(
                    email=f"g{i}@mail.test", substitutions={"name": f"G{i}"}
                )
                for i in range(5)
            ],
        )
        getattr(req, "from").email = "news@acme.test"
        auth = (("authorization", f"Bearer {stack.api_key}"),)
        resp = await stub.SendBlast(req, metadata=auth)
        assert resp.recipient_count == 5 and len(resp.message_ids) == 5

        req.recipients[2].email = "broken"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.SendBlast(req, metadata=auth)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers: dict[str, Any] = dict(exc.value.trailing_metadata() or ())  # type: ignore[arg-type]
        st = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        br = error_details_pb2.BadRequest()
        assert st.details[1].Unpack(br)
        assert br.field_violations[0].field == "recipients[2].email"
    await wait_for(lambda: len(stack.smtp.received) == 5, what="gRPC blast delivered")
    assert sorted(r.message["Subject"] for r in stack.smtp.received) == [
        f"Hello G{i}" for i in range(5)
    ]


async def test_blast_validation(stack: Stack) -> None:
    blast = blast_body(3)
    blast["recipients"][1] = {"email": "bad@@x", "colour": "red"}
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast)
    assert status == 400
    got = dict(violations(body))
    assert got["recipients[1].colour"] == "unknown field"
    assert "recipients[1].email" in got
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast_body(51))
    assert status == 400 and violations(body) == [("recipients", "51 recipients; at most 50")]
    status, body, _ = await call(stack, "POST", "/v1/blasts", blast_body(0))
    assert status == 400 and violations(body)[0][0] == "recipients"
    assert await stream_messages(stack, names.JOBS_STREAM) == 0


async def test_attachments_are_delivered_and_limited(stack: Stack) -> None:
    pdf = b"%PDF-1.4 tiny"
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        send_body(
            attachments=[
                {
                    "filename": "invoice.pdf",
                    "content_type": "application/pdf",
                    "content": base64.b64encode(pdf).decode(),
                }
            ]
        ),
    )
    assert status == 202, body
    (got,) = await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="mail")
    parts = list(got.message.iter_attachments())
    assert [(p.get_filename(), p.get_content_type(), p.get_content()) for p in parts] == [
        ("invoice.pdf", "application/pdf", pdf)
    ]
    big = base64.b64encode(b"x" * 4096).decode()
    status, body, _ = await call(
        stack, "POST", "/v1/send", send_body(attachments=[{"filename": "big.bin", "content": big}])
    )
    assert status == 400
    assert violations(body) == [("attachments[0].content", "4096 bytes; at most 2048")]
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        send_body(attachments=[{"filename": "a\r\nb", "content": "not base64!"}]),
    )
    assert status == 400
    assert violations(body)[0][0] == "attachments[0].content"


async def test_scheduled_send_is_not_delivered_early(stack: Stack) -> None:
    due = time.time() + 2
    send_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(due)) + f".{int(due % 1 * 1000):03d}Z"
    status, body, _ = await call(stack, "POST", "/v1/send", send_body(send_at=send_at))
    assert status == 202, body
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="scheduled mail")
    arrived = time.time()
    assert arrived >= due, "delivered before send_at"
    status, body, _ = await call(
        stack, "POST", "/v1/send", send_body(send_at="2099-01-01T00:00:00Z")
    )
    assert status == 400 and violations(body)[0][0] == "send_at"


async def test_idempotency_key_returns_first_response(stack: Stack) -> None:
    headers = {"Idempotency-Key": "order-1234"}
    first = await call(stack, "POST", "/v1/send", send_body(), headers=headers)
    again = await call(stack, "POST", "/v1/send", send_body(), headers=headers)
    assert first[0] == again[0] == 202
    assert first[1] == again[1]
    status, body, _ = await call(
        stack, "POST", "/v1/send", send_body(subject="other"), headers=headers
    )
    assert status == 409 and reason(body) == "IDEMPOTENCY_KEY_REUSED"
    # The same key in the body field works the same way.
    status, body, _ = await call(stack, "POST", "/v1/send", send_body(request_id="order-1234"))
    assert status == 202 and body == first[1]
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="mail")
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to("bob@mail.test")) == 1


async def test_fifty_concurrent_duplicates_make_one_job(stack: Stack) -> None:
    results = await asyncio.gather(
        *(
            call(stack, "POST", "/v1/send", send_body(), headers={"Idempotency-Key": "dup-50"})
            for _ in range(50)
        )
    )
    assert {r[0] for r in results} == {202}
    assert len({r[1]["job_id"] for r in results}) == 1
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="mail")

    async def delivered() -> bool:  # the event follows the SMTP transaction
        status, job, _ = await call(stack, "GET", f"/v1/jobs/{results[0][1]['job_id']}")
        assert status == 200, job
        return bool(job.get("delivered") == 1)

    await wait_for(delivered, what="the delivered event")
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to("bob@mail.test")) == 1


async def test_message_status_and_tenant_isolation(stack: Stack) -> None:
    stack.smtp.script["carol@other.test"] = ["550 5.1.1 User unknown"]
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        send_body(to=[{"email": "bob@mail.test"}], cc=[{"email": "carol@other.test"}]),
    )
    assert status == 202
    message_id = body["message_id"]
    await wait_for(lambda: stack.hooks.of_type("message.bounced"), what="bounce")
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="delivery")

    async def settled() -> dict[str, Any] | None:
        status, msg, _ = await call(stack, "GET", f"/v1/messages/{message_id}")
        assert status == 200, msg
        states = {r["recipient"]: r["state"] for r in msg["recipients"]}
        return (
            msg if states == {"bob@mail.test": "delivered", "carol@other.test": "bounced"} else None
        )

    msg = await wait_for(settled, what="both recipients final")
    assert msg["state"] == "bounced"
    assert {e["type"] for e in msg["events"]} == {"delivered", "bounced"}
    status, job, _ = await call(stack, "GET", f"/v1/jobs/{body['job_id']}")
    assert (job["recipient_count"], job["delivered"], job["bounced"]) == (2, 1, 1)

    other = await add_tenant(stack, "globex", ["globex.test"])
    for path in (f"/v1/messages/{message_id}", f"/v1/jobs/{body['job_id']}"):
        status, err, _ = await call(stack, "GET", path, key=other)
        assert status == 404 and reason(err) == "NOT_FOUND"
    status, err, _ = await call(stack, "GET", "/v1/messages/job_000000000000000000000000@x.test")
    assert status == 404


async def test_queued_before_delivery(stack: Stack) -> None:
    # Nothing is delivered (the scheduler is stopped); the message reads as queued.
    stack.tasks[2].cancel()  # scheduler
    status, body, _ = await call(stack, "POST", "/v1/send", send_body())
    assert status == 202
    status, msg, _ = await call(stack, "GET", f"/v1/messages/{body['message_id']}")
    assert status == 200 and msg["state"] == "queued"
    assert msg["recipients"] == [{"recipient": "bob@mail.test", "state": "queued"}]


async def test_auth_tiers_revocation_and_rate_limit(stack: Stack) -> None:
    critical_only = await add_tenant(
        stack, "twofa", ["twofa.test"], tiers=[messages_pb2.TIER_CRITICAL]
    )
    ok = send_body(**{"from": {"email": "codes@twofa.test"}, "tier": "critical"})
    assert (await call(stack, "POST", "/v1/send", ok, key=critical_only))[0] == 202
    status, body, _ = await call(
        stack, "POST", "/v1/send", {**ok, "tier": "bulk"}, key=critical_only
    )
    assert status == 403 and reason(body) == "TIER_NOT_ALLOWED"

    limited = await add_tenant(stack, "slowco", ["slowco.test"], rate_limit=2)
    body_slow = send_body(**{"from": {"email": "a@slowco.test"}})
    codes = [(await call(stack, "POST", "/v1/send", body_slow, key=limited)) for _ in range(4)]
    assert [c[0] for c in codes[:2]] == [202, 202]
    assert codes[3][0] == 429 and reason(codes[3][1]) == "RATE_LIMITED"
    assert int(codes[3][2]["Retry-After"]) >= 1

    from sluice.nats_layout import connect
    from sluice.tenants import TenantStore

    nc = await connect(stack.cfg, "test")
    store = TenantStore(nc.jetstream())
    (record,) = [k for _, k in await store.list_keys() if k.tenant_id == "twofa"]
    assert await store.revoke_key(record.key_id)
    await nc.close()
    # Keys are cached for key_cache_ttl; a fresh ingest process sees the revocation at once.
    from ingest.auth import Authenticator

    nc = await connect(stack.cfg, "test")
    auth = Authenticator(TenantStore(nc.jetstream()), 0)
    try:
        with pytest.raises(Exception, match="revoked"):
            await auth.authenticate(f"Bearer {critical_only}")
    finally:
        await nc.close()


async def test_oversize_body_is_413(stack: Stack) -> None:
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/send",
        data=b'{"text": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and reason(body) == "REQUEST_TOO_LARGE"


async def test_unknown_routes_and_methods_get_the_api_error_format(stack: Stack) -> None:
    status, body, _ = await call(stack, "POST", "/v1/sendd", {"to": []})
    assert status == 404 and reason(body) == "NO_SUCH_ROUTE"
    assert violations(body) == [("path", "/v1/sendd: no such route")]
    status, body, headers = await call(stack, "PUT", "/v1/send", {})
    assert status == 405 and reason(body) == "METHOD_NOT_ALLOWED"
    assert violations(body) == [("method", "PUT not allowed; use POST")]
    assert headers["Content-Type"].startswith("application/json")
