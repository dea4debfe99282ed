"""Prometheus metrics of our own, beside BentoML's.

Metrics are created lazily on first use: BentoML workers set
``PROMETHEUS_MULTIPROC_DIR`` after importing the service module, and a
``prometheus_client`` metric created before that is invisible to ``/metrics``.
So nothing here touches prometheus_client at import time; call :func:`get`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Metrics:
    provider_fallback: Any  # Counter{requested, active}
    model_load_failures: Any  # Counter{reason}


@lru_cache(maxsize=1)
def get() -> Metrics:
    from prometheus_client import Counter

    return Metrics(
        provider_fallback=Counter(
            "embedkit_provider_fallback_total",
            "Sessions whose first requested available provider did not attach.",
            ["requested", "active"],
        ),
        model_load_failures=Counter(
            "embedkit_model_load_failures_total",
            "Artifacts refused at load (checksum, signature, missing files).",
            ["reason"],
        ),
    )
