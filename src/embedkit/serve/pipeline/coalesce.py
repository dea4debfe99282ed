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

Waiting requests are queued per tenant (the ``tenant`` a request is submitted with)
and calls are filled in deficit round robin over tenants, charged in tokens (``cost``),
so a tenant's flood costs another tenant's queries turns, never the whole queue. A
tenant with nothing in the lane (queued or in a call) goes ahead of the round for its
first turn (FQ-CoDel's new flows): its lone query leaves in the very next call. With one
tenant this is the first-in, first-out queue it always was.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")  # a row: the coalescer only counts and concatenates them

# Tokens a tenant may send per turn: one text at the 512-token limit of most embedding
# models, so a new tenant's single-text query always fits its first turn, while a turn
# of short queries (tens of tokens each) still fills a query-lane call.
QUANTUM_TOKENS = 512


@dataclass(eq=False)
class _Waiter(Generic[R]):
    ids: list[R]
    fut: asyncio.Future[np.ndarray]
    tenant: Hashable
    cost: int
    since: int  # the tenant's ``passed`` when it arrived
    ahead: int = 0  # other tenants' calls that left while it waited (set when it leaves)


@dataclass(eq=False)
class _Tenant(Generic[R]):
    queue: deque[_Waiter[R]] = field(default_factory=deque)
    deficit: int = 0  # tokens it may still send this round (deficit round robin)
    passed: int = 0  # calls carrying other tenants' rows that left while it had a queue


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
        quantum: int = QUANTUM_TOKENS,
    ) -> None:
        self._send = send
        self._max_rows = max(1, max_rows)
        self._max_in_flight = max_in_flight
        self._quantum = max(1, quantum)
        self._tenants: dict[Hashable, _Tenant[R]] = {}  # those with requests waiting
        self._new: deque[Hashable] = deque()  # arrived with nothing in the lane: first
        self._old: deque[Hashable] = deque()  # the round
        self._live: dict[Hashable, int] = {}  # per tenant: requests queued or in a call
        self._queued = 0
        self._in_flight = 0
        self._live_rows = 0  # submitted and not yet answered (queued here or in a call)
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    @property
    def queued(self) -> int:
        """Requests waiting for a call (not yet sent)."""
        return self._queued

    async def submit(
        self, ids: list[R], tenant: Hashable = None, cost: int | None = None
    ) -> np.ndarray:
        """Raw vectors for ``ids`` (at most ``max_rows`` rows), in order."""
        vectors, _ = await self.submit_counted(ids, tenant, cost)
        return vectors

    async def submit_counted(
        self, ids: list[R], tenant: Hashable = None, cost: int | None = None
    ) -> tuple[np.ndarray, int]:
        """As :meth:`submit`, with how many calls carrying other tenants' rows left this
        lane's queue while the request waited in it. ``cost``: its tokens (default: one
        per row), what the round robin charges ``tenant``."""
        loop = asyncio.get_running_loop()
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
            # Only a tenant with nothing in a call is new: a flood's next request, arriving
            # while its last call runs, waits its turn in the round.
            (self._old if tenant in self._live else self._new).append(tenant)
        self._live[tenant] = self._live.get(tenant, 0) + 1
        waiter = _Waiter(
            ids, loop.create_future(), tenant, len(ids) if cost is None else cost, state.passed
        )
        state.queue.append(waiter)
        self._queued += 1
        self._live_rows += len(ids)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._pump)
        return await waiter.fut, waiter.ahead

    def _pump(self) -> None:
        """Send pending requests as calls of at most ``max_rows`` rows, within the limit."""
        self._scheduled = False
        limit = self._max_in_flight
        while self._tenants and (limit is None or self._in_flight < limit):
            cap = self._max_rows
            if limit is not None:  # pipeline: leave rows for the next call to overlap
                cap = min(cap, max(1, -(-self._live_rows // (limit + 1))))
            group = self._fill(cap)
            if not group:
                return
            self._count(group)
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fill(self, cap: int) -> list[_Waiter[R]]:
        """One call's requests, up to ``cap`` rows (a single larger request goes alone),
        taken from tenants in deficit round robin: each turn adds a quantum of tokens."""
        group: list[_Waiter[R]] = []
        rows = 0
        while self._new or self._old:
            key = (self._new or self._old).popleft()
            state = self._tenants[key]
            state.deficit += self._quantum
            full = False
            while state.queue:
                waiter = state.queue[0]
                if waiter.fut.done():  # cancelled before it left: nothing to send
                    self._pop(state)
                    self._gone([waiter])
                    continue
                if group and rows + len(waiter.ids) > cap:
                    full = True
                    break
                if waiter.cost > state.deficit:
                    break
                self._pop(state)
                state.deficit -= waiter.cost
                waiter.ahead = state.passed - waiter.since
                group.append(waiter)
                rows += len(waiter.ids)
            if not state.queue:  # an emptied tenant leaves the round, and its credit
                del self._tenants[key]
                continue
            # A turn cut short by a full call keeps its credit but rejoins the round
            # behind the others: the next call starts with someone else.
            self._old.append(key)
            if full:
                break
        return group

    def _pop(self, state: _Tenant[R]) -> None:
        state.queue.popleft()
        self._queued -= 1

    def _gone(self, waiters: list[_Waiter[R]]) -> None:
        """``waiters`` are answered (or dropped): no longer live."""
        for waiter in waiters:
            self._live_rows -= len(waiter.ids)
            left = self._live[waiter.tenant] - 1
            if left:
                self._live[waiter.tenant] = left
            else:
                del self._live[waiter.tenant]

    def _count(self, group: list[_Waiter[R]]) -> None:
        """A call leaves: each tenant still waiting counts it if it carries others' rows."""
        senders = {waiter.tenant for waiter in group}
        for key, state in self._tenants.items():
            if senders - {key}:
                state.passed += 1

    async def _run(self, group: list[_Waiter[R]]) -> None:
        rows = group[0].ids if len(group) == 1 else [row for w in group for row in w.ids]
        try:
            raw = np.asarray(await self._send(rows))
        except BaseException as exc:  # handed to every waiter
            self._release(group)
            for waiter in group:
                if not waiter.fut.done():
                    waiter.fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._release(group)
        start = 0
        for waiter in group:
            end = start + len(waiter.ids)
            if not waiter.fut.done():
                waiter.fut.set_result(raw[start:end])
            start = end

    def _release(self, group: list[_Waiter[R]]) -> None:
        """A call returned: the next one leaves *before* its results are handed out, so
        it is not queued behind the event-loop work of answering those requests, which
        left the model idle between batches (docs/benchmarks/http.md). It is sized while
        the returned requests still count as live: their clients come back as the call
        after it."""
        self._in_flight -= 1
        if self._tenants:
            self._pump()
        self._gone(group)
