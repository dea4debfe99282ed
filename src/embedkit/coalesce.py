"""Front-side coalescing: requests that reach the front together share one Embedder call.

Every call to the Embedder is a full HTTP round trip through BentoML on both sides
(client request, server middlewares, (de)serialisation, the dispatcher's queue),
and on 2 cores that fixed cost rivalled the inference of a single text
(docs/benchmarks/serving-tuning.md). Under concurrent load, requests arrive in
clumps (a batch of answers goes out, its clients send their next requests at
once), so the rows of every request that reaches the hand-off in the same
event-loop turn are sent as one call, split back per request on return. No timer:
nothing waits for company; a lone request leaves on the next loop turn, so
latency at low load is unchanged. BentoML's adaptive batching still merges the
calls that queue up inside the Embedder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

Send = Callable[[list[list[int]]], Awaitable[object]]


class Coalescer:
    """Merges concurrent ``submit`` calls of one lane into calls of at most ``max_rows`` rows.

    ``send`` performs one Embedder call (timeout, retry and error translation included)
    and returns a ``[rows, dim]`` array-like. A failed call fails every request in it
    with the same error, as a failed batch inside the Embedder would. A waiter that is
    cancelled (client gone) leaves the shared call running for the others.
    """

    def __init__(self, send: Send, max_rows: int) -> None:
        self._send = send
        self._max_rows = max(1, max_rows)
        self._pending: list[tuple[list[list[int]], asyncio.Future[np.ndarray]]] = []
        self._rows = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    async def submit(self, ids: list[list[int]]) -> np.ndarray:
        """Raw vectors for ``ids`` (at most ``max_rows`` rows), in order."""
        loop = asyncio.get_running_loop()
        if self._rows + len(ids) > self._max_rows:
            self._flush()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((ids, fut))
        self._rows += len(ids)
        if self._rows >= self._max_rows:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        group, self._pending, self._rows = self._pending, [], 0
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[tuple[list[list[int]], asyncio.Future[np.ndarray]]]) -> None:
        rows = group[0][0] if len(group) == 1 else [row for ids, _ in group for row in ids]
        try:
            raw = np.asarray(await self._send(rows))
        except BaseException as exc:  # handed to every waiter
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        start = 0
        for ids, fut in group:
            end = start + len(ids)
            if not fut.done():
                fut.set_result(raw[start:end])
            start = end
