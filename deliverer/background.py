"""Work a deliverer runs in the background (a transaction's settling once its reply comes,
lease releases): at most a limit at once for callers that wait for room, and all of it
waited for by a drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

__all__ = ["Background"]

log = logging.getLogger(__name__)


class Background:
    """Tasks started by `run` (which waits while `limit` are running) or `start` (at once).
    Each task that ends lets one caller waiting for room in, longest waiting first, with
    the room kept for it until it starts (a caller that comes meanwhile queues behind):
    waiting with asyncio.wait on the whole set cost a callback added and removed per task
    in it for every wait, and a long tail of sites kept the set full."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what  # (for the logs: "settling", ...)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._kept = 0  # rooms kept for waiters let in that have not started yet

    def __len__(self) -> int:
        return len(self._tasks)

    def _full(self) -> bool:
        return len(self._tasks) + self._kept >= self.limit

    async def run(self, work: Awaitable[Any]) -> None:
        """Start `work` once there is room and nobody waits longer for it (cancelled
        meanwhile, `work` is not started, and closed if it is a coroutine)."""
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()  # (waiters cancelled)
        if self._full() or self._waiting:
            room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.done() and not room.cancelled():
                    self._kept -= 1  # (let in, then cancelled: the room goes to the next)
                    self._let_in()
                if asyncio.iscoroutine(work):
                    work.close()
                raise
            self._kept -= 1
        self.start(work)

    def start(self, work: Awaitable[Any]) -> None:
        """Start `work` now, room or not (from a callback, which cannot wait)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        self._let_in()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed (the pointer comes back): %r", self._what, task.exception())

    def _let_in(self) -> None:
        """Let the longest waiting caller in, if there is room (kept for it)."""
        while self._waiting and not self._full():
            room = self._waiting.popleft()
            if not room.done():
                room.set_result(None)
                self._kept += 1
                return

    async def join(self, within: float | None = None) -> bool:
        """Wait for every task, and for the callers let in to start theirs, `within`
        seconds at most: whether all have ended."""
        deadline = None if within is None else time.monotonic() + within
        while self._tasks or self._kept:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=left)
            else:
                await asyncio.sleep(0)  # (a caller let in starts its task)
        return True
