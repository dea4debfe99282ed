"""Tenants without a server: the tenants file refused with one line, the token bucket's
admission and Retry-After, the priority class's lane cap, keys and revocation, request
ids, and the bulk runs an interactive call waits behind (serve/edge/tenants.py,
serve/pipeline/trace.py, serve/engine/embedder.py). Through a real server:
tests/http/test_tenants.py (a distinct basename: pytest collects by it)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.core.errors import InvalidInput, QuotaExceeded, RevokedKey, Unauthorized
from embedkit.core.settings import Settings
from embedkit.serve.edge import tenants
from embedkit.serve.edge.tenants import Tenant, Tenants
from embedkit.serve.pipeline import trace
from embedkit.serve.seams import EngineReport


def _settings(tmp_path: Path, text: str, **kw: Any) -> Settings:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return Settings(tenants_file=path, **kw)


GOOD = """
tenants:
  search: {keys: [s1, s2], rate_tokens_per_s: 100, burst_tokens: 500}
  backfill: {keys: [b1], rate_tokens_per_s: 10, priority: bulk}
"""


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("tenants:\n  a: {keys: [k]}\n", "tenants.a.rate_tokens_per_s: Field required"),
        (
            "tenants:\n  a: {keys: [k], rate_tokens_per_s: -5}\n",
            "tenants.a.rate_tokens_per_s: Input should be greater than 0",
        ),
        (
            "tenants:\n  a: {keys: [k], rate_tokens_per_s: 5, burst_tokens: -1}\n",
            "tenants.a.burst_tokens: Input should be greater than 0",
        ),
        (
            "tenants:\n  a: {keys: [k], rate_tokens_per_s: 5, priority: urgent}\n",
            "tenants.a.priority: Input should be 'interactive' or 'bulk'",
        ),
        (
            "tenants:\n  a: {keys: [k], rate_tokens_per_s: 5, rate: 1}\n",
            "tenants.a.rate: Extra inputs are not permitted",
        ),
        (
            "tenants:\n  a: {keys: [k], rate_tokens_per_s: 5}\n"
            "  b: {keys: [k], rate_tokens_per_s: 5}\n",
            "an API key is given twice (tenants 'a' and 'b')",
        ),
        (
            "tenants:\n  default: {keys: [k], rate_tokens_per_s: 5}\n",
            "tenant name 'default' is reserved for api_keys",
        ),
        ("tenants: [a\n", "line 2"),
    ],
)
def test_a_bad_tenants_file_refuses_startup_with_one_line(
    tmp_path: Path, text: str, names: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, text)
    with caplog.at_level(logging.ERROR), pytest.raises(InvalidInput) as err:
        tenants.check_startup(settings)
    message = str(err.value)
    assert "\n" not in message and names in message and "tenants.yaml" in message
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"embedkit refuses to start: {message}"


def test_a_missing_tenants_file_refuses_startup(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"cannot read tenants file .*nope\.yaml"):
        tenants.check_startup(Settings(tenants_file=tmp_path / "nope.yaml"))


def test_keys_name_their_tenant_and_revocation_wins(tmp_path: Path) -> None:
    reg = Tenants.from_settings(_settings(tmp_path, GOOD, api_keys=["plain"], revoked_keys=["s2"]))
    assert reg.identify("Bearer s1").name == "search"
    assert reg.identify("bearer b1").name == "backfill"
    assert reg.identify("Bearer plain") is reg.default and reg.default.rate is None
    with pytest.raises(RevokedKey, match="revoked"):
        reg.identify("Bearer s2")  # still listed under search, but revoked
    for header in (None, "Bearer nope", "s1", "Basic s1", "Bearer "):
        with pytest.raises(Unauthorized):
            reg.identify(header)
    assert Tenants().identify(None).name == "default"  # no keys: auth off


def test_bulk_class_caps_the_lane() -> None:
    assert Tenant("b", "bulk", 1).lane("query") == "bulk"
    assert Tenant("i", "interactive", 1).lane("query") == "query"
    assert Tenant("i", "interactive", 1).lane("bulk") == "bulk"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_admits_within_burst_and_says_when_to_retry() -> None:
    clock = _Clock()
    t = Tenant("a", rate=100, burst=500, clock=clock)
    asyncio.run(t.charge(300))
    asyncio.run(t.charge(200))  # the burst is spent
    with pytest.raises(QuotaExceeded) as err:
        asyncio.run(t.charge(150))
    assert err.value.status == 429 and err.value.code == "quota_exceeded"
    assert err.value.retry_after_s == 2  # 150 tokens at 100/s: 1.5 s, rounded up
    assert "tenant 'a'" in err.value.message and "150 tokens" in err.value.message
    clock.now += 1.5
    asyncio.run(t.charge(150))  # exactly what Retry-After promised
    asyncio.run(t.refund(150))  # shed by the queue: given back
    asyncio.run(t.charge(150))


def test_a_request_over_the_burst_waits_for_a_full_bucket_and_leaves_debt() -> None:
    clock = _Clock()
    t = Tenant("a", rate=10, burst=100, clock=clock)
    asyncio.run(t.charge(400))  # full bucket: admitted, 300 in debt
    with pytest.raises(QuotaExceeded) as err:
        asyncio.run(t.charge(1))
    assert err.value.retry_after_s == 31  # (1 + 300) / 10
    clock.now += 40
    asyncio.run(t.charge(400))  # refilled to the burst (capped), admitted again


def test_default_burst_is_one_second_of_rate(tmp_path: Path) -> None:
    reg = Tenants.from_settings(_settings(tmp_path, GOOD))
    backfill = reg.identify("Bearer b1")
    assert backfill.burst == 10 and backfill.priority == "bulk"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
        (None, False),
    ],
)
def test_request_id_is_the_clients_when_valid(given: str | None, kept: bool) -> None:
    rid = trace.request_id(given)
    if kept:
        assert rid == given
    else:
        assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


class _GatedCore:
    """The first bulk run holds its runner until released; records the order of runs."""

    def __init__(self) -> None:
        import threading

        self.order: list[str] = []
        self.release = threading.Event()

    def embed(self, items, lane: str) -> np.ndarray:
        if not self.order:
            self.release.wait(10)
        self.order.append(f"{lane}:{items[0][1][0]}")
        return np.zeros((len(items), 2), np.float32)


def test_a_query_waits_behind_the_bulk_runs_in_progress_only() -> None:
    """Bulk calls queued before a query do not run ahead of it: it reports the one bulk
    run that held the runner (its bound: the runs at once), not the three queued."""
    from embedkit.serve.engine.embedder import LocalEmbedder

    core = _GatedCore()
    local = LocalEmbedder(core, runs=1)  # type: ignore[arg-type]

    async def query(report: EngineReport) -> np.ndarray:
        return await local.embed_query([(0.0, [10])], report)  # as EmbedderClient._call does

    async def scenario() -> tuple[EngineReport, EngineReport]:
        first = asyncio.ensure_future(local.embed_bulk([(0.0, [1])]))
        await asyncio.sleep(0.05)  # bulk 1 holds the runner
        queued = [asyncio.ensure_future(local.embed_bulk([(0.0, [i])])) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        waited = EngineReport()
        q = asyncio.ensure_future(query(waited))
        await asyncio.sleep(0.05)
        core.release.set()
        await asyncio.gather(first, *queued, q)
        alone = EngineReport()  # runner idle: waits for nothing
        await query(alone)
        return waited, alone

    waited, alone = asyncio.run(scenario())
    assert core.order[:2] == ["bulk:1", "query:10"]
    assert waited.bulk_runs_ahead == 1
    assert alone.bulk_runs_ahead == 0
