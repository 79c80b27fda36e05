from __future__ import annotations

import pytest

from ingest.validate import check_address, validate_send
from sluice.config import IngestConfig
from sluice.v1 import ingest_pb2, messages_pb2


@pytest.mark.parametrize(
    "email",
    [
        "user@example.com",
        "first.last+tag@sub.example.co.uk",
        '"quoted local"@example.com',
        "user@bücher.example",
    ],
)
def test_good_addresses(email: str) -> None:
    assert check_address(email) is None


@pytest.mark.parametrize(
    ("email", "why"),
    [
        ("", "is required"),
        ("plain", "local@domain"),
        ("a@b", "two labels"),
        ("a..b@example.com", "dot-atom"),
        ("user@exa_mple.com", "label"),
        ("user@example.com\r\nBcc: x@y.z", "control characters"),
        ("x" * 65 + "@example.com", "64 octets"),
        ("user@-bad.com", "label"),
    ],
)
def test_bad_addresses(email: str, why: str) -> None:
    reason = check_address(email)
    assert reason is not None and why in reason


def _req(**kw: object) -> ingest_pb2.SendRequest:
    req = ingest_pb2.SendRequest(
        to=[messages_pb2.Address(email="b@example.com")], subject="s", text="t"
    )
    getattr(req, "from").email = "a@example.com"
    for k, v in kw.items():
        setattr(req, k, v)
    return req


def test_valid_request_has_no_violations() -> None:
    assert validate_send(_req(), IngestConfig()) == []


def test_header_injection_and_reserved_headers() -> None:
    req = _req()
    req.headers["X-Ok"] = "fine"
    req.headers["X-Bad"] = "a\r\nBcc: victim@example.com"
    req.headers["Message-ID"] = "<mine@x>"
    req.headers["Bad Name"] = "v"
    fields = dict(validate_send(req, IngestConfig()))
    assert "X-Ok" not in " ".join(fields)
    assert "control characters" in fields["headers.X-Bad"]
    assert "set by Sluice" in fields["headers.Message-ID"]
    assert "not a valid header name" in fields["headers.Bad Name"]


def test_missing_content_recipients_and_limits() -> None:
    req = ingest_pb2.SendRequest()
    fields = dict(validate_send(req, IngestConfig()))
    assert fields["from"] == "is required"
    assert "at least one recipient" in fields["to"]
    assert fields["text"] == "text or html is required"
    many = _req()
    many.bcc.extend(messages_pb2.Address(email=f"r{i}@example.com") for i in range(5))
    fields = dict(validate_send(many, IngestConfig(max_recipients=3)))
    assert fields["to"].startswith("6 recipients")


def test_the_message_size_counts_utf8_bytes_of_text_and_html() -> None:
    """Text and html count as their UTF-8 bytes (two for an "é"), the subject as characters."""
    cfg = IngestConfig(max_message_bytes=1000)
    fits = _req()
    fits.subject, fits.text, fits.html = "s" * 10, "a" * 490, "b" * 490
    assert validate_send(fits, cfg) == []
    wide = _req()
    wide.subject, wide.text, wide.html = "s" * 10, "é" * 300, "ü" * 200
    assert dict(validate_send(wide, cfg)) == {"html": "message is 1010 bytes; at most 1000"}
