"""What both services do once, at startup: pick and load the artifact, decide whether a
variant may serve here, and settle the collector.

A missing or tampered artifact logs one clear line, counts ``model_load_failures``
and stops startup: nothing unverified is ever served. A variant whose approval does
not hold on this machine (:func:`refusal`) is refused by the Embedder, which then
serves its fp32 parent (:func:`find_parent`).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact, Manifest

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


def served_tag(settings: Settings) -> str:
    """The model tag to serve: ``settings.model``, or with ``settings.variant`` the newest
    registered version of that name whose ``variant`` label is the one named."""
    if not settings.variant:
        return settings.model
    import bentoml

    name = settings.model.partition(":")[0]
    stored = bentoml.models.list(name)
    named = [m for m in stored if m.info.labels.get("variant") == settings.variant]
    if not named:
        known = sorted({m.info.labels.get("variant", "?") for m in stored})
        raise ArtifactError(
            f"no registered version of {name} is variant {settings.variant!r} "
            f"(registered: {', '.join(known) or 'none'}); check EMBEDKIT_VARIANT"
        )
    return str(max(named, key=lambda m: m.info.creation_time).tag)


def refusal(
    manifest: Manifest, settings: Settings, *, isa: str, runtime: str
) -> tuple[str, str] | None:
    """Why this variant must not serve here, as (metric reason, one-line reason); None
    when it may. fp32 (mode ``none``) always may: it is the fallback and the index space.

    A verdict holds only where it was measured (INT8 kernels differ between VNNI and
    non-VNNI CPUs, and between runtime versions): a mixed node pool must never put
    vectors of two kernels into one index. Format-1 manifests record no such binding.
    """
    q = manifest.quantization
    if q.mode == "none":
        return None
    if q.measured_on is None:
        return (
            "format",
            f"manifest format {manifest.format_version} records no measurement binding "
            "(ISA level, runtime, parent checksum); re-release it with this embedkit",
        )
    if q.measured_on.isa != isa:
        return "isa", f"measured on ISA level {q.measured_on.isa}, this CPU is {isa}"
    if q.measured_on.onnxruntime != runtime:
        return (
            "runtime",
            f"measured with onnxruntime {q.measured_on.onnxruntime}, this is {runtime}",
        )
    if manifest.compatibility == "reindex" and settings.variant != manifest.variant:
        return (
            "reindex_not_named",
            f"class reindex serves only when named (EMBEDKIT_VARIANT={manifest.variant} or "
            "scripts/serve --variant), for an index built entirely with it",
        )
    return None


def find_parent(artifact: Artifact) -> Artifact:
    """The fp32 parent a variant was measured against, from the model store by the
    checksum its manifest records (newest such version), verified."""
    import bentoml

    measured = artifact.manifest.quantization.measured_on
    label = artifact.tag or str(artifact.path)
    if measured is None:
        raise ArtifactError(f"cannot find the fp32 parent of {label}: no parent checksum recorded")
    stored = [
        m
        for m in bentoml.models.list(artifact.manifest.name)
        if m.info.metadata.get("quantization") == "none"
        and m.info.metadata.get("model_sha256") == measured.parent_sha256
    ]
    if not stored:
        raise ArtifactError(
            f"the fp32 parent of {label} (model.onnx sha256 {measured.parent_sha256[:12]}…) "
            "is not in the model store"
        )
    newest = max(stored, key=lambda m: m.info.creation_time)
    return Artifact.load(Path(newest.path), tag=str(newest.tag))


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
