"""What a scheduler call costs over gRPC: a unary call against a message on an open
bidirectional stream (the deliverer's `Leases` stream), client and server in one process on
loopback, so the CPU figure covers both sides.

    .venv/bin/python -m bench.grpc_calls [--calls N]

Prints the CPU time per call for sequential unary calls, 50 concurrent callers of unary
calls, and sequential round trips on one stream, in two rounds (the first warms up).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
from collections.abc import AsyncIterator

import grpc

from bench.common import machine


def _same(b: bytes) -> bytes:
    return b


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _echo(request: bytes, context: object) -> bytes:
    return request


async def _echo_stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def main(calls: int, options: list[tuple[str, int]]) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_echo, _same, _same),
            "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream, _same, _same),
        },
    )
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(machine())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options) as channel:
        unary = channel.unary_unary("/bench.Echo/Unary", _same, _same)
        stream = channel.stream_stream("/bench.Echo/Stream", _same, _same)
        payload = b"x" * 100  # about an AcquireLeasesRequest with a few domains
        await unary(payload)
        for round_ in (1, 2):
            c0 = _cpu()
            for _ in range(calls):
                await unary(payload)
            sequential = (_cpu() - c0) / calls

            async def caller(n: int) -> None:
                for _ in range(n):
                    await unary(payload)

            c0 = _cpu()
            await asyncio.gather(*(caller(calls // 50) for _ in range(50)))
            concurrent = (_cpu() - c0) / (calls // 50 * 50)

            # (no request iterator: the writes below go out as they are made)
            call = stream()  # type: ignore[call-arg]
            c0 = _cpu()
            for _ in range(calls):
                await call.write(payload)
                await call.read()
            streamed = (_cpu() - c0) / calls
            await call.done_writing()
            await call.read()  # the end of the stream
            print(
                f"round {round_}: CPU per call, both sides: unary {sequential * 1e3:.3f} ms,"
                f" unary with 50 callers {concurrent * 1e3:.3f} ms,"
                f" stream round trip {streamed * 1e3:.3f} ms"
                f" ({sequential / streamed:.1f}x less than unary)"
            )
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=N",
        help="a gRPC channel argument for both sides, e.g. grpc.http2.bdp_probe=0",
    )
    args = parser.parse_args()
    opts = [(k, int(v)) for k, _, v in (o.partition("=") for o in args.option)]
    asyncio.run(main(args.calls, opts))
