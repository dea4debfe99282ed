"""Per-node INT8 sensitivity: quantise one weight MatMul at a time, measure the cosine drop.

The INT8 error of a BERT encoder is not spread evenly: a few MatMuls (those fed
by outlier-heavy activations) cause most of it. :func:`measure` builds, for each
weight MatMul, a dynamic-INT8 variant in which only that node is integer, and
scores its vectors against the fp32 parent on sentences the quality gate never
scores (STS Benchmark *train*). The result, most harmful first, is what mixed
precision keeps in fp32 (``keep_fp32``); it is committed per model
(:mod:`embedkit.variants.ranking`) because measuring it takes minutes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.variants import quantize, staging


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    mean_drop: float  # mean (1 - cosine) to fp32 over the sentences
    p1_cosine: float  # 1st-percentile cosine to fp32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``[n, d]`` arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.asarray(np.sum(a * b, axis=1))


def held_out_sentences(size: int, *, calibration_size: int = 512, seed: int = 0) -> list[str]:
    """STS Benchmark train sentences disjoint from the first ``calibration_size`` that
    :func:`embedkit.variants.staging.read_calibration_sentences` samples with ``seed``."""
    from embedkit.model import evaldata

    path = evaldata.data_file("stsbenchmark/sts-train.csv")
    pool = staging.read_calibration_sentences(path, 1_000_000, seed=seed)
    return pool[calibration_size : calibration_size + size]


def measure(
    parent: Artifact,
    sentences: Sequence[str],
    *,
    nodes: Sequence[str] | None = None,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda _m: None,
    **options: Any,
) -> list[NodeSensitivity]:
    """Sensitivity of every weight MatMul of ``parent``, most harmful first.

    ``options`` are :func:`embedkit.variants.quantize.quantize_dynamic_int8` options
    (weight type, per-channel, reduce-range: use the ones the candidates use on this
    CPU, since the integer kernels differ by ISA). ``nodes`` restricts the measurement
    to those weight MatMuls (default: all).
    """
    texts = list(sentences)
    base = Engine(parent).encode(texts)
    every = quantize.weight_matmuls(parent.model_path)
    nodes = list(nodes) if nodes is not None else every
    out = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, node in enumerate(nodes):
            others = [n for n in every if n != node]
            variant = quantize.build_variant(
                parent, "dynamic-int8", Path(tmp) / str(i), exclude=others, **options
            )
            cos = cosines(Engine(variant).encode(texts), base)
            out.append(
                NodeSensitivity(
                    node, float(np.mean(1 - cos)), float(np.percentile(cos, 1, method="lower"))
                )
            )
            say(f"{i + 1}/{len(nodes)} {node}: mean drop {out[-1].mean_drop:.2e}")
    return sorted(out, key=lambda s: s.mean_drop, reverse=True)
