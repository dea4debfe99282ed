"""The quality gate for a reranker's variants (fused FP32, INT8, OpenVINO): per segment,
score fidelity and ranking agreement against the fp32 parent.

The embedding gate (:mod:`embedkit.quality.gate`) compares vectors; a reranker's output
is one score a pair, and what a caller does with it is rank documents for a query (and
sometimes threshold the score). So every segment is judged on:

* **score fidelity**: the largest |variant - parent| of raw scores and of activated ones,
  each as a share of the parent's own score range over the whole evaluation;
* **ranking agreement**: Spearman of the variant's raw scores against the parent's;
* on **ranking groups** (``rank/*``: each query scored against one pool of documents), the
  mean share of the parent's top-k reranked list that the variant keeps.

Segments: the pair contract's (STS genres as ``sts/*``, edge cases as ``edge/*``), pair
lengths (``len/*``: by share of the token window the pair fills, ``len/cut`` for those
truncated), and the ranking groups (one per STS genre: its first sentence1s as queries,
its sentence2s as the pool). Everything is shipped data: no SciFact, no hub.

The limits live in ``config/quality-gate.yaml`` (``rerank:``, with their reasons); the
verdict is a :class:`~embedkit.quality.gate.GateVerdict` whose class is
``index-compatible`` (a drop-in for the parent) or ``rejected`` — a reranker has no index
to rebuild, so nothing is ``reindex``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.settings import Settings
from embedkit.model import evaldata, toolchain
from embedkit.model.artifact import MODEL_FILE, Artifact, MeasuredOn
from embedkit.quality.gate import GateFailure, GateThresholds, GateVerdict, load_thresholds
from embedkit.quality.pair_contract import Pair, parity_segments

RANK_QUERIES = 8  # queries per ranking group
RANK_POOL = 30  # documents each of them ranks (>= 3 × the default top-k)
# By the share of the token window a pair fills; a pair that fills all of it is len/cut.
LENGTH_BUCKETS = ((0.25, "len/quarter"), (0.5, "len/half"), (1.0, "len/most"))
LENGTH_PAIRS = 32  # pairs per length bucket at most


class PairSegmentScores(BaseModel):
    """One segment's numbers, variant vs fp32 parent (the gate reads these, nothing else)."""

    model_config = ConfigDict(frozen=True)
    name: str
    pairs: int
    raw_max_abs_diff: float
    activated_max_abs_diff: float
    raw_delta_share: float = Field(description="raw_max_abs_diff / the parent's raw range.")
    activated_delta_share: float
    spearman: float | None = Field(None, description="None: too few pairs or constant scores.")
    queries: int | None = Field(None, description="Ranking groups: how many queries.")
    topk_overlap: float | None = Field(None, description="Ranking groups: mean top-k kept.")


class PairQualityReport(BaseModel):
    """What :func:`evaluate_pairs` measured; :func:`gate_pairs` classes it."""

    model_config = ConfigDict(frozen=True)
    kind: str = "embedkit-pair-quality"
    artifact: str
    mode: str
    settings: dict[str, Any]
    model_sha256: str
    fp32_model_sha256: str
    pairs: int
    topk: int
    raw_range: float = Field(description="The parent's raw scores, max - min.")
    activated_range: float
    seconds: float
    segments: list[PairSegmentScores]
    measured_on: MeasuredOn


# --- segments -------------------------------------------------------------------------------


def length_segments(tokenizer: Any, *, limit: int = LENGTH_PAIRS) -> dict[str, list[Pair]]:
    """Pairs bucketed by the share of the token window they fill once tokenised, and those
    that fill all of it (``len/cut``: cut to it): STS queries against documents of growing
    length."""
    max_len = tokenizer.max_length
    queries = [p.sentence1 for p in evaldata.sts("test")[:8]]
    docs = [
        d for words in (4, 12, 24, 48, 96, 200, 400, 800) for d in evaldata.long_texts(words, 2)
    ]
    candidates = [(q, d) for d in docs for q in queries]
    ids, _, _ = tokenizer.encode_pairs(candidates)
    buckets: dict[str, list[Pair]] = {name: [] for _, name in LENGTH_BUCKETS}
    buckets["len/cut"] = []
    for pair, row in zip(candidates, ids, strict=True):
        share = len(row) / max_len
        # A pair that fills the window was (almost always) cut to it.
        name = (
            "len/cut"
            if len(row) == max_len
            else next(n for top, n in LENGTH_BUCKETS if share <= top)
        )
        if len(buckets[name]) < limit:
            buckets[name].append(pair)
    return {name: pairs for name, pairs in buckets.items() if pairs}


def ranking_groups(
    *, queries: int = RANK_QUERIES, pool: int = RANK_POOL
) -> dict[str, tuple[list[str], list[str]]]:
    """Per STS genre: its first ``queries`` distinct sentence1s, each to rank the genre's
    first ``pool`` distinct sentence2s (their own partners among them)."""
    by_genre: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for pair in evaldata.sts("test"):
        qs, ds = by_genre.setdefault(pair.genre, ({}, {}))
        if len(ds) < pool:
            ds.setdefault(pair.sentence2)
            if len(qs) < queries:
                qs.setdefault(pair.sentence1)
    return {f"rank/{g}": (list(qs), list(ds)) for g, (qs, ds) in by_genre.items()}


def evaluation_segments(tokenizer: Any, *, limit: int | None = None) -> dict[str, list[Pair]]:
    """Every gated segment's pairs; ``limit`` bounds the STS genres and length buckets (the
    ranking groups keep their shape: a top-10 needs its pool)."""
    segments = parity_segments(tokenizer, "test", limit=limit)
    segments.update(length_segments(tokenizer, limit=limit or LENGTH_PAIRS))
    for name, (qs, ds) in ranking_groups().items():
        segments[name] = [(q, d) for q in qs for d in ds]
    return segments


# --- measuring ------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two score lists; None when either is constant (undefined)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def topk_overlap(parent: np.ndarray, variant: np.ndarray, k: int) -> float:
    """Mean over queries (rows) of the share of the parent's top ``k`` documents that are
    also in the variant's top ``k``. Each row is one query's scores over the same pool."""
    k = min(k, parent.shape[1])
    top_p = np.argsort(-parent, axis=1, kind="stable")[:, :k]
    top_v = np.argsort(-variant, axis=1, kind="stable")[:, :k]
    kept = [len(set(p) & set(v)) / k for p, v in zip(top_p, top_v, strict=True)]
    return float(np.mean(kept))


def evaluate_pairs(
    artifact: Artifact,
    *,
    fp32: Artifact,
    settings: Settings | None = None,
    thresholds: GateThresholds | None = None,
    limit_per_segment: int | None = None,
) -> PairQualityReport:
    """Score every segment's pairs with the fp32 parent and with ``artifact`` (as the gate
    still judges it), and measure each segment (:class:`PairSegmentScores`)."""
    from embedkit.runtime.rerank import Reranker
    from embedkit.runtime.vectors import activate

    started = time.perf_counter()
    th = (thresholds or load_thresholds()).rerank_limits()
    settings = settings or Settings(providers=["CPUExecutionProvider"])
    parent = Reranker(fp32, settings)
    variant = Reranker(artifact, settings, judging=True)
    segments = evaluation_segments(parent.tokenizer, limit=limit_per_segment)
    activation = parent.config.activation
    groups = ranking_groups()
    raw = {
        name: (parent.score(pairs, raw=True), variant.score(pairs, raw=True))
        for name, pairs in segments.items()
    }
    every = np.concatenate([p for p, _ in raw.values()])
    raw_range = float(np.ptp(every)) or 1.0
    act_range = float(np.ptp(activate(every, activation))) or 1.0
    scored = []
    for name, (p, v) in raw.items():
        raw_diff = float(np.max(np.abs(p - v)))
        act_diff = float(np.max(np.abs(activate(p, activation) - activate(v, activation))))
        group: dict[str, Any] = {}
        if name.startswith("rank/"):
            queries = len(groups[name][0])
            group = {
                "queries": queries,
                "topk_overlap": round(
                    topk_overlap(p.reshape(queries, -1), v.reshape(queries, -1), th.topk), 4
                ),
            }
        rho = spearman(p, v)
        scored.append(
            PairSegmentScores(
                name=name,
                pairs=len(p),
                raw_max_abs_diff=round(raw_diff, 6),
                activated_max_abs_diff=round(act_diff, 6),
                raw_delta_share=round(raw_diff / raw_range, 6),
                activated_delta_share=round(act_diff / act_range, 6),
                spearman=None if rho is None else round(rho, 6),
                **group,
            )
        )
    return PairQualityReport(
        artifact=str(artifact.tag or artifact.path),
        mode=artifact.manifest.quantization.mode,
        settings=artifact.manifest.quantization.settings,
        model_sha256=artifact.manifest.files[MODEL_FILE],
        fp32_model_sha256=fp32.manifest.files[MODEL_FILE],
        pairs=len(every),
        topk=th.topk,
        raw_range=round(raw_range, 6),
        activated_range=round(act_range, 6),
        seconds=round(time.perf_counter() - started, 1),
        segments=scored,
        measured_on=MeasuredOn(
            parent_sha256=fp32.manifest.files[MODEL_FILE],
            isa=toolchain.detect_isa().level,
            runtime=artifact.manifest.runtime,
            version=toolchain.runtime_version(artifact.manifest.runtime),
        ),
    )


# --- the verdict ----------------------------------------------------------------------------


def _failure(segment: str, metric: str, value: float, limit: float) -> GateFailure:
    return GateFailure(
        segment=segment,
        metric=metric,
        value=value,
        threshold=limit,
        by=round(abs(value - limit), 6),
    )


def gate_pairs(report: PairQualityReport, thresholds: GateThresholds | None = None) -> GateVerdict:
    """``index-compatible`` (approved: ranks as the parent does) when every segment holds
    every limit of ``rerank:``, else ``rejected`` with each failing segment and margin."""
    th = (thresholds or load_thresholds()).rerank_limits()
    failures: list[GateFailure] = []
    for seg in report.segments:
        for metric in ("raw_delta_share", "activated_delta_share"):
            value = getattr(seg, metric)
            if value > th.score_delta_share_max:
                failures.append(_failure(seg.name, metric, value, th.score_delta_share_max))
        if seg.pairs >= th.rank_pairs_min:
            # A constant variant next to a varying parent ranks nothing: that fails too.
            rho = seg.spearman if seg.spearman is not None else -1.0
            if rho < th.spearman_min:
                failures.append(_failure(seg.name, "spearman", rho, th.spearman_min))
        if seg.topk_overlap is not None and seg.topk_overlap < th.topk_overlap_min:
            failures.append(
                _failure(
                    seg.name, f"top{report.topk}_overlap", seg.topk_overlap, th.topk_overlap_min
                )
            )
    approved = not failures
    return GateVerdict(
        approved=approved,
        compatibility="index-compatible" if approved else "rejected",
        failures=failures,
        segments_checked=len(report.segments),
        why_not_reindex=None if approved else "a reranker has no index: no reindex class",
        measured_on=report.measured_on,
    )


def _segment_line(seg: PairSegmentScores, verdict: GateVerdict) -> str:
    failed = {f.segment for f in verdict.failures}
    rho = "—" if seg.spearman is None else f"{seg.spearman:.4f}"
    top = "—" if seg.topk_overlap is None else f"{seg.topk_overlap:.3f}"
    return (
        f"| {seg.name} | {seg.pairs} | {seg.raw_max_abs_diff:.3g} | "
        f"{seg.activated_max_abs_diff:.3g} | {seg.raw_delta_share:.3g} | {rho} | {top} | "
        f"{'FAIL' if seg.name in failed else 'ok'} |"
    )


def write_pair_report(
    report: PairQualityReport, out_dir: Path, verdict: GateVerdict
) -> dict[str, Path]:
    """``quality.json`` (report and verdict) and ``quality.md`` (one row a segment) in
    ``out_dir``, as :func:`embedkit.quality.report.write_report` names them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "quality.json", "markdown": out_dir / "quality.md"}
    data = {**report.model_dump(mode="json"), "verdict": verdict.model_dump(mode="json")}
    files["json"].write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        f"# Reranker variant {report.artifact} ({report.mode}) vs fp32",
        "",
        f"Verdict: {verdict.summary()}",
        "",
        f"{report.pairs} pairs; parent raw range {report.raw_range:.4g}, "
        f"activated {report.activated_range:.4g}; top-{report.topk} over ranking groups.",
        "",
        "| segment | pairs | max abs diff raw | activated | raw share | Spearman "
        f"| top-{report.topk} overlap | gate |",
        "|---|---|---|---|---|---|---|---|",
        *(_segment_line(seg, verdict) for seg in report.segments),
    ]
    files["markdown"].write_text("\n".join(lines) + "\n")
    return files


def summary_markdown(
    reports: dict[str, PairQualityReport],
    verdicts: dict[str, GateVerdict],
    speeds: dict[str, float],
    *,
    rank_pairs_min: int = 0,
) -> str:
    """One row a candidate: its class, the worst of each metric over the segments (Spearman
    over those of at least ``rank_pairs_min`` pairs, the gated ones), and pairs/s beside the
    parent's (the release's ``variants/summary.md``)."""
    lines = [
        "| variant | class | max abs diff raw | activated | min Spearman | min top-k overlap "
        "| pairs/s | failing segments |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 | parent | — | — | — | — | {speeds.get('fp32', '—')} | — |",
    ]
    for name, report in reports.items():
        segs, verdict = report.segments, verdicts[name]
        rhos = [s.spearman for s in segs if s.spearman is not None and s.pairs >= rank_pairs_min]
        tops = [s.topk_overlap for s in segs if s.topk_overlap is not None]
        cells = [
            name,
            verdict.compatibility,
            f"{max(s.raw_max_abs_diff for s in segs):.3g}",
            f"{max(s.activated_max_abs_diff for s in segs):.3g}",
            f"{min(rhos):.4f}" if rhos else "—",
            f"{min(tops):.3f}" if tops else "—",
            str(speeds.get(name, "—")),
            ", ".join(verdict.failing_segments) or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
