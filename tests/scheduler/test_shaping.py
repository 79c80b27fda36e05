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


def test_lease_table_renewal_outlives_first_expiry() -> None:
    """Expiry follows the latest renewal (the heap keeps the stale entry), and the per-site
    count follows grants, releases and expiry."""
    table = LeaseTable(ttl=30)
    limits = Limits(max_connections=5)
    a = table.grant("s1", "d1", limits, ["a.test"], 2)
    b = table.grant("s1", "d1", limits, ["b.test"], 1)
    c = table.grant("s2", "d2", limits, ["c.test"], 1)
    assert a is not None and b is not None and c is not None
    assert (table.in_use("s1"), table.in_use("s2")) == (3, 1)
    first_expiry = a.expires_at
    table.ttl = 50  # a renewal now lasts 20 s longer than the first grant
    assert table.renew("d1", a.lease_id) is a
    assert table.renew("d2", a.lease_id) is None, "another deliverer cannot renew it"
    gone = table.expire(now=first_expiry + 1)
    assert {ls.lease_id for ls in gone} == {b.lease_id, c.lease_id}
    assert (table.in_use("s1"), table.in_use("s2")) == (2, 0)
    assert [ls.lease_id for ls in table.all()] == [a.lease_id]
    table.release("d2", a.lease_id)  # not its holder: nothing happens
    assert table.in_use("s1") == 2
    table.release("d1", a.lease_id)
    assert table.in_use("s1") == 0 and table.get(a.lease_id) is None
    assert table.expire(now=first_expiry + 60) == []
