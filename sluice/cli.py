"""The `sluice` command: the single composition root that starts services and manages tenants.

sluice dev                          the whole stack locally (see sluice/dev.py)
sluice ingest|expander|scheduler|deliverer|webhooks
                                    one service, from sluice.toml + SLUICE_* variables
sluice init                         create the JetStream streams and buckets
sluice tenants create|list|show|dkim tenants (NATS KV sluice_tenants)
sluice tenants purge <tenant>       remove everything held for a tenant (docs/storage.md)
sluice keys create|list|revoke      API keys (NATS KV sluice_keys)
sluice dlq list|show|replay|webhooks dead letters (mail; webhook deliveries)
sluice suppressions list|add|remove recipients a tenant does not mail
sluice sites                        per-site limits, leases, backlog (asks the scheduler)
sluice sink                         a catch-all SMTP sink with a DNS server (compose stack)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from sluice import __version__, deadletters, jsonpb, names, suppressions
from sluice import config as config_mod
from sluice.config import Config, ConfigError
from sluice.nats_layout import connect, ensure_layout
from sluice.services import SERVICES, run_until_signal, service, setup_logging, tune_gc
from sluice.tenants import TenantStore, new_webhook_secret, now_ts, valid_tenant_id
from sluice.v1 import messages_pb2, tenant_pb2

__all__ = ["main"]


def _tiers(values: list[str]) -> list[messages_pb2.Tier.ValueType]:
    return [messages_pb2.Tier.Value("TIER_" + v.upper()) for v in values]


async def _with_tenants(cfg: Config, fn: Callable[[TenantStore], Awaitable[int]]) -> int:
    nc = await connect(cfg, "sluice-cli")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        return await fn(TenantStore(js))
    finally:
        await nc.close()


async def _with_js(cfg: Config, fn: Callable[[JetStreamContext], Awaitable[int]]) -> int:
    nc = await connect(cfg, "sluice-cli")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        return await fn(js)
    finally:
        await nc.close()


async def _dlq(args: argparse.Namespace, js: JetStreamContext) -> int:
    if args.action == "webhooks":
        return await _webhook_dlq(args, js)
    if args.action == "list":
        entries, _ = await deadletters.list_page(js, args.tenant, args.limit)
        for _, delivery_id, dl in entries:
            reply = f"{dl.last_reply.code} {dl.last_reply.text}" if dl.last_reply.code else ""
            print(
                f"{delivery_id}\t{dl.pointer.tenant_id}\t{dl.pointer.recipient}\t"
                f"{messages_pb2.DeadLetterReason.Name(dl.reason)}\t{reply}"
            )
        return 0
    if args.action == "show":
        found = await deadletters.get(js, args.tenant, args.delivery_id)
        if found is None:
            print(f"no dead letter {args.delivery_id!r} for {args.tenant!r}", file=sys.stderr)
            return 1
        _print(found[1])
        return 0
    if await deadletters.replay(js, args.tenant, args.delivery_id):
        print(f"replayed {args.delivery_id}")
        return 0
    print(f"no dead letter {args.delivery_id!r} for {args.tenant!r}", file=sys.stderr)
    return 1


async def _webhook_dlq(args: argparse.Namespace, js: JetStreamContext) -> int:
    from webhooks import deadletters as webhook_deadletters

    if args.replay:
        if await webhook_deadletters.replay(js, args.tenant, args.replay):
            print(f"replayed {args.replay}")
            return 0
        print(f"no webhook dead letter {args.replay!r} for {args.tenant!r}", file=sys.stderr)
        return 1
    for dead_id, d in await webhook_deadletters.list_all(js, args.tenant, args.limit):
        print(f"{dead_id}\t{d.endpoint_id}\t{d.event.event_id}\t{names.event_token(d.event.type)}")
    return 0


async def _suppressions(args: argparse.Namespace, js: JetStreamContext) -> int:
    if args.action == "list":
        for e in await suppressions.list_tenant(js, args.tenant):
            expires = e.expires_at.ToJsonString() if e.HasField("expires_at") else "never"
            source = messages_pb2.SuppressionSource.Name(e.source).removeprefix(
                "SUPPRESSION_SOURCE_"
            )
            print(f"{e.email}\t{source.lower()}\t{expires}\t{e.reason}")
        return 0
    if args.action == "add":
        ttl = config_mod.parse_duration(args.expires_in) if args.expires_in else None
        entry = await suppressions.put(
            js, args.tenant, args.email, args.reason, messages_pb2.SUPPRESSION_SOURCE_MANUAL, ttl
        )
        _print(entry)
        return 0
    if await suppressions.remove(js, args.tenant, args.email):
        print(f"removed {suppressions.normalise(args.email)}")
        return 0
    print(f"{args.email!r} is not suppressed for {args.tenant!r}", file=sys.stderr)
    return 1


def _print(msg: Any) -> None:
    print(json.dumps(jsonpb.to_dict(msg), indent=2))


async def _tenants(args: argparse.Namespace, store: TenantStore) -> int:
    if args.action == "create":
        if not valid_tenant_id(args.tenant_id):
            print(f"invalid tenant id {args.tenant_id!r}: use a-z, 0-9 and '-'", file=sys.stderr)
            return 2
        tenant = tenant_pb2.Tenant(
            tenant_id=args.tenant_id,
            name=args.name or args.tenant_id,
            allowed_from_domains=[d.lower() for d in args.from_domain],
            allowed_tiers=_tiers(args.tier),
            created_at=now_ts(),
        )
        for i, url in enumerate(args.webhook):
            tenant.webhooks.append(
                tenant_pb2.WebhookEndpoint(
                    id=f"ep{i + 1}",
                    url=url,
                    secrets=[new_webhook_secret()],
                    batch_size=args.webhook_batch_size,
                )
            )
        await store.put_tenant(tenant)
        _print(tenant)
        return 0
    if args.action == "list":
        for t in await store.list_tenants():
            print(f"{t.tenant_id}\t{','.join(t.allowed_from_domains)}\t{t.name}")
        return 0
    tenant_or_none = await store.get_tenant(args.tenant_id)
    if args.action == "dkim":
        if tenant_or_none is None:
            print(f"no tenant {args.tenant_id!r}", file=sys.stderr)
            return 1
        keys = [k for k in tenant_or_none.dkim_keys if k.domain != args.domain.lower()]
        del tenant_or_none.dkim_keys[:]
        tenant_or_none.dkim_keys.extend(keys)
        tenant_or_none.dkim_keys.add(
            domain=args.domain.lower(),
            selector=args.selector,
            private_key_pem=await asyncio.to_thread(Path(args.key_file).read_text),
        )
        await store.put_tenant(tenant_or_none)
        print(
            f"{args.tenant_id}: {args.domain} signed with selector {args.selector}; publish "
            f"its public key at {args.selector}._domainkey.{args.domain}"
        )
        return 0
    if tenant_or_none is None:
        print(f"no tenant {args.tenant_id!r}", file=sys.stderr)
        return 1
    _print(tenant_or_none)
    return 0


async def _keys(args: argparse.Namespace, store: TenantStore) -> int:
    if args.action == "create":
        if await store.get_tenant(args.tenant_id) is None:
            print(f"no tenant {args.tenant_id!r}", file=sys.stderr)
            return 1
        api_key, record = await store.create_key(args.tenant_id, _tiers(args.tiers))
        print(api_key)
        print(f"key id {record.key_id}; the key is shown only once", file=sys.stderr)
        return 0
    if args.action == "list":
        for _, k in await store.list_keys():
            print(f"{k.key_id}\t{k.tenant_id}\t{'revoked' if k.revoked else 'active'}")
        return 0
    if await store.revoke_key(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"no key {args.key_id!r}", file=sys.stderr)
    return 1


async def _sites(cfg: Config) -> int:
    """Print the scheduler's ListSites as a table."""
    import grpc

    from deliverer.schedclient import SchedulerClient
    from sluice.v1 import scheduler_pb2

    # Standby schedulers answer UNAVAILABLE; the client asks each address until one answers.
    async with SchedulerClient.from_config(cfg.deliverer) as stub:
        try:
            resp = await stub.ListSites(scheduler_pb2.ListSitesRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            # The details name a TLS failure (certificate, host name) when that is the cause.
            print(
                f"scheduler at {cfg.deliverer.scheduler}: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
            )
            return 1
    print(f"{'SITE':28} {'CONNS':>9} {'RATE/s':>13} {'LEASES':>6} {'BACKLOG c/t/b':>16}  STATE")
    for s in resp.sites:
        backlog = {int(b.tier): b.messages for b in s.backlog}
        state = []
        if s.HasField("suspended_until"):
            state.append(f"suspended until {s.suspended_until.ToDatetime():%H:%M:%S}")
        if s.reason:
            state.append(s.reason)
        rate = (
            f"{s.current.max_message_rate:g}/{s.configured.max_message_rate:g}"
            if s.configured.max_message_rate
            else "-"
        )
        print(
            f"{s.site_id[:28]:28} "
            f"{s.connections_in_use:>3}/{s.current.max_connections}/"
            f"{s.configured.max_connections:<3} {rate:>13} {s.leases:>6} "
            f"{backlog.get(1, 0):>5}/{backlog.get(2, 0)}/{backlog.get(3, 0):<5}  "
            f"{'; '.join(state)}"
        )
        if s.domains:
            print(
                f"{'':28} domains: {', '.join(s.domains[:8])}{' …' if len(s.domains) > 8 else ''}"
            )
    return 0


def _purge(cfg: Config, tenant_id: str, yes: bool) -> int:
    """`sluice tenants purge`: confirm, then remove everything held for the tenant."""
    from sluice.purge import purge_tenant
    from sluice.store import open_store
    from sluice.tenants import valid_tenant_id

    if not valid_tenant_id(tenant_id):
        print(f"invalid tenant id {tenant_id!r}", file=sys.stderr)
        return 2
    if not yes:
        if not sys.stdin.isatty():
            print("refusing to purge without --yes (stdin is not a terminal)", file=sys.stderr)
            return 2
        answer = input(f"Purge tenant {tenant_id!r} and all its data? Type its id to confirm: ")
        if answer.strip() != tenant_id:
            print("not purged", file=sys.stderr)
            return 1

    async def run() -> int:
        nc = await connect(cfg, "sluice-cli")
        store = open_store(cfg.store, nc.jetstream(), cfg.nats.replicas)
        try:
            await ensure_layout(nc.jetstream(), cfg)
            report = await purge_tenant(nc, cfg, store, tenant_id)
        finally:
            await store.close()
            await nc.close()
        for kind, n in report.removed.items():
            print(f"{kind}\t{n}")
        for uri in report.payload_errors:
            print(f"payload not deleted: {uri}", file=sys.stderr)
        return 1 if report.payload_errors else 0

    return asyncio.run(run())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Sluice email delivery platform")
    p.add_argument("--config", help="config file (default: $SLUICE_CONFIG or ./sluice.toml)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the whole stack locally")
    dev.add_argument("--data-dir", default="var/dev", help="where NATS data and mail go")
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service")
    sub.add_parser("init", help="create the JetStream streams and buckets")
    sub.add_parser("sites", help="per-site limits, leases, backlog and throttling (scheduler)")
    sink = sub.add_parser("sink", help="a catch-all SMTP sink with a DNS server pointing at it")
    sink.add_argument("--smtp-listen", default="0.0.0.0:25")
    sink.add_argument("--dns-listen", default="0.0.0.0:53")
    sink.add_argument("--mail-dir", default="var/sink")
    sink.add_argument("--mx-address", help="the A record of the sink (default: this host's)")
    tiers = ["critical", "transactional", "bulk"]

    t = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    tc = t.add_parser("create")
    tc.add_argument("tenant_id")
    tc.add_argument("--name")
    tc.add_argument(
        "--from-domain",
        action="append",
        default=[],
        required=True,
        help="a domain the tenant may send From (repeatable)",
    )
    tc.add_argument(
        "--tier",
        action="append",
        default=[],
        choices=tiers,
        help="an allowed tier (repeatable; default all)",
    )
    tc.add_argument("--webhook", action="append", default=[], help="an endpoint URL (repeatable)")
    tc.add_argument(
        "--webhook-batch-size",
        type=int,
        default=0,
        metavar="N",
        help="POST up to N events at once as a JSON array (default: one event per POST)",
    )
    t.add_parser("list")
    ts = t.add_parser("show")
    ts.add_argument("tenant_id")
    td = t.add_parser("dkim", help="set the DKIM key the tenant signs one From domain with")
    td.add_argument("tenant_id")
    td.add_argument("--domain", required=True)
    td.add_argument("--selector", required=True)
    td.add_argument("--key-file", required=True, help="RSA private key, PEM")
    tp = t.add_parser(
        "purge",
        help="remove the tenant and everything held for it: keys, queued mail, events, dead "
        "letters, suppressions, idempotency keys, payloads",
    )
    tp.add_argument("tenant_id")
    tp.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    d = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="action", required=True)
    dl = d.add_parser("list")
    dl.add_argument("--tenant", help="only this tenant's")
    dl.add_argument("--limit", type=int, default=100)
    for name in ("show", "replay"):
        dp = d.add_parser(name)
        dp.add_argument("delivery_id")
        dp.add_argument("--tenant", required=True)
    dw = d.add_parser("webhooks", help="webhook deliveries that ran out of retries")
    dw.add_argument("--tenant", required=True)
    dw.add_argument("--limit", type=int, default=1000)
    dw.add_argument("--replay", metavar="ID", help="queue this one again (an id from the list)")

    s = sub.add_parser("suppressions", help="recipients a tenant does not mail")
    sa = s.add_subparsers(dest="action", required=True)
    sl = sa.add_parser("list", help="live entries, ordered by address")
    sl.add_argument("--tenant", required=True)
    sadd = sa.add_parser("add", help="suppress a recipient (replaces an existing entry)")
    sadd.add_argument("email")
    sadd.add_argument("--tenant", required=True)
    sadd.add_argument("--reason", default="manual")
    sadd.add_argument("--expires-in", metavar="DURATION", help='e.g. "3d"; default: never')
    sr = sa.add_parser("remove", help="let the tenant mail the recipient again")
    sr.add_argument("email")
    sr.add_argument("--tenant", required=True)

    k = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    kc = k.add_parser("create", help="create a key; it is printed once, only its hash is kept")
    kc.add_argument("--tenant", dest="tenant_id", required=True)
    kc.add_argument(
        "--tiers",
        nargs="+",
        default=[],
        choices=tiers,
        help="tiers this key may use (default: the tenant's)",
    )
    k.add_parser("list")
    kr = k.add_parser("revoke")
    kr.add_argument("key_id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    cmd = args.command
    if cmd == "dev":
        from sluice.dev import run_dev

        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        tune_gc()
        run_until_signal(lambda stop: run_dev(cfg, Path(args.data_dir), stop))
        return 0
    if cmd in SERVICES:
        serve = service(cmd)  # (imports the service's modules)
        tune_gc()
        run_until_signal(lambda stop: serve(cfg, stop))
        return 0
    if cmd == "sink":
        from sluice.dev import run_sink

        run_until_signal(
            lambda stop: run_sink(
                args.smtp_listen, args.dns_listen, Path(args.mail_dir), args.mx_address, stop
            )
        )
        return 0
    if cmd == "sites":
        return asyncio.run(_sites(cfg))
    if cmd == "init":

        async def init() -> int:
            nc = await connect(cfg, "sluice-cli")
            await ensure_layout(nc.jetstream(), cfg)
            await nc.close()
            return 0

        return asyncio.run(init())
    if cmd == "tenants" and args.action == "purge":
        return _purge(cfg, args.tenant_id, args.yes)
    if cmd == "tenants":
        return asyncio.run(_with_tenants(cfg, lambda s: _tenants(args, s)))
    if cmd == "dlq":
        return asyncio.run(_with_js(cfg, lambda js: _dlq(args, js)))
    if cmd == "suppressions":
        return asyncio.run(_with_js(cfg, lambda js: _suppressions(args, js)))
    if cmd == "keys":
        return asyncio.run(_with_tenants(cfg, lambda s: _keys(args, s)))
    return 2  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
