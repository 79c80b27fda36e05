"""The deliverer's scheduler client: the SchedulerService calls over one or several scheduler
addresses (`[deliverer] scheduler`, comma-separated).

Of several schedulers one is active and the others are standbys that answer UNAVAILABLE
(scheduler/server.py). A call goes to the address that answered last; on UNAVAILABLE (a
standby, or nobody listening there) it tries the next addresses in turn, once each, and the
one that answers becomes the address for the next calls. If none answers, the last error
is raised, so callers handle a failed call as they would with a single scheduler.

AcquireLeases, RenewLeases, ReleaseLeases and ReportOutcomes go over one Leases stream per
address (opened at the first call, and again after it ends): a message on a stream costs
both sides a fraction of a unary call, and a deliverer working a long tail of domains makes
thousands of these calls a minute. ReleaseLeases waits for no response. ListSites is unary.

With `[deliverer] scheduler_tls_*` set the channels are TLS (mutual TLS with a client
certificate); a failed handshake is UNAVAILABLE, like a scheduler that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from sluice.config import DelivererConfig
from sluice.grpctls import channel_credentials
from sluice.v1 import scheduler_pb2, scheduler_pb2_grpc

__all__ = ["SchedulerClient", "parse_addresses"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A scheduler that comes back (a restart) is tried again within a couple of seconds, not
# after gRPC's default reconnect backoff of up to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


class LeaseStream:
    """One Leases stream: requests are written in order, responses matched to them by id."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub) -> None:
        self._outbox: asyncio.Queue[scheduler_pb2.LeasesRequest | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[scheduler_pb2.LeasesResponse]] = {}
        self._ids = itertools.count(1)
        self.error: grpc.aio.AioRpcError | None = None
        # Whether the scheduler at the other end reads Outcome.count (its last response
        # said so; an older one never does).
        self.outcome_counts = False
        self._call = stub.Leases(self._requests())
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[scheduler_pb2.LeasesRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        error = _error(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the lease stream")
        try:
            async for resp in self._call:
                self.outcome_counts = resp.outcome_counts
                waiter = self._waiting.pop(resp.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(resp)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _error(grpc.StatusCode.CANCELLED, "the lease stream was closed")
            raise
        finally:
            # Every request still waiting fails as its unary call would have, and the
            # request iterator ends (gRPC's task reading it would wait on it forever).
            self.error = error
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(error)
            self._waiting.clear()
            self._outbox.put_nowait(None)

    async def send(
        self,
        request: scheduler_pb2.LeasesRequest,
        timeout: float | None,  # noqa: ASYNC109 - a per-request deadline
    ) -> scheduler_pb2.LeasesResponse:
        """`request`'s response. AioRpcError: the scheduler's answer was an error, or the
        stream ended first, or `timeout` passed first (DEADLINE_EXCEEDED)."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        request.id = next(self._ids)
        waiter: asyncio.Future[scheduler_pb2.LeasesResponse] = loop.create_future()
        self._waiting[request.id] = waiter
        self._outbox.put_nowait(request)
        timer = loop.call_later(timeout, self._expire, request.id, timeout) if timeout else None
        try:
            resp = await waiter
        finally:
            if timer is not None:
                timer.cancel()
        if resp.error_code:
            raise _error(_CODES.get(resp.error_code, grpc.StatusCode.UNKNOWN), resp.error_message)
        return resp

    def _expire(self, request_id: int, timeout: float) -> None:
        waiter = self._waiting.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                _error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no response within {timeout:g}s")
            )

    def post(self, request: scheduler_pb2.LeasesRequest) -> None:
        """Send `request` asking for no response (AioRpcError if the stream has ended)."""
        if self.error is not None:
            raise self.error
        request.id = 0
        self._outbox.put_nowait(request)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def parse_addresses(value: str) -> list[str]:
    """ "a:1, b:2" -> ["a:1", "b:2"]."""
    return [a.strip() for a in value.split(",") if a.strip()]


class SchedulerClient:
    """SchedulerService calls that fail over between scheduler addresses."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        """credentials: TLS for every address (None: plaintext); server_name: the name the
        schedulers' certificates carry, when not the addresses' hosts."""
        self.addresses = (
            parse_addresses(addresses) if isinstance(addresses, str) else list(addresses)
        )
        if not self.addresses:
            raise ValueError("no scheduler address")
        self._credentials = credentials
        self._options: list[tuple[str, int | str]] = list(_CHANNEL_OPTIONS)
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, LeaseStream] = {}
        self._current = 0

    @classmethod
    def from_config(cls, cfg: DelivererConfig) -> SchedulerClient:
        """The client `[deliverer]` describes: its scheduler addresses and TLS settings."""
        return cls(
            cfg.scheduler,
            channel_credentials(
                cfg.scheduler_tls_ca_file, cfg.scheduler_tls_cert_file, cfg.scheduler_tls_key_file
            ),
            cfg.scheduler_tls_server_name,
        )

    @property
    def current(self) -> str:
        """The address calls go to first."""
        return self.addresses[self._current]

    @property
    def outcome_counts(self) -> bool:
        """Whether the scheduler calls go to reads Outcome.count (as far as its lease
        stream has told: False until it has answered once)."""
        stream = self._streams.get(self.current)
        return stream is not None and stream.error is None and stream.outcome_counts

    def _stub(self, address: str) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, self._options)
            self._channels[address] = channel
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)

    def _stream(self, address: str) -> LeaseStream:
        """The address's Leases stream, opened again if it has ended."""
        stream = self._streams.get(address)
        if stream is None or stream.error is not None:
            stream = self._streams[address] = LeaseStream(self._stub(address))
        return stream

    async def _send(
        self,
        request: scheduler_pb2.LeasesRequest,
        timeout: float | None,  # noqa: ASYNC109 - a per-request deadline
    ) -> scheduler_pb2.LeasesResponse:
        return await self._call(lambda address: self._stream(address).send(request, timeout))

    async def _call(self, call: Callable[[str], Awaitable[T]]) -> T:
        """`call` on the current address, else on the others in turn (see the module)."""
        last: grpc.aio.AioRpcError | None = None
        n = len(self.addresses)
        for i in range(n):
            index = (self._current + i) % n
            try:
                result = await call(self.addresses[index])
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and n > 1:
                    # A hung scheduler: this call is spent, the next one starts elsewhere.
                    self._current = (index + 1) % n
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = exc
                continue
            if index != self._current:
                log.info("scheduler: now using %s", self.addresses[index])
                self._current = index
            return result
        assert last is not None
        raise last

    async def AcquireLeases(  # noqa: N802 - the gRPC method's name, as on a stub
        self,
        request: scheduler_pb2.AcquireLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call deadline
    ) -> scheduler_pb2.AcquireLeasesResponse:
        resp = await self._send(scheduler_pb2.LeasesRequest(acquire=request), timeout)
        return resp.acquire

    async def RenewLeases(  # noqa: N802
        self,
        request: scheduler_pb2.RenewLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call deadline
    ) -> scheduler_pb2.RenewLeasesResponse:
        resp = await self._send(scheduler_pb2.LeasesRequest(renew=request), timeout)
        return resp.renew

    async def ReleaseLeases(  # noqa: N802
        self, request: scheduler_pb2.ReleaseLeasesRequest
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        """Sent without waiting for a response (if it is lost, the leases simply expire);
        AioRpcError only when no scheduler's stream is open or can be opened."""

        async def post(address: str) -> None:
            self._stream(address).post(scheduler_pb2.LeasesRequest(release=request))

        await self._call(post)
        return scheduler_pb2.ReleaseLeasesResponse()

    async def ReportOutcomes(  # noqa: N802
        self,
        request: scheduler_pb2.ReportOutcomesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call deadline
    ) -> scheduler_pb2.ReportOutcomesResponse:
        resp = await self._send(scheduler_pb2.LeasesRequest(report=request), timeout)
        return resp.report

    async def ListSites(  # noqa: N802
        self,
        request: scheduler_pb2.ListSitesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.ListSitesResponse:
        return await self._call(
            lambda address: self._stub(address).ListSites(request, timeout=timeout)
        )

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
