"""The shared quota store against a real redis-server: one bucket per tenant for every
process, the fleet's live processes counted, and serving on when Redis is away."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

from embedkit.core.errors import QuotaExceeded
from embedkit.serve.edge.quota_store import QuotaStore, StoreUnavailable
from embedkit.serve.edge.tenants import Tenant

TIMEOUT_S = 0.2


def _store(url: str, prefix: str = "t", beat: float = 0.2) -> QuotaStore:
    return QuotaStore(url, prefix, TIMEOUT_S, beat)


def _up(store: QuotaStore) -> float | None:
    return REGISTRY.get_sample_value("embedkit_quota_store_up", {"store": store.where()})


def test_two_processes_charge_one_bucket(redis_server: RedisServer) -> None:  # noqa: F811
    """A refill of 1 token/s keeps the arithmetic exact within the test's second."""

    async def scenario() -> None:
        a, b = _store(redis_server.url), _store(redis_server.url)
        assert await a.take("acme", 1, 100, 60) is None
        assert await b.take("acme", 1, 100, 40) is None  # the same bucket: now empty
        wait = await a.take("acme", 1, 100, 10)
        assert wait is not None and 9.0 < wait <= 10.0  # Retry-After: ~10 s at 1 token/s
        await b.refund("acme", 1, 100, 10)  # shed by a queue: given back
        assert await a.take("acme", 1, 100, 10) is None
        assert await a.take("other", 1, 100, 100) is None  # a bucket per tenant
        # Another deployment (prefix) sharing the Redis has buckets of its own.
        assert await _store(redis_server.url, prefix="u").take("acme", 1, 100, 100) is None
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_request_over_the_burst_waits_for_a_full_bucket_and_leaves_debt(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async def scenario() -> None:
        s = _store(redis_server.url)
        assert await s.take("acme", 1, 100, 400) is None  # a full bucket admits it: -300
        wait = await s.take("acme", 1, 100, 1)
        assert wait is not None and 300 < wait <= 301
        await s.close()

    asyncio.run(scenario())


def test_the_heartbeat_counts_live_processes(redis_server: RedisServer) -> None:  # noqa: F811
    async def scenario() -> None:
        stores = [_store(redis_server.url, beat=0.2) for _ in range(3)]
        for s in stores:
            await s.beat()
        assert stores[-1].live == 3
        await asyncio.sleep(0.7)  # more than three beats: the silent ones are dropped
        assert await stores[0].beat() == 1
        for s in stores:
            await s.close()

    asyncio.run(scenario())


def test_with_redis_away_a_tenant_charges_its_share_locally_and_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped: every call answers within its bound, the tenant is charged a local bucket
    of rate ÷ live processes (one log line, the gauge at 0); back: the shared bucket."""
    server = RedisServer(tmp_path)
    server.start()

    async def scenario() -> None:
        store, peer = _store(server.url), _store(server.url)
        await peer.beat()
        assert await store.beat() == 2
        acme = Tenant("acme", rate=1, burst=100, store=store)
        await acme.charge(10)
        assert _up(store) == 1
        server.stop()
        with pytest.raises(StoreUnavailable):
            await store.take("acme", 1, 100, 1)
        assert _up(store) == 0
        # The local share: burst 100 / 2 processes.
        await acme.charge(50)
        with pytest.raises(QuotaExceeded):
            await acme.charge(1)
        server.start()
        await store.beat()  # the heartbeat finds it again
        assert _up(store) == 1
        await acme.charge(80)  # the shared bucket (90 left there), not the spent local one
        await store.close()
        await peer.close()

    with caplog.at_level(logging.WARNING, logger="embedkit.serve.edge.quota_store"):
        asyncio.run(scenario())
    server.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in line for line in lines) == 1, lines
    assert sum("shared again" in line for line in lines) == 1, lines


def test_password_from_the_url_and_never_in_the_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()

    async def scenario() -> None:
        good = _store(server.url)
        assert await good.take("acme", 1, 10, 1) is None
        assert "s3cret" not in good.where() and good.where().endswith(f":{server.port}/0")
        bad = _store(server.url.replace("s3cret", "wrong"))
        with pytest.raises(StoreUnavailable):
            await bad.take("acme", 1, 10, 1)
        await good.close()
        await bad.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
