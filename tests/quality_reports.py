"""Small hand-made quality reports for the pure gate and release-rule tests, and the one
bounded real evaluation the gate tests share."""

from __future__ import annotations

from typing import Any

from embedkit.quality.evaluate import CosineStats, QualityReport, SegmentResult

# Every test that runs a real evaluation (tests/test_quality.py, test_compatibility.py,
# test_cli.py's `embedkit evaluate`) asks for these texts, so the PyTorch reference's, the
# fp32's and a shared variant's vectors are encoded once per machine (the evaluation cache
# is keyed by the text set) and, with two workers, by one while the other waits. Retrieval
# reads the shipped SciFact slice (tests/conftest.py points the extended data at it).
FAST_EVALUATION: dict[str, Any] = {
    "groups": ("stsb", "length", "lang"),
    "languages": ("en", "de", "ja"),
    "max_pairs": 160,
    "retrieval_docs": 300,
    "retrieval_queries": 40,
}


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
