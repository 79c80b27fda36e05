"""DELETE /v1/suppressions/{email} for addresses whose local part holds characters that mean
something in a URL ("/" above all, legal in a local part), sent percent-encoded as RFC 3986
asks, against the real ingest HTTP API."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
import pytest

from tests.api import call
from tests.conftest import Stack


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest",)


async def _listed(stack: Stack) -> list[str]:
    status, body, _ = await call(stack, "GET", "/v1/suppressions")
    assert status == 200, body
    return [e["email"] for e in body.get("suppressions", [])]


@pytest.mark.parametrize("email", ["a/b@x.test", "a%b@x.test", "x/y/z?q=1#f+g@x.test"])
async def test_delete_an_address_with_url_characters(stack: Stack, email: str) -> None:
    status, body, _ = await call(stack, "POST", "/v1/suppressions", {"email": email})
    assert status == 200, body
    assert await _listed(stack) == [email]

    path = f"/v1/suppressions/{quote(email, safe='')}"  # "a/b@x.test" -> "a%2Fb%40x.test"
    status, body, _ = await call(stack, "DELETE", path)
    assert (status, body) == (200, {"email": email})
    assert await _listed(stack) == []
    status, body, _ = await call(stack, "DELETE", path)
    assert status == 404, body


async def test_an_unencoded_slash_is_a_path_separator(stack: Stack) -> None:
    status, body, _ = await call(stack, "POST", "/v1/suppressions", {"email": "a/b@x.test"})
    assert status == 200, body
    # No route matches (aiohttp's own 404, not JSON: `call` cannot be used).
    async with (
        aiohttp.ClientSession() as s,
        s.delete(
            f"{stack.http}/v1/suppressions/a/b@x.test",
            headers={"Authorization": f"Bearer {stack.api_key}"},
        ) as resp,
    ):
        assert resp.status == 404
    assert await _listed(stack) == ["a/b@x.test"]
