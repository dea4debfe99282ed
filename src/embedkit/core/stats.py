"""The one percentile definition of every benchmark, load test and soak report.

Nearest rank, no interpolation: the p-th percentile is the smallest measured value
with at least p % of the values at or below it, so a reported p99 is a real call
(an interpolated p99 of a few hundred calls is a latency no request had).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

REPORTED = (50, 95, 99)  # the p50 / p95 / p99 every report carries


def nearest_rank(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) of values already sorted ascending."""
    if not ordered:
        raise ValueError("no values")
    # round(): p/100·n lands a hair above an integer in floating point (0.07·100 = 7.000…01).
    rank = math.ceil(round(p / 100 * len(ordered), 9))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th nearest-rank percentile of ``values`` (any order)."""
    return nearest_rank(sorted(values), p)


def percentiles(values: Iterable[float], ps: Sequence[int] = REPORTED) -> dict[str, float | None]:
    """``{"p50": …, "p95": …, "p99": …}`` of ``values``; every entry None when there are none."""
    ordered = sorted(values)
    return {f"p{p}": nearest_rank(ordered, p) if ordered else None for p in ps}
