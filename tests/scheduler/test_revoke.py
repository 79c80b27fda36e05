"""A lease taken back because its site's limit fell keeps counting against the site until its
holder, told at its next renewal, releases it (its connections closed) or it expires: the
holder's connections are open until then, and granting them to another lease meanwhile put a
site over its limit (freed at the renewal, a server still closing them saw one too many)."""

from __future__ import annotations

from scheduler.leases import LeaseTable
from scheduler.shaping import Limits


def test_a_revoked_lease_holds_its_connections_until_its_holder_releases_it() -> None:
    table = LeaseTable(ttl=30.0)
    limits = Limits(max_connections=3)
    first = table.grant("mx.site", "d1", limits, ["site.test"])
    assert first is not None and first.connections == 3
    table.revoke(first.lease_id)
    assert table.in_use("mx.site") == 3
    assert table.grant("mx.site", "d2", limits, ["site.test"]) is None, "granted over the limit"
    # Its holder's renewal says it is lost; its connections are still closing.
    assert table.renew("d1", first.lease_id) is None
    assert table.in_use("mx.site") == 3
    assert table.grant("mx.site", "d2", limits, ["site.test"]) is None, "granted while closing"
    # Released by its holder, its connections closed: free.
    table.release("d1", first.lease_id)
    assert table.in_use("mx.site") == 0
    second = table.grant("mx.site", "d2", limits, ["site.test"])
    assert second is not None and second.connections == 3


def test_a_revoked_lease_that_is_never_renewed_expires() -> None:
    table = LeaseTable(ttl=30.0)
    lease = table.grant("mx.site", "d1", Limits(max_connections=2), ["site.test"])
    assert lease is not None
    table.revoke(lease.lease_id)
    table.expire(now=lease.expires_at + 1)
    assert table.in_use("mx.site") == 0 and table.get(lease.lease_id) is None
