"""The README's curl and Python examples work as pasted (against a test stack: only the
address differs) and deliver mail."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from sluice.devdns import DnsServer
from sluice.nats_layout import connect
from sluice.tenants import TenantStore, now_ts
from sluice.v1 import tenant_pb2
from tests.conftest import SMTP_HOST, Stack, wait_for

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.DOTALL)


async def _demo_key(stack: Stack, dns_server: DnsServer) -> str:
    dns_server.records["example.net"] = [("MX", f"10 {SMTP_HOST}.")]
    nc = await connect(stack.cfg, "readme-test")
    try:
        store = TenantStore(nc.jetstream())
        await store.put_tenant(
            tenant_pb2.Tenant(
                tenant_id="demo", allowed_from_domains=["example.com"], created_at=now_ts()
            )
        )
        key, _ = await store.create_key("demo")
        return key
    finally:
        await nc.close()


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_readme_curl_examples(stack: Stack, dns_server: DnsServer) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed; the README's curl examples need it")
    key = await _demo_key(stack, dns_server)
    env = dict(os.environ, SLUICE_API_KEY=key)
    send, bad = [b for b in _blocks("sh") if "curl" in b and "/v1/send" in b][:2]
    script = send.replace("http://127.0.0.1:8080", stack.http)
    script = "\n".join(line for line in script.splitlines() if not line.startswith("export "))
    code, out = await _run("sh", "-c", script, env=env)
    assert code == 0, out
    body = json.loads(out)
    assert body["message_id"].endswith("@example.com")
    mail = await wait_for(lambda: stack.smtp.to("someone@example.net"), what="README mail")
    assert mail[0].message["Subject"] == "Hello from Sluice"

    code, out = await _run("sh", "-c", bad.replace("http://127.0.0.1:8080", stack.http), env=env)
    error = json.loads(out)
    assert error["code"] == 3
    assert error["message"] == "to[0].email: must be an address of the form local@domain"

    (blast,) = [b for b in _blocks("sh") if "/v1/blasts" in b]
    first_command = blast.split("\n# ")[0].replace("http://127.0.0.1:8080", stack.http)
    dns_server.records["example.org"] = [("MX", f"10 {SMTP_HOST}.")]
    code, out = await _run("sh", "-c", first_command, env=env)
    assert code == 0, out
    body = json.loads(out)
    assert body["recipient_count"] == 2
    await wait_for(lambda: stack.smtp.to("alan@example.org"), what="README blast")
    (ada,) = await wait_for(lambda: stack.smtp.to("ada@example.net"), what="README blast")
    assert ada.message["Subject"] == "Hi Ada"


async def test_readme_python_example(stack: Stack, dns_server: DnsServer, tmp_path: Path) -> None:
    key = await _demo_key(stack, dns_server)
    (example,) = _blocks("python")
    script = tmp_path / "example.py"
    script.write_text(example)
    env = dict(os.environ, SLUICE_API_KEY=key, SLUICE_GRPC=stack.cfg.ingest.grpc_listen)
    code, out = await _run(sys.executable, str(script), env=env)
    assert code == 0, out
    job_id, message_id = out.split()
    assert job_id.startswith("job_") and message_id == f"{job_id}@example.com"
    mail = await wait_for(lambda: stack.smtp.to("someone@example.net"), what="SDK mail")
    assert mail[0].message["Subject"] == "Your code is 123456"
