"""Shaping rules: default -> provider (MX host suffix) -> domain, from a TOML file."""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Limits", "Rules", "ShapingError", "load_rules"]

DEFAULT_FILE = Path(__file__).with_name("shaping.toml")


class ShapingError(ValueError):
    """The shaping file is invalid; the message names the file and key."""


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10
    max_message_rate: float = 0.0
    max_deliveries_per_connection: int = 100
    max_connection_rate: float = 0.0
    # Out of every ten batches, how many go to bulk even while higher tiers wait (0: strict).
    bulk_reserve: int = 0


_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}


@dataclass(frozen=True)
class Provider:
    name: str
    match: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def matches(self, hosts: list[str]) -> bool:
        return bool(hosts) and all(
            any(fnmatch.fnmatch(h, pat) for pat in self.match) for h in hosts
        )


@dataclass(frozen=True)
class Rules:
    default: Limits = field(default_factory=Limits)
    providers: tuple[Provider, ...] = ()
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)

    def site_of(self, domain: str, mx_hosts: list[str]) -> str:
        """The site id: the matching provider's name, else the sorted MX host set."""
        for p in self.providers:
            if p.matches(mx_hosts):
                return p.name
        return ",".join(sorted(set(mx_hosts))) or domain

    def limits(self, site_id: str, domains: list[str]) -> Limits:
        limits = self.default
        for p in self.providers:
            if p.name == site_id:
                limits = dataclasses.replace(limits, **p.overrides)
        for d in sorted(domains):
            if d in self.domains:
                limits = dataclasses.replace(limits, **self.domains[d])
        return limits


def _limit_values(table: dict[str, Any], where: str, extra: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in extra:
            continue
        if key not in _LIMIT_KEYS:
            raise ShapingError(f"{where}: unknown key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ShapingError(f"{where}: {key} must be a non-negative number")
        if key == "bulk_reserve" and value > 10:
            raise ShapingError(f"{where}: bulk_reserve is out of 10 batches (0-10)")
        out[key] = type(getattr(Limits(), key))(value)
    return out


def load_rules(path: str | Path | None = None) -> Rules:
    p = Path(path) if path else DEFAULT_FILE
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ShapingError(f"{p}: {exc}") from exc
    for section in data:
        if section not in {"default", "provider", "domain"}:
            raise ShapingError(f"{p}: unknown section [{section}]")
    default = Limits(**_limit_values(data.get("default", {}), f"{p} [default]", set()))
    providers = []
    for name, table in data.get("provider", {}).items():
        where = f"{p} [provider.{name}]"
        match = table.get("match")
        if not isinstance(match, list) or not match or not all(isinstance(m, str) for m in match):
            raise ShapingError(f"{where}: match must be a non-empty list of host patterns")
        providers.append(
            Provider(name, tuple(m.lower() for m in match), _limit_values(table, where, {"match"}))
        )
    domains = {
        d.lower(): _limit_values(t, f"{p} [domain.{d}]", set())
        for d, t in data.get("domain", {}).items()
    }
    return Rules(default, tuple(providers), domains)
