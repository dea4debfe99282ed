"""Small hand-made quality reports for the pure gate and release-rule tests."""

from __future__ import annotations

from embedkit.quality.evaluate import CosineStats, QualityReport, SegmentResult


def segment(
    name: str,
    group: str,
    drop: float | None,
    p1: float = 0.999,
    overlap: float = 1.0,
    pairs: int = 50,
) -> SegmentResult:
    """One segment that lost ``drop`` Spearman points (None: no gold scores)."""
    cos = CosineStats(min=p1 - 0.001, p1=p1, mean=0.999)
    return SegmentResult(
        name=name,
        group=group,
        pairs=pairs,
        spearman_reference=80.0,
        spearman=None if drop is None else 80.0 - drop,
        drop_vs_reference=drop,
        cosine_fp32=cos,
        cosine_reference=cos,
        overlap_fp32=overlap,
        overlap_reference=overlap,
    )


def quality_report(*segments: SegmentResult, mode: str = "dynamic-int8") -> QualityReport:
    return QualityReport(
        artifact="x",
        mode=mode,
        settings={},
        model_sha256="a",
        fp32_model_sha256="b",
        reference_source_sha256="c",
        texts=1,
        seconds=0.0,
        segments=list(segments),
    )
