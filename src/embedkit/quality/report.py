"""Quality reports: JSON, markdown tables, a per-segment delta plot, the contract for a terminal.

One variant: :func:`write_report` (``quality.{json,md,png}``). Several variants
side by side (the release's candidates): :func:`summary_markdown` and
:func:`plot_deltas`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedkit.quality.evaluate import QualityReport, SegmentResult
from embedkit.quality.gate import GateThresholds, GateVerdict
from embedkit.quality.retrieval import RetrievalMetrics

if TYPE_CHECKING:
    from rich.console import RenderableType


def _fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def report_markdown(report: QualityReport, verdict: GateVerdict | None = None) -> str:
    lines = [
        f"### {report.mode} — `{report.artifact}`",
        "",
        f"settings: `{report.settings}`  ",
        f"{report.texts} texts, {report.seconds} s",
        "",
    ]
    if verdict is not None:
        lines += [f"**Gate: {verdict.summary()}**", ""]
    lines += [
        "| segment | pairs | Spearman ref | Spearman | drop vs ref "
        "| cos min | cos p1 | cos mean | top-10 overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report.segments:
        c = s.cosine_fp32
        lines.append(
            f"| {s.name} | {s.pairs} | {_fmt(s.spearman_reference)} | {_fmt(s.spearman)} | "
            f"{_fmt(s.drop_vs_reference)} | {c.min:.4f} | {c.p1:.4f} | {c.mean:.4f} | "
            f"{s.overlap_fp32:.3f} |"
        )
    lines += ["", *retrieval_markdown({report.mode: report})]
    return "\n".join(lines) + "\n"


def retrieval_markdown(reports: Mapping[str, QualityReport]) -> list[str]:
    """Retrieval rows (nDCG@10, recall@100 ×100, documents/s indexing), fp32 then each
    variant, each searching an index it built itself; or why there are none."""
    scored = {name: rep.retrieval for name, rep in reports.items() if rep.retrieval is not None}
    if not scored:
        note = next(iter(reports.values())).retrieval_note
        return [f"Retrieval: none ({note})."]
    first = next(iter(scored.values()))
    names = list(scored)
    lines = [
        f"#### Retrieval: {first.dataset}, {first.documents} documents, {first.queries} queries "
        "(each model indexes the corpus itself)",
        "",
        "| metric | FP32 | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    rows: list[tuple[str, Callable[[RetrievalMetrics], float | None]]] = [
        ("nDCG@10", lambda m: m.ndcg_at_10),
        ("recall@100", lambda m: m.recall_at_100),
        ("documents/s indexing", lambda m: m.docs_per_s),
    ]
    for label, get in rows:
        cells = [_fmt(get(r.variant)) for r in scored.values()]
        lines.append(f"| {label} | {_fmt(get(first.fp32))} | " + " | ".join(cells) + " |")
    drops = [f"{r.ndcg_drop:.2f} / {r.recall_drop:.2f}" for r in scored.values()]
    lines.append("| drop vs FP32 (nDCG / recall) | – | " + " | ".join(drops) + " |")
    return [*lines, ""]


def plot_deltas(reports: Mapping[str, QualityReport], path: Path) -> None:
    """Per-segment Spearman drop and p1 cosine, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in next(iter(reports.values())).segments]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.28 * len(names) + 2), sharey=True)
    height = 0.8 / max(1, len(reports))
    y = np.arange(len(names))
    for i, (label, rep) in enumerate(reports.items()):
        by = {s.name: s for s in rep.segments}
        drops = [by[n].drop_vs_reference or 0.0 for n in names]
        p1 = [1 - by[n].cosine_fp32.p1 for n in names]
        axes[0].barh(y + i * height, drops, height, label=label)
        axes[1].barh(y + i * height, p1, height, label=label)
    axes[0].set_yticks(y + 0.4 - height / 2, names, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("Spearman drop vs FP32 PyTorch (points ×100)")
    axes[1].set_xlabel("1 − p1 cosine to FP32 ONNX (log)")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    report: QualityReport, out_dir: Path, verdict: GateVerdict | None = None
) -> dict[str, Path]:
    """``quality.json``, ``quality.md`` (with the verdict, if given) and ``quality.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "quality.json",
        "markdown": out_dir / "quality.md",
        "plot": out_dir / "quality.png",
    }
    paths["json"].write_text(report.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(report_markdown(report, verdict))
    plot_deltas({report.mode: report}, paths["plot"])
    return paths


def _verdict_cell(verdict: GateVerdict) -> str:
    if verdict.compatibility == "index-compatible":
        return "index-compatible"
    failing = verdict.failing_segments
    shown = ", ".join(failing[:6]) + (", …" if len(failing) > 6 else "")
    if verdict.compatibility == "reindex":
        return f"reindex (fidelity fails on {len(failing)} segments: {shown})"
    return f"rejected ({len(failing)} segments: {shown})"


def summary_markdown(
    reports: Mapping[str, QualityReport],
    verdicts: Mapping[str, GateVerdict],
    speeds: Mapping[str, float],
    th: GateThresholds,
) -> str:
    """Variant × segment tables (Spearman drop, p1 cosine, neighbour overlap), speed and verdicts.

    ``reports`` and ``verdicts`` are keyed by variant name (columns in that order);
    ``speeds`` are texts/s, key ``"fp32"`` being the parent.
    """
    names = list(reports)
    segs = next(iter(reports.values())).segments
    by = {name: {s.name: s for s in rep.segments} for name, rep in reports.items()}
    head = "| segment | pairs | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names)

    def table(
        title: str,
        cell: Callable[[SegmentResult], str],
        ref: Callable[[SegmentResult], str] | None = None,
    ) -> list[str]:
        h = (
            head
            if ref is None
            else head.replace("| pairs |", "| pairs | FP32 ref |").replace(
                "|---:|", "|---:|---:|", 1
            )
        )
        out = [f"#### {title}", "", h]
        for s in segs:
            extra = "" if ref is None else f" {ref(s)} |"
            out.append(
                f"| {s.name} | {s.pairs} |{extra} "
                + " | ".join(cell(by[n][s.name]) for n in names)
                + " |"
            )
        return [*out, ""]

    fp32 = speeds.get("fp32", 0.0)
    lines = [
        "#### Verdicts and speed (texts/s at batch 32, one side-by-side run)",
        "",
        "| variant | mode | texts/s | × FP32 | gate |",
        "|---|---|---:|---:|---|",
        f"| fp32 (parent) | none | {fp32:.1f} | 1.00 | – |",
    ]
    for name, rep in reports.items():
        sp = speeds.get(name, 0.0)
        ratio = sp / fp32 if fp32 else 0
        lines.append(
            f"| {name} | {rep.mode} | {sp:.1f} | {ratio:.2f} | {_verdict_cell(verdicts[name])} |"
        )
    lines.append("")
    lines += table(
        "Spearman ×100 drop vs FP32 PyTorch (limit: "
        + ", ".join(f"{k} {v}" for k, v in th.spearman_drop_max.items())
        + ")",
        lambda s: _fmt(s.drop_vs_reference),
        lambda s: _fmt(s.spearman_reference),
    )
    lines += table(
        f"p1 cosine to FP32 ONNX (limit ≥ {th.cosine_p1_min})", lambda s: f"{s.cosine_fp32.p1:.4f}"
    )
    lines += table(
        f"Top-10 neighbour overlap with FP32 ONNX (limit ≥ {th.overlap_min})",
        lambda s: f"{s.overlap_fp32:.3f}",
    )
    lines += retrieval_markdown(reports)
    lines.append(
        f"reindex class: Spearman limits on every segment and retrieval drop ≤ "
        f"{th.retrieval.ndcg_at_10_drop_max} (nDCG@10) / {th.retrieval.recall_at_100_drop_max} "
        "(recall@100) points."
    )
    return "\n".join(lines)


def contract_lines(result: dict[str, Any]) -> list[RenderableType]:
    """The contract's verdict for a terminal (`embedkit validate`): one table, the GPU
    providers' operator coverage, PASSED or FAILED."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"contract: {result['name']} ({result['quantization']})")
    for col in ("check / segment", "n", "min cos", "max |Δ|", "result"):
        table.add_column(col)
    for key in ("operators", "shapes", "batch_invariance", "truncation"):
        section = result.get(key)
        if section:
            table.add_row(key, "", "", "", "pass" if section["passed"] else "FAIL")
    rows = [
        *((f"parity {n}", seg) for n, seg in result.get("parity", {}).get("segments", {}).items()),
        *((f"prompt {n}", seg) for n, seg in result.get("prompts", {}).get("prompts", {}).items()),
    ]
    for label, seg in rows:
        table.add_row(
            label,
            str(seg["count"]),
            f"{seg['min_cosine']:.7f}" if "min_cosine" in seg else "—",  # pair scores: none
            f"{seg['max_abs_diff']:.2e}",
            "pass" if seg["passed"] else "FAIL",
        )
    lines: list[RenderableType] = [table]
    gpu = result.get("operators", {}).get("gpu_unsupported_ops", {})
    for provider, ops in gpu.items():
        found = "all ops implemented" if not ops else "not implemented: " + ", ".join(ops)
        lines.append(f"{provider}: {found}")
    lines.append(Text("PASSED" if result.get("passed") else "FAILED", style="bold"))
    return lines
