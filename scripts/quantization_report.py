"""Full quantization evaluation of the default model → docs/quantization.md and its plot.

Builds every candidate preset for this CPU plus landmarks of the INT8 search
(:func:`techniques`: SmoothQuant alphas, static QDQ ranges and output quantisation,
mixed precision, full-range weights, and the deliberately bad per-tensor variant)
from an fp32 artifact, evaluates each on every segment, gates it and times all
of them side by side with the fp32 parent at batch 1 and 32. Rewrites the part
of docs/quantization.md between the `measured` markers (the technique table,
worst segment per metric) and the sensitivity ranking between the `ranking`
markers.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/quantization_report.py --lang-pairs 300

``--sensitivity`` re-measures the per-node ranking (quantise one MatMul at a
time; minutes) and rewrites ``src/embedkit/data/int8-sensitivity.json``, the
ranking every release reads instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedkit.model import evaldata
from embedkit.model.artifact import Artifact
from embedkit.quality.evaluate import SegmentResult
from embedkit.quality.gate import GateThresholds, load_thresholds
from embedkit.quality.report import plot_deltas
from embedkit.release.pipeline import (
    PARENT,
    Candidate,
    pick_default,
    run_candidates,
    throughput,
)
from embedkit.runtime.engine import Engine
from embedkit.variants import quantize, ranking, sensitivity

DOCS = Path("docs")  # run from the project root, like every command
RANKING_FILE = Path("src/embedkit") / ranking.RANKINGS
# One measured block per ISA level (docs/quantization.md), each rewritten only on its ISA.
BEGIN, END = "<!-- measured:{isa}:begin -->", "<!-- measured:{isa}:end -->"
REPRODUCE = "## Reproduce"
RANK_BEGIN, RANK_END = "<!-- ranking:begin -->", "<!-- ranking:end -->"


def techniques(isa: quantize.CpuIsa) -> dict[str, dict[str, Any]]:
    """What the search tried beyond the presets (each built through build_variant); the
    proxy sweep in docs/quantization.md covers more alphas and k, these are its landmarks."""
    rr = not isa.vnni
    dyn = {"kind": "dynamic-int8", "weight_type": "s8", "per_channel": True, "reduce_range": rr}
    sq = {"smoothquant_alpha": quantize.SMOOTHQUANT_ALPHA}
    static = {"kind": "static-int8", "per_channel": True, "reduce_range": rr}
    other_range = "full range" if rr else "reduce-range"
    found = {
        "dynamic s8 per-tensor + rr (bad)": {**dyn, "per_channel": False, "reduce_range": True},
        "dynamic s8-pc + SQ 0.7": {**dyn, **sq},
        f"dynamic s8-pc, {other_range}": {**dyn, "reduce_range": not rr},
        f"dynamic s8-pc + SQ 0.7, k=2, {other_range}": {
            **dyn,
            **sq,
            "keep_fp32": 2,
            "reduce_range": not rr,
        },
        # FFN-only: the attention block's MatMuls (Q, K, V, output) stay fp32.
        "dynamic s8-pc, FFN only": {**dyn, "exclude": ["/attention/"]},
        "static QDQ percentile": {**static, "method": "percentile"},
        "static QDQ min-max + SQ 0.7": {**static, "method": "minmax", **sq},
    }
    if not isa.vnni:  # u8 weights: the u8×u8 path, the other documented fix for AVX2
        found["dynamic u8u8 per-channel"] = {**dyn, "weight_type": "u8", "reduce_range": False}
    return found


def _worst(
    segments: list[SegmentResult], value: Callable[[SegmentResult], float | None], low: bool
) -> str:
    scored = [(v, s.name) for s in segments if (v := value(s)) is not None]
    v, name = min(scored) if low else max(scored)
    return f"{v:.4f} ({name})" if low else f"{v:.2f} ({name})"


def _ndcg(c: Candidate) -> str:
    r = c.report.retrieval
    if r is None:
        return "–"
    return f"{r.variant.ndcg_at_10:.2f} ({r.variant.ndcg_at_10 - r.fp32.ndcg_at_10:+.2f})"


def technique_table(
    candidates: list[Candidate],
    presets: dict[str, dict[str, Any]],
    speeds: dict[int, dict[str, float]],
    th: GateThresholds,
) -> str:
    """One row per candidate: runtime, speed × fp32 ORT per batch size, the worst segment
    per gated metric, the gate's class, SciFact-train nDCG@10 (Δ vs fp32)."""
    gated = {g for g, v in th.spearman_drop_max.items() if v is not None}
    sizes = sorted(speeds)
    parent_ndcg = next(
        (f"{r.fp32.ndcg_at_10:.2f}" for c in candidates if (r := c.report.retrieval)), "–"
    )
    lines = [
        "| technique | runtime | options | "
        + " | ".join(f"× fp32 b{b}" for b in sizes)
        + " | worst Spearman drop (gated) "
        f"| worst p1 cosine (≥ {th.cosine_p1_min}) | worst top-10 overlap (≥ {th.overlap_min}) "
        "| class | SciFact nDCG@10 (Δ) |",
        "|---|---|---|" + "---:|" * len(sizes) + "---|---|---|---|---:|",
        "| fp32 (parent) | onnxruntime | – | "
        + " | ".join(f"1.00 ({speeds[b][PARENT]:.0f}/s)" for b in sizes)
        + f" | – | – | – | index-compatible | {parent_ndcg} |",
    ]
    for c in candidates:
        opts = ", ".join(f"{k}={v}" for k, v in presets[c.name].items())
        segs = c.report.segments
        klass = c.verdict.compatibility
        if klass != "index-compatible":
            klass += f" ({len(c.verdict.failing_segments)} segments fail the strict class)"
        spearman = _worst(
            [s for s in segs if s.group in gated], lambda s: s.drop_vs_reference, False
        )
        lines.append(
            f"| {c.name} | {c.artifact.manifest.runtime} | {opts} | "
            + " | ".join(f"{speeds[b][c.name] / speeds[b][PARENT]:.2f}" for b in sizes)
            + f" | {spearman}"
            f" | {_worst(segs, lambda s: s.cosine_fp32.p1, True)}"
            f" | {_worst(segs, lambda s: s.overlap_fp32, True)} | {klass} | {_ndcg(c)} |"
        )
    return "\n".join(lines)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return head + begin + "\n" + body + "\n" + end + tail


def ranking_markdown() -> str:
    lines = []
    for model_id, by_isa in ranking.load_rankings().items():
        for entry in by_isa.values():
            how = entry["measured_with"]
            lines += [
                f"`{model_id}` — {how['sentences']}; options {how['kind']} "
                f"s8 per-channel={how['per_channel']} reduce-range={how['reduce_range']}, "
                f"ISA {how['isa']}, onnxruntime {how['onnxruntime']}. Mean (1 − cosine) to fp32 "
                "when only that MatMul is INT8, most harmful first:",
                "",
                "| rank | node | mean drop |",
                "|---:|---|---:|",
                *[
                    f"| {i} | `{n}` | {d:.2e} |"
                    for i, (n, d) in enumerate(
                        zip(entry["nodes"], entry["mean_drop"], strict=True), 1
                    )
                ],
                "",
            ]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (what `lscpu` prints)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.machine()


def measure_sensitivity(parent: Artifact, isa: quantize.CpuIsa, size: int) -> None:
    import onnxruntime

    options = {"weight_type": "s8", "per_channel": True, "reduce_range": not isa.vnni}
    started = time.time()
    result = sensitivity.measure(
        parent,
        sensitivity.held_out_sentences(size),
        say=lambda m: print(f"[{time.time() - started:5.0f}s] {m}", flush=True),
        **options,
    )
    data = ranking.load_rankings()
    data.setdefault(parent.manifest.model_id, {})[isa.level] = {
        "nodes": [r.node for r in result],
        "mean_drop": [float(f"{r.mean_drop:.3g}") for r in result],
        "measured_with": {
            "kind": "dynamic-int8",
            **options,
            "sentences": f"{size} STS Benchmark train sentences disjoint from the calibration "
            "sample (sensitivity.held_out_sentences)",
            "isa": f"{isa.level} ({cpu_name()})",
            "onnxruntime": onnxruntime.__version__,
            "command": "scripts/quantization_report.py --sensitivity",
        },
    }
    RANKING_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {RANKING_FILE}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", type=Path, default=None, help="default: artifacts/bench-fp32")
    ap.add_argument("--out", type=Path, default=Path("/tmp/embedkit-variants"))
    ap.add_argument("--max-pairs", type=int, default=None, help="subsample STSb and languages")
    ap.add_argument("--lang-pairs", type=int, default=None, help="subsample languages only")
    ap.add_argument("--presets-only", action="store_true", help="skip the search techniques")
    ap.add_argument("--retrieval-docs", type=int, default=None, help="bound SciFact's corpus")
    ap.add_argument("--retrieval-queries", type=int, default=None, help="bound its queries")
    ap.add_argument(
        "--sensitivity", type=int, nargs="?", const=512, default=None, metavar="SENTENCES"
    )
    args = ap.parse_args(argv)

    from embedkit.release.measure import default_artifact

    parent = Artifact.load(default_artifact(args.fp32))
    isa = quantize.detect_isa()
    if args.sensitivity:
        measure_sensitivity(parent, isa, args.sensitivity)
    presets = quantize.candidate_presets(isa)
    if not args.presets_only:
        presets.update(techniques(isa))
    started = time.time()
    th = load_thresholds()
    candidates, b32 = run_candidates(
        parent,
        args.out,
        presets=presets,
        thresholds=th,
        max_pairs=args.max_pairs,
        lang_pairs=args.lang_pairs,
        retrieval_docs=args.retrieval_docs,
        retrieval_queries=args.retrieval_queries,
        say=lambda m: print(f"[{time.time() - started:6.0f}s] {m}", flush=True),
    )
    pairs = evaldata.sts("test")
    texts = [t for p in pairs for t in (p.sentence1, p.sentence2)]
    encoders = {
        PARENT: Engine(parent),
        **{c.name: Engine(c.artifact, judging=True) for c in candidates},
    }
    for engine in encoders.values():
        engine.warmup()
    speeds = {
        1: throughput(encoders, texts[:128], batch_size=1, rounds=3),
        16: throughput(encoders, texts[:320], batch_size=16, rounds=3),
        32: b32,
    }
    # The release's own rule, so the doc states what `embedkit release --variants` would do.
    best = pick_default(candidates, b32[PARENT])
    default = best.name if best else "fp32 (parent)"
    plot = f"quantization-{isa.level}.png"  # one per ISA, as the measured blocks
    plot_deltas({c.name: c.report for c in candidates}, DOCS / plot)
    preset_names = ", ".join(quantize.candidate_presets(isa))
    body = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}, {platform.machine()} "
            f"({os.cpu_count()} cores, ISA `{isa.level}`: {isa.to_dict()}), "
            f"encoder `Engine`, {candidates[0].report.texts} texts per variant, "
            f"{time.time() - started:.0f} s in all. Speed: texts/s through the engine, "
            "× the fp32 parent timed in the same run (STSb test sentences in file order, "
            "median of interleaved rounds). Command:",
            "",
            "```",
            "HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/quantization_report.py "
            + " ".join(argv),
            "```",
            "",
            f"Default chosen by the gate: **{default}** (the fastest approved version; "
            "the fp32 parent competes). Presets (`candidate_presets()`, what "
            f"`embedkit release --variants` tries here): {preset_names}.",
            "",
            technique_table(candidates, presets, speeds, th),
            "",
            f"![per-segment deltas]({plot})",
            "",
            "#### Gate failures, per variant",
            "",
            *[f"- **{c.name}**: {c.verdict.summary()}" for c in candidates],
        ]
    )
    doc = DOCS / "quantization.md"
    text = doc.read_text()
    begin, end = BEGIN.format(isa=isa.level), END.format(isa=isa.level)
    if begin not in text:  # the first report on this ISA: a section of its own
        head, sep, tail = text.partition(REPRODUCE)
        text = head + f"### On ISA `{isa.level}`\n\n{begin}\n{end}\n\n" + sep + tail
    text = _replace(text, begin, end, body)
    text = _replace(text, RANK_BEGIN, RANK_END, ranking_markdown())
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
