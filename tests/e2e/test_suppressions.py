"""The suppression list end to end: bounces add entries (hard ones for good, soft ones for a
while), the API and the CLI list, add and remove them, suppressed recipients get a
`suppressed` event instead of an SMTP attempt, and expired entries stop suppressing."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sluice import suppressions
from sluice.nats_layout import connect
from sluice.v1 import messages_pb2
from tests.api import add_tenant, call, sluice_cli, violations
from tests.conftest import Stack, wait_for
from tests.e2e.test_send import message


def _iso(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat()


async def _listed(stack: Stack, key: str = "default", **query: Any) -> dict[str, Any]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    status, body, _ = await call(stack, "GET", f"/v1/suppressions?{qs}", key=key)
    assert status == 200, body
    return dict(body)


async def test_bounces_suppress_hard_ones_for_good_soft_ones_for_a_while(stack: Stack) -> None:
    stack.smtp.script["bob@mail.test"] = ["550 5.1.1 User unknown"]
    stack.smtp.script["carol@mail.test"] = ["552 5.2.2 Mailbox full"]
    status, _, _ = await post_to(stack, "bob@mail.test", "carol@mail.test")
    assert status == 202
    await wait_for(
        lambda: len(stack.hooks.of_type("message.bounced")) == 2, what="two bounces", timeout=30
    )
    entries = {e["email"]: e for e in (await _listed(stack))["suppressions"]}
    assert set(entries) == {"bob@mail.test", "carol@mail.test"}
    hard, soft = entries["bob@mail.test"], entries["carol@mail.test"]
    assert hard["source"] == "bounce" and hard["reason"].startswith("bad_mailbox: 550")
    assert "expires_at" not in hard, "a bad mailbox stays suppressed"
    assert soft["reason"].startswith("mailbox_full: 552")
    expires = datetime.fromisoformat(soft["expires_at"].replace("Z", "+00:00"))
    left = (expires - datetime.now(UTC)).total_seconds()
    assert 3 * 86400 - 120 < left <= 3 * 86400, "a full mailbox is suppressed for soft_ttl"

    # Both are now skipped: suppressed events, no SMTP attempt.
    status, _, _ = await post_to(stack, "bob@mail.test", "carol@mail.test")
    assert status == 202
    await wait_for(
        lambda: len(stack.hooks.of_type("message.suppressed")) == 2, what="two suppressed events"
    )
    assert stack.smtp.rcpt_attempts["bob@mail.test"] == 1
    assert stack.smtp.rcpt_attempts["carol@mail.test"] == 1

    # Removing an entry lets the tenant mail the recipient again.
    del stack.smtp.script["carol@mail.test"]
    status, body, _ = await call(stack, "DELETE", "/v1/suppressions/Carol@Mail.test")
    assert status == 200 and body == {"email": "carol@mail.test"}, body
    status, body, _ = await call(stack, "DELETE", "/v1/suppressions/carol@mail.test")
    assert status == 404, body
    status, _, _ = await post_to(stack, "carol@mail.test")
    assert status == 202
    await wait_for(lambda: stack.smtp.to("carol@mail.test"), what="carol delivered after removal")


async def post_to(stack: Stack, *emails: str) -> tuple[int, Any, Any]:
    return await call(
        stack,
        "POST",
        "/v1/send",
        message(tier="transactional", to=[{"email": e} for e in emails]),
    )


async def test_manual_entries_with_expiry_validation_and_pages(stack: Stack) -> None:
    status, body, _ = await call(
        stack,
        "POST",
        "/v1/suppressions",
        {"email": "Dave@Mail.test", "reason": "asked to stop", "expires_at": _iso(3)},
    )
    assert status == 200, body
    entry = body["suppression"]
    assert entry["email"] == "dave@mail.test" and entry["source"] == "manual"
    assert entry["reason"] == "asked to stop" and "expires_at" in entry

    status, _, _ = await post_to(stack, "dave@mail.test")
    assert status == 202
    await wait_for(lambda: stack.hooks.of_type("message.suppressed"), what="suppressed event")
    assert not stack.smtp.to("dave@mail.test")

    # Once the entry lapses it is neither listed nor suppressing.
    async def lapsed() -> bool:
        return not (await _listed(stack)).get("suppressions")

    await wait_for(lapsed, 30, "the expired entry no longer listed")
    status, _, _ = await post_to(stack, "dave@mail.test")
    assert status == 202
    await wait_for(lambda: stack.smtp.to("dave@mail.test"), what="delivered after expiry")

    # Bad input names the field and the reason.
    status, body, _ = await call(
        stack, "POST", "/v1/suppressions", {"email": "not-an-address", "expires_at": _iso(-60)}
    )
    assert status == 400
    fields = dict(violations(body))
    assert set(fields) == {"email", "expires_at"}, fields
    assert fields["expires_at"] == "must be in the future"
    status, body, _ = await call(stack, "POST", "/v1/suppressions", {"email": "a@b.test", "x": 1})
    assert status == 400 and dict(violations(body)).get("x") == "unknown field", body
    status, _, _ = await call(stack, "GET", "/v1/suppressions", key=None)
    assert status == 401

    # Pages, ordered by address; another tenant sees none of them.
    for i in (3, 1, 4, 0, 2):
        status, body, _ = await call(
            stack, "POST", "/v1/suppressions", {"email": f"user{i}@page.test"}
        )
        assert status == 200, body
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await _listed(stack, page_size=2, page_token=token)
        seen += [e["email"] for e in page["suppressions"]]
        token = page.get("next_page_token", "")
        if not token:
            break
    assert seen == [f"user{i}@page.test" for i in range(5)]
    other = await add_tenant(stack, "globex", ["globex.test"])
    assert (await _listed(stack, key=other)).get("suppressions", []) == []


async def test_cli_lists_adds_and_removes(stack: Stack) -> None:
    def cli(*args: str) -> str:
        done = sluice_cli(stack.cfg.nats.url, "suppressions", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cli(
        "add", "Eve@Mail.test", "--tenant", "acme", "--reason", "complaint", "--expires-in", "2d"
    )
    assert '"email": "eve@mail.test"' in out
    (line,) = cli("list", "--tenant", "acme").splitlines()
    email, source, expires, reason = line.split("\t")
    assert (email, source, reason) == ("eve@mail.test", "manual", "complaint")
    assert expires != "never"
    status, _, _ = await post_to(stack, "eve@mail.test")
    assert status == 202
    await wait_for(lambda: stack.hooks.of_type("message.suppressed"), what="suppressed event")
    assert "removed eve@mail.test" in cli("remove", "eve@mail.test", "--tenant", "acme")
    assert cli("list", "--tenant", "acme").strip() == ""
    missing = sluice_cli(
        stack.cfg.nats.url, "suppressions", "remove", "eve@mail.test", "--tenant", "acme"
    )
    assert missing.returncode == 1 and "not suppressed" in missing.stderr


async def test_a_soft_bounce_never_shortens_an_entry(stack: Stack) -> None:
    nc = await connect(stack.cfg, "test")
    try:
        js = nc.jetstream()
        manual = messages_pb2.SUPPRESSION_SOURCE_MANUAL
        bounce = messages_pb2.SUPPRESSION_SOURCE_BOUNCE
        await suppressions.put(js, "acme", "kept@mail.test", "complaint", manual)
        got = await suppressions.put_unless_longer(
            js, "acme", "kept@mail.test", "mailbox_full", bounce, 60
        )
        assert got.reason == "complaint" and not got.HasField("expires_at")
        await suppressions.put(js, "acme", "short@mail.test", "mailbox_full", bounce, 5)
        got = await suppressions.put_unless_longer(
            js, "acme", "short@mail.test", "mailbox_full again", bounce, 600
        )
        assert got.reason == "mailbox_full again", "a longer soft entry replaces a shorter one"
        entries = {e.email: e for e in await suppressions.list_tenant(js, "acme")}
        assert entries["kept@mail.test"].reason == "complaint"
        assert entries["short@mail.test"].expires_at.seconds > time.time() + 500
    finally:
        await nc.close()
