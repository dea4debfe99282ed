"""Rerank over HTTP beside the in-process reranker (`embedkit bench-rerank`,
scripts/bench-rerank): one query and ``documents`` documents a request to ``/rerank``,
closed loop (:func:`embedkit_bench.http.load`), then the in-process
:class:`~embedkit.runtime.rerank.Reranker` on the very same pairs, one call a request.

Reported: p50/p95 latency of a request and pairs/s, HTTP at concurrency 1 and at
``concurrency``, in-process alone, and the ratios (HTTP over in-process). Pairs: each STS
Benchmark test sentence1 as the query, the next ``documents`` sentence2s as its documents
(file order, deterministic). A benchmark, not a test: speed is noisy on shared CPUs, so
compare ratios from one run and rerun.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embedkit.core.errors import InvalidInput
from embedkit.core.stats import percentiles
from embedkit_bench.http import load, request_headers
from embedkit_bench.server import start_service, wait_ready

RERANK_PATH = "/rerank"
Group = tuple[str, list[str]]  # a query and its documents: one request


def rerank_groups(documents: int, count: int = 12) -> list[Group]:
    """``count`` (query, documents) requests from STS Benchmark test, file order."""
    from embedkit.model import evaldata

    if documents < 1:
        raise InvalidInput(f"--documents must be >= 1, got {documents}")
    pairs = evaldata.sts("test")
    docs = [p.sentence2 for p in pairs]
    return [
        (pairs[i].sentence1, [docs[(i + j) % len(docs)] for j in range(documents)])
        for i in range(0, count * 7, 7)
    ]


def rerank_bodies(groups: Sequence[Group], model: str | None = None) -> list[bytes]:
    """TEI ``/rerank`` bodies (raw scores: the in-process side skips the activation too)."""
    extra = {"model": model} if model else {}
    return [
        json.dumps({"query": q, "texts": docs, "raw_scores": True, **extra}).encode()
        for q, docs in groups
    ]


def in_process(artifact: str | Path, groups: Sequence[Group], seconds: float) -> dict[str, Any]:
    """The in-process reranker scoring each group's pairs in one call, in turn, for
    ``seconds``: the same row as :func:`~embedkit_bench.http.load` (c = 1)."""
    from embedkit.model.artifact import resolve
    from embedkit.runtime.rerank import Reranker

    reranker = Reranker(resolve(str(artifact)))
    reranker.warmup()
    calls = [[(q, d) for d in docs] for q, docs in groups]
    for pairs in calls[:2]:  # settle: arenas, shapes
        reranker.score(pairs, raw=True)
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        reranker.score(calls[len(latencies) % len(calls)], raw=True)
        latencies.append(time.perf_counter() - t0)
    return row(latencies, len(calls[0]), time.perf_counter() - start)


def row(latencies: Sequence[float], pairs_per_request: int, elapsed: float) -> dict[str, Any]:
    """Requests, pairs/s and p50/p95/p99 ms of ``latencies`` (seconds) over ``elapsed``."""
    q = percentiles(s * 1000 for s in latencies)
    return {
        "requests": len(latencies),
        "texts_per_s": len(latencies) * pairs_per_request / elapsed,
        "req_per_s": len(latencies) / elapsed,
        **{f"{k}_ms": float("nan") if v is None else v for k, v in q.items()},
        "seconds": elapsed,
    }


def ratios(http: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, float]:
    """HTTP over in-process: pairs/s (below 1: HTTP is slower) and p50 latency (above 1)."""
    return {
        "pairs_per_s_http_over_in_process": http["texts_per_s"] / local["texts_per_s"],
        "p50_http_over_in_process": http["p50_ms"] / local["p50_ms"],
    }


def line(name: str, r: Mapping[str, Any]) -> str:
    """One printed row: pairs/s, requests/s, p50 and p95 ms (and errors, for HTTP)."""
    errors = f"  errors {r['errors']}" if "errors" in r else ""
    return (
        f"{name:28s} {r['texts_per_s']:9.1f} pairs/s {r['req_per_s']:7.2f} req/s  "
        f"p50 {r['p50_ms']:7.1f}  p95 {r['p95_ms']:7.1f} ms{errors}"
    )


def http_vs_reranker(
    artifact: str | Path,
    *,
    url: str | None = None,
    documents: int = 100,
    seconds: float = 15.0,
    concurrency: int = 4,
    model: str | None = None,
    env_extra: Mapping[str, str] | None = None,
    api_key: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``/rerank`` of ``documents`` documents at concurrency 1 and ``concurrency``, then the
    in-process reranker on the same requests; without ``url`` it serves ``artifact`` itself
    (:func:`~embedkit_bench.server.start_service`)."""
    groups = rerank_groups(documents)
    bodies = rerank_bodies(groups, model)
    headers = request_headers(api_key)
    service = start_service(artifact, env_extra) if url is None else None
    target = service.url if service else str(url)
    results: dict[str, Any] = {"documents_per_request": documents}
    try:
        if service:
            service.wait_ready()
        else:
            wait_ready(target)
        for conc in sorted({1, concurrency}):
            asyncio.run(load(target, RERANK_PATH, bodies, documents, conc, 2.0, headers))
            r = asyncio.run(load(target, RERANK_PATH, bodies, documents, conc, seconds, headers))
            results[f"http c{conc}"] = r
            echo(line(f"{RERANK_PATH} x{documents} c={conc}", r))
    finally:
        if service is not None:
            service.stop()
    results["in-process"] = in_process(artifact, groups, seconds)
    echo(line(f"in-process Reranker x{documents}", results["in-process"]))
    results["ratios"] = ratios(results["http c1"], results["in-process"])
    echo(
        "HTTP c=1 / in-process: pairs/s {pairs_per_s_http_over_in_process:.1%}, "
        "p50 latency {p50_http_over_in_process:.2f}x".format(**results["ratios"])
    )
    load_avg = os.getloadavg()
    results["load_average"] = dict(zip(("1m", "5m", "15m"), load_avg, strict=True))
    echo("load average (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*load_avg))
    return results
