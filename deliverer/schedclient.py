"""The deliverer's scheduler client: the SchedulerService calls over one or several scheduler
addresses (`[deliverer] scheduler`, comma-separated).

Of several schedulers one is active and the others are standbys that answer UNAVAILABLE
(scheduler/server.py). A call goes to the address that answered last; on UNAVAILABLE (a
standby, or nobody listening there) it tries the next addresses in turn, once each, and the
one that answers becomes the address for the next calls. If none answers, the last error
is raised, so callers handle a failed call as they would with a single scheduler.

With `[deliverer] scheduler_tls_*` set the channels are TLS (mutual TLS with a client
certificate); a failed handshake is UNAVAILABLE, like a scheduler that is not there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
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

    def _stub(self, address: str) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, self._options)
            self._channels[address] = channel
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def _call(
        self, call: Callable[[scheduler_pb2_grpc.SchedulerServiceAsyncStub], Awaitable[T]]
    ) -> T:
        last: grpc.aio.AioRpcError | None = None
        n = len(self.addresses)
        for i in range(n):
            index = (self._current + i) % n
            try:
                result = await call(self._stub(self.addresses[index]))
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
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.AcquireLeasesResponse:
        return await self._call(lambda stub: stub.AcquireLeases(request, timeout=timeout))

    async def RenewLeases(  # noqa: N802
        self,
        request: scheduler_pb2.RenewLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.RenewLeasesResponse:
        return await self._call(lambda stub: stub.RenewLeases(request, timeout=timeout))

    async def ReleaseLeases(  # noqa: N802
        self,
        request: scheduler_pb2.ReleaseLeasesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.ReleaseLeasesResponse:
        return await self._call(lambda stub: stub.ReleaseLeases(request, timeout=timeout))

    async def ReportOutcomes(  # noqa: N802
        self,
        request: scheduler_pb2.ReportOutcomesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.ReportOutcomesResponse:
        return await self._call(lambda stub: stub.ReportOutcomes(request, timeout=timeout))

    async def ListSites(  # noqa: N802
        self,
        request: scheduler_pb2.ListSitesRequest,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call gRPC deadline
    ) -> scheduler_pb2.ListSitesResponse:
        return await self._call(lambda stub: stub.ListSites(request, timeout=timeout))

    async def close(self) -> None:
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
