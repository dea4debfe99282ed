"""Load, soak and overload against one real server, every returned vector checked.

CI runs a short soak (EMBEDKIT_SOAK_SECONDS, default 60) at about the measured
capacity; the documented 10-minute run uses scripts/soak (docs/soak.md). Speed is
never asserted: the latency bounds below are budgets an overloaded service must
keep (what token-budget admission bought: docs/reliability.md), not benchmarks.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest
from tests.servers import engine_worker

from embedkit_bench import loadtest as lt

pytestmark = pytest.mark.usefixtures("timed")  # memory and latency: run alone

MODEL = "all-minilm-l6-v2"
SOAK_S = float(os.environ.get("EMBEDKIT_SOAK_SECONDS", "60"))
CONCURRENCY = 4  # about one server's capacity on the CI machine (docs/reliability.md)
OVERLOAD_FACTOR = 5
BURST_S = 10.0
# p99 of answered requests while 5x overloaded: bounded admission keeps it to a few seconds
# (max_queued_tokens / throughput); an unbounded queue would grow to ~4 x BURST_S = 40 s
# by the burst's end. Half the 60 s request timeout tells the two apart even on a shared
# machine running at half speed (10 s failed there at 16 s with admission working).
SERVED_LATENCY_BUDGET_S = 30.0
DELIBERATE = {"200", "429", "503"}


@dataclass(frozen=True)
class Baseline:
    requests_per_s: float
    interactive_median_s: float


def run(coro):
    return asyncio.run(coro)


def workers(server) -> set[int]:
    return {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}


@pytest.fixture(scope="module")
def baseline(server, corpus) -> Baseline:
    """10 s at the soak's concurrency: warms every shape, measures capacity."""
    out = run(
        lt.closed_loop(server.url, corpus, duration_s=10, concurrency=CONCURRENCY, model=MODEL)
    )
    report = lt.summarize(out, 10)
    assert report.wrong_vectors == 0
    return Baseline(report.requests_per_s, lt.median_latency(out))


def test_soak_mixed_workload_every_vector_right(server, corpus, baseline, tmp_path) -> None:
    run(lt.warm_peak(server.url, corpus))
    with lt.RssWatch(server.proc.pid) as rss:
        out = run(
            lt.closed_loop(
                server.url, corpus, duration_s=SOAK_S, concurrency=CONCURRENCY, model=MODEL, seed=1
            )
        )
    report = lt.summarize(out, SOAK_S, rss=rss.samples, meta={"concurrency": CONCURRENCY})
    lt.dump(report, tmp_path / "soak.json")
    print("\n" + lt.markdown(report))
    assert report.requests > 0 and report.wrong_vectors == 0, report
    assert set(report.by_status) <= DELIBERATE, report.by_status  # no 5xx but shedding
    assert report.by_status.get("200", 0) >= 0.95 * report.requests, report.by_status
    assert set(report.latency_by_kind_s) == set(lt.DEFAULT_MIX)  # every kind was answered
    # 60 s at full speed is not long enough for the arena to settle: a clean CI-machine run
    # grew 586 -> 624 -> 660 MB (quarter medians, +5.8 %) and held 625-680 MB through its
    # second half. So 10 % here (a leak of ~20 % a minute fails); the 10-minute soak
    # (scripts/soak, docs/soak.md) keeps the 5 % default.
    assert report.rss_growth is not None and lt.memory_levels_off(report, late_max=0.10), (
        lt.markdown(report) + f"RSS samples (MB): {report.rss_samples_mb}"
    )


def test_overload_sheds_excess_keeps_serving_and_recovers(server, corpus, baseline) -> None:
    before = workers(server)
    rate = OVERLOAD_FACTOR * baseline.requests_per_s
    out = run(lt.open_loop(server.url, corpus, duration_s=BURST_S, rate=rate, model=MODEL, seed=2))
    report = lt.summarize(out, BURST_S)
    print("\n" + lt.markdown(report))
    assert report.wrong_vectors == 0
    assert set(report.by_status) <= DELIBERATE, report.by_status
    shed = [o for o in out if o.status in (429, 503)]
    # The excess is refused... (how much: the server batches far better under 5x open load
    # than at the baseline's 4 clients — with parallel ORT runs it served ~75 % of it)
    assert len(shed) > 0.1 * len(out), report.by_status
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in shed)  # ...with Retry-After
    served = [o for o in out if o.status == 200]
    # ...while the rest keeps being served, within the budget (bounded queue, not 60 s).
    assert len(served) >= 0.5 * baseline.requests_per_s * BURST_S, report.by_status
    assert (
        report.latency_s["p99"] is not None and report.latency_s["p99"] <= SERVED_LATENCY_BUDGET_S
    )
    # No worker crashed or was replaced.
    assert server.proc.poll() is None and workers(server) == before
    # Recovery: interactive latency back to normal within seconds of the burst.
    after = run(
        lt.closed_loop(
            server.url,
            corpus,
            duration_s=5,
            concurrency=2,
            model=MODEL,
            seed=3,
            mix={"query": 0.5, "openai_one": 0.5},
        )
    )
    assert all(o.status == 200 for o in after), lt.summarize(after, 5).by_status
    recovered = lt.median_latency(after)
    assert recovered <= max(
        3 * baseline.interactive_median_s, baseline.interactive_median_s + 0.25
    ), (
        recovered,
        baseline,
    )


def test_long_and_short_texts_mixed_do_not_blow_up_memory(server, corpus) -> None:
    """Worst-case padding shapes (1-token and 256-token texts in one batch), repeatedly:
    the token-aware planner and arena shrinkage keep the server's memory flat."""
    long_text = "word " * 400
    bodies = [{"texts": ["a", long_text] * 32, "normalize": i % 2 == 0} for i in range(6)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(server.url + "/embed", json=b) for b in bodies))
        return [r.status_code for r in rs]

    # Warm these shapes twice: which requests a burst sheds (429: over the token budget)
    # and which worker takes which shape varies, so a shape may first appear later.
    for _ in range(2):
        assert set(run(burst())) <= {200, 429}
    # Resident memory moves ±5 % between bursts as arenas shrink and malloc trims (measured
    # 486-563 MiB, no trend; CI stop 38 failed a 5 % end/start bound at 5.3 %), so compare
    # the median of the last three bursts' samples with the first three's, against 10 %:
    # what this guards against is far larger (an unsplit 64 x 256-token batch's attention
    # alone is ~200 MiB a layer; keeping each request's token states, 25 MiB, adds 150 a burst).
    samples = []
    for _ in range(6):
        assert set(run(burst())) <= {200, 429}
        samples.append(lt.tree_rss(server.proc.pid))
    growth = statistics.median(samples[3:]) / statistics.median(samples[:3]) - 1
    mib = [round(s / 2**20) for s in samples]
    assert growth < 0.10, f"server RSS grew {growth:.1%} over 36 mixed requests (MiB: {mib})"


def test_client_disconnect_drops_its_work(server, corpus) -> None:
    """A client that gives up on a ~6 s bulk request: the server cancels it, the Embedder
    goes idle after the chunk in flight instead of computing the rest for nobody."""
    embedder = engine_worker(server)
    texts = (corpus.texts[: corpus.long_from] * 4)[:1536]

    def cpu() -> float:
        t = embedder.cpu_times()
        return t.user + t.system

    def dropped() -> float:
        m = re.search(r"^embedkit_dropped_requests_total ([0-9.e+]+)", server.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    before = dropped()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/embed", json={"texts": texts}, timeout=httpx.Timeout(60, read=1.5)
        )
    time.sleep(2.0)  # the chunk in flight at the disconnect finishes
    start = cpu()
    time.sleep(3.0)
    busy = cpu() - start
    assert busy < 0.6, f"the Embedder kept working {busy:.1f} CPU-s after its client left"
    assert dropped() == before + 1
    one = httpx.post(server.url + "/embed/query", json={"texts": [corpus.texts[0]]}, timeout=30)
    assert one.status_code == 200
