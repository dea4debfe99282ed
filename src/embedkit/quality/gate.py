"""The quality gate: a variant is approved only if every segment holds every threshold.

The thresholds live in one file, ``config/quality-gate.yaml``; :func:`gate`
names every failing segment, metric and margin, and :func:`stamp_verdict`
writes the verdict into the variant's manifest.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings
from embedkit.model.artifact import Artifact, PrecisionApproval, RuntimePrecision, finalize
from embedkit.quality.evaluate import QualityReport


class GateThresholds(BaseModel):
    """``config/quality-gate.yaml``: one place for every threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spearman_drop_max: dict[str, float | None] = Field(
        description="Per segment group: most Spearman points (×100) a variant may lose vs the "
        "FP32 PyTorch reference; null = reported, not gated."
    )
    cosine_p1_min: float = Field(ge=-1, le=1)
    overlap_min: float = Field(ge=0, le=1)


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
        op = ">" if self.metric == "spearman_drop" else "<"
        return (
            f"{self.segment}: {self.metric} {self.value:.4g} {op} {self.threshold:g} "
            f"(by {self.by:.3g})"
        )


class GateVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)
    approved: bool
    failures: list[GateFailure]
    segments_checked: int

    @property
    def failing_segments(self) -> list[str]:
        return sorted({f.segment for f in self.failures})

    def summary(self) -> str:
        if self.approved:
            return f"approved: all {self.segments_checked} segments pass"
        return f"rejected: {len(self.failing_segments)} segment(s) fail — " + "; ".join(
            str(f) for f in self.failures
        )


def gate(report: QualityReport, thresholds: GateThresholds | None = None) -> GateVerdict:
    """Approve only if every segment holds every threshold; list each failure and its margin."""
    th = thresholds or load_thresholds()
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
    return GateVerdict(
        approved=not failures, failures=failures, segments_checked=len(report.segments)
    )


def stamp_verdict(artifact: Artifact, verdict: GateVerdict, *, force: bool = False) -> Artifact:
    """Write the gate verdict into the manifest (re-checksummed in place).

    An unapproved variant is only stamped with ``force=True``, which sets
    ``quantization.forced`` so the registry shows it was pushed through.
    """
    if not verdict.approved and not force:
        raise InvalidInput(
            f"{artifact.path} failed the quality gate ({verdict.summary()}); "
            "pass --force to register it anyway"
        )
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    fields["quantization"] = {
        **fields["quantization"],
        "approved": verdict.approved,
        "forced": force and not verdict.approved,
    }
    return finalize(artifact.path, fields)


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
    return finalize(artifact.path, fields)
