"""Front-side batching: concurrent requests of one lane share Embedder calls.

Every call to the Embedder is a full HTTP round trip through BentoML on both sides
(client request, server middlewares, (de)serialisation, the dispatcher's queue),
and on 2 cores that fixed cost rivalled the inference of a single text
(docs/benchmarks/serving-tuning.md). So the rows of requests that reach the
hand-off together are sent as one call and split back per request on return.

Two policies, both without timers (nothing ever waits for company):

* ``max_in_flight=None`` — coalescing: whatever reached the hand-off in the same
  event-loop turn leaves on the next turn. BentoML's adaptive batching then merges
  the calls that queue up inside the Embedder.
* ``max_in_flight=k`` — continuous batching (what TEI and vLLM do): at most ``k``
  calls of the lane are out; requests arriving meanwhile queue here and leave
  together, as one call of up to ``max_rows`` rows, the moment a call returns.
  A lone request still leaves at once. Each call takes at most a ``1 / (k + 1)``
  share of the live requests, so under closed-loop load calls overlap (16 clients,
  k=1: 8 + 8) instead of one call of 16 leaving the model idle while the front
  answers it. This also keeps the Embedder's own queue at ``k`` calls: BentoML
  1.4's dispatcher learns its hold-back ("cork") time from how long jobs queued.
  Kept over plain coalescing on the interactive lane after its A/B
  (docs/benchmarks/http.md, "Continuous batching on the interactive lane").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")  # a row: the coalescer only counts and concatenates them


class Coalescer(Generic[R]):
    """Merges concurrent ``submit`` calls of one lane into calls of at most ``max_rows`` rows.

    ``send`` performs one Embedder call (timeout, retry and error translation included)
    and returns a ``[rows, dim]`` array-like. A failed call fails every request in it
    with the same error, as a failed batch inside the Embedder would. A waiter that is
    cancelled (client gone) before its call leaves is dropped; once in a call, the call
    runs on for the others.
    """

    def __init__(
        self,
        send: Callable[[list[R]], Awaitable[object]],
        max_rows: int,
        max_in_flight: int | None = None,
    ) -> None:
        self._send = send
        self._max_rows = max(1, max_rows)
        self._max_in_flight = max_in_flight
        self._pending: deque[tuple[list[R], asyncio.Future[np.ndarray]]] = deque()
        self._in_flight = 0
        self._live_rows = 0  # submitted and not yet answered (queued here or in a call)
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    @property
    def queued(self) -> int:
        """Requests waiting for a call (not yet sent)."""
        return len(self._pending)

    async def submit(self, ids: list[R]) -> np.ndarray:
        """Raw vectors for ``ids`` (at most ``max_rows`` rows), in order."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((ids, fut))
        self._live_rows += len(ids)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._pump)
        return await fut

    def _pump(self) -> None:
        """Send pending requests as calls of at most ``max_rows`` rows, within the limit."""
        self._scheduled = False
        limit = self._max_in_flight
        while self._pending and (limit is None or self._in_flight < limit):
            cap = self._max_rows
            if limit is not None:  # pipeline: leave rows for the next call to overlap
                cap = min(cap, max(1, -(-self._live_rows // (limit + 1))))
            group: list[tuple[list[R], asyncio.Future[np.ndarray]]] = []
            rows = 0
            while self._pending:
                ids, fut = self._pending[0]
                if fut.done():  # cancelled before it left: nothing to send
                    self._pending.popleft()
                    self._live_rows -= len(ids)
                    continue
                if group and rows + len(ids) > cap:
                    break
                group.append(self._pending.popleft())
                rows += len(ids)
            if not group:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[tuple[list[R], asyncio.Future[np.ndarray]]]) -> None:
        rows = group[0][0] if len(group) == 1 else [row for ids, _ in group for row in ids]
        try:
            raw = np.asarray(await self._send(rows))
        except BaseException as exc:  # handed to every waiter
            self._release(len(rows))
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._release(len(rows))
        start = 0
        for ids, fut in group:
            end = start + len(ids)
            if not fut.done():
                fut.set_result(raw[start:end])
            start = end

    def _release(self, rows: int) -> None:
        """A call returned: the next one leaves *before* its results are handed out, so
        it is not queued behind the event-loop work of answering those requests, which
        left the model idle between batches (docs/benchmarks/http.md). It is sized while
        the returned requests still count as live: their clients come back as the call
        after it."""
        self._in_flight -= 1
        if self._pending:
            self._pump()
        self._live_rows -= rows
