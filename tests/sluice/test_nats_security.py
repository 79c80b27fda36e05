"""NATS authentication and TLS against real nats-server processes (docs/security.md).

Each test starts a nats-server with an authorization or tls block and checks that
`sluice.nats_layout.connect` (the one way Sluice connects) gets in with the right settings,
creates the JetStream layout, and is refused with NatsRefused, at once, with the wrong ones.
The last test sends a message through the API with NATS on TLS + a password and the
deliverer's lease channel on mutual TLS.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest

from sluice import config as config_mod
from sluice import names
from sluice.config import Config, ConfigError
from sluice.nats_layout import NatsRefused, connect, ensure_layout
from sluice.natsserver import NatsServer
from tests.api import call
from tests.certs import Ca, Issued
from tests.conftest import Stack, wait_for

# Bounds a refused connect: without the refusal check nats-py would retry for ever.
REFUSAL_BOUND = 30.0

StartServer = Callable[[str], NatsServer]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Starts nats-servers with the given config text; stops them after the test."""
    started: list[NatsServer] = []

    def start(conf: str) -> NatsServer:
        n = len(started)
        srv = NatsServer(tmp_path / f"js{n}", log_file=tmp_path / f"nats{n}.log", config=conf)
        srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def _cfg(srv: NatsServer, **nats: Any) -> Config:
    return config_mod.replace(Config(), nats={"url": srv.url, "connect_timeout": "5s", **nats})


async def _layout_works(cfg: Config) -> None:
    """Connect, create the layout, and round-trip a JetStream publish."""
    nc = await connect(cfg, "test-security")
    try:
        js = nc.jetstream()
        await ensure_layout(js, cfg)
        ack = await js.publish("sluice.jobs.critical", b"x", timeout=10)
        assert ack.stream == names.JOBS_STREAM
    finally:
        await nc.close()


async def _refused(cfg: Config) -> str:
    async with asyncio.timeout(REFUSAL_BOUND):
        with pytest.raises(NatsRefused) as err:
            await connect(cfg, "test-security")
    return str(err.value)


def _nkey_pair() -> tuple[str, str]:
    """(seed, public key) of a new user nkey."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    kp = nkeys.from_seed(bytearray(seed))
    return seed.decode(), kp.public_key.decode()


async def test_user_and_password(start_server: StartServer, tmp_path: Path) -> None:
    srv = start_server('authorization { user: "sluice", password: "pw-right" }')
    await _layout_works(_cfg(srv, user="sluice", password="pw-right"))
    # The documented way: the password from the environment, the rest from the file.
    toml = tmp_path / "sluice.toml"
    toml.write_text(f'[nats]\nurl = "{srv.url}"\nuser = "sluice"\n')
    from_env = config_mod.load(toml, environ={"SLUICE_NATS__PASSWORD": "pw-right"})
    assert from_env.nats.password == "pw-right"
    await _layout_works(from_env)

    wrong = await _refused(_cfg(srv, user="sluice", password="pw-wrong"))
    assert "Authorization Violation" in wrong and srv.url in wrong
    assert "Authorization Violation" in await _refused(_cfg(srv))


async def test_token(start_server: StartServer) -> None:
    srv = start_server('authorization { token: "tok-right" }')
    await _layout_works(_cfg(srv, token="tok-right"))
    assert "Authorization Violation" in await _refused(_cfg(srv, token="tok-wrong"))


async def test_nkey(start_server: StartServer, tmp_path: Path) -> None:
    seed, public = _nkey_pair()
    other_seed, _ = _nkey_pair()
    srv = start_server(f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}')
    seed_file = tmp_path / "sluice.nk"
    seed_file.write_text(seed + "\n")
    await _layout_works(_cfg(srv, nkey_seed_file=str(seed_file)))

    other_file = tmp_path / "other.nk"
    other_file.write_text(other_seed + "\n")
    assert "Authorization Violation" in await _refused(_cfg(srv, nkey_seed_file=str(other_file)))


async def test_one_auth_method_and_existing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="user/password and token"):
        await connect(_cfg_url(user="a", password="b", token="c"), "x")
    with pytest.raises(ConfigError, match="no such file"):
        await connect(_cfg_url(nkey_seed_file=str(tmp_path / "missing.nk")), "x")
    with pytest.raises(ConfigError, match="go together"):
        await connect(_cfg_url(tls_cert_file=str(tmp_path / "c.pem")), "x")
    with pytest.raises(ConfigError, match="TLS files"):
        await connect(_cfg_url(tls_ca_file=str(tmp_path / "missing.pem")), "x")


def _cfg_url(**nats: Any) -> Config:
    return config_mod.replace(Config(), nats={"url": "nats://127.0.0.1:1", **nats})


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Ca, Issued]:
    """A CA and a server certificate for 127.0.0.1 and localhost."""
    ca = Ca(tmp_path / "pki")
    return ca, ca.issue("server")


def _tls_block(server: Issued, *extra: str) -> str:
    lines = [f'cert_file: "{server.cert}"', f'key_file: "{server.key}"', *extra]
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"


async def test_tls_needs_the_ca(start_server: StartServer, pki: tuple[Ca, Issued]) -> None:
    ca, server = pki
    srv = start_server(_tls_block(server))
    await _layout_works(_cfg(srv, tls_ca_file=str(ca.pem)))
    # The same URL with the tls:// scheme.
    tls_url = srv.url.replace("nats://", "tls://")
    await _layout_works(
        config_mod.replace(_cfg(srv, tls_ca_file=str(ca.pem)), nats={"url": tls_url})
    )

    # Without the CA the server's certificate is checked against the system's CAs.
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(_cfg(srv))
    # A CA that did not sign it.
    stranger = Ca(ca.folder.parent / "stranger")
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(_cfg(srv, tls_ca_file=str(stranger.pem)))
    # The certificate names 127.0.0.1 and localhost, not this name.
    wrong_name = _cfg(srv, tls_ca_file=str(ca.pem), tls_server_name="nats.example")
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(wrong_name)
    right_name = _cfg(srv, tls_ca_file=str(ca.pem), tls_server_name="localhost")
    await _layout_works(right_name)


async def test_mutual_tls(start_server: StartServer, pki: tuple[Ca, Issued]) -> None:
    ca, server = pki
    client = ca.issue("sluice-client", server=False, ips=(), dns=())
    srv = start_server(_tls_block(server, f'ca_file: "{ca.pem}"', "verify: true"))
    await _layout_works(
        _cfg(
            srv,
            tls_ca_file=str(ca.pem),
            tls_cert_file=str(client.cert),
            tls_key_file=str(client.key),
        )
    )
    # No client certificate: the server ends the handshake.
    assert "CERTIFICATE_REQUIRED" in await _refused(_cfg(srv, tls_ca_file=str(ca.pem)))
    # A client certificate from another CA.
    stranger = Ca(ca.folder.parent / "stranger").issue("x", server=False, ips=(), dns=())
    refused = await _refused(
        _cfg(
            srv,
            tls_ca_file=str(ca.pem),
            tls_cert_file=str(stranger.cert),
            tls_key_file=str(stranger.key),
        )
    )
    assert "UNKNOWN_CA" in refused


async def test_tls_handshake_first(start_server: StartServer, pki: tuple[Ca, Issued]) -> None:
    ca, server = pki
    srv = start_server(_tls_block(server, "handshake_first: true"))
    await _layout_works(_cfg(srv, tls_ca_file=str(ca.pem), tls_handshake_first=True))


# End to end: the `stack` fixture with NATS on TLS + password and the lease channel on mTLS.


@pytest.fixture
def nats_server(tmp_path: Path, pki: tuple[Ca, Issued]) -> Iterator[NatsServer]:
    _, server = pki
    conf = _tls_block(server) + 'authorization { user: "sluice", password: "e2e-pw" }\n'
    srv = NatsServer(tmp_path / "js", log_file=tmp_path / "nats.log", config=conf)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def stack_overrides(pki: tuple[Ca, Issued]) -> dict[str, dict[str, Any]]:
    ca, server = pki
    deliverer = ca.issue("deliverer", server=False, ips=(), dns=())
    return {
        "nats": {"user": "sluice", "password": "e2e-pw", "tls_ca_file": str(ca.pem)},
        "scheduler": {
            "tls_cert_file": str(server.cert),
            "tls_key_file": str(server.key),
            "tls_client_ca_file": str(ca.pem),
        },
        "deliverer": {
            "scheduler_tls_ca_file": str(ca.pem),
            "scheduler_tls_cert_file": str(deliverer.cert),
            "scheduler_tls_key_file": str(deliverer.key),
        },
    }


async def test_send_delivered_with_tls_and_auth(stack: Stack) -> None:
    body = {
        "from": {"email": "app@acme.test"},
        "to": [{"email": "bob@mail.test"}],
        "subject": "over TLS",
        "text": "hello",
        "tier": "critical",
    }
    status, sent, _ = await call(stack, "POST", "/v1/send", body)
    assert status == 202, sent
    await wait_for(lambda: stack.smtp.to("bob@mail.test"), what="delivery")
    assert len(stack.smtp.to("bob@mail.test")) == 1
    await wait_for(lambda: stack.hooks.of_type("message.delivered"), what="delivered webhook")
    # The stack's services could not have got in without the password.
    plain = config_mod.replace(stack.cfg, nats={"password": ""})
    assert "Authorization Violation" in await _refused(plain)


# Decentralised auth: an operator, an account with JetStream, a user with a .creds file.


def _keypair(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _jwt(issuer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) signed by issuer's nkey (what `nsc` writes)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": base64.b32encode(os.urandom(20)).decode(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "name": name,
        "nats": {**nats, "version": 2},
    }
    payload = b64(json.dumps(claims).encode())
    signature = b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def _creds(account: Any, path: Path) -> Path:
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    user_claims = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user"}
    token = _jwt(account, user.public_key.decode(), "sluice", user_claims)
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


async def test_creds_file(start_server: StartServer, tmp_path: Path) -> None:
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    op_jwt = _jwt(operator, operator.public_key.decode(), "op", {"type": "operator"})
    unlimited = {"subs": -1, "conn": -1, "data": -1, "payload": -1, "imports": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acct_jwt = _jwt(
        operator,
        account.public_key.decode(),
        "sluice",
        {"type": "account", "limits": {**unlimited, **jetstream}},
    )
    # JetStream needs a system account in operator mode.
    system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    sys_pub = system.public_key.decode()
    sys_jwt = _jwt(operator, sys_pub, "SYS", {"type": "account", "limits": unlimited})
    srv = start_server(
        f'operator: "{op_jwt}"\nsystem_account: "{sys_pub}"\nresolver: MEMORY\n'
        f'resolver_preload: {{ {account.public_key.decode()}: "{acct_jwt}", '
        f'{sys_pub}: "{sys_jwt}" }}\n'
    )
    await _layout_works(_cfg(srv, creds_file=str(_creds(account, tmp_path / "sluice.creds"))))

    # A user of an account this server does not know.
    stranger = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    other = _creds(stranger, tmp_path / "other.creds")
    assert "Authorization Violation" in await _refused(_cfg(srv, creds_file=str(other)))
