"""Full quantization evaluation of the default model → docs/quantization.md + docs/quantization.png.

Builds every candidate preset for this CPU (plus the deliberately bad s8 +
reduce-range variant, for contrast) from an fp32 artifact, evaluates each on
every segment, gates it and times all of them side by side at batch 32.
Rewrites the part of docs/quantization.md between the `measured` markers.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/quantization_report.py \
        --out /tmp/embedkit-variants
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedkit.model.artifact import Artifact
from embedkit.quality.gate import load_thresholds
from embedkit.quality.report import plot_deltas
from embedkit.release import PARENT, candidates_summary, pick_default, run_candidates
from embedkit.variants import quantize

DOCS = Path("docs")  # run from the project root, like every command
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
BAD = {"kind": "dynamic-int8", "weight_type": "s8", "per_channel": False, "reduce_range": True}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", type=Path, default=None, help="default: artifacts/bench-fp32")
    ap.add_argument("--out", type=Path, default=Path("/tmp/embedkit-variants"))
    ap.add_argument("--max-pairs", type=int, default=None, help="subsample STSb and languages")
    ap.add_argument("--lang-pairs", type=int, default=None, help="subsample languages only")
    args = ap.parse_args(argv)

    from embedkit.bench.inprocess import default_artifact

    parent = Artifact.load(default_artifact(args.fp32))
    isa = quantize.detect_isa()
    presets = {**quantize.candidate_presets(isa), "dynamic-int8-s8-rr (bad)": BAD}
    started = time.time()
    th = load_thresholds()
    candidates, speeds = run_candidates(
        parent,
        args.out,
        presets=presets,
        thresholds=th,
        max_pairs=args.max_pairs,
        lang_pairs=args.lang_pairs,
        say=lambda m: print(f"[{time.time() - started:6.0f}s] {m}", flush=True),
    )
    # The release's own rule, so the doc states what `embedkit release --variants` would do.
    best = pick_default(candidates, speeds[PARENT])
    default = best.name if best else "fp32 (parent)"
    plot_deltas({c.name: c.report for c in candidates}, DOCS / "quantization.png")
    body = "\n".join(
        [
            BEGIN,
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} "
            f"({os.cpu_count()} cores, ISA `{isa.level}`: {isa.to_dict()}), "
            f"encoder `Engine`, {candidates[0].report.texts} texts per variant, "
            f"{time.time() - started:.0f} s in all. Command:",
            "",
            "```",
            "HF_HUB_OFFLINE=1 .venv/bin/python scripts/quantization_report.py " + " ".join(argv),
            "```",
            "",
            f"Default chosen by the gate: **{default}** (the fastest approved version; "
            "the fp32 parent competes).",
            "",
            candidates_summary(candidates, speeds, th),
            "![per-segment deltas](quantization.png)",
            "",
            "#### Gate failures, per variant",
            "",
            *[f"- **{c.name}**: {c.verdict.summary()}" for c in candidates],
            END,
        ]
    )
    doc = DOCS / "quantization.md"
    text = doc.read_text() if doc.is_file() else f"# Quantization\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + body + tail)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
