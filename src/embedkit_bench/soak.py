"""The soak (`embedkit soak`, scripts/soak): a sustained mixed workload, memory watched.

Loopback only and bounded (``seconds``, ``max_requests``). Phases: a warm-up run
(every request shape once, arenas grown; it measures capacity), then the soak at
``concurrency`` closed-loop clients. The RSS of the whole server process tree is
sampled through the soak (``loadtest.RssWatch``): it must level off. The workload
and its checks (every vector compared with the in-process engine's) are
:mod:`embedkit_bench.loadtest`'s, the same as tests/load; docs/soak.md has the
documented 10-minute run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from embedkit_bench import loadtest as lt
from embedkit_bench.server import start_service

PASSING_STATUSES = frozenset({"200", "429", "503"})  # answers, and deliberate shedding


@dataclass(frozen=True)
class SoakPlan:
    seconds: float = 60.0
    warmup_seconds: float = 20.0
    concurrency: int = 4
    max_requests: int | None = None
    short: int = 1500  # distinct short texts in the pool
    long: int = 60  # distinct long (truncated) texts
    model: str = "all-minilm-l6-v2"  # the served model name


def passed(report: lt.Report) -> bool:
    """No wrong vector, no status but answers and shedding, memory flat."""
    return (
        report.wrong_vectors == 0
        and set(report.by_status) <= PASSING_STATUSES
        and lt.memory_levels_off(report)
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_soak(
    artifact: str | Path | None,
    plan: SoakPlan,
    *,
    url: str | None = None,
    pid: int | None = None,
    env_extra: Mapping[str, str] | None = None,
    command: str = "",
    say: Callable[[str], None] = _stderr,
) -> lt.Report:
    """Soak ``url`` (a running loopback server; ``pid`` for its RSS) or, without it, a
    server of ``artifact`` started in a fresh BENTOML_HOME with ``env_extra``.

    ``artifact`` (default: the benchmark's fp32 export) also computes the expected
    vectors. A server this starts is stopped at the end; its home and log are kept
    when the soak fails (or is interrupted), for the log.
    """
    from embedkit.model.artifact import Artifact
    from embedkit.release.measure import default_artifact
    from embedkit.runtime.engine import Engine

    if url:
        lt.check_loopback(url)  # before minutes of corpus building
    art = Artifact.load(default_artifact(artifact))
    texts = lt.sts_texts(n_short=plan.short, n_long=plan.long)
    corpus = lt.build_corpus(Engine(art), texts, n_long=plan.long)
    server = None
    if url:
        watched = pid
    else:
        server = start_service(art.path, env_extra)
        url, watched = server.url, server.proc.pid
        say(f"server log: {server.log}")
    ok = False
    try:
        if server is not None:
            server.wait_ready()
        warm = asyncio.run(
            lt.closed_loop(
                url,
                corpus,
                duration_s=plan.warmup_seconds,
                concurrency=plan.concurrency,
                model=plan.model,
            )
        )
        warm_report = lt.summarize(warm, plan.warmup_seconds)
        asyncio.run(lt.warm_peak(url, corpus))
        start = time.perf_counter()
        with lt.RssWatch(watched, interval_s=max(1.0, plan.seconds / 120)) as rss:
            out = asyncio.run(
                lt.closed_loop(
                    url,
                    corpus,
                    duration_s=plan.seconds,
                    concurrency=plan.concurrency,
                    model=plan.model,
                    seed=1,
                    max_requests=plan.max_requests,
                )
            )
        elapsed = time.perf_counter() - start
        report = lt.summarize(
            out,
            elapsed,
            rss=rss.samples,
            meta={
                "concurrency": plan.concurrency,
                "mix": lt.DEFAULT_MIX,
                "pool": {"short": plan.short, "long": plan.long},
                "warmup": {
                    "seconds": plan.warmup_seconds,
                    "requests_per_s": warm_report.requests_per_s,
                    "wrong_vectors": warm_report.wrong_vectors,
                },
                "command": command,
                "load_average": os.getloadavg(),
            },
        )
        ok = passed(report)
    finally:
        if server is not None:
            server.stop(keep_home=not ok)
            if not ok:
                say(f"server log kept: {server.log}")
    return report
