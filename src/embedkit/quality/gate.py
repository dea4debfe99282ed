"""The quality gate: every segment must hold every limit of a variant's compatibility class.

Classes (``docs/service.md § Compatibility classes``), strictest first:

* ``index-compatible``: the fidelity limits (p1 cosine and top-10 neighbour overlap
  with fp32, Spearman drop) hold on every segment — it may query an fp32-built index;
* ``reindex``: fidelity misses, but the Spearman limits hold on every segment *and*
  retrieval holds (nDCG@10 and recall@100 within the configured points of fp32, each
  searching an index it built itself) — correct only for an index built entirely with it;
* ``rejected``: anything else. Without the (optional) retrieval data nothing is ``reindex``.

The thresholds live in one file, ``config/quality-gate.yaml``; :func:`gate`
names every failing segment, metric and margin, and :func:`with_verdict` puts the
class, what it was measured on and reference vectors into the manifest (in memory: a
release writes each version's manifest once, at its end, with :func:`embedkit.model.artifact.seal`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model.artifact import (
    Artifact,
    Compatibility,
    MeasuredOn,
    PrecisionApproval,
    RuntimePrecision,
    amend,
    format_version_for,
    seal,
)
from embedkit.quality.evaluate import QualityReport
from embedkit.runtime.engine import Engine
from embedkit.runtime.reference import reference_scores, reference_vectors
from embedkit.runtime.rerank import Reranker

RETRIEVAL_SEGMENT = "retrieval:"  # + dataset name: the segment name of retrieval failures


class RetrievalLimits(BaseModel):
    """Most points (×100) a ``reindex`` variant may lose against fp32, each model searching
    an index it built itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ndcg_at_10_drop_max: float = Field(1.0, ge=0)
    recall_at_100_drop_max: float = Field(1.0, ge=0)


class RerankLimits(BaseModel):
    """``rerank:`` of ``config/quality-gate.yaml`` (where the values and their reasons
    are): what a reranker's variant must hold on every segment of
    :func:`embedkit.quality.pair_gate.evaluate_pairs` to be approved."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spearman_min: float = Field(ge=-1, le=1)
    topk: int = Field(ge=1)
    topk_overlap_min: float = Field(ge=0, le=1)
    score_delta_share_max: float = Field(ge=0)
    rank_pairs_min: int = Field(
        ge=3, description="Segments with fewer pairs report Spearman without gating it."
    )
    reference_abs_max: float = Field(
        ge=0,
        description="Serving startup: most a pod's raw score may differ from the manifest's "
        "reference scores.",
    )


class GateThresholds(BaseModel):
    """``config/quality-gate.yaml``: one place for every threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spearman_drop_max: dict[str, float | None] = Field(
        description="Per segment group: most Spearman points (×100) a variant may lose vs the "
        "FP32 PyTorch reference; null = reported, not gated."
    )
    cosine_p1_min: float = Field(ge=-1, le=1)
    overlap_min: float = Field(ge=0, le=1)
    retrieval: RetrievalLimits = Field(default_factory=RetrievalLimits)
    reference_cosine_min: float = Field(
        0.9999,
        ge=-1,
        le=1,
        description="Least cosine a serving pod must reproduce on the manifest's reference "
        "vectors (same ISA level and runtime: only thread-order noise).",
    )
    rerank: RerankLimits | None = Field(
        None, description="A reranker's variants (absent: they cannot be gated)."
    )

    def rerank_limits(self) -> RerankLimits:
        if self.rerank is None:
            raise InvalidInput(
                "the gate config has no rerank: section, so a reranker's variants cannot "
                "be gated (see config/quality-gate.yaml)"
            )
        return self.rerank


def load_thresholds(path: Path | None = None) -> GateThresholds:
    """``path``, else ``quality-gate.yaml`` in ``settings.config_dir``."""
    path = path or get_settings().config_dir / "quality-gate.yaml"
    return load_yaml(path, GateThresholds, "gate config")


class GateFailure(BaseModel):
    model_config = ConfigDict(frozen=True)
    segment: str
    metric: str
    value: float
    threshold: float
    by: float = Field(description="How far past the threshold (always positive).")

    def __str__(self) -> str:
        op = ">" if self.metric.endswith(("_drop", "_share")) else "<"
        return (
            f"{self.segment}: {self.metric} {self.value:.4g} {op} {self.threshold:g} "
            f"(by {self.by:.3g})"
        )


class GateVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)
    approved: bool = Field(description="Index-compatible: every fidelity limit holds.")
    failures: list[GateFailure]
    segments_checked: int
    compatibility: Compatibility = "rejected"
    why_not_reindex: str | None = Field(
        None, description="For a rejected variant: what kept it out of the reindex class."
    )
    measured_on: MeasuredOn | None = None

    @model_validator(mode="before")
    @classmethod
    def _class_from_approval(cls, data: object) -> object:
        # A verdict built with approved only (the format-1 gate) gets its class from it.
        if isinstance(data, dict) and "compatibility" not in data:
            data = {
                **data,
                "compatibility": "index-compatible" if data.get("approved") else "rejected",
            }
        return data

    @property
    def failing_segments(self) -> list[str]:
        return sorted({f.segment for f in self.failures})

    def summary(self) -> str:
        failed = "; ".join(str(f) for f in self.failures)
        if self.compatibility == "index-compatible":
            return f"index-compatible: all {self.segments_checked} segments pass"
        if self.compatibility == "reindex":
            return (
                f"reindex: Spearman and retrieval hold (only for an index built with this "
                f"variant); fidelity fails on {len(self.failing_segments)} segment(s) — {failed}"
            )
        why = f" [not reindex: {self.why_not_reindex}]" if self.why_not_reindex else ""
        return f"rejected: {len(self.failing_segments)} segment(s) fail — {failed}{why}"


def _retrieval_failures(report: QualityReport, th: GateThresholds) -> list[GateFailure]:
    r = report.retrieval
    if r is None:
        return []
    name = RETRIEVAL_SEGMENT + r.dataset
    checks = (
        ("ndcg_at_10_drop", r.ndcg_drop, th.retrieval.ndcg_at_10_drop_max),
        ("recall_at_100_drop", r.recall_drop, th.retrieval.recall_at_100_drop_max),
    )
    return [
        GateFailure(segment=name, metric=m, value=v, threshold=lim, by=round(v - lim, 3))
        for m, v, lim in checks
        if v > lim
    ]


def gate(report: QualityReport, thresholds: GateThresholds | None = None) -> GateVerdict:
    """Class the variant (strictest class whose limits every segment holds); list each
    failure and its margin."""
    th = thresholds or load_thresholds()
    failures = _fidelity_failures(report, th)
    retrieval = _retrieval_failures(report, th)
    spearman = sorted({f.segment for f in failures if f.metric == "spearman_drop"})
    why: str | None = None
    if not failures:
        klass: Compatibility = "index-compatible"
    elif spearman:
        klass, why = "rejected", f"Spearman fails on {', '.join(spearman)}"
    elif report.retrieval is None:
        klass, why = "rejected", f"no retrieval scores ({report.retrieval_note})"
    elif retrieval:
        klass, why = "rejected", "retrieval drops: " + "; ".join(str(f) for f in retrieval)
    else:
        klass = "reindex"
    return GateVerdict(
        approved=klass == "index-compatible",
        compatibility=klass,
        failures=failures + retrieval,
        segments_checked=len(report.segments) + (report.retrieval is not None),
        why_not_reindex=why,
        measured_on=report.measured_on,
    )


def _fidelity_failures(report: QualityReport, th: GateThresholds) -> list[GateFailure]:
    failures: list[GateFailure] = []
    for seg in report.segments:
        limit = th.spearman_drop_max.get(seg.group)
        drop = seg.drop_vs_reference
        if limit is not None and drop is not None and drop > limit:
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="spearman_drop",
                    value=drop,
                    threshold=limit,
                    by=round(drop - limit, 4),
                )
            )
        if seg.cosine_fp32.p1 < th.cosine_p1_min:
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="cosine_p1",
                    value=seg.cosine_fp32.p1,
                    threshold=th.cosine_p1_min,
                    by=round(th.cosine_p1_min - seg.cosine_fp32.p1, 5),
                )
            )
        if seg.overlap_fp32 < th.overlap_min:
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="neighbour_overlap",
                    value=seg.overlap_fp32,
                    threshold=th.overlap_min,
                    by=round(th.overlap_min - seg.overlap_fp32, 4),
                )
            )
    return failures


def with_verdict(
    artifact: Artifact,
    verdict: GateVerdict,
    *,
    force: bool = False,
    name: str | None = None,
    thresholds: GateThresholds | None = None,
    settings: Settings | None = None,
) -> Artifact:
    """``artifact`` with the verdict in its manifest (its task's newest format,
    :func:`~embedkit.model.artifact.format_version_for`): the class, the candidate ``name``,
    what it was measured on, and this artifact's reference vectors (a reranker's: reference
    scores), computed here, on the machine that measured it. Nothing is written
    (:func:`embedkit.model.artifact.seal`).

    A rejected variant is only stamped with ``force=True``, which sets
    ``quantization.forced`` so the registry shows it was pushed through.
    """
    if verdict.compatibility == "rejected" and not force:
        raise InvalidInput(
            f"{artifact.path} failed the quality gate ({verdict.summary()}); "
            "pass --force to register it anyway"
        )
    th = thresholds or load_thresholds()
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    if artifact.manifest.task == "rerank":
        # Scores, not vectors: each reference pair scored alone (raw).
        limit = th.rerank_limits().reference_abs_max
        scores = reference_scores(Reranker(artifact, settings), limit)
        fields["reference_scores"] = scores.model_dump(mode="json")
    else:
        vectors = reference_vectors(Engine(artifact, settings), th.reference_cosine_min)
        fields["reference"] = vectors.model_dump()
    fields["format_version"] = format_version_for(artifact.manifest.task)
    fields["quantization"] = {
        **fields["quantization"],
        "approved": verdict.approved,
        "forced": force and verdict.compatibility == "rejected",
        "compatibility": verdict.compatibility,
        "variant": name or fields["quantization"].get("variant"),
        "measured_on": None if verdict.measured_on is None else verdict.measured_on.model_dump(),
    }
    return amend(artifact, fields)


def stamp_precision(
    artifact: Artifact,
    verdict: GateVerdict,
    *,
    precision: RuntimePrecision,
    provider: str,
    device: str = "",
) -> Artifact:
    """Record the gate's approval of a run-time precision (TensorRT FP16) in the manifest.

    Only an approval is recorded, and there is no force: ``runtime.session`` enables a
    reduced precision only when the manifest carries it, so a rejected one stays off.
    """
    if not verdict.approved:
        raise InvalidInput(
            f"{precision} on {provider} failed the quality gate for {artifact.path} "
            f"({verdict.summary()}); it stays off"
        )
    approval = PrecisionApproval(
        precision=precision,
        provider=provider,
        device=device,
        segments_checked=verdict.segments_checked,
    )
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    fields["precision_approvals"] = [
        a
        for a in fields["precision_approvals"]
        if (a["precision"], a["provider"]) != (precision, provider)
    ] + [approval.model_dump(mode="json")]
    return seal(amend(artifact, fields))
