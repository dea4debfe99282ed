"""HTTP load benchmark of a running embedkit service (or one it starts), closed loop.

Each of ``concurrency`` clients sends its next request as soon as the previous
one returns, for a fixed time per phase, from one asyncio process (aiohttp, a
BentoML dependency, so this works in a serving-only install). Phases sweep
concurrency over the interactive route (``/embed/query``, one text) and the
bulk route (``/embed``, ``bulk_size`` texts); throughput against latency over
the sweep is the latency-vs-throughput curve. Non-200 answers are counted as
errors, never timed. Vectors are not checked here (:mod:`embedkit.bench.loadtest`
does that under load); this measures speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import NotReady

SERVICE = "service:EmbeddingAPI"
ROUTES = {"interactive": "/embed/query", "bulk": "/embed", "openai": "/v1/embeddings"}


# --- a service to measure ----------------------------------------------------------------


@dataclass
class ServiceProcess:
    """A `bentoml serve` of this repo's service in its own process group and BENTOML_HOME."""

    url: str
    tag: str
    home: Path
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.home / "serve.log"

    def stop(self, *, keep_home: bool = False) -> None:
        stop_process_group(self.proc)
        if not keep_home:
            shutil.rmtree(self.home, ignore_errors=True)  # the model store copy is ~90 MB


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server's whole process group (BentoML forks workers), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(
    artifact: str | Path, env_extra: Mapping[str, str] | None = None
) -> ServiceProcess:
    """Register ``artifact`` in a fresh BENTOML_HOME and serve it on a free loopback port.

    Registration runs in a subprocess so this process's BentoML home is untouched.
    Call :func:`wait_ready` before sending load and :meth:`ServiceProcess.stop` after.
    """
    home = Path(tempfile.mkdtemp(prefix="embedkit-bench-"))
    env = {**os.environ, "BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    code = (
        "from embedkit.model.artifact import register, resolve;"
        f"print(register(resolve({str(artifact)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise NotReady(f"cannot register {artifact} for the benchmark server: {tail}")
    tag = done.stdout.strip().splitlines()[-1]
    env["EMBEDKIT_MODEL"] = tag
    port = _free_port()
    bentoml = str(Path(sys.executable).parent / "bentoml")
    with open(home / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [bentoml, "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServiceProcess(f"http://127.0.0.1:{port}", tag, home, proc)


async def wait_ready(
    url: str, timeout: float = 180.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise NotReady(f"the benchmark server exited early (code {proc.returncode})")
            try:
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise NotReady(f"server at {url} not ready after {timeout:.0f} s")


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
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "texts_per_s": len(latencies) * texts_per_req / elapsed,
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
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
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    asyncio.run(wait_ready(url, timeout=30))
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
