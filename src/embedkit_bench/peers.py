"""embedkit beside a peer server (Infinity), measured in one run: `embedkit bench-peers`.

Both servers serve the same model with the same threads on the same machine, up at once
(an idle server costs next to nothing), and take turns: for every round and workload,
each gets a short settle run and then a measured phase of the same length; the server
that goes first alternates from round to round so a drift of the shared machine does
not always favour one. The load generator is ``wrk`` (one thread, ``-c`` connections,
closed loop) with a Lua script that cycles a file of request bodies and prints its
summary as JSON: a C client takes far less of the two cores than a Python loop would,
and its own CPU is measured (``wait4``) and reported with each server's process-tree
CPU as core-ms per request. Latency percentiles are wrk's (per-request, microsecond
resolution), not :mod:`embedkit.core.stats`'s: wrk keeps no list of calls.

The peer is Infinity (``infinity-emb``) in its own virtual environment under
``build/peers/infinity`` (it needs numpy<2; the pins that resolved are
``peers-infinity.txt`` beside this module), serving a plain Optimum feature-extraction
export of the model (``last_hidden_state``; Infinity mean-pools and normalises itself)
through its ``optimum`` engine. Workloads: single STS Benchmark test sentences (shuffled
with a fixed seed) at 1, 16 and 64 clients, 32 sentences per request at 4, and 64 SciFact
abstracts per request at 1 (their ~16k tokens fill the default ``max_queued_tokens``).
Both answer ``POST /v1/embeddings`` with the same body.
Beside them: the vectors of both servers compared (cosine), and this project's engine
in-process on the same texts at the batch sizes the workloads compare with.

``baseline`` (``--baseline-artifact``): a second embedkit server, for a second artifact of
the same model (say the release's default beside its fp32 parent), up with the others and
taking its turn in every round the same way (the order rotates by round, so with three
servers each goes first once every three rounds); its vectors are checked against
Infinity's and it has its own in-process engine, and a second table gives each round's
ratios embedkit ÷ baseline, baseline ÷ Infinity and embedkit ÷ Infinity, so one run
compares the two artifacts on the same minutes of the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from embedkit.client import api
from embedkit.core.errors import (
    BuildError,
    ContractViolation,
    EmbedkitError,
    InvalidInput,
    NotReady,
)
from embedkit.core.settings import Settings
from embedkit.release.measure import default_artifact, engine_encoder, measure, sts_stream
from embedkit_bench.http import bodies_for
from embedkit_bench.loadtest import check_loopback
from embedkit_bench.server import HOST, Server, free_port, start_service, stop_process_group
from embedkit_bench.server import wait_ready as wait_http_ready
from embedkit_bench.stages import tree_cpu

if TYPE_CHECKING:
    from embedkit.model.artifact import Artifact

INFINITY_VERSION = "0.0.78"
# The optimum extra brings ORT through optimum-onnx; torch is pinned to the release whose
# CPU wheel is on these machines (unpinned, pip takes a multi-GB CUDA build).
INFINITY_REQUIREMENTS = (f"infinity-emb[server,optimum]=={INFINITY_VERSION}", "torch==2.13.0")
CONSTRAINTS = "peers-infinity.txt"
WRK_SCRIPT = "peers-wrk.lua"
ROOT = Path("build") / "peers"  # venv, export, logs (ignored by git)
PATH = "/v1/embeddings"
FALLBACK_SCIFACT = Path("tests") / "data" / "scifact-slice"
SYSTEMS = ("embedkit", "infinity")
BASELINE = "baseline"  # the second embedkit server, with a baseline artifact
SEED = 0

Say = Callable[[str], None]
OnPhase = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Workload:
    """One load shape: texts per request, clients, corpus, and the in-process batch size
    its throughput is compared with."""

    name: str
    texts_per_request: int
    concurrency: int
    corpus: Literal["sts", "long"]
    reference_batch: int
    # Phases this many times --seconds: a long-document request takes seconds, and a phase
    # must hold several of them (wrk counts only the requests that finish inside it).
    phase_factor: int = 1
    # "latency": throughput by Little's law (clients ÷ mean latency) instead of counting
    # requests: a phase that holds a handful of them would quantise a count (3 or 4 → ±30 %).
    throughput_from: Literal["count", "latency"] = "count"

    @property
    def label(self) -> str:
        n = self.texts_per_request
        what = "abstracts" if self.corpus == "long" else "text" if n == 1 else "texts"
        return f"{n} {what}/req, c={self.concurrency}"


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("single-c1", 1, 1, "sts", 1),
        Workload("single-c16", 1, 16, "sts", 16),
        Workload("single-c64", 1, 64, "sts", 32),
        Workload("batch32-c4", 32, 4, "sts", 32),
        # One client: 64 abstracts are ~16k tokens, embedkit's whole default admission budget
        # (max_queued_tokens), so a second request in flight is answered 429 at once.
        Workload("long64-c1", 64, 1, "long", 64, phase_factor=3, throughput_from="latency"),
    )
}


def parse_workloads(spec: str | None) -> list[Workload]:
    """``"single-c1,batch32-c4"`` → workloads (all when ``spec`` is empty)."""
    if not spec:
        return list(WORKLOADS.values())
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise InvalidInput(
            f"unknown workload {', '.join(unknown) or repr(spec)}; "
            f"choose from {', '.join(WORKLOADS)}"
        )
    return [WORKLOADS[n] for n in dict.fromkeys(names)]


# --- corpora -------------------------------------------------------------------------------


def long_documents(count: int, *, seed: int = SEED) -> tuple[list[str], str]:
    """``count`` SciFact abstracts (title + body, shuffled) and where they came from: the
    full set under ``extended_data_dir``, else the slice the tests ship (said so)."""
    from embedkit.quality import retrieval

    directory = retrieval.scifact_dir()
    source = f"SciFact train abstracts ({directory})"
    if retrieval.missing_reason(directory) is not None:
        if retrieval.missing_reason(FALLBACK_SCIFACT) is not None:
            raise InvalidInput(
                f"no SciFact data: neither {directory} nor {FALLBACK_SCIFACT} holds "
                "corpus.jsonl, queries.jsonl and qrels/train.tsv"
            )
        directory = FALLBACK_SCIFACT
        source = (
            f"SciFact slice of the tests ({directory}, 300 abstracts): "
            f"{retrieval.scifact_dir()} is absent"
        )
    docs = list(retrieval.load_beir(directory).docs)
    random.Random(seed).shuffle(docs)
    return docs[:count], source


# --- wrk -----------------------------------------------------------------------------------


def ensure_wrk(say: Say) -> str:
    """The ``wrk`` binary; installed with apt-get when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BuildError("wrk is not installed (apt-get install wrk, as root)")
    say("installing wrk (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise BuildError(f"{' '.join(cmd)} failed: {tail}")
    return shutil.which("wrk") or "wrk"


def wrk_command(
    wrk: str, url: str, script: Path, bodies: Path, concurrency: int, seconds: int
) -> list[str]:
    """One wrk thread, ``concurrency`` connections, ``seconds`` long; a request that takes
    longer than the whole phase counts as a timeout."""
    timeout = max(10, 2 * seconds)
    return [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        f"{timeout}s",
        "-s",
        str(script),
        url,
        "--",
        str(bodies),
        PATH,
    ]


def parse_wrk(output: str) -> dict[str, Any]:
    """The JSON line the Lua script's ``done()`` prints (``WRK_JSON {...}``)."""
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            try:
                data = json.loads(line.removeprefix("WRK_JSON "))
            except json.JSONDecodeError as exc:
                raise EmbedkitError(f"wrk printed a summary that is not JSON: {exc.msg}") from None
            if isinstance(data, dict):
                return data
    tail = " | ".join(output.strip().splitlines()[-3:]) or "no output"
    raise EmbedkitError(f"wrk printed no summary: {tail}")


def phase_row(
    wrk: Mapping[str, Any],
    workload: Workload,
    *,
    server_cpu_s: float | None,
    wrk_cpu_s: float | None,
) -> dict[str, Any]:
    """Throughput, latency, errors and core-ms per request of one measured phase.

    Only 2xx answers count as served; wrk's latency percentiles cover every answer.
    ``req_per_s_counted`` is always served ÷ seconds; ``req_per_s`` is that or, for a
    workload whose throughput comes from latency, clients ÷ mean latency."""
    texts_per_request = workload.texts_per_request
    seconds = wrk["duration_us"] / 1e6
    status_errors = int(wrk["status_errors"])
    ok = max(0, int(wrk["requests"]) - status_errors)
    errors = status_errors + sum(
        int(wrk[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    lat = wrk["latency_us"]

    def per_request(cpu_s: float | None) -> float | None:
        return cpu_s * 1000 / ok if cpu_s is not None and ok else None

    counted = ok / seconds if seconds > 0 else 0.0
    rate = counted
    if workload.throughput_from == "latency":
        rate = workload.concurrency / (lat["mean"] / 1e6) if ok and lat["mean"] > 0 else 0.0
    return {
        "requests": ok,
        "errors": errors,
        "seconds": seconds,
        "req_per_s": rate,
        "texts_per_s": rate * texts_per_request,
        "req_per_s_counted": counted,
        "throughput_from": workload.throughput_from,
        **{f"p{p}_ms": lat[f"p{p}"] / 1000 for p in (50, 95, 99)},
        "server_core_ms_per_req": per_request(server_cpu_s),
        "wrk_core_ms_per_req": per_request(wrk_cpu_s),
    }


# --- processes -----------------------------------------------------------------------------


def tree_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of ``pid`` and its live descendants (None when unknown)."""
    if pid is None:
        return None
    by_role = tree_cpu(pid)
    return sum(by_role.values()) if by_role else None


def listener_pid(url: str) -> int | None:
    """The topmost process listening on ``url``'s port (BentoML's arbiter holds the socket
    its workers share), or None when it cannot be seen (another user's process)."""
    from urllib.parse import urlsplit

    import psutil

    port = urlsplit(url).port
    try:
        pids = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.pid and c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        }
    except psutil.AccessDenied:
        return None
    for pid in pids:
        try:
            if psutil.Process(pid).ppid() not in pids:
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def wait_idle(
    pid: int | None, *, timeout: float = 60.0, window: float = 0.5, busy_cores: float = 0.1
) -> float:
    """Wait until ``pid``'s process tree uses under ``busy_cores`` over ``window`` seconds;
    return the seconds waited. When wrk stops, requests still in flight are abandoned but a
    server may finish them: that work must not land in the next phase (the other server's)."""
    start = time.monotonic()
    last = tree_cpu_seconds(pid)
    if last is None:
        time.sleep(1.0)
        return time.monotonic() - start
    while time.monotonic() - start < timeout:
        time.sleep(window)
        now = tree_cpu_seconds(pid)
        if now is None or (now - last) / window < busy_cores:
            break
        last = now
    return time.monotonic() - start


@dataclass
class Target:
    """A server under load: where it answers and whose CPU to count."""

    name: str
    url: str
    pid: int | None


def run_wrk(
    wrk: str, target: Target, script: Path, bodies: Path, workload: Workload, seconds: int
) -> dict[str, Any]:
    """One wrk run against ``target``; its row, with wrk's and the server's CPU."""
    cmd = wrk_command(wrk, target.url, script, bodies, workload.concurrency, seconds)
    before = tree_cpu_seconds(target.pid)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
        # wait4 gives this child's own rusage: the load generator's CPU, nothing else's.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    after = tree_cpu_seconds(target.pid)
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise EmbedkitError(f"wrk against {target.name} exited {proc.returncode}: {tail}")
    server_cpu = after - before if before is not None and after is not None else None
    return phase_row(
        parse_wrk(output),
        workload,
        server_cpu_s=server_cpu,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime,
    )


def _settle(
    wrk: str, target: Target, script: Path, bodies: Path, w: Workload, seconds: int, model: str
) -> None:
    """Warm ``target`` up on ``w``'s shape, then wait until it is idle. A long-document
    request outlasts a short wrk run, so those settle with one request waited for."""
    if w.phase_factor > 1:
        first = json.loads(bodies.read_text().splitlines()[0])
        embed(target.url, first["input"], model)
    else:
        run_wrk(wrk, target, script, bodies, w, seconds)
    wait_idle(target.pid)


# --- Infinity: its venv, its export, its server ----------------------------------------------


def _package_file(name: str) -> Path:
    return Path(str(resources.files("embedkit_bench") / name))


def _clean_env() -> dict[str, str]:
    """This environment minus what would leak our packages into another interpreter."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def ensure_infinity(root: Path, say: Say) -> Path:
    """Infinity's own venv under ``root/infinity``, made once and reused while the pins in
    ``peers-infinity.txt`` are unchanged; returns the venv."""
    venv = root / "infinity"
    python = venv / "bin" / "python"
    constraints = _package_file(CONSTRAINTS)
    wanted = hashlib.sha256(
        (constraints.read_text() + " ".join(INFINITY_REQUIREMENTS)).encode()
    ).hexdigest()
    stamp = venv / ".embedkit-pins"
    if python.is_file() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return venv
    say(f"creating {venv} with infinity-emb {INFINITY_VERSION} (pip, ~2 min)")
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "infinity-install.log"
    # The base interpreter, not ours: a venv made from inside a venv would still see it.
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c",
         str(constraints), *INFINITY_REQUIREMENTS],
    ]  # fmt: skip
    start = time.monotonic()
    with open(log, "w") as fh:
        for cmd in steps:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_clean_env())
            if done.returncode != 0:
                raise BuildError(f"{' '.join(cmd[:4])} … failed (log: {log})")
    stamp.write_text(wanted + "\n")
    say(f"Infinity venv ready in {time.monotonic() - start:.0f} s (log: {log})")
    return venv


def venv_versions(venv: Path) -> dict[str, str]:
    """Versions of the packages that matter, as installed in ``venv``."""
    names = ["infinity-emb", "onnxruntime", "optimum", "optimum-onnx", "transformers",
             "tokenizers", "torch", "numpy"]  # fmt: skip
    code = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{n: v(n) for n in {names!r}}}))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True, text=True, env=_clean_env(), check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BuildError(f"cannot read package versions in {venv}: {done.stderr.strip()[-200:]}")
    return {k: v for k, v in json.loads(done.stdout).items() if v}


def export_for_infinity(model_dir: Path, out: Path, max_tokens: int, say: Say) -> Path:
    """A plain Optimum feature-extraction export of ``model_dir`` (``model.onnx`` with
    ``last_hidden_state``, config, tokenizer) in ``out``, made once per source checksum.

    Infinity truncates at the config's ``max_position_embeddings`` (512 for MiniLM), not at
    the sentence-transformers limit the model was trained and is served with (256): the
    exported config says ``max_tokens`` so both servers embed the same tokens."""
    from embedkit.model.export import require_export_extra, source_checksum

    wanted = f"{source_checksum(model_dir)} max_tokens={max_tokens}"
    stamp = out / ".embedkit-source"
    if (out / "model.onnx").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return out
    require_export_extra()
    from optimum.exporters.onnx import main_export

    say(f"exporting {out.name} for Infinity (Optimum, last_hidden_state)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        main_export(
            str(model_dir),
            staging,
            task="feature-extraction",
            library_name="transformers",
            do_validation=False,
        )
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["max_position_embeddings"] = max_tokens
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        stamp_tmp = staging / ".embedkit-source"
        stamp_tmp.write_text(wanted)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def start_infinity(venv: Path, model_dir: Path, served_name: str, root: Path) -> Server:
    """Infinity on a free loopback port, serving ``model_dir`` as ``served_name``.

    Started inside the model folder with ``--model-id .`` (the only way a local folder
    worked); its own warm-up, vector cache, graph optimiser (it fails against optimum 2.x
    and falls back anyway) and telemetry are off; routes under ``/v1`` like ours."""
    port = free_port()
    log = root / "infinity.log"
    env = {
        **_clean_env(),
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str((root / "hf-home").resolve()),
    }
    cmd = [
        str(venv / "bin" / "infinity_emb"), "v2",
        "--model-id", ".", "--served-model-name", served_name,
        "--engine", "optimum", "--device", "cpu", "--pooling-method", "mean",
        "--no-model-warmup", "--no-vector-disk-cache", "--onnx-disable-optimize",
        "--url-prefix", "/v1", "--log-level", "warning",
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=model_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Server(f"http://{HOST}:{port}", "infinity", log, proc)


# --- parity and the in-process reference ---------------------------------------------------


def embed(url: str, texts: Sequence[str], model: str) -> np.ndarray:
    """Vectors of ``texts`` from an OpenAI-style ``/v1/embeddings`` route, in input order."""
    with api.Client(url, timeout_s=300) as client:
        r = client.embeddings(list(texts), model=model, check=False)
    if r.status_code != 200:
        raise EmbedkitError(f"{url}{PATH} answered {r.status_code}: {r.text[:200]}")
    return api.openai_vectors(r.json(), dtype=np.float64)


def cosine_parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two ``[n, dim]`` arrays: min, mean, and the count."""
    if a.shape != b.shape:
        raise ContractViolation(f"the servers answered different shapes: {a.shape} vs {b.shape}")
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "texts": len(cos),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


Reference = Callable[[], dict[str, dict[str, Any]]]


def inprocess_reference(
    artifact: str | Path,
    sts: Sequence[str],
    long_docs: Sequence[str],
    workloads: Sequence[Workload],
    env: Mapping[str, str] | None = None,
) -> Reference:
    """The engine loaded in this process; each call measures it on the same texts at each
    batch size the workloads compare with (key ``sts-b16``, ``long-b64``): texts/s and
    per-call latency. ``env``: the EMBEDKIT_* variables the server got, so both run with the
    same settings. Called once per round while the servers idle, so each round's shares of
    in-process speed compare figures of the same minutes on a shared machine."""
    from embedkit.runtime.engine import Engine

    engine = Engine.load(artifact, _settings_with(env or {}))
    engine.warmup()
    encode, counts = engine_encoder(engine)
    shapes = sorted({(w.corpus, w.reference_batch) for w in workloads})

    def run() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for corpus, batch in shapes:
            # ~2-10 s each on a 2-core machine: enough calls for a p50, bounded for long texts.
            texts = list(long_docs[: 3 * batch] if corpus == "long" else sts[: 256 + 24 * batch])
            timing = measure(
                {"engine": encode}, texts, batch, warmup_batches=1, before_timing=[counts]
            )["engine"]
            out[f"{corpus}-b{batch}"] = {"batch": batch, **timing.summary(len(texts), counts.real)}
        return out

    return run


def _settings_with(env: Mapping[str, str]) -> Settings:
    """Settings read from this environment plus ``env`` (as the started server reads them)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the run -------------------------------------------------------------------------------


@contextmanager
def _servers(
    url: str | None,
    artifacts: Mapping[str, str | Path],
    env_extra: Mapping[str, str],
    venv: Path,
    model_dir: Path,
    served_name: str,
    root: Path,
    say: Say,
) -> Iterator[dict[str, Target]]:
    """Every server up, stopped on the way out: one of ours per ``artifacts`` entry (system
    name → artifact; ``embedkit`` is the one at ``url`` when given), then Infinity. Targets
    come in that order, the order :func:`alternate` rotates."""
    started: list[Server] = []
    targets: dict[str, Target] = {}
    try:
        ours = []
        for name, artifact in artifacts.items():
            if name == "embedkit" and url is not None:
                targets[name] = Target(name, url.rstrip("/"), listener_pid(url))
                continue
            say(f"starting {name} (bentoml serve)")
            ek = start_service(artifact, env_extra)
            started.append(ek)
            ours.append(ek)
            targets[name] = Target(name, ek.url, ek.proc.pid)
        say("starting Infinity")
        inf = start_infinity(venv, model_dir, served_name, root)
        started.append(inf)
        for ek in ours:  # started before Infinity: they load while it does
            ek.wait_ready()
        try:
            wait_http_ready(inf.url, path="/health", proc=inf.proc, timeout=180)
        except EmbedkitError as exc:
            raise EmbedkitError(f"{exc.message} (Infinity log: {inf.log})") from None
        targets["infinity"] = Target("infinity", inf.url, inf.proc.pid)
        yield targets
    finally:
        for server in reversed(started):
            if hasattr(server, "home"):
                server.stop()  # IsolatedServer: removes its model store copy too
            else:
                stop_process_group(server.proc)


@dataclass(frozen=True)
class PhasePlan:
    """What every phase of a run shares: the load generator, its script, the request
    bodies per workload, and the phase lengths."""

    wrk: str
    script: Path
    bodies: dict[str, Path]
    seconds: int
    settle_s: int
    model: str


def _write_bodies(
    directory: Path,
    workloads: Sequence[Workload],
    sts: Sequence[str],
    long_docs: Sequence[str],
    model: str,
) -> dict[str, Path]:
    """One file of request bodies (a JSON body per line) per workload."""
    out = {}
    for w in workloads:
        texts = long_docs if w.corpus == "long" else sts
        path = directory / f"{w.name}.jsonl"
        path.write_bytes(
            b"\n".join(bodies_for("openai", texts, w.texts_per_request, model)) + b"\n"
        )
        out[w.name] = path
    return out


def check_parity(
    targets: Mapping[str, Target],
    texts: Sequence[str],
    model: str,
    min_cosine: float,
    pair: tuple[str, str] = SYSTEMS,
) -> dict[str, float]:
    """The same texts through the ``pair`` of servers; refuse to go on when the vectors
    disagree."""
    parity = cosine_parity(*(embed(targets[name].url, texts, model) for name in pair))
    parity["threshold"] = min_cosine
    if parity["min_cosine"] < min_cosine:
        who = "the servers" if pair == SYSTEMS else " and ".join(pair)
        raise ContractViolation(
            f"{who} disagree: min cosine {parity['min_cosine']:.6f} over "
            f"{parity['texts']} texts < {min_cosine} (same model, same export?)"
        )
    return parity


def alternate(
    plan: PhasePlan,
    targets: Mapping[str, Target],
    workloads: Sequence[Workload],
    rounds: int,
    *,
    references: Mapping[str, Reference],
    say: Say,
    on_phase: OnPhase | None = None,
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, list[dict[str, dict[str, Any]]]]]:
    """Every round, every workload, each server in turn (the order of ``targets``, rotated
    by one each round: who goes first changes, and with two servers it alternates): settle,
    measure, wait until idle; then each in-process reference while the servers idle.
    ``([round][workload][system] = row, {name: [round][shape] = reference row})``."""
    systems = tuple(targets)
    results = []
    measured: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name in references}
    total = rounds * len(workloads) * len(systems)
    step = 0
    for r in range(rounds):
        k = r % len(systems)
        order = systems[k:] + systems[:k]
        round_rows: dict[str, dict[str, Any]] = {}
        for w in workloads:
            round_rows[w.name] = {}
            bodies = plan.bodies[w.name]
            for name in order:
                if on_phase:
                    on_phase(step, total, f"round {r + 1}: {w.name} → {name}")
                target = targets[name]
                _settle(plan.wrk, target, plan.script, bodies, w, plan.settle_s, plan.model)
                row = run_wrk(
                    plan.wrk, target, plan.script, bodies, w, plan.seconds * w.phase_factor
                )
                row["drain_s"] = wait_idle(target.pid)
                round_rows[w.name][name] = row
                step += 1
                say(
                    f"round {r + 1} {w.name:11s} {name:9s} {row['req_per_s']:7.1f} req/s "
                    f"{row['texts_per_s']:7.1f} texts/s  p50 {row['p50_ms']:6.1f}  "
                    f"p95 {row['p95_ms']:6.1f} ms  errors {row['errors']}"
                )
        results.append(round_rows)
        for name, reference in references.items():
            if on_phase:
                on_phase(step, total, f"round {r + 1}: in-process reference{_of(name)}")
            measured[name].append(reference())
    return results, measured


def run_peers(
    artifact: str | Path | None,
    *,
    workloads: Sequence[Workload],
    rounds: int = 2,
    seconds: int = 10,
    url: str | None = None,
    env_extra: Mapping[str, str] | None = None,
    min_cosine: float = 0.999,
    baseline: str | Path | None = None,
    root: Path = ROOT,
    say: Say = print,
    on_phase: OnPhase | None = None,
) -> dict[str, Any]:
    """The whole comparison; the report :func:`markdown` and the CLI's table read.

    ``artifact`` None: :func:`~embedkit.release.measure.default_artifact` (exported on first
    use); with ``url``, pass the artifact that server serves (the in-process reference).
    ``baseline``: a second artifact (dir or tag) of the same model, served by a second
    embedkit server started like the first and measured in the same rounds."""
    from embedkit.model.artifact import resolve
    from embedkit.model.recipe import find_recipe, read_embedding_config
    from embedkit_bench.roofline import machine

    if rounds < 1 or seconds < 1:
        raise InvalidInput("--rounds and --seconds must be at least 1")
    if url is not None:  # a typo in --url fails now, not after minutes of installing
        check_loopback(url)
        _check_reachable(url)
    wrk = ensure_wrk(say)
    root = root.resolve()  # Infinity starts inside its model folder
    art = resolve(default_artifact(artifact))
    served_name = art.manifest.name
    arts = {"embedkit": art}
    if baseline is not None:
        arts[BASELINE] = resolve(baseline)
        # The request bodies name the model, and Infinity serves one export of it.
        if arts[BASELINE].manifest.name != served_name:
            raise InvalidInput(
                f"the baseline serves {arts[BASELINE].manifest.name}, not {served_name}: "
                "--baseline-artifact takes another artifact of the same model"
            )
    recipe = find_recipe(served_name)
    model_dir, model_version = recipe.source.resolve()
    max_tokens = read_embedding_config(model_dir).max_seq_length
    venv = ensure_infinity(root, say)
    inf_model = export_for_infinity(model_dir, root / "models" / served_name, max_tokens, say)

    sts = sts_stream(seed=SEED)
    long_docs, long_source = long_documents(512)
    env = dict(env_extra or {})
    threads = _settings_with(env).intra_op_threads
    engines = {}
    for name, a in arts.items():
        say("loading the engine in-process (the reference)" + _of(name))
        engines[name] = inprocess_reference(a.path, sts, long_docs, workloads, env)
    started_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="embedkit-peers-") as tmp:
        plan = PhasePlan(
            wrk=wrk,
            script=_package_file(WRK_SCRIPT),
            bodies=_write_bodies(Path(tmp), workloads, sts, long_docs, served_name),
            seconds=seconds,
            settle_s=min(2, seconds),
            model=served_name,
        )
        paths = {name: a.path for name, a in arts.items()}
        with _servers(url, paths, env, venv, inf_model, served_name, root, say) as targets:
            parities = {}
            for name in arts:
                through = "both servers" if name == "embedkit" else f"the {name} and Infinity"
                say(f"parity: the same texts through {through}")
                parities[name] = check_parity(
                    targets,
                    list(sts[:56]) + list(long_docs[:8]),
                    served_name,
                    min_cosine,
                    pair=(name, "infinity"),
                )
            results, references = alternate(
                plan, targets, workloads, rounds, references=engines, say=say, on_phase=on_phase
            )
    report: dict[str, Any] = {
        "date": started_at.isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": dict(zip(("1m", "5m", "15m"), os.getloadavg(), strict=True)),
        "settings": {
            "rounds": rounds,
            "seconds_per_phase": seconds,
            "long_phase_s": seconds * WORKLOADS["long64-c1"].phase_factor,
            "settle_s": plan.settle_s,
        },
        "model": {"name": served_name, "source": model_version, "max_tokens": max_tokens},
        "systems": {
            "embedkit": {
                "version": embedkit_version(),
                "url": url or "started by the benchmark",
                "artifact": str(art.path),
                "intra_op_threads": threads,
                "env": env,
                "onnxruntime": _version("onnxruntime"),
            },
            "infinity": {
                "versions": venv_versions(venv),
                "engine": "optimum, --pooling-method mean, --device cpu",
                "model": str(inf_model),
                "intra_op_threads": f"ORT default: one per physical core ({_physical_cores()})",
            },
        },
        "corpora": {
            "sts": "STS Benchmark test sentences (sentence1+sentence2), shuffled, seed 0",
            "long": long_source,
        },
        "workloads": {w.name: asdict(w) | {"label": w.label} for w in workloads},
        "parity": parities["embedkit"],
        "rounds": results,
        "in_process": references["embedkit"],
        "summary": summarize(results, references["embedkit"], workloads, references.get(BASELINE)),
    }
    if baseline is not None:
        # Its rows sit beside the others in "rounds"; its own figures here.
        report["systems"]["embedkit"]["variant"] = _variant(art)
        report["systems"][BASELINE] = {
            "artifact": str(arts[BASELINE].path),
            "variant": _variant(arts[BASELINE]),
            "url": "started by the benchmark",
        }
        report["parity_baseline"] = parities[BASELINE]
        report["in_process_baseline"] = references[BASELINE]
    return report


def _variant(art: Artifact) -> str:
    """The release candidate's name (``openvino-bf16``), else ``fp32`` or the mode."""
    q = art.manifest.quantization
    return q.variant or ("fp32" if q.mode == "none" else q.mode)


def _of(name: str) -> str:
    """`` (baseline)`` after a progress line about the baseline; nothing for the default."""
    return "" if name == "embedkit" else f" ({name})"


def _check_reachable(url: str) -> None:
    """Refuse a ``url`` nothing answers at once; give one that answers 60 s to be ready."""
    try:
        with api.Client(url, timeout_s=5) as client:
            client.get(api.READY_PATH)
    except api.HTTPError as exc:
        raise NotReady(f"no server answers at {url}: {type(exc).__name__}") from None
    try:
        wait_http_ready(url.rstrip("/"), timeout=60)
    except NotReady:
        raise NotReady(f"the server at {url} is not ready (GET /readyz, 60 s)") from None


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def embedkit_version() -> str:
    """This package's version and git commit, for a report."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"{_version('embedkit') or '?'}" + (f" (git {commit})" if commit else "")


def _physical_cores() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


# --- summary, table, markdown (pure: tested without servers) -------------------------------


def _span(values: Sequence[float | None]) -> list[float] | None:
    """[min, max] of the known values (None when there are none)."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    return [min(known), max(known)] if known else None


def _ratio(
    rows: Sequence[Mapping[str, Mapping[str, Any]]], num: str, den: str
) -> list[float] | None:
    """Span of ``num``'s texts/s ÷ ``den``'s, round by round (never max over min)."""
    return _span(
        [
            row[num]["texts_per_s"] / row[den]["texts_per_s"]
            if row[den]["texts_per_s"] > 0
            else None
            for row in rows
        ]
    )


def summarize(
    rounds: Sequence[Mapping[str, Mapping[str, Mapping[str, Any]]]],
    reference: Sequence[Mapping[str, Mapping[str, Any]]],
    workloads: Sequence[Workload],
    baseline_reference: Sequence[Mapping[str, Mapping[str, Any]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per workload: each system's ranges over rounds, the per-round ratio embedkit/Infinity
    (texts/s) and each system's share of the in-process engine at the matching batch,
    measured in the same round (``reference[i]`` belongs to ``rounds[i]``).

    With a baseline server in the rounds, also its ranges (its share against its own
    engine, ``baseline_reference``), ``vs_baseline`` (embedkit ÷ baseline) and
    ``baseline_ratio`` (baseline ÷ Infinity), each per round."""
    keys = ("req_per_s", "texts_per_s", "p50_ms", "p95_ms", "p99_ms",
            "server_core_ms_per_req", "wrk_core_ms_per_req")  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for w in workloads:
        rows = [r[w.name] for r in rounds if w.name in r]
        if not rows:
            continue
        key = f"{w.corpus}-b{w.reference_batch}"
        refs = [ref.get(key) for ref in reference]
        # Infinity's share stays against the default's engine, as without a baseline.
        refs_of = {name: refs for name in SYSTEMS}
        if all(BASELINE in row for row in rows):
            refs_of[BASELINE] = [ref.get(key) for ref in baseline_reference or ()]
        entry: dict[str, Any] = {"label": w.label}
        for system, system_refs in refs_of.items():
            entry[system] = {k: _span([row[system][k] for row in rows]) for k in keys}
            entry[system]["errors"] = sum(row[system]["errors"] for row in rows)
            entry[system]["of_in_process"] = _span(
                [
                    row[system]["texts_per_s"] / ref["texts_per_s"] if ref else None
                    for row, ref in zip(rows, system_refs, strict=False)
                ]
            )
        entry["ratio"] = _ratio(rows, "embedkit", "infinity")
        if BASELINE in refs_of:
            entry["vs_baseline"] = _ratio(rows, "embedkit", BASELINE)
            entry["baseline_ratio"] = _ratio(rows, BASELINE, "infinity")
        known = [ref for ref in refs if ref]
        entry["in_process"] = (
            {
                "batch": w.reference_batch,
                "texts_per_s": _span([ref["texts_per_s"] for ref in known]),
                "p50_ms": _span([ref["p50_ms"] for ref in known]),
            }
            if known
            else None
        )
        out[w.name] = entry
    return out


def fmt_span(span: Sequence[float] | None, fmt: str = "{:.0f}", suffix: str = "") -> str:
    """``[a, b]`` → ``"a–b"`` (one figure when both print the same); ``-`` when unknown."""
    if not span:
        return "-"
    lo, hi = (fmt.format(v) for v in span)
    return (lo if lo == hi else f"{lo}–{hi}") + suffix


TABLE_COLUMNS = (
    "workload", "embedkit", "Infinity", "ratio", "embedkit p50 / p95 ms",
    "Infinity p50 / p95 ms", "% of in-process", "server core-ms/req", "wrk core-ms/req",
)  # fmt: skip
# The last three columns read "embedkit / Infinity".


def _speed(s: Mapping[str, Any], single: bool) -> str:
    if single:
        return fmt_span(s["req_per_s"], suffix=" req/s")
    texts = fmt_span(s["texts_per_s"], suffix=" texts/s")
    return f"{texts} ({fmt_span(s['req_per_s'], '{:.1f}')} req/s)"


def _latency(s: Mapping[str, Any]) -> str:
    errors = f", {s['errors']} errors" if s["errors"] else ""
    return f"{fmt_span(s['p50_ms'], '{:.1f}')} / {fmt_span(s['p95_ms'], '{:.1f}')}{errors}"


def _pair(ek: Sequence[float] | None, inf: Sequence[float] | None, fmt: str) -> str:
    return f"{fmt_span(ek, fmt)} / {fmt_span(inf, fmt)}"


def table_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The side-by-side table as text cells (the CLI's rich table and the markdown)."""
    rows = []
    for e in summary.values():
        ek, inf = e["embedkit"], e["infinity"]
        single = e["label"].startswith("1 text")
        pct = _pair(_pct(ek["of_in_process"]), _pct(inf["of_in_process"]), "{:.0f}")
        if e["in_process"]:
            pct += f" % of b{e['in_process']['batch']}"
        rows.append([
            e["label"], _speed(ek, single), _speed(inf, single),
            fmt_span(e["ratio"], "{:.2f}", "×"), _latency(ek), _latency(inf), pct,
            _pair(ek["server_core_ms_per_req"], inf["server_core_ms_per_req"], "{:.2f}"),
            _pair(ek["wrk_core_ms_per_req"], inf["wrk_core_ms_per_req"], "{:.3f}"),
        ])  # fmt: skip
    return rows


def _pct(span: Sequence[float] | None) -> list[float] | None:
    return [100 * v for v in span] if span else None


BASELINE_COLUMNS = (
    "workload", "embedkit", "baseline", "embedkit ÷ baseline", "baseline ÷ Infinity",
    "embedkit ÷ Infinity", "baseline p50 / p95 ms", "baseline % of in-process",
    "baseline server core-ms/req",
)  # fmt: skip


def baseline_rows(summary: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The second table (a run with a baseline): the baseline's figures and the three
    ratios, each per round; empty without a baseline."""
    rows = []
    for e in summary.values():
        if BASELINE not in e:
            continue
        base = e[BASELINE]
        single = e["label"].startswith("1 text")
        pct = fmt_span(_pct(base["of_in_process"]), "{:.0f}")
        if e["in_process"] and base["of_in_process"]:
            pct += f" % of b{e['in_process']['batch']}"
        rows.append([
            e["label"], _speed(e["embedkit"], single), _speed(base, single),
            *(fmt_span(e[k], "{:.2f}", "×") for k in ("vs_baseline", "baseline_ratio", "ratio")),
            _latency(base), pct, fmt_span(base["server_core_ms_per_req"], "{:.2f}"),
        ])  # fmt: skip
    return rows


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _reference_table(reference: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The in-process reference, min–max over rounds, per corpus and batch."""
    rows = []
    for key in sorted({k for ref in reference for k in ref}):
        found = [ref[key] for ref in reference if key in ref]
        tps = fmt_span(_span([r["texts_per_s"] for r in found]), "{:.1f}")
        p50 = fmt_span(_span([r["p50_ms"] for r in found]), "{:.1f}")
        rows.append([key, tps, p50])
    return _table(("corpus / batch", "texts/s", "p50 ms per call"), rows)


def markdown(report: Mapping[str, Any], *, command: str = "", note: str = "") -> str:
    """The report as markdown: context first (date, CPU, command, versions), then the table,
    parity and the in-process reference."""
    m = report["machine"]
    ek, inf = report["systems"]["embedkit"], report["systems"]["infinity"]
    base = report["systems"].get(BASELINE)
    s = report["settings"]
    title = "embedkit and a baseline beside Infinity" if base else "embedkit beside Infinity"
    lines = [f"# {title}, one run", ""]
    if note:
        lines += [f"> {note}", ""]
    inf_versions = ", ".join(f"{k} {v}" for k, v in inf["versions"].items())
    lines += [
        f"- date: {report['date']}",
        f"- machine: {m['cpu']} ({m['cores']} cores, ISA {m['isa'].get('level', '?')}); "
        "load average at the end {:.2f} / {:.2f} / {:.2f}".format(*report["load_average"].values()),
        f"- command: `{command}`" if command else "- command: (library call)",
        f"- model: {report['model']['name']} ({report['model']['source']}), "
        f"both truncating at {report['model']['max_tokens']} tokens",
        f"- embedkit {ek['version']}, onnxruntime {ek['onnxruntime']}, "
        f"{ek['intra_op_threads']} intra-op threads"
        + (f", env {ek['env']}" if ek["env"] else "")
        + f"; server: {ek['url']}",
        f"- Infinity: {inf_versions}; {inf['engine']}; threads: {inf['intra_op_threads']}",
    ]
    if base:
        lines.append(
            f"- embedkit serves {ek['variant']} ({ek['artifact']}); baseline: a second embedkit "
            f"server, same settings, serving {base['variant']} ({base['artifact']})"
        )
    both = "embedkit and Infinity" if base else "both servers"
    order = (
        "the order (embedkit, baseline, Infinity) rotates by one each round"
        if base
        else "who goes first alternates by round"
    )
    lines += [
        f"- {s['rounds']} round(s); per workload and round each server gets a "
        f"{s['settle_s']} s settle run (long documents: one request), then "
        f"{s['seconds_per_phase']} s measured (long documents: {s['long_phase_s']} s, and "
        "their throughput is 1 client ÷ mean latency, as a count of a few requests would "
        "quantise it) "
        f"(wrk -t1, closed loop), then a wait until the server is idle; {order}",
        f"- texts: {report['corpora']['sts']}; long documents: {report['corpora']['long']}",
        "",
        *_table(TABLE_COLUMNS, table_rows(report["summary"])),
    ]
    p = report["parity"]
    lines += [
        "",
        "Ranges are min–max over rounds; the last three columns read embedkit / Infinity; "
        "ratio = embedkit texts/s ÷ Infinity texts/s in the same round; % of in-process = "
        "served texts/s ÷ the engine in this process at the batch size named (bN), same "
        "texts, same threads, measured in the same round. Latency percentiles are "
        "wrk's. Core-ms per request: CPU of the server's process tree and of wrk during the "
        "measured phase, divided by the requests served.",
        "",
        f"Parity: {p['texts']} texts (STS sentences and long documents) through {both}: "
        f"min cosine {p['min_cosine']:.6f}, mean {p['mean_cosine']:.6f} "
        f"(threshold {p['threshold']}).",
        "",
        "In-process reference (embedkit engine, this process, once per round while "
        f"{'the' if base else 'both'} servers idle; min–max over rounds):",
        "",
        *_reference_table(report["in_process"]),
    ]
    if base:
        lines += _baseline_section(report)
    return "\n".join(lines) + "\n"


def _baseline_section(report: Mapping[str, Any]) -> list[str]:
    """The baseline's table, parity and in-process reference (a run with a baseline)."""
    p = report["parity_baseline"]
    return [
        "",
        f"## embedkit ({report['systems']['embedkit']['variant']}) beside the baseline "
        f"({report['systems'][BASELINE]['variant']}), same run",
        "",
        *_table(BASELINE_COLUMNS, baseline_rows(report["summary"])),
        "",
        "Every ratio is texts/s ÷ texts/s in the same round, min–max over rounds; the "
        "baseline's % of in-process is against its own engine in this process (table below).",
        "",
        f"Parity of the baseline: the same {p['texts']} texts through it and Infinity: "
        f"min cosine {p['min_cosine']:.6f}, mean {p['mean_cosine']:.6f} "
        f"(threshold {p['threshold']}).",
        "",
        "In-process reference of the baseline (its engine, this process, once per round "
        "while the servers idle; min–max over rounds):",
        "",
        *_reference_table(report["in_process_baseline"]),
    ]
