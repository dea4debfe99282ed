"""Where a served request's CPU goes: core-ms per request, per process and per stage.

While a closed-loop load runs against a server, ``py-spy`` samples every Python thread
of the server's process tree (``--subprocesses``, idle threads excluded) and each
process's CPU time is read (psutil) before and after. Each sampled stack is put in
one stage by its innermost frame that names one (:data:`RULES`: tokenising, validation,
the hop to the Embedder, the batching queue, the ORT run, post-processing, the response
body, HTTP, the event loop); ``core-ms per request`` is samples ÷ rate ÷ requests.
ORT's own worker threads are native, so py-spy does not see them: a process's measured
CPU minus its sampled non-ORT stages is what ORT (and its spinning) used. The load
generator's CPU is reported too: on two cores it competes with the server.

`embedkit bench-stages` (scripts/bench-stages) prints the table; docs/benchmarks/stages.md
keeps the runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedkit.core.errors import MissingExtra

# (stage, substrings of a frame "function (file:line)"); frames are tried innermost first
# and the first frame matching any rule decides, so a JSON encoder under the response
# body counts as the response while the event loop's own frames count as the loop.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ORT run", ("onnxruntime/",)),
    ("tokenise", ("tokenizers", "embedkit/runtime/tokens.py")),
    ("post-process", ("embedkit/runtime/vectors.py",)),
    ("response body", ("embedkit/serve/edge/bodies.py",)),
    (
        "validation",
        (
            "pydantic",
            "embedkit/serve/pipeline/jobs.py",
            "embedkit/serve/edge/schemas.py",
            "io_descriptors",
        ),
    ),
    (
        "hop to Embedder",
        ("aiohttp/", "_bentoml_impl/client", "_bentoml_impl/serde", "pickle", "multipart"),
    ),
    ("batching queue", ("embedkit/serve/pipeline/coalesce.py", "marshal/dispatcher")),
    (
        "HTTP",
        (
            "uvicorn",
            "h11",
            "httptools",
            "starlette",
            "embedkit/serve/edge/middleware.py",
            "_bentoml",
        ),
    ),
    ("event loop", ("asyncio/", "uvloop", "selectors", "anyio/", "threading.py")),
)
OTHER = "other"
IDLE = "idle"
# Innermost frames of a thread that is waiting, which py-spy (without --native) cannot
# tell from running: uvloop's epoll wait happens inside ``Runner.run``, worker threads
# park in ``Condition.wait``.
IDLE_LEAVES = (
    "Runner.run (asyncio/runners.py",
    "Condition.wait (threading.py",
    "_worker (concurrent/futures/thread.py",
    "select (selectors.py",
)


def stage_of(frames: Sequence[str]) -> str:
    """The stage of one stack, ``frames`` outermost first."""
    if frames and frames[-1].startswith(IDLE_LEAVES):
        return IDLE
    for frame in reversed(frames):
        for stage, needles in RULES:
            if any(n in frame for n in needles):
                return stage
    return OTHER


def role_of(process: str) -> str:
    """``front``/``embedder``/``supervisor`` from a py-spy process frame (its command line)."""
    if "--service-name embedder" in process:
        return "embedder"
    if "--service-name" in process:
        return "front"
    return "supervisor"


def parse_raw(lines: Iterable[str]) -> dict[str, Counter[str]]:
    """py-spy ``--format raw`` output → samples per stage, per process role."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        role = role_of(procs[-1]) if procs else "front"
        calls = [f for f in frames if not f.startswith(("process ", "thread "))]
        out[role][stage_of(calls)] += int(count)
    return dict(out)


def tree_cpu(root: int) -> dict[str, float]:
    """User + system CPU seconds so far, per role, over ``root`` and its live descendants."""
    import psutil

    out: dict[str, float] = defaultdict(float)
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in procs:
        try:
            times, cmd = proc.cpu_times(), " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[role_of(cmd)] += times.user + times.system
    return dict(out)


@dataclass
class StageRun:
    """One load phase: the load generator's row and what each process spent per request."""

    label: str
    load: dict[str, Any]
    loader_cpu_s: float
    cpu_s: dict[str, float]  # per role, measured with psutil
    samples: dict[str, Counter[str]]  # per role and stage, from py-spy
    rate: int
    notes: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return max(1, int(self.load["requests"]))

    def core_ms(self) -> dict[str, dict[str, float]]:
        """core-ms per request: per role, each sampled stage, ``ORT (incl. native)`` as the
        process CPU beyond its sampled non-ORT stages, and ``total``."""
        out: dict[str, dict[str, float]] = {}
        for role in sorted(set(self.cpu_s) | set(self.samples)):
            per = {
                stage: n / self.rate * 1000 / self.requests
                for stage, n in sorted(self.samples.get(role, Counter()).items())
                if stage not in ("ORT run", IDLE)
            }
            total = self.cpu_s.get(role, 0.0) * 1000 / self.requests
            outside = sum(per.values())
            if self.samples.get(role, Counter()).get("ORT run") or role == "embedder":
                per["ORT run (incl. native threads)"] = max(0.0, total - outside)
            per["total"] = total
            out[role] = per
        out["load generator"] = {"total": self.loader_cpu_s * 1000 / self.requests}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "load": self.load,
            "core_ms_per_request": self.core_ms(),
            "samples": {role: dict(c) for role, c in self.samples.items()},
            "rate_hz": self.rate,
            "notes": self.notes,
        }


LoadFn = Callable[[], tuple[dict[str, Any], float]]


def profile_phase(
    label: str, root_pid: int, run_load: LoadFn, seconds: float, rate: int = 200
) -> StageRun:
    """Run ``run_load`` (→ load row, loader CPU seconds) while py-spy samples ``root_pid``'s
    tree for ``seconds``; CPU per process is read around it."""
    spy_bin = shutil.which("py-spy")
    if spy_bin is None:
        raise MissingExtra("py-spy is not installed: pip install -e .[dev]")
    out = Path(tempfile.mkstemp(prefix="embedkit-spy-", suffix=".txt")[1])
    before = tree_cpu(root_pid)
    spy = subprocess.Popen(
        [spy_bin, "record", "--pid", str(root_pid), "--subprocesses", "--nonblocking",
         "--format", "raw", "--rate", str(rate), "--duration", str(int(seconds)), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(0.3)  # py-spy attached before the load starts
    load, loader_cpu = run_load()
    after = tree_cpu(root_pid)
    _, err = spy.communicate(timeout=seconds + 60)
    last = (err.strip().splitlines() or ["?"])[-1]
    notes = [] if spy.returncode == 0 else [f"py-spy exited {spy.returncode}: {last}"]
    samples = parse_raw(out.read_text().splitlines()) if out.exists() else {}
    out.unlink(missing_ok=True)
    cpu = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
    return StageRun(label, load, loader_cpu, cpu, samples, rate, notes)


def stage_table(runs: Sequence[StageRun]) -> list[tuple[str, ...]]:
    """Rows (process, stage, one core-ms cell per run) for a table, stages in RULES order."""
    order = [s for s, _ in RULES if s != "ORT run"] + [
        OTHER,
        "ORT run (incl. native threads)",
        "total",
    ]
    cells = [r.core_ms() for r in runs]
    roles = [r for r in ("front", "embedder", "supervisor", "load generator")
             if any(r in c for c in cells)]  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for role in roles:
        for stage in order:
            values = [c.get(role, {}).get(stage) for c in cells]
            if all(v is None or v < 0.005 for v in values) and stage != "total":
                continue
            rows.append((role, stage, *("" if v is None else f"{v:.2f}" for v in values)))
    return rows


def summary(run: StageRun) -> Mapping[str, float]:
    load = run.load
    return {
        "req_per_s": float(load["req_per_s"]),
        "p50_ms": float(load["p50_ms"]),
        "p95_ms": float(load["p95_ms"]),
    }


def _aiohttp_load(
    url: str, path: str, bodies: Sequence[bytes], concurrency: int, seconds: float
) -> LoadFn:
    """The project's closed-loop aiohttp client, in this process (its CPU: RUSAGE_SELF)."""
    import asyncio
    import resource

    from embedkit_bench.http import load, request_headers

    def run() -> tuple[dict[str, Any], float]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        row = asyncio.run(load(url, path, bodies, 1, concurrency, seconds, request_headers()))
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return row, cpu

    return run


def stages_by_arm(
    artifact: str | Path,
    arms: Mapping[str, Mapping[str, str]],
    *,
    concurrencies: Sequence[int] = (1, 16),
    seconds: float = 10.0,
    rate: int = 200,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Single texts on ``/v1/embeddings`` at each concurrency, for each server
    configuration in ``arms`` (label → extra environment), py-spy sampling each phase;
    then the in-process engine at batch 1 and 16 on the same texts."""
    from embedkit.model import evaldata
    from embedkit_bench.http import bodies_for, engine_reference
    from embedkit_bench.server import start_service

    texts = [s for p in evaldata.sts("test") for s in (p.sentence1, p.sentence2)]
    bodies = bodies_for("openai", texts, 1, "all-minilm-l6-v2")
    runs: list[StageRun] = []
    for arm, env in arms.items():
        service = start_service(artifact, dict(env))
        try:
            service.wait_ready()
            for conc in concurrencies:
                _aiohttp_load(service.url, "/v1/embeddings", bodies[:50], conc, 2.0)()  # settle
                run = profile_phase(
                    f"{arm} c={conc}",
                    service.proc.pid,
                    _aiohttp_load(service.url, "/v1/embeddings", bodies, conc, seconds),
                    seconds,
                    rate,
                )
                runs.append(run)
                s = summary(run)
                echo(
                    f"{run.label:16s} {s['req_per_s']:7.1f} req/s  p50 {s['p50_ms']:6.1f} ms"
                    f"  p95 {s['p95_ms']:6.1f} ms"
                )
        finally:
            service.stop()
    reference = {
        str(b): engine_reference(artifact, [texts[i : i + b] for i in range(0, 800, b)], seconds)
        for b in (1, 16)
    }
    echo("in-process engine texts/s: " + ", ".join(f"b{b} {v:.1f}" for b, v in reference.items()))
    return {
        "runs": [r.as_dict() for r in runs],
        "table": stage_table(runs),
        "labels": [r.label for r in runs],
        "in_process_texts_per_s": reference,
        "load_average": dict(zip(("1m", "5m", "15m"), os.getloadavg(), strict=True)),
    }
