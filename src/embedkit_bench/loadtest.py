"""Load, soak and overload runs against a live embedkit server, every vector checked.

Used by ``tests/load`` (short runs in CI), ``tests/faults`` and :mod:`embedkit_bench.soak`
(`embedkit soak` / ``scripts/soak``, the documented 10-minute run). Loopback only: the
runner refuses any other host, so it can never be pointed at someone else's service.

The workload mixes what real clients send: single-text interactive requests
(``/embed/query``, OpenAI with one input) and bulk requests (``/embed``, OpenAI
with a list, float and base64), short STS Benchmark sentences beside texts
past the model's token limit, some with Matryoshka ``dimensions``. Every text
in the pool is distinct and its expected vector is computed in-process by the
same :class:`~embedkit.runtime.engine.Engine`, so a crossed-over, stale or corrupted
result under concurrency shows up as a wrong vector, not as a latency blip.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from embedkit.client import api
from embedkit.core.errors import InvalidInput
from embedkit.core.stats import percentile, percentiles
from embedkit.model import evaldata
from embedkit.runtime.vectors import decode_base64, postprocess

RSS_LATE_GROWTH_MAX = 0.05  # server memory growth after a run's first quarter (medians)
RSS_GROWTH_MAX = 0.25  # ... and over the whole run, arenas' warm-up included
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
TOLERANCE = 1e-4  # max |Δ| per component, as the HTTP parity tests (batching changes padding only)
# Share of requests per kind; "interactive" kinds are single texts.
DEFAULT_MIX: dict[str, float] = {
    "query": 0.55,
    "openai_one": 0.15,
    "bulk": 0.2,
    "openai_bulk": 0.1,
}
INTERACTIVE = frozenset({"query", "openai_one"})


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise InvalidInput(f"load runs target loopback only (127.0.0.1/localhost), not {host!r}")


# --- the text pool and its expected vectors -------------------------------------------


def sts_texts(*, n_short: int, n_long: int, seed: int = 0) -> list[str]:
    """``n_short`` distinct STS Benchmark test sentences and ``n_long`` distinct texts of
    300+ word pieces (several sentences joined: they get truncated to the model limit)."""
    seen: dict[str, None] = {}
    for pair in evaldata.sts("test"):
        for text in (pair.sentence1, pair.sentence2):
            seen.setdefault(text.strip(), None)
    pool = [t for t in seen if t]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if n_short > len(pool):
        raise InvalidInput(f"only {len(pool)} distinct sentences available, asked for {n_short}")
    short = pool[:n_short]
    longs = [f"[{i}] " + " ".join(rng.sample(pool, 24)) for i in range(n_long)]
    return short + longs


@dataclass(frozen=True)
class Corpus:
    """Distinct texts and their raw pooled vectors from the in-process engine."""

    texts: list[str]
    raw: np.ndarray
    normalize: bool
    dimension: int
    long_from: int  # texts[long_from:] are the long ones

    def expected(
        self, idx: Sequence[int], *, dimensions: int | None, normalize: bool
    ) -> np.ndarray:
        return postprocess(
            self.raw[list(idx)],
            normalize=normalize,
            dimensions=dimensions,
            model_dim=self.dimension,
        )


def build_corpus(engine: Any, texts: Sequence[str], *, n_long: int = 0) -> Corpus:
    """Expected raw vectors for ``texts`` (the last ``n_long`` being the long ones)."""
    ids = engine.tokenizer.encode(list(texts), truncate=True)
    raw = np.concatenate([engine.embed_ids(ids[i : i + 64])[0] for i in range(0, len(ids), 64)])
    return Corpus(
        texts=list(texts),
        raw=raw,
        normalize=bool(engine.manifest.embedding_config.normalize),
        dimension=int(engine.dimension),
        long_from=len(texts) - n_long,
    )


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One request to send and what its answer must be."""

    kind: str
    path: str
    body: dict[str, Any]
    idx: list[int]
    dimensions: int | None
    normalize: bool


def make_shot(rng: random.Random, corpus: Corpus, kind: str, model: str) -> Shot:
    n_short = corpus.long_from
    n_long = len(corpus.texts) - n_short

    def pick(k: int) -> list[int]:
        out = []
        for _ in range(k):
            if n_long and rng.random() < 0.2:
                out.append(n_short + rng.randrange(n_long))
            else:
                out.append(rng.randrange(n_short))
        return out

    dims = rng.choice((None, None, None, 64, 256))
    idx = pick(1) if kind in INTERACTIVE else pick(rng.randint(4, 48))
    texts = [corpus.texts[i] for i in idx]
    if kind in ("query", "bulk"):
        path = "/embed/query" if kind == "query" else "/embed"
        normalize = rng.random() < 0.9
        body: dict[str, Any] = {"texts": texts, "normalize": normalize}
        if dims:
            body["dimensions"] = dims
        if rng.random() < 0.3:
            body["encoding_format"] = "base64"
        return Shot(kind, path, body, idx, dims, normalize)
    body = {"model": model, "input": texts[0] if kind == "openai_one" else texts}
    if dims:
        body["dimensions"] = dims
    if rng.random() < 0.3:
        body["encoding_format"] = "base64"
    return Shot(kind, "/v1/embeddings", body, idx, dims, corpus.normalize)


def decode(data: dict[str, Any], shot: Shot, width: int) -> np.ndarray:
    """The vectors of a 200 answer, in request order."""

    if "embeddings" in data:  # native
        emb = data["embeddings"]
        return decode_base64(emb, width) if isinstance(emb, str) else np.asarray(emb, np.float32)
    items = sorted(data["data"], key=lambda d: d["index"])
    rows = [
        decode_base64(d["embedding"], width)[0]
        if isinstance(d["embedding"], str)
        else np.asarray(d["embedding"], np.float32)
        for d in items
    ]
    return np.stack(rows)


def count_wrong(got: np.ndarray, want: np.ndarray) -> int:
    """Rows that differ from their expected vector by more than :data:`TOLERANCE`."""
    if got.shape != want.shape:
        return int(want.shape[0])
    return int((np.abs(got - want).max(axis=1) > TOLERANCE).sum())


@dataclass
class Outcome:
    kind: str
    status: int  # 0: transport error (connection refused/reset, client timeout)
    latency_s: float
    started_s: float  # since the run began
    texts: int
    wrong: int = 0
    retry_after: str | None = None
    error: str | None = None


async def send(client: Any, url: str, shot: Shot, corpus: Corpus, t0: float) -> Outcome:
    start = time.perf_counter()
    base = Outcome(shot.kind, 0, 0.0, start - t0, len(shot.idx))
    try:
        resp = await client.post(url + shot.path, json=shot.body)
    except api.HTTPError as exc:
        base.latency_s = time.perf_counter() - start
        base.error = type(exc).__name__
        return base
    base.latency_s = time.perf_counter() - start
    base.status = resp.status_code
    base.retry_after = resp.headers.get("retry-after")
    if resp.status_code == 200:
        want = corpus.expected(shot.idx, dimensions=shot.dimensions, normalize=shot.normalize)
        try:
            got = decode(resp.json(), shot, want.shape[1])
        except (ValueError, KeyError, TypeError):
            base.wrong = len(shot.idx)
        else:
            base.wrong = count_wrong(got, want)
    else:
        try:
            base.error = str(resp.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            base.error = "non-openai-body"
    return base


async def warm_peak(url: str, corpus: Corpus, *, copies: int = 4, timeout_s: float = 120.0) -> None:
    """The mix's largest request (48 long texts), ``copies`` at once, so every ORT run and
    its allocator meet the peak shape before memory is watched: what grows after that is
    not warm-up. 429s (over the token budget) are fine; any other failure is raised."""
    check_loopback(url)
    longs = corpus.texts[corpus.long_from :] or corpus.texts
    body = {"texts": (longs * 48)[:48]}
    async with api.async_http_client(timeout=timeout_s) as client:
        answers = await asyncio.gather(
            *(client.post(url + api.EMBED_PATH, json=body) for _ in range(copies))
        )
    for resp in answers:
        if resp.status_code not in (200, 429):
            resp.raise_for_status()


def _kinds(mix: dict[str, float]) -> tuple[list[str], list[float]]:
    return list(mix), list(mix.values())


async def closed_loop(
    url: str,
    corpus: Corpus,
    *,
    duration_s: float,
    concurrency: int,
    model: str,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    max_requests: int | None = None,
    timeout_s: float = 120.0,
) -> list[Outcome]:
    """``concurrency`` clients, each sending its next request when the last one returns,
    until ``duration_s`` has passed (or ``max_requests`` were sent)."""
    check_loopback(url)
    kinds, weights = _kinds(mix or DEFAULT_MIX)
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    end = t0 + duration_s
    budget = max_requests if max_requests is not None else 1 << 62
    limits = api.limits(concurrency, keepalive=concurrency)
    async with api.async_http_client(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal budget
            while time.perf_counter() < end and budget > 0:
                budget -= 1
                shot = make_shot(rng, corpus, rng.choices(kinds, weights)[0], model)
                outcomes.append(await send(client, url, shot, corpus, t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def open_loop(
    url: str,
    corpus: Corpus,
    *,
    duration_s: float,
    rate: float,
    model: str,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    max_outstanding: int = 2000,
    timeout_s: float = 120.0,
) -> list[Outcome]:
    """Requests arrive at ``rate`` per second whatever the server does (how overload
    really looks); the client never holds more than ``max_outstanding`` at once."""
    check_loopback(url)
    kinds, weights = _kinds(mix or DEFAULT_MIX)
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[None]] = set()
    limits = api.limits(max_outstanding, keepalive=256)
    async with api.async_http_client(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(shot: Shot) -> None:
            outcomes.append(await send(client, url, shot, corpus, t0))

        sent = 0
        while (now := time.perf_counter()) - t0 < duration_s:
            due = int((now - t0) * rate) + 1
            while sent < due and len(tasks) < max_outstanding:
                shot = make_shot(rng, corpus, rng.choices(kinds, weights)[0], model)
                task = asyncio.get_running_loop().create_task(one(shot))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            sent = max(sent, due)  # arrivals the client could not hold are dropped, not delayed
            await asyncio.sleep(min(0.01, 1.0 / rate))
        if tasks:
            await asyncio.gather(*tasks)
    return outcomes


# --- memory -------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (the whole BentoML server)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class RssWatch:
    """Samples the server tree's RSS every ``interval_s`` in a thread while a load runs.

    One start/end pair cannot tell a leak from an allocator warming up: ONNX Runtime's
    arena and each runner thread's malloc arena grow while they meet new batch shapes,
    then level off; a leak keeps growing with the requests served. The growth after the
    first quarter (``Report.rss_late_growth``, :func:`memory_levels_off`) tells them apart.
    """

    def __init__(self, pid: int | None, interval_s: float = 1.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def _run(self) -> None:
        while True:
            if self.pid and (rss := tree_rss(self.pid)):
                self.samples.append(rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.pid and (rss := tree_rss(self.pid)):
            self.samples.append(rss)


# --- the report ---------------------------------------------------------------------------


@dataclass
class Report:
    duration_s: float
    requests: int
    texts: int
    by_status: dict[str, int]
    errors: dict[str, int]
    wrong_vectors: int
    latency_s: dict[str, float | None]
    latency_by_kind_s: dict[str, dict[str, float | None]]
    requests_per_s: float
    texts_per_s: float
    rss_start_mb: float | None = None
    rss_mid_mb: float | None = None  # median of the 2nd quarter's samples
    rss_end_mb: float | None = None  # median of the last quarter's samples
    rss_growth: float | None = None  # start -> end
    rss_late_growth: float | None = None  # mid -> end: a leak keeps growing, warm-up levels off
    rss_samples_mb: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_levels(rss: Sequence[int]) -> tuple[float, float, float]:
    """(first sample, median of the 2nd quarter, median of the last quarter), or zeros.

    Medians, because the arena gives memory back between batches: single samples swing
    by +-4 % (a 120 s soak: 574-630 MB). A linear leak of g over the run shows ~g/2
    between the two quarter medians; the warm-up mostly falls in the first quarter.
    """
    n = len(rss)
    if n < 4:
        return 0.0, 0.0, 0.0
    q2 = float(np.median(rss[n // 4 : n // 2]))
    q4 = float(np.median(rss[3 * n // 4 :]))
    return float(rss[0]), q2, q4


def summarize(
    outcomes: Sequence[Outcome],
    duration_s: float,
    *,
    rss: Sequence[int] = (),
    meta: dict[str, Any] | None = None,
) -> Report:
    """``rss``: the server's RSS samples over the run (:class:`RssWatch`), if watched."""
    ok = [o for o in outcomes if o.status == 200]
    by_kind: dict[str, dict[str, float | None]] = {}
    for kind in sorted({o.kind for o in ok}):
        by_kind[kind] = percentiles([o.latency_s for o in ok if o.kind == kind])
    start, mid, end = _rss_levels(rss)
    return Report(
        duration_s=duration_s,
        requests=len(outcomes),
        texts=sum(o.texts for o in ok),
        by_status=dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        errors=dict(sorted(Counter(o.error for o in outcomes if o.error).items())),
        wrong_vectors=sum(o.wrong for o in outcomes),
        latency_s=percentiles([o.latency_s for o in ok]),
        latency_by_kind_s=by_kind,
        requests_per_s=len(ok) / duration_s if duration_s else 0.0,
        texts_per_s=sum(o.texts for o in ok) / duration_s if duration_s else 0.0,
        rss_start_mb=start / 2**20 if start else None,
        rss_mid_mb=mid / 2**20 if mid else None,
        rss_end_mb=end / 2**20 if end else None,
        rss_growth=end / start - 1.0 if start else None,
        rss_late_growth=end / mid - 1.0 if mid else None,
        rss_samples_mb=[round(r / 2**20, 1) for r in rss],
        meta=meta or {},
    )


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.0f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def memory_levels_off(report: Report, *, late_max: float = RSS_LATE_GROWTH_MAX) -> bool:
    """No leak: under 5 % growth from the 2nd quarter to the last (a leak at the old 10 %
    start-to-end limit shows ~5 % there), and under 25 % in all (warm-up included)."""
    if report.rss_growth is None or report.rss_late_growth is None:
        return True  # not watched
    return report.rss_late_growth < late_max and report.rss_growth < RSS_GROWTH_MAX


def markdown(report: Report) -> str:
    lat = report.latency_s
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| duration | {report.duration_s:.0f} s |",
        f"| requests | {report.requests} ({report.requests_per_s:.1f}/s answered 200) |",
        f"| texts embedded | {report.texts} ({report.texts_per_s:.0f}/s) |",
        f"| responses by status | {_counts(report.by_status)} |",
        f"| errors by code | {_counts(report.errors) or 'none'} |",
        f"| wrong vectors | {report.wrong_vectors} |",
        "| latency p50 / p95 / p99 (200s) | "
        f"{_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])} |",
    ]
    for kind, p in report.latency_by_kind_s.items():
        lines.append(
            f"| — {kind} p50 / p95 / p99 | {_ms(p['p50'])} / {_ms(p['p95'])} / {_ms(p['p99'])} |"
        )
    if report.rss_start_mb and report.rss_mid_mb and report.rss_end_mb:
        lines.append(
            f"| server RSS start → 2nd quarter → last quarter (medians) | "
            f"{report.rss_start_mb:.0f} → {report.rss_mid_mb:.0f} → {report.rss_end_mb:.0f} MB "
            f"({(report.rss_growth or 0) * 100:+.1f} % in all, "
            f"{(report.rss_late_growth or 0) * 100:+.1f} % after the first quarter) |"
        )
    return "\n".join(lines) + "\n"


def dump(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def median_latency(outcomes: Sequence[Outcome], kinds: frozenset[str] = INTERACTIVE) -> float:
    """Median latency of successful requests of ``kinds`` (for recovery checks)."""
    lat = [o.latency_s for o in outcomes if o.status == 200 and o.kind in kinds]
    return percentile(lat, 50) if lat else float("inf")
