"""DKIM signatures made by deliverer.dkim_sign verify with dkimpy (an independent
implementation): RSA and Ed25519 keys, folded and repeated headers, white space the relaxed
canonicalisation must absorb, an empty body; tampering breaks them. (The end-to-end test in
test_delivery.py verifies at a receiving SMTP server with the key in a real DNS server.)"""

from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from deliverer.dkim_sign import DkimError, sign
from deliverer.mime import build_message
from sluice.v1 import messages_pb2, tenant_pb2


def _rsa() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def _ed25519() -> tuple[str, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def _verify(message: bytes, record: bytes) -> bool:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.acme.test."
        return record

    return bool(dkim.verify(message, dnsfunc=lookup))


MESSAGES = {
    "built": None,  # filled from build_message below
    "folded and repeated headers, messy white space": (
        b"From: Acme <news@acme.test>\r\n"
        b"To: a@mail.test,\r\n\tb@mail.test\r\n"
        b"Subject:   Hello    there  \r\n"
        b"Received: x\r\nReceived: y\r\n"
        b"Date: Sat, 28 Nov 2026 21:35:13 +0000\r\n"
        b"Message-ID: <m1@acme.test>\r\n"
        b"\r\n"
        b"line one   \r\n\t tabbed  line\r\n\r\n\r\n"
    ),
    "empty body": b"From: news@acme.test\r\nSubject: empty\r\n\r\n",
}


def _payload() -> bytes:
    p = messages_pb2.Payload(subject="Grüße", text="Hi\n" * 50, html="<p>Hi</p>")
    getattr(p, "from").CopyFrom(messages_pb2.Address(email="news@acme.test", name="Acme"))
    ptr = messages_pb2.DeliveryPointer(message_id="m@acme.test", recipient="bob@mail.test")
    ptr.accepted_at.FromSeconds(1_795_000_000)
    return build_message(p, ptr, unsubscribe_url="https://acme.test/u")


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_signatures_verify_with_dkimpy(kind: str, case: str) -> None:
    pem, record = _rsa() if kind == "rsa" else _ed25519()
    key = tenant_pb2.DkimKey(domain="acme.test", selector="s1", private_key_pem=pem)
    message = MESSAGES[case] or _payload()
    signed = sign(message, key)
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(message)
    assert all(len(line) <= 998 for line in signed.split(b"\r\n"))
    algorithm = b"a=rsa-sha256" if kind == "rsa" else b"a=ed25519-sha256"
    assert algorithm in signed.split(b"\r\n\r\n", 1)[0]
    assert _verify(signed, record), "dkimpy rejects the signature"
    tampered = signed.replace(b"acme.test>", b"acme.evil>", 1)
    if tampered == signed:
        tampered = signed + b"tampered\r\n"
    assert not _verify(tampered, record)


def test_messages_sharing_a_body_each_verify() -> None:
    """The body hash is cached by body: messages that share one (a blast) and messages that
    differ by a byte each carry the right one."""
    pem, record = _rsa()
    key = tenant_pb2.DkimKey(domain="acme.test", selector="s1", private_key_pem=pem)
    body = b"Same for everyone\r\n" * 20
    for i, variant in enumerate([body, body, body + b"x\r\n", body]):
        message = b"From: news@acme.test\r\nTo: u%d@mail.test\r\n\r\n" % i + variant
        signed = sign(message, key)
        assert _verify(signed, record), f"message {i}"
        assert not _verify(signed.replace(b"Same for", b"Same to", 1), record)


def test_a_bad_key_is_a_dkim_error() -> None:
    key = tenant_pb2.DkimKey(domain="acme.test", selector="s1", private_key_pem="not a key")
    with pytest.raises(DkimError, match="private key"):
        sign(_payload(), key)
