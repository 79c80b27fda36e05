"""sluice.resolver reads DNS answers itself (names, addresses, MX records): what it reads is
what dnspython reads from the same wire, and a malformed answer is an error, never a loop
or a wrong record. (A unit below the resolver's network seam; the lookups themselves are
tested against a real DNS server in test_resolver.py.)"""

from __future__ import annotations

from typing import cast

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from sluice.resolver import _read_name, _read_reply, _Unanswered, _wire_name

_QUESTION_AT = 12


def _records(
    wire: bytes, question: bytes, qname: str, rdtype: dns.rdatatype.RdataType
) -> tuple[int, list[tuple[str, int, int, object]]]:
    read = _read_reply(wire, int.from_bytes(wire[:2], "big"), question, qname, rdtype)
    assert read is not None, "not truncated"
    rcode, records = read
    return rcode, list(records)


def _reply(qname: str, rdtype: str, *records: tuple[str, int, str, str]) -> tuple[bytes, bytes]:
    """A reply (dnspython's wire, names compressed) and its question section as sent."""
    query = dns.message.make_query(qname, rdtype)
    reply = dns.message.make_response(query)
    for owner, ttl, rtype, text in records:
        reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, text))
    wire = reply.to_wire()
    question_end = wire.index(b"\0", _QUESTION_AT) + 5
    return wire, wire[_QUESTION_AT:question_end]


@pytest.mark.parametrize(
    "name",
    [
        "mx.example.com.",
        "MX1.Example.COM.",
        ".",
        "a\\.b.example.",  # a dot inside a label
        "semi\\;colon\\@at.example.",
        "\\000\\255bin.example.",
        "xn--bcher-kva.example.",
        "_dmarc.example.",
    ],
)
def test_names_read_as_dnspython_writes_them(name: str) -> None:
    parsed = dns.name.from_text(name)
    wire = b"\x07example\x00" + cast(bytes, parsed.to_wire())  # (a name before it: offsets)
    text, end = _read_name(wire, 9)
    assert text == parsed.to_text().lower().rstrip(".")
    assert end == len(wire)


def test_query_names_are_encoded_as_dnspython_encodes_them() -> None:
    for name in ["example.com", "example.com.", "MiXed.Case.test", "bücher.example", "a\\.b.x"]:
        assert _wire_name(name) == dns.name.from_text(name).to_wire()


def test_answers_read_as_dnspython_reads_them() -> None:
    wire, question = _reply(
        "Mail.Example.",
        "MX",
        ("mail.example.", 300, "MX", "10 mx1.example.net."),
        ("mail.example.", 200, "MX", "20 MX2.Example.NET."),
        ("mail.example.", 60, "TXT", '"not asked for"'),
    )
    rcode, records = _records(wire, question, "mail.example", dns.rdatatype.MX)
    assert rcode == 0
    assert records == [
        ("mail.example", 15, 300, (10, "mx1.example.net")),
        ("mail.example", 15, 200, (20, "mx2.example.net")),
    ]
    wire, question = _reply(
        "alias.example.",
        "AAAA",
        ("alias.example.", 30, "CNAME", "real.example."),
        ("real.example.", 40, "AAAA", "2001:db8::1"),
        ("real.example.", 40, "AAAA", "::ffff:127.0.0.1"),
    )
    _, records = _records(wire, question, "alias.example", dns.rdatatype.AAAA)
    want = [r.to_text() for r in dns.message.from_wire(wire).answer[1]]
    assert records == [
        ("alias.example", 5, 30, "real.example"),
        *(("real.example", 28, 40, address) for address in want),
    ]


def test_a_null_mx_is_the_root() -> None:
    wire, question = _reply("null.example.", "MX", ("null.example.", 60, "MX", "0 ."))
    _, records = _records(wire, question, "null.example", dns.rdatatype.MX)
    assert records == [("null.example", 15, 60, (0, ""))]


def test_malformed_answers_are_errors() -> None:
    wire, question = _reply("x.example.", "A", ("x.example.", 60, "A", "127.0.0.1"))
    qid = int.from_bytes(wire[:2], "big")
    # A compression pointer to itself (a loop) in place of the owner's name.
    start = _QUESTION_AT + len(question)
    looped = wire[:start] + bytes([0xC0 | start >> 8, start & 0xFF]) + wire[start + 2 :]
    with pytest.raises(_Unanswered, match="malformed name"):
        _read_reply(looped, qid, question, "x.example", dns.rdatatype.A)
    # A pointer forward (to the record's own type field), and one into the header.
    forward = wire[:start] + bytes([0xC0, start + 4]) + wire[start + 2 :]
    with pytest.raises(_Unanswered, match="malformed name"):
        _read_reply(forward, qid, question, "x.example", dns.rdatatype.A)
    header = wire[:start] + b"\xc0\x02" + wire[start + 2 :]
    with pytest.raises(_Unanswered, match="malformed name"):
        _read_reply(header, qid, question, "x.example", dns.rdatatype.A)
    # A label, then a pointer back to that label: each pointer must point before the last
    # one's target (as dnspython requires), so this is refused at once, not followed 64 times.
    looping = wire + b"\x01a\xc0" + bytes([len(wire)])
    with pytest.raises(_Unanswered, match="malformed name"):
        _read_name(looping + b"\xc0" + bytes([len(wire)]), len(looping))
    # The record cut short.
    with pytest.raises(_Unanswered):
        _read_reply(wire[:-2], qid, question, "x.example", dns.rdatatype.A)
    # An address of the wrong length.
    bad = wire[:-6] + b"\x00\x03" + wire[-4:-1]
    with pytest.raises(_Unanswered, match="wrong size"):
        _read_reply(bad, qid, question, "x.example", dns.rdatatype.A)
