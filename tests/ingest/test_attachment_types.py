"""Attachments may not be multipart/* or message/*: Sluice sends every attachment base64-
encoded, which RFC 2046 forbids for those types, and such a part would bring MIME structure
of its own. Refused at the API with a 400 naming the field, for sends and blasts."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from ingest.validate import validate_send
from sluice import names
from sluice.config import IngestConfig
from sluice.v1 import ingest_pb2, messages_pb2
from tests.api import call, stream_messages, violations
from tests.conftest import Stack

CONTENT = base64.b64encode(b"From: x@y.test\r\n\r\nhi\r\n").decode()


@pytest.fixture
def stack_services() -> tuple[str, ...]:
    return ("ingest",)


def _attachments(*types: str) -> list[dict[str, str]]:
    return [
        {"filename": f"part{i}.eml", "content_type": t, "content": CONTENT}
        for i, t in enumerate(types)
    ]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (
            "/v1/send",
            {"to": [{"email": "bob@mail.test"}]},
        ),
        (
            "/v1/blasts",
            {"recipients": [{"email": "bob@mail.test"}]},
        ),
    ],
)
async def test_container_types_are_refused_naming_the_field(
    stack: Stack, route: str, body: dict[str, Any]
) -> None:
    request = {
        "from": {"email": "news@acme.test"},
        "subject": "s",
        "text": "t",
        "attachments": _attachments(
            "application/pdf", "message/rfc822", "text/plain", "Multipart/Mixed"
        ),
        **body,
    }
    status, answer, _ = await call(stack, "POST", route, request)
    assert status == 400, answer
    got = violations(answer)
    assert [field for field, _ in got] == [
        "attachments[1].content_type",
        "attachments[3].content_type",
    ]
    assert all("multipart/* and message/* cannot be attachments" in why for _, why in got)
    assert await stream_messages(stack, names.JOBS_STREAM) == 0

    # The same request with harmless types is accepted.
    request["attachments"] = _attachments("application/pdf", "application/octet-stream")
    status, answer, _ = await call(stack, "POST", route, request)
    assert status == 202, answer


@pytest.mark.parametrize(
    ("content_type", "refused"),
    [
        ("message/rfc822", True),
        ("message/global", True),
        ("MESSAGE/partial", True),
        ("multipart/alternative", True),
        ("application/mbox", False),
        ("text/multipart", False),
        ("", False),
    ],
)
def test_which_types_are_containers(content_type: str, refused: bool) -> None:
    req = ingest_pb2.SendRequest(
        to=[messages_pb2.Address(email="b@example.com")],
        subject="s",
        text="t",
        attachments=[
            messages_pb2.Attachment(filename="f", content_type=content_type, content=b"x")
        ],
    )
    getattr(req, "from").email = "a@example.com"
    fields = [field for field, _ in validate_send(req, IngestConfig())]
    assert fields == (["attachments[0].content_type"] if refused else [])
