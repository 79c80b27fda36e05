"""CPU per SMTP connection opened and closed by the deliverer (deliverer/smtp.py: greeting,
EHLO, QUIT over Sluice's own protocol; through aiosmtplib until the sixteenth session),
against the same exchange written by hand on a bare asyncio protocol, both against
Postfix's `smtp-sink` on loopback (its CPU is not counted).

    .venv/bin/python -m bench.smtp_connect [--connections 1000] [--rounds 3]

A long tail of small sites costs a connection for every few messages: this is its price
apart from the messages. Needs Debian's `postfix` package (smtp-sink).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

from bench.common import machine
from deliverer.smtp import SmtpConnection
from sluice.natsserver import free_port, port_open


class _Bare(asyncio.Protocol):
    """Just enough client to read a reply (its last line) at a time."""

    def __init__(self) -> None:
        self._buffer = b""
        self._waiter: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._check()

    def _check(self) -> None:
        if self._waiter is None or self._waiter.done() or not self._buffer.endswith(b"\r\n"):
            return
        if self._buffer.split(b"\r\n")[-2][3:4] != b"-":
            self._waiter.set_result(self._buffer)
            self._buffer = b""

    async def reply(self) -> bytes:
        self._waiter = asyncio.get_running_loop().create_future()
        self._check()
        return await self._waiter


async def _sluice(port: int) -> None:
    conn = SmtpConnection("sink", "127.0.0.1", port, "bench.test", 5.0, 5.0)
    await conn.open()
    await conn.close()


async def _bare(port: int) -> None:
    transport, proto = await asyncio.get_running_loop().create_connection(_Bare, "127.0.0.1", port)
    await proto.reply()
    for command in (b"EHLO bench.test\r\n", b"QUIT\r\n"):
        transport.write(command)
        await proto.reply()
    transport.close()


def _start_sink(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["smtp-sink", "-u", "postfix", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    sink = _start_sink(port)
    try:
        for _ in range(100):
            if port_open("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        print(machine())
        for rnd in range(args.rounds):
            figures = []
            for name, connect in (("deliverer", _sluice), ("by hand", _bare)):
                cpu0 = time.process_time()
                for _ in range(args.connections):
                    await connect(port)
                figures.append(
                    f"{name} {(time.process_time() - cpu0) / args.connections * 1e6:.0f} µs"
                )
            print(f"round {rnd + 1}: CPU per connection: " + ", ".join(figures))
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
