"""What both services do once, at startup: load the artifact, and settle the collector.

A missing or tampered artifact logs one clear line, counts ``model_load_failures``
and stops startup: nothing unverified is ever served.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact

log = logging.getLogger(__name__)


def load_artifact(model: Any) -> Artifact:
    """The artifact behind a ``bentoml.models.BentoModel`` reference, sha256-verified.

    Reads the local store only (``BentoModel``'s own resolve would try BentoCloud).
    """
    tag = str(model.tag)
    try:
        stored = model.stored
        if stored is None:
            raise ArtifactError(
                f"model {tag!r} is not in the BentoML model store; register it first "
                "(embedkit.model.artifact.register / `embedkit release`)"
            )
        return Artifact.load(Path(stored.path), tag=str(stored.tag))
    except ArtifactError as exc:
        log.error("embedkit refuses to start: %s", exc)
        metrics.get().model_load_failures.labels(reason=exc.code or "artifact_error").inc()
        raise


def settle_gc(settings: Settings) -> None:
    """After warm-up, keep the garbage collector out of the request path.

    Everything loaded at startup (model, tokenizer, BentoML, pydantic schemas) is
    moved to the permanent generation, and young collections run less often: full
    collections over hundreds of thousands of startup objects were the p99 tail
    (A/B in docs/benchmarks/http.md, "Garbage collection was the tail").
    """
    if settings.gc_tuning:
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
