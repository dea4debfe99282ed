"""embedkit.coalesce: requests arriving together share one Embedder call, split back exactly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedkit.coalesce import Coalescer
from embedkit.errors import Overloaded


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
