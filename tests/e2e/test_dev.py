"""`sluice dev` — the README's run command — starts the stack, the curl it prints delivers a
mail to the local sink, and Ctrl-C stops everything, nats-server included."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        out.append(line)
        if marker in line:
            return "".join(out)
    raise AssertionError(f"no {marker!r} within {timeout}s:\n{''.join(out)}")


def _post_like_curl(curl: str) -> tuple[int, dict[str, str]]:
    """Run the printed curl command's request (parsed from its own words)."""
    words = shlex.split(curl.replace("\\\n", " "))
    url = next(w for w in words if w.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    data = words[words.index("-d") + 1].encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_dev_stack_delivers_the_printed_curl_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "dev", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        banner = _read_until(proc, "Ctrl-C stops everything", 60)
        m = re.search(r"(curl .*?)\n\n", banner, re.DOTALL)
        assert m, banner
        status, body = _post_like_curl(m.group(1))
        assert status == 202 and body["job_id"].startswith("job_")
        mail_dir = data_dir / "mail"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(mail_dir.glob("*.eml")):
            time.sleep(0.1)
        emls = list(mail_dir.glob("*.eml"))
        assert len(emls) == 1, "the demo mail did not reach the sink"
        content = emls[0].read_bytes()
        assert b"Subject: Hello from Sluice" in content
        assert f"Message-ID: <{body['message_id']}>".encode() in content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            raise AssertionError("sluice dev did not stop on SIGINT") from None
    assert proc.returncode == 0, rest
    assert "Sluice stopped." in rest
    assert _processes_mentioning(str(data_dir)) == [], "nats-server left running"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and "nats-server" in args:
            found.append(args)
    return found
