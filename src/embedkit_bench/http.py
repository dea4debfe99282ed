"""HTTP load benchmark of a running embedkit service (or one it starts), closed loop.

Each of ``concurrency`` clients sends its next request as soon as the previous
one returns, for a fixed time per phase, from one asyncio process (aiohttp, a
BentoML dependency, so this works in a serving-only install). Phases sweep
concurrency over the interactive route (``/embed/query``, one text) and the
bulk route (``/embed``, ``bulk_size`` texts); throughput against latency over
the sweep is the latency-vs-throughput curve. Non-200 answers are counted as
errors, never timed. Vectors are not checked here (:mod:`embedkit_bench.loadtest`
does that under load); this measures speed. :func:`run_http_bench` is the sweep of
`embedkit bench --http`; :func:`http_vs_engine` is `embedkit bench-http` (the HTTP
routes beside the in-process engine). Servers come from :mod:`embedkit_bench.server`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embedkit.client import api
from embedkit.core.stats import percentiles
from embedkit_bench.server import start_service, wait_ready

ROUTES = {"interactive": api.QUERY_PATH, "bulk": api.EMBED_PATH, "openai": api.OPENAI_PATH}


def request_headers(api_key: str | None = None) -> dict[str, str]:
    """The headers of every request the load sends: a JSON body and the API key."""
    return {"content-type": "application/json", **api.auth_headers(api_key)}


# --- load ----------------------------------------------------------------------------------


def bodies_for(route: str, texts: Sequence[str], per_request: int, model: str) -> list[bytes]:
    """Request bodies of ``per_request`` texts each, cycling through ``texts``."""
    groups = [
        list(texts[i : i + per_request])
        for i in range(0, len(texts) - per_request + 1, per_request)
    ]
    if route == "openai":
        return [
            json.dumps({"input": g[0] if per_request == 1 else g, "model": model}).encode()
            for g in groups
        ]
    return [json.dumps({"texts": g}).encode() for g in groups]


async def load(
    url: str,
    path: str,
    bodies: Sequence[bytes],
    texts_per_req: int,
    concurrency: int,
    seconds: float,
    headers: Mapping[str, str],
) -> dict[str, Any]:
    """Closed-loop load for ``seconds``: texts/s, requests/s, p50/p95/p99 ms, errors by status."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    counter = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=max(120.0, seconds * 4))
    async with aiohttp.ClientSession(
        connector=conn, headers=dict(headers), timeout=timeout
    ) as session:

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < stop:
                body = bodies[counter % len(bodies)]
                counter += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url + path, data=body) as r:
                        await r.read()
                        status = str(r.status)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[status] = errors.get(status, 0) + 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    q = percentiles(s * 1000 for s in latencies)
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "texts_per_s": len(latencies) * texts_per_req / elapsed,
        "req_per_s": len(latencies) / elapsed,
        **{f"{k}_ms": float("nan") if v is None else v for k, v in q.items()},
        "seconds": elapsed,
    }


def run_http_bench(
    url: str,
    texts: Sequence[str],
    *,
    concurrencies: Sequence[int] = (1, 4, 16, 64),
    routes: Sequence[str] = ("interactive", "bulk"),
    bulk_size: int = 32,
    seconds: float = 10.0,
    settle_s: float = 2.0,
    model: str = "all-minilm-l6-v2",
    api_key: str | None = None,
    on_phase: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Sweep routes × concurrencies against ``url``; ``{route: {concurrency: row}}``."""
    headers = request_headers(api_key)
    wait_ready(url, timeout=30)
    total = len(routes) * len(concurrencies)
    out: dict[str, Any] = {}
    step = 0
    for route in routes:
        per = 1 if route == "interactive" else bulk_size
        bodies = bodies_for(route, texts, per, model)
        out[route] = {"path": ROUTES[route], "texts_per_request": per, "concurrency": {}}
        for conc in concurrencies:
            if on_phase:
                on_phase(step, total, f"http {route} c={conc}")
            asyncio.run(load(url, ROUTES[route], bodies[:50], per, conc, settle_s, headers))
            row = asyncio.run(load(url, ROUTES[route], bodies, per, conc, seconds, headers))
            out[route]["concurrency"][str(conc)] = row
            step += 1
    if on_phase:
        on_phase(total, total, "http done")
    return {
        "url": url,
        "seconds_per_phase": seconds,
        "routes": out,
        "load_average": dict(zip(("1m", "5m", "15m"), os.getloadavg(), strict=True)),
    }


# --- HTTP beside the in-process engine (`embedkit bench-http`, scripts/bench-http) -----------


def engine_reference(artifact: str | Path, batches: Sequence[list[str]], seconds: float) -> float:
    """Texts/s of the in-process engine encoding ``batches`` in turn for ``seconds``."""
    from embedkit.runtime.engine import Engine

    engine = Engine.load(artifact)
    engine.warmup()
    done = i = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = batches[i % len(batches)]
        engine.encode(batch)
        done += len(batch)
        i += 1
    return done / (time.perf_counter() - start)


def _phase_line(path: str, per: int, conc: int, r: Mapping[str, Any]) -> str:
    return (
        f"{path:16s} {per:3d} texts/req  c={conc:<3d} {r['texts_per_s']:8.1f} texts/s "
        f"{r['req_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f}  p95 {r['p95_ms']:6.1f}  "
        f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}"
    )


def http_vs_engine(
    artifact: str | Path,
    *,
    url: str | None = None,
    env_extra: Mapping[str, str] | None = None,
    seconds: float = 20.0,
    concurrency: int = 16,
    bulk_concurrency: int = 4,
    api_key: str | None = None,
    keep: bool = False,
    model: str = "all-minilm-l6-v2",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Single texts to /embed/query and /v1/embeddings at ``concurrency``, 32-text requests
    to /embed at ``bulk_concurrency``, then the in-process engine on the same 32-text
    batches; the headline is HTTP bulk texts/s over in-process texts/s.

    Texts: STS Benchmark test sentences in file order. Without ``url`` it serves
    ``artifact`` itself (:func:`~embedkit_bench.server.start_service`, ``env_extra`` added
    to its environment); ``keep`` keeps that server's BENTOML_HOME and log.
    """
    from embedkit.model import evaldata

    texts = [s for p in evaldata.sts("test") for s in (p.sentence1, p.sentence2)]
    batches = [texts[i : i + 32] for i in range(0, len(texts) - 32, 32)]
    headers = request_headers(api_key)
    service = start_service(artifact, env_extra) if url is None else None
    target = service.url if service else str(url)
    results: dict[str, Any] = {}
    try:
        if service:
            service.wait_ready()
        else:
            wait_ready(target)
        phases = [
            ("interactive", 1, concurrency),
            ("openai", 1, concurrency),
            ("bulk", 32, bulk_concurrency),
        ]
        for route, per, conc in phases:
            path = ROUTES[route]
            bodies = bodies_for(route, texts, per, model)
            asyncio.run(load(target, path, bodies[:50], per, conc, 2.0, headers))  # settle
            row = asyncio.run(load(target, path, bodies, per, conc, seconds, headers))
            results[f"{path} x{per} c{conc}"] = row
            echo(_phase_line(path, per, conc, row))
    finally:
        if service is not None:
            service.stop(keep_home=keep)
            if keep:
                echo(f"server log: {service.log}")
    reference = engine_reference(artifact, batches, seconds)
    results["in-process engine x32"] = {"texts_per_s": reference}
    ratio = results[f"/embed x32 c{bulk_concurrency}"]["texts_per_s"] / reference
    echo(f"in-process engine, 32-text batches: {reference:.1f} texts/s")
    echo(f"HTTP /embed x32 / in-process: {ratio:.1%} (target >= 85%)")
    results["ratio"] = {"bulk_http_over_in_process": ratio}
    load_avg = os.getloadavg()
    results["load_average"] = dict(zip(("1m", "5m", "15m"), load_avg, strict=True))
    echo("load average (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*load_avg))
    return results
