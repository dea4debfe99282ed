"""One token budget per tenant across a fleet: two servers of two workers each sharing one
real redis-server (EMBEDKIT_QUOTA_STORE), hammered by one tenant that ignores Retry-After.

Phases, each counted in the tokens the fleet admitted (200s × the request's tokens):
shared (Redis up), away (Redis stopped: every process charges rate ÷ live processes),
back (Redis started again: within 10 s the shared budget holds). Without the store the
four processes would admit about four times the rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.redis_server import RedisServer

KEY = {"authorization": "Bearer acme-key"}
RATE, BURST = 300, 300  # tokens/s; a request is a few tokens, so ~100 admitted per second
TEXT = "the quick brown fox"
TENANTS = f"""
tenants:
  acme:
    keys: [acme-key]
    rate_tokens_per_s: {RATE}
    burst_tokens: {BURST}
"""
CLIENTS = 8  # concurrent requests, spread over both servers


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(model_tag, launcher, redis, tmp_path_factory):
    path: Path = tmp_path_factory.mktemp("fleet") / "tenants.yaml"
    path.write_text(TENANTS)
    env = {
        "EMBEDKIT_TENANTS_FILE": str(path),
        "EMBEDKIT_QUOTA_STORE": redis.url,
        "EMBEDKIT_QUOTA_KEY_PREFIX": "fleet-test",
        "EMBEDKIT_QUOTA_HEARTBEAT_S": "1",
        "EMBEDKIT_WORKERS": "2",
        "EMBEDKIT_INTRA_OP_THREADS": "1",
        "EMBEDKIT_REQUEST_LOG": "false",
        "EMBEDKIT_ACCESS_LOG": "false",
    }
    return [launcher.start(model_tag, env), launcher.start(model_tag, env)]


def _tokens(url: str) -> int:
    body = {"input": TEXT, "model": "all-minilm-l6-v2"}
    done = httpx.post(url + "/v1/embeddings", json=body, headers=KEY, timeout=30)
    assert done.status_code == 200, done.text
    return int(done.json()["usage"]["total_tokens"])


async def _hammer(urls: list[str], seconds: float) -> Counter[int]:
    """Status codes of every request ``CLIENTS`` clients sent for ``seconds``."""
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    body = {"input": TEXT, "model": "all-minilm-l6-v2"}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        url = urls[i % len(urls)] + "/v1/embeddings"
        while time.monotonic() < deadline:
            done = await http.post(url, json=body, headers=KEY)
            statuses[done.status_code] += 1

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
    return statuses


def _store_up(server) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(server.metrics())
        for s in family.samples
        if s.name == "embedkit_quota_store_up"
    ]


def _admitted(statuses: Counter[int], tokens: int) -> int:
    assert set(statuses) <= {200, 429}, statuses  # never a 5xx, whatever the store does
    return statuses[200] * tokens


def test_one_budget_across_the_fleet_with_and_without_redis(fleet, redis) -> None:
    urls = [s.url for s in fleet]
    tokens = _tokens(urls[0])
    time.sleep(BURST / RATE + 1)  # the probe's tokens back: the bucket full again

    shared = _admitted(asyncio.run(_hammer(urls, 20)), tokens)
    assert 0.85 * RATE * 20 <= shared <= 1.15 * (RATE * 20 + BURST), shared
    assert all(v == [1.0] * len(v) and v for v in map(_store_up, fleet))

    redis.stop()
    away = _admitted(asyncio.run(_hammer(urls, 10)), tokens)
    # Each of the 4 processes charges rate/4 (burst/4): the fleet stays near the rate.
    assert away <= 1.5 * RATE * 10, away
    assert all(0.0 in v for v in map(_store_up, fleet))

    redis.start()  # empty: every bucket starts full again
    deadline = time.monotonic() + 10
    while not all(v and min(v) == 1.0 for v in map(_store_up, fleet)):
        assert time.monotonic() < deadline, "the fleet did not return to the store within 10 s"
        time.sleep(0.5)
    back = _admitted(asyncio.run(_hammer(urls, 10)), tokens)
    assert 0.85 * RATE * 10 <= back <= 1.15 * (RATE * 10 + BURST), back
    print(f"\nadmitted tokens: shared {shared} (20 s), away {away} (10 s), back {back} (10 s)")
