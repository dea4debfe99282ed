"""The conversion contract: operators, dynamic shapes, batch invariance, parity.

``validate(artifact)`` runs every check and returns one JSON-able report with a
section per check; the artifact passes only if every section passes. Parity is
measured through the serving engine (the same code path the service runs)
against the PyTorch ``SentenceTransformer.encode`` reference, so what is
verified is what is served.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import ArtifactError, ContractViolation, InferenceError
from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.model.artifact import Artifact

# fp32 parity thresholds, per vector (issue #2).
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4
# Batch invariance: same text, different batch-mates and padding.
INVARIANCE_ABS = 1e-5
SHAPE_BATCHES = (1, 2, 7, 32, 128)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
Step = Callable[[str], None]


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = MIN_COSINE
    max_abs_diff: float = MAX_ABS_DIFF


# --- operators ----------------------------------------------------------------


def _ep_kernel_table() -> dict[str, Any]:
    text = resources.files("embedkit").joinpath("data/ep_kernels.json").read_text()
    return dict(json.loads(text))


def _version_covered(ranges: Sequence[str], opset: int) -> bool:
    """Whether an OperatorKernels.md version list ('13+', '[7, 12]', '11', '*') covers ``opset``."""
    for spec in ranges:
        spec = spec.strip()
        if spec == "*":
            return True
        if spec.endswith("+") and opset >= int(spec[:-1]):
            return True
        if m := re.fullmatch(r"\[(\d+),\s*(\d+)\]", spec):
            if int(m.group(1)) <= opset <= int(m.group(2)):
                return True
        elif spec.isdigit() and int(spec) == opset:
            return True
    return False


def check_operators(artifact: Artifact, settings: Settings) -> dict[str, Any]:
    """Op inventory, opset, CPU session build (and OpenVINO compile for its variants), and
    ops the GPU EPs do not implement."""
    import onnx
    from google.protobuf.message import DecodeError

    from embedkit.runtime import session

    try:
        model = onnx.load(str(artifact.model_path), load_external_data=False)
    except DecodeError as exc:  # checksums can match a file that was never a graph
        raise ArtifactError(f"{artifact.model_path} is not an ONNX graph: {exc}") from exc
    opsets = {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import}
    ops = Counter(((n.domain or "ai.onnx"), n.op_type) for n in model.graph.node)
    section: dict[str, Any] = {
        "opsets": opsets,
        "ops": {f"{d}::{op}": count for (d, op), count in sorted(ops.items())},
    }
    try:
        session.create_session(
            artifact.model_path, settings, fixed_providers=["CPUExecutionProvider"]
        )
        section["cpu_session"] = "ok"
        cpu_ok = True
    except Exception as exc:  # any ORT failure to build a session is the finding itself
        section["cpu_session"] = f"failed: {exc}"
        cpu_ok = False
    if artifact.manifest.runtime == "openvino":  # the runtime that will serve it compiles it
        from embedkit.runtime.openvino import OpenVINOModel

        try:
            OpenVINOModel(
                artifact.model_path,
                artifact.manifest.quantization.mode,
                settings,
                inputs=artifact.manifest.inputs,
                output=artifact.manifest.output,
            )
            section["openvino_compile"] = "ok"
        except Exception as exc:  # as above: the failure is the finding
            section["openvino_compile"] = f"failed: {exc}"
            cpu_ok = False

    table = _ep_kernel_table()
    unsupported: dict[str, list[str]] = {}
    for provider in GPU_PROVIDERS:
        missing = []
        for domain, op in sorted(ops):
            if (domain, op) == ("ai.onnx", "Constant"):  # folded into initializers, no kernel
                continue
            versions = table.get(provider, {}).get(domain, {}).get(op)
            if versions is None or not _version_covered(versions, opsets.get(domain, 1)):
                missing.append(f"{domain}::{op}")
        unsupported[provider] = missing
    section["gpu_unsupported_ops"] = unsupported
    section["gpu_table_source"] = table.get("source", {})
    section["note"] = (
        "GPU support is read from ORT's registered-kernel tables (docs/OperatorKernels.md) and "
        "the onnx-tensorrt operator list; unsupported nodes fall back to CPU at run time. On a "
        "GPU host, session option session.disable_cpu_ep_fallback=1 makes this strict."
    )
    section["passed"] = cpu_ok
    return section


# --- shapes -------------------------------------------------------------------


def check_shapes(engine: Any, *, batches: Sequence[int] = SHAPE_BATCHES) -> dict[str, Any]:
    """Batch × sequence-length cells through the engine, all outputs ``[n, dim]`` and finite.

    The graph sees each cell as the runs the engine's settings plan (token budget, sub-batch
    size); a run shape an earlier cell already ran is not run again, its result stands for
    both (with 512-token runs, 128 texts of 256 tokens are 64 runs of 2 × 256, the shape
    the 32 row ran: the matrix took 25 s on 2 cores, nearly all of it repeats)."""
    max_len = engine.tokenizer.max_length
    seq_lens = sorted(
        {1, 2, 16, 127, 128, 129, max_len} - {x for x in (127, 128, 129) if x > max_len}
    )
    rng = np.random.default_rng(0)
    # Any content id of this vocabulary (not BERT's "above its [unused] range": a Unigram
    # vocabulary may be smaller than that); special ids would move XLM-R's position ids.
    content = np.setdiff1d(
        np.arange(engine.tokenizer.vocab_size), sorted(engine.tokenizer.special_ids)
    )
    runs: dict[tuple[int, int], dict[str, Any]] = {}  # (rows, seq_len) → its run's result
    cells = []
    passed = True
    for batch in batches:
        for seq in seq_lens:
            shapes = sorted({(len(group), seq) for group in engine.plan([seq] * batch)})
            for rows, _ in shapes:
                if (rows, seq) not in runs:
                    ids = [list(rng.choice(content, size=seq)) for _ in range(rows)]
                    runs[rows, seq] = _shape_cell(engine, ids)
            results = [runs[shape] for shape in shapes]
            cell: dict[str, Any] = {"ok": all(r["ok"] for r in results)}
            cell.update(next((r for r in results if "error" in r), {}))
            passed &= cell["ok"]
            cells.append(
                {"batch": batch, "seq_len": seq, "runs": [list(s) for s in shapes], **cell}
            )
    # Beyond max_len, the tokenizer truncates: the graph never sees more than max_len.
    overlong = evaldata.long_texts(max_len * 2, 2)
    ids = engine.tokenizer.encode(overlong, truncate=True)
    last = _shape_cell(engine, ids)
    last["ok"] &= all(len(x) == max_len for x in ids)
    passed &= last["ok"]
    cells.append({"batch": len(ids), "seq_len": f">{max_len} (truncated)", **last})
    return {"passed": passed, "seq_lens": seq_lens, "batches": list(batches), "cells": cells}


def _shape_cell(engine: Any, ids: list[list[int]]) -> dict[str, Any]:
    """One cell of the matrix: ``[batch, dim]`` and finite, or the run's error (e.g. a
    position table shorter than the declared max length) as a failed cell."""
    try:
        vectors, _ = engine.embed_ids(ids)
    except InferenceError as exc:
        return {"ok": False, "error": exc.message}
    ok = vectors.shape == (len(ids), engine.dimension) and bool(np.isfinite(vectors).all())
    return {"ok": ok}


# --- batch invariance ---------------------------------------------------------


def check_batch_invariance(engine: Any, texts: Sequence[str]) -> dict[str, Any]:
    """A text's vector must not depend on its batch-mates or on padding."""
    texts = list(texts)
    alone = np.vstack([engine.encode([t]) for t in texts])
    together = engine.encode(texts)
    shuffled_order = np.random.default_rng(1).permutation(len(texts))
    shuffled = engine.encode([texts[i] for i in shuffled_order])[np.argsort(shuffled_order)]
    # Pad every text to the longest one in a single run: the worst case for padding.
    naive = type(engine)(
        engine.artifact,
        engine.settings.model_copy(
            update={"token_aware_batching": False, "max_sub_batch_size": len(texts)}
        ),
        judging=getattr(engine, "judging", False),
    )
    padded = naive.encode(texts)
    diffs = {
        "batched": float(np.abs(alone - together).max()),
        "shuffled": float(np.abs(alone - shuffled).max()),
        "padded_to_longest": float(np.abs(alone - padded).max()),
    }
    return {
        "passed": all(v <= INVARIANCE_ABS for v in diffs.values()),
        "tolerance_abs": INVARIANCE_ABS,
        "texts": len(texts),
        "max_abs_diff": diffs,
    }


# --- parity -------------------------------------------------------------------


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Per-vector cosine and absolute difference statistics."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    abs_diff = np.abs(ref - cand).max(axis=1)
    return {
        "count": len(ref),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(abs_diff.max()),
        "worst_index": int(np.argmin(cos)),
    }


def parity_segments(split: str = "test", *, limit: int | None = None) -> dict[str, list[str]]:
    """Parity inputs by segment: STS sentences per genre plus generated edge cases."""
    segments: dict[str, list[str]] = {}
    for pair in evaldata.sts(split):
        bucket = segments.setdefault(f"sts/{pair.genre}", [])
        for s in (pair.sentence1, pair.sentence2):
            if limit is None or len(bucket) < limit:
                bucket.append(s)
    for name, texts in evaldata.edge_cases().items():
        segments[f"edge/{name}"] = texts
    return {k: list(dict.fromkeys(v)) for k, v in segments.items()}


def check_parity(
    engine: Any,
    reference: Any,
    segments: dict[str, list[str]],
    thresholds: Thresholds = Thresholds(),
    *,
    step: Step | None = None,
    prompt_name: str | None = None,
) -> dict[str, Any]:
    """Engine vs PyTorch ``SentenceTransformer.encode``, per segment and overall, both with
    ``prompt_name`` (None: each applies the model's default prompt, if any)."""
    say = step or (lambda _m: None)
    out: dict[str, Any] = {"thresholds": vars(thresholds), "segments": {}}
    all_ref, all_cand = [], []
    for name, texts in segments.items():
        say(f"parity {name} ({len(texts)} texts)")
        ref = reference.encode(
            texts,
            batch_size=32,
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
            prompt_name=prompt_name,
        )
        cand = engine.encode(texts, prompt_name=prompt_name)
        stats = compare(ref, cand)
        stats["passed"] = (
            stats["min_cosine"] >= thresholds.min_cosine
            and stats["max_abs_diff"] <= thresholds.max_abs_diff
        )
        if not stats["passed"]:
            stats["worst_text"] = texts[stats["worst_index"]][:120]
        out["segments"][name] = stats
        all_ref.append(ref)
        all_cand.append(cand)
    overall = compare(np.vstack(all_ref), np.vstack(all_cand))
    out["overall"] = overall
    out["passed"] = all(s["passed"] for s in out["segments"].values())
    return out


def check_prompt_parity(
    engine: Any,
    reference: Any,
    texts: Sequence[str],
    thresholds: Thresholds = Thresholds(),
    *,
    step: Step | None = None,
) -> dict[str, Any]:
    """:func:`check_parity` once per prompt the manifest defines, on ``texts``; passes
    trivially for a model without prompts."""
    prompts = engine.manifest.prompts
    results = {
        name: check_parity(
            engine, reference, {"prompted": list(texts)}, thresholds, step=step, prompt_name=name
        )
        for name in prompts
    }
    return {
        "passed": all(r["passed"] for r in results.values()),
        "default_prompt_name": engine.manifest.default_prompt_name,
        "prompts": {name: {**r["overall"], "passed": r["passed"]} for name, r in results.items()},
    }


# --- the whole contract -------------------------------------------------------

CHECKS = ("operators", "shapes", "batch_invariance", "parity", "prompts")


def validate(
    artifact: Artifact,
    *,
    reference_dir: Path | None,
    settings: Settings | None = None,
    split: str = "test",
    limit_per_segment: int | None = None,
    shape_batches: Sequence[int] = SHAPE_BATCHES,
    step: Step | None = None,
) -> dict[str, Any]:
    """Run every contract check; the report's ``passed`` is the conjunction."""
    from embedkit.model.export import load_reference, source_checksum
    from embedkit.runtime.engine import Engine

    say = step or (lambda _m: None)
    settings = settings or Settings(providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {
        "artifact": str(artifact.path),
        "tag": artifact.tag,
        "name": artifact.manifest.name,
        "quantization": artifact.manifest.quantization.mode,
    }
    say("operators")
    report["operators"] = check_operators(artifact, settings)
    if not report["operators"]["passed"]:
        report["passed"] = False
        return report
    engine = Engine(artifact, settings)
    say("shape matrix")
    report["shapes"] = check_shapes(engine, batches=shape_batches)
    if not report["shapes"]["passed"]:  # a graph that fails a shape would fail parity's runs
        report["passed"] = False
        return report
    segments = parity_segments(split, limit=limit_per_segment)
    sample = [t for texts in segments.values() for t in texts[:4]]
    say("batch invariance")
    report["batch_invariance"] = check_batch_invariance(engine, sample)
    if reference_dir is None:
        report["parity"] = {"passed": False, "error": "no PyTorch reference model given"}
    else:
        say("loading the PyTorch reference")
        source_ok = source_checksum(reference_dir) == artifact.manifest.source_sha256
        reference = load_reference(reference_dir)
        report["parity"] = check_parity(engine, reference, segments, step=say)
        report["parity"]["reference_dir"] = str(reference_dir)
        report["parity"]["reference_matches_source"] = source_ok
        if not source_ok:
            report["parity"]["passed"] = False
            report["parity"]["error"] = "reference model files differ from the artifact's source"
        # Each prompt on the batch-invariance sample: every segment, long texts included.
        say("prompt parity")
        report["prompts"] = check_prompt_parity(engine, reference, sample, step=say)
    report["passed"] = all(report.get(k, {}).get("passed", False) for k in CHECKS)
    return report


def parity_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact parity record stored in the manifest."""
    parity = report.get("parity", {})
    return {
        "passed": bool(report.get("passed")),
        "thresholds": parity.get("thresholds"),
        "overall": parity.get("overall"),
        "segments": {
            name: {k: s[k] for k in ("count", "min_cosine", "max_abs_diff", "passed")}
            for name, s in parity.get("segments", {}).items()
        },
        "checks": {
            k: report[k]["passed"]
            for k in ("operators", "shapes", "batch_invariance", "prompts")
            if k in report
        },
    }


def require_passed(report: dict[str, Any]) -> None:
    if not report.get("passed"):
        failed = [k for k in CHECKS if not report.get(k, {}).get("passed", False)]
        raise ContractViolation(f"contract failed: {', '.join(failed)}")
