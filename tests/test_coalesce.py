"""embedkit.serve.pipeline.coalesce: requests arriving together share one Embedder call, split back
exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from embedkit.core.errors import Overloaded
from embedkit.serve.pipeline.coalesce import Coalescer


class FakeEmbedder:
    """Records each call's rows; a row [t] embeds as [t, t, t] so splits are checkable."""

    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[list[int]]] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, rows: list[list[int]]) -> np.ndarray:
        self.calls.append(rows)
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return np.array([[float(r[0])] * 3 for r in rows], dtype=np.float32)


def test_requests_in_one_loop_turn_share_a_call_and_get_their_own_rows() -> None:
    async def main() -> tuple[FakeEmbedder, list[np.ndarray]]:
        fake = FakeEmbedder()
        merger = Coalescer(fake, max_rows=16)
        requests = [[[1]], [[2], [3]], [[4]]]
        return fake, await asyncio.gather(*(merger.submit(r) for r in requests))

    fake, results = asyncio.run(main())
    assert fake.calls == [[[1], [2], [3], [4]]]
    assert [r[:, 0].tolist() for r in results] == [[1.0], [2.0, 3.0], [4.0]]


def test_a_lone_request_is_sent_without_waiting() -> None:
    async def main() -> FakeEmbedder:
        fake = FakeEmbedder()
        merger = Coalescer(fake, max_rows=16)
        await merger.submit([[7]])
        await merger.submit([[8]])
        return fake

    assert asyncio.run(main()).calls == [[[7]], [[8]]]


def test_calls_never_exceed_max_rows() -> None:
    async def main() -> tuple[FakeEmbedder, list[np.ndarray]]:
        fake = FakeEmbedder()
        merger = Coalescer(fake, max_rows=3)
        requests = [[[i], [i]] for i in range(5)]  # 10 rows, 2 per request
        return fake, await asyncio.gather(*(merger.submit(r) for r in requests))

    fake, results = asyncio.run(main())
    assert all(len(rows) <= 3 for rows in fake.calls)
    assert sum(len(rows) for rows in fake.calls) == 10
    assert [r[:, 0].tolist() for r in results] == [[float(i)] * 2 for i in range(5)]


def test_a_failed_call_fails_every_request_in_it() -> None:
    async def main() -> list[object]:
        merger = Coalescer(FakeEmbedder(fail=Overloaded("queue full")), max_rows=16)
        return await asyncio.gather(
            merger.submit([[1]]), merger.submit([[2]]), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, Overloaded) for r in results)


def test_a_cancelled_request_leaves_the_shared_call_to_the_others() -> None:
    async def main() -> np.ndarray:
        fake = FakeEmbedder(delay=0.05)
        merger = Coalescer(fake, max_rows=16)
        gone = asyncio.ensure_future(merger.submit([[1]]))
        stays = asyncio.ensure_future(merger.submit([[2]]))
        await asyncio.sleep(0.01)  # both are in the call now
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await stays

    assert asyncio.run(main())[:, 0].tolist() == [2.0]


# --- continuous batching (max_in_flight) ------------------------------------------------


class GatedEmbedder(FakeEmbedder):
    """Each call waits until the test opens its gate, so calls can be held in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []

    async def __call__(self, rows: list[list[int]]) -> np.ndarray:
        gate = asyncio.Event()
        self.gates.append(gate)
        self.calls.append(rows)
        await gate.wait()
        return np.array([[float(r[0])] * 3 for r in rows], dtype=np.float32)


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _drain(fake: GatedEmbedder, waiters: Sequence[asyncio.Future[Any]]) -> None:
    """Let every call return, one at a time, in order."""
    opened = 0
    while not all(w.done() for w in waiters):
        await _turns()
        while opened < len(fake.gates):
            fake.gates[opened].set()
            opened += 1


def test_continuous_batching_holds_arrivals_until_the_call_in_flight_returns() -> None:
    async def main() -> tuple[GatedEmbedder, list[np.ndarray], list[int]]:
        fake = GatedEmbedder()
        merger = Coalescer(fake, max_rows=16, max_in_flight=1)
        first = asyncio.ensure_future(merger.submit([[1]]))
        await _turns()
        later = [asyncio.ensure_future(merger.submit([[i]])) for i in (2, 3, 4, 5, 6, 7)]
        await _turns()
        held = [len(fake.calls), merger.queued]  # a lone request left at once; the rest wait
        await _drain(fake, [first, *later])
        return fake, [await w for w in (first, *later)], held

    fake, results, held = asyncio.run(main())
    assert held == [1, 6]
    # When the first call returns, 7 requests are live (its own come back next): the
    # waiting six leave as calls of ceil(7 / 2) = 4 and 2, in arrival order.
    assert fake.calls == [[[1]], [[2], [3], [4], [5]], [[6], [7]]]
    assert [r[:, 0].tolist() for r in results] == [[float(i)] for i in range(1, 8)]


def test_continuous_batching_splits_a_crowd_so_two_calls_overlap() -> None:
    """16 requests waiting at once leave as 8 + 8: while the model runs the first
    half, the front serves the other; one call of 16 would leave it idle."""

    async def main() -> GatedEmbedder:
        fake = GatedEmbedder()
        merger = Coalescer(fake, max_rows=16, max_in_flight=1)
        waiters = [asyncio.ensure_future(merger.submit([[i]])) for i in range(16)]
        await _turns()
        fake.gates[0].set()
        await _turns()
        fake.gates[1].set()
        await asyncio.gather(*waiters)
        return fake

    assert [len(c) for c in asyncio.run(main()).calls] == [8, 8]


def test_a_request_cancelled_while_queued_is_never_sent() -> None:
    async def main() -> GatedEmbedder:
        fake = GatedEmbedder()
        merger = Coalescer(fake, max_rows=16, max_in_flight=1)
        first = asyncio.ensure_future(merger.submit([[1]]))
        await _turns()
        gone = asyncio.ensure_future(merger.submit([[2]]))
        stays = asyncio.ensure_future(merger.submit([[3]]))
        await _turns()
        gone.cancel()
        fake.gates[0].set()
        await _turns()
        fake.gates[1].set()
        await asyncio.gather(first, stays)
        return fake

    assert asyncio.run(main()).calls == [[[1]], [[3]]]


def test_a_failed_call_frees_its_slot_for_the_queue() -> None:
    async def main() -> list[object]:
        calls: list[list[list[int]]] = []

        async def flaky(rows: list[list[int]]) -> np.ndarray:
            calls.append(rows)
            await asyncio.sleep(0.01)
            if len(calls) == 1:
                raise Overloaded("queue full")
            return np.ones((len(rows), 3), dtype=np.float32)

        merger = Coalescer(flaky, max_rows=16, max_in_flight=1)
        first = asyncio.ensure_future(merger.submit([[1]]))
        await _turns()
        second = asyncio.ensure_future(merger.submit([[2]]))
        return list(await asyncio.gather(first, second, return_exceptions=True))

    first, second = asyncio.run(main())
    assert isinstance(first, Overloaded)
    assert isinstance(second, np.ndarray) and second.shape == (1, 3)


# --- tenants in turn (deficit round robin by tokens) ------------------------------------


def _flood_then_one(lone_tenant: str) -> tuple[GatedEmbedder, list[int], int]:
    """Tenant A submits 41 one-row requests at once (the first call leaves with 4 of
    them); while it runs, ``lone_tenant`` submits one. Returns the calls, the
    other-tenant calls each of A's requests waited behind, and the lone request's."""

    async def main() -> tuple[GatedEmbedder, list[int], int]:
        fake = GatedEmbedder()
        merger = Coalescer(fake, max_rows=4, max_in_flight=1)
        flood = [
            asyncio.ensure_future(merger.submit_counted([[i]], "A", cost=10)) for i in range(1, 42)
        ]
        await _turns()
        lone = asyncio.ensure_future(merger.submit_counted([[100]], lone_tenant, cost=10))
        await _drain(fake, [*flood, lone])
        answered = [await f for f in flood]
        assert [r[:, 0].tolist() for r, _ in answered] == [[float(i)] for i in range(1, 42)]
        assert (await lone)[0][:, 0].tolist() == [100.0]
        assert merger.queued == 0 and not merger._live  # nothing left behind
        return fake, [ahead for _, ahead in answered], (await lone)[1]

    return asyncio.run(main())


def test_another_tenants_lone_query_leaves_in_the_next_call_past_a_flood() -> None:
    fake, flood_ahead, lone_ahead = _flood_then_one("B")
    assert fake.calls[0] == [[1], [2], [3], [4]]
    # B had nothing in the lane: first in the next call, behind no call of A's. The rest
    # of that call is A's turn, A's requests in their order.
    assert fake.calls[1] == [[100], [5], [6], [7]]
    assert lone_ahead == 0
    # A's requests still queued then waited behind that one call carrying B's row.
    assert max(flood_ahead) == 1 and flood_ahead[:7] == [0] * 7


def test_one_tenant_is_first_in_first_out_as_before() -> None:
    """The same arrivals from one tenant: the late request waits its place in line (what
    B would get without the round robin), and no other tenant's call is counted."""
    fake, flood_ahead, lone_ahead = _flood_then_one("A")
    assert fake.calls[-1][-1] == [100]
    assert all(len(call) <= 4 for call in fake.calls)
    assert lone_ahead == 0 and set(flood_ahead) == {0}


def test_two_flooding_tenants_take_calls_in_turn() -> None:
    """Both waiting, neither gets two calls in a row while the other waits: each turn's
    quantum (512 tokens) outlasts a call of four 10-token rows, so turns alternate."""

    async def main() -> GatedEmbedder:
        fake = GatedEmbedder()
        merger = Coalescer(fake, max_rows=4, max_in_flight=1)
        waiters = [
            asyncio.ensure_future(merger.submit([[tenant * 100 + i]], tenant, cost=10))
            for tenant in (1, 2)
            for i in range(12)
        ]
        await _drain(fake, waiters)
        return fake

    owners = [{row[0] // 100 for row in call} for call in asyncio.run(main()).calls]
    assert owners == [{1}, {2}] * 3


def test_the_round_robin_charges_tokens_not_requests() -> None:
    """A's requests cost 256 tokens, B's 32: a turn of 512 tokens takes 2 of A's or 16 of
    B's, so B's short queries are not held behind A's long ones, request for request."""

    async def main() -> FakeEmbedder:
        fake = FakeEmbedder()
        merger = Coalescer(fake, max_rows=64)
        waiters = [merger.submit([[i]], "A", cost=256) for i in range(1, 9)]
        waiters += [merger.submit([[i]], "B", cost=32) for i in range(101, 133)]
        await asyncio.gather(*waiters)
        return fake

    (call,) = asyncio.run(main()).calls
    order = [row[0] for row in call]
    a, b = list(range(1, 9)), list(range(101, 133))
    assert order == a[:2] + b[:16] + a[2:4] + b[16:] + a[4:]


def test_the_client_takes_tenants_in_turn_and_tells_each_request() -> None:
    """Through the Embedder client (query lane, continuous batching): the tenant's name is
    the turn, the chunk's tokens its charge, and each request's context learns the other
    tenants' calls it waited behind (the request log's other_tenant_runs_ahead)."""
    from embedkit.core.settings import Settings
    from embedkit.serve.edge.tenants import Tenant
    from embedkit.serve.pipeline.client import EmbedderClient
    from embedkit.serve.pipeline.jobs import EmbedJob
    from embedkit.serve.pipeline.trace import RequestContext

    class Gated:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []
            self.gates: list[asyncio.Event] = []

        async def embed_query(self, items: list, report: object = None) -> np.ndarray:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.calls.append([item[1][1] for item in items])
            await gate.wait()
            return np.zeros((len(items), 3), np.float32)

    settings = Settings(front_coalescing=True, parallel_runs=False, query_max_batch_size=4)
    client = EmbedderClient(settings)
    flooder, searcher = Tenant("flood"), Tenant("search")

    def job(text_id: int) -> EmbedJob:
        return EmbedJob(
            ids=[[101, text_id, 102]],
            lane="query",
            normalize=True,
            dimensions=None,
            encoding="float",
        )

    async def main() -> tuple[Gated, list[RequestContext], RequestContext]:
        engine = Gated()
        floods = [RequestContext(f"f{i}", tenant=flooder) for i in range(21)]
        waiters = [
            asyncio.ensure_future(client.embed(engine, job(i), r))  # type: ignore[arg-type]
            for i, r in enumerate(floods)
        ]
        await _turns()
        query = RequestContext("q", tenant=searcher)
        waiters.append(asyncio.ensure_future(client.embed(engine, job(999), query)))  # type: ignore[arg-type]
        opened = 0
        while not all(w.done() for w in waiters):
            await _turns()
            while opened < len(engine.gates):
                engine.gates[opened].set()
                opened += 1
        await asyncio.gather(*waiters)
        return engine, floods, query

    engine, floods, query = asyncio.run(main())
    assert engine.calls[:2] == [[0, 1, 2, 3], [999, 4, 5, 6]]
    assert query.other_tenant_runs_ahead == 0 and query.batches == ["query-2"]
    assert [r.other_tenant_runs_ahead for r in floods] == [0] * 7 + [1] * 14
