"""A small authoritative DNS server over UDP, for `sluice dev` and the tests.

Records come from a dict {name: [(type, rdata text), ...]}. Names not listed get NXDOMAIN,
unless a catch-all MX target is set: then every name has "MX 10 <target>" (so that in
`sluice dev` every domain delivers to the local sink). Names can be told to answer SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsServer"]

log = logging.getLogger(__name__)


class DnsServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        records: dict[str, list[tuple[str, str]]] | None = None,
        catch_all_mx: str | None = None,
        ttl: int = 60,
    ) -> None:
        self.records: dict[str, list[tuple[str, str]]] = {
            k.lower().rstrip("."): v for k, v in (records or {}).items()
        }
        self.servfail: set[str] = set()
        self.silent: set[str] = set()  # names asked about and never answered (tests)
        self.catch_all_mx = catch_all_mx
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.clients: set[tuple[str, int]] = set()  # (address, port) of every query's sender
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self.transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self.port

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _lookup(self, name: str, rdtype: str) -> tuple[dns.rcode.Rcode, list[str]]:
        if name in self.servfail:
            return dns.rcode.SERVFAIL, []
        if name in self.records:
            return dns.rcode.NOERROR, [r for t, r in self.records[name] if t == rdtype]
        if self.catch_all_mx:
            if rdtype == "MX":
                return dns.rcode.NOERROR, [f"10 {self.catch_all_mx}."]
            return dns.rcode.NOERROR, []
        return dns.rcode.NXDOMAIN, []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        self.clients.add(addr)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for q in query.question:
            name = q.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(q.rdtype)
            self.queries.append((name, rdtype))
            if name in self.silent:
                return
            rcode, answers = self._lookup(name, rdtype)
            response.set_rcode(rcode)
            if answers:
                response.answer.append(
                    dns.rrset.from_text_list(q.name, self.ttl, dns.rdataclass.IN, rdtype, answers)
                )
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)
