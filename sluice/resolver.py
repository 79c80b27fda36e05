"""The DNS seam shared by the scheduler (grouping domains into sites) and the deliverer.

MX lookup with dnspython, cached by TTL. RFC 5321 5.1: no MX means the domain itself is
the mail host (implicit MX). RFC 7505: a single "MX 0 ." is a null MX, a permanent failure.
dnspython exceptions become `DnsPermanent` or `DnsTemporary`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from sluice.config import DnsConfig

__all__ = ["DnsError", "DnsPermanent", "DnsTemporary", "MxHost", "Resolver"]


class DnsError(Exception):
    """A DNS lookup failed."""


class DnsPermanent(DnsError):
    """The domain cannot receive mail (NXDOMAIN, null MX)."""


class DnsTemporary(DnsError):
    """The lookup may succeed later (SERVFAIL, timeout)."""


@dataclass(frozen=True)
class MxHost:
    preference: int
    host: str


def parse_routes(routes: tuple[str, ...]) -> dict[str, tuple[str, int | None]]:
    """ "example.com=relay.example.net:2525" entries as {domain: (host, port)}."""
    out: dict[str, tuple[str, int | None]] = {}
    for entry in routes:
        domain, sep, target = entry.partition("=")
        host, _, port = target.strip().rpartition(":") if ":" in target else (target, "", "")
        if not sep or not domain.strip() or not (host or target).strip():
            raise ValueError(f"route {entry!r}: use domain=host[:port]")
        out[domain.strip().lower()] = (
            (host or target).strip().lower(),
            int(port) if port else None,
        )
    return out


class Resolver:
    """MX and address lookups with a TTL cache."""

    def __init__(self, cfg: DnsConfig) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            self._resolver.nameservers = list(cfg.nameservers)
            self._resolver.port = cfg.port
        self._resolver.lifetime = cfg.timeout
        self._resolver.timeout = cfg.timeout
        self._mx: dict[str, tuple[float, list[MxHost]]] = {}
        self._addr: dict[str, tuple[float, list[str]]] = {}
        self._routes = parse_routes(cfg.routes)

    def route(self, domain: str) -> tuple[str, int | None] | None:
        """The (host, port) a route override sends this domain's mail to, if any ("*" matches
        every domain); the port is None when the route names none."""
        return self._routes.get(domain.lower()) or self._routes.get("*")

    async def mx(self, domain: str) -> list[MxHost]:
        """MX hosts by preference (lowest first); implicit MX if there are none. A route
        override replaces the lookup (like Postfix's transport map)."""
        route = self.route(domain)
        if route is not None:
            return [MxHost(0, route[0])]
        now = time.monotonic()
        cached = self._mx.get(domain)
        if cached and cached[0] > now:
            return cached[1]
        try:
            answer = await self._resolver.resolve(domain, "MX")
            hosts = sorted(
                (MxHost(r.preference, r.exchange.to_text().rstrip(".").lower()) for r in answer),
                key=lambda h: (h.preference, h.host),
            )
            ttl = float(answer.rrset.ttl if answer.rrset else 300)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsPermanent(f"{domain}: no such domain") from exc
        except dns.resolver.NoAnswer:
            hosts, ttl = [MxHost(0, domain)], 300.0
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTemporary(f"{domain}: MX lookup failed: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporary(f"{domain}: MX lookup failed: {exc}") from exc
        if len(hosts) == 1 and hosts[0].host in ("", "."):
            raise DnsPermanent(f"{domain}: null MX (RFC 7505), the domain accepts no mail")
        self._mx[domain] = (now + ttl, hosts)
        return hosts

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of a host."""
        now = time.monotonic()
        cached = self._addr.get(host)
        if cached and cached[0] > now:
            return cached[1]
        found: list[str] = []
        ttl = 300.0
        temporary: DnsError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                temporary = DnsTemporary(f"{host}: {rdtype} lookup failed: {exc}")
                continue
            found.extend(r.to_text() for r in answer)
            if answer.rrset is not None:
                ttl = min(ttl, float(answer.rrset.ttl))
        if not found:
            if temporary is not None:
                raise temporary
            raise DnsPermanent(f"{host}: no A or AAAA record")
        self._addr[host] = (now + ttl, found)
        return found

    @staticmethod
    def in_order(hosts: list[MxHost]) -> list[MxHost]:
        """Hosts by preference, shuffled among equal preferences (RFC 5321 5.1)."""
        groups: dict[int, list[MxHost]] = {}
        for h in hosts:
            groups.setdefault(h.preference, []).append(h)
        out: list[MxHost] = []
        for pref in sorted(groups):
            group = groups[pref][:]
            random.shuffle(group)
            out.extend(group)
        return out
