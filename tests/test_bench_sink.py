"""bench/sink.py, the benchmarks' light SMTP sink, against a real SMTP client (aiosmtplib):
it must take pipelined mail and count it per site as the benchmark reports it."""

from __future__ import annotations

import asyncio

import aiosmtplib

from bench.sink import SinkProtocol, SiteCounter

MESSAGE = b"From: a@bench.test\r\nTo: x@one.test\r\nSubject: s\r\n\r\nbody\r\n.leading dot\r\n"


async def test_sink_counts_mail_connections_and_duplicates_per_site() -> None:
    counter = SiteCounter()
    counter.site_of = {"one.test": "mx.one", "two.test": "mx.one", "three.test": "mx.three"}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(counter), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port) for _ in range(3)]
        for c in clients:
            await c.connect()
        assert all(c.supports_extension("pipelining") for c in clients)
        # two connections to mx.one at once, one to mx.three; a recipient sent twice
        await asyncio.gather(
            clients[0].sendmail("a@bench.test", ["x@one.test", "y@two.test"], MESSAGE),
            clients[1].sendmail("a@bench.test", ["z@one.test"], MESSAGE),
            clients[2].sendmail("a@bench.test", ["w@three.test"], MESSAGE),
        )
        await clients[0].sendmail("a@bench.test", ["x@one.test"], MESSAGE)
        assert counter.active == {"mx.one": 2, "mx.three": 1}
        for c in clients:
            await c.quit()
        for _ in range(100):  # (connection_lost comes on a later turn)
            if not any(counter.active.values()):
                break
            await asyncio.sleep(0.01)
    finally:
        server.close()
    assert counter.delivered == 4
    assert counter.connections == 3
    assert dict(counter.site_connections) == {"mx.one": 2, "mx.three": 1}
    assert dict(counter.site_mail) == {"mx.one": 3, "mx.three": 1}
    assert dict(counter.peak) == {"mx.one": 2, "mx.three": 1}
    assert counter.active == {"mx.one": 0, "mx.three": 0}
    assert counter.seen == {"x@one.test", "y@two.test", "z@one.test", "w@three.test"}
    assert counter.duplicates == 1


async def test_sink_answers_data_without_recipients_and_unknown_commands() -> None:
    counter = SiteCounter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(counter), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await client.connect()
        await client.ehlo()
        assert (await client.execute_command(b"DATA")).code == 503
        assert (await client.execute_command(b"VRFY", b"x")).code == 500
        assert (await client.noop()).code == 250
        await client.quit()
    finally:
        server.close()
    assert counter.delivered == 0 and counter.connections == 0
