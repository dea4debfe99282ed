"""The release's rule for the default version, and its candidates summary (pure, no models)."""

from __future__ import annotations

from typing import Any

from tests.quality_reports import quality_report, segment

from embedkit.quality.gate import GateFailure, GateThresholds, GateVerdict
from embedkit.release import PARENT, Candidate, candidates_summary, pick_default

APPROVED = GateVerdict(approved=True, failures=[], segments_checked=1)
REJECTED = GateVerdict(
    approved=False,
    segments_checked=1,
    failures=[
        GateFailure(segment="lang:ja", metric="cosine_p1", value=0.9, threshold=0.99, by=0.09)
    ],
)


def _candidate(name: str, speed: float | None, verdict: GateVerdict) -> Candidate:
    artifact: Any = None  # the rule never looks at the artifact
    return Candidate(
        name, artifact, quality_report(segment("stsb:all", "stsb", 0.1, pairs=10)), verdict, speed
    )


def test_default_is_the_fastest_approved_version_parent_included() -> None:
    fast_rejected = _candidate("int8", 900.0, REJECTED)
    fused = _candidate("fused", 500.0, APPROVED)
    faster = _candidate("fused-2", 650.0, APPROVED)
    # The parent at 585 texts/s beats the approved fused graph: it stays the default.
    assert pick_default([fast_rejected, fused], 585.0) is None
    assert pick_default([fast_rejected, fused, faster], 585.0) is faster
    assert pick_default([fused], 500.0) is None  # a tie goes to the parent
    assert pick_default([], None) is None
    assert pick_default([_candidate("untimed", None, APPROVED)], None) is None


def test_candidates_summary_names_speed_and_verdicts() -> None:
    th = GateThresholds(spearman_drop_max={"stsb": 0.5}, cosine_p1_min=0.99, overlap_min=0.95)
    text = candidates_summary(
        [_candidate("fused", 500.0, APPROVED), _candidate("int8", 1000.0, REJECTED)],
        {PARENT: 500.0, "fused": 500.0, "int8": 1000.0},
        th,
    )
    assert "| fused | dynamic-int8 | 500.0 | 1.00 | index-compatible |" in text
    assert "| int8 | dynamic-int8 | 1000.0 | 2.00 | rejected (1 segments: lang:ja) |" in text
    assert "| stsb:all | 10 | 80.00 | 0.10 | 0.10 |" in text
