from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.leases import LeaseTable
from scheduler.shaping import Limits, ShapingError, load_rules


def test_default_rules_group_google_workspace_into_one_site() -> None:
    rules = load_rules()
    hosts = ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]
    assert rules.site_of("customer.example", hosts) == "google"
    assert rules.site_of("other.example", ["mx1.other.example", "mx0.other.example"]) == (
        "mx0.other.example,mx1.other.example"
    )
    assert rules.limits("google", ["customer.example"]).max_connections == 50


def test_layers_and_unknown_keys(tmp_path: Path) -> None:
    f = tmp_path / "shaping.toml"
    f.write_text(
        "[default]\nmax_connections = 5\n"
        '[provider.big]\nmatch = ["*.big.test"]\nmax_connections = 40\n'
        '[domain."vip.test"]\nmax_message_rate = 2.5\n'
    )
    rules = load_rules(f)
    assert rules.limits("big", ["vip.test"]) == Limits(40, 2.5, 100, 0.0)
    assert rules.limits("x", ["plain.test"]).max_connections == 5
    f.write_text("[default]\nmax_conections = 5\n")
    with pytest.raises(ShapingError, match="unknown key 'max_conections'"):
        load_rules(f)


def test_lease_table_never_exceeds_site_limit() -> None:
    table = LeaseTable(ttl=30)
    limits = Limits(max_connections=3)
    first = table.grant("google", "d1", limits, ["gmail.com"])
    assert first is not None and first.connections == 3
    assert table.grant("google", "d2", limits, ["gmail.com"]) is None
    table.release("d1", first.lease_id)
    second = table.grant("google", "d2", limits, ["gmail.com"])
    assert second is not None and second.connections == 3
    # An expired lease frees its connections.
    table.expire(now=second.expires_at + 1)
    assert table.in_use("google") == 0
