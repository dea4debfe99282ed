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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError, ConfigurationError, EmbedkitError
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
        # Named, so that in a list of several models the line says which one.
        named = exc.message if tag in exc.message else f"model {tag}: {exc.message}"
        log.error("embedkit refuses to start: %s", named)
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


def served_tags(settings: Settings, arguments: Any = None) -> list[str]:
    """The model tags one deployment serves, the default first.

    A built Bento's arguments win (``--arg models=TAG,TAG`` or ``--arg model=TAG``, which
    BentoML restores whenever that Bento is served), then ``settings.models``, then the
    one model :func:`served_tag` picks. Several models need ``topology=single`` (one
    process whose runner threads serve them all, docs/design/serving.md decision 5);
    a list that cannot serve stops startup with one line.
    """
    pinned = getattr(arguments, "models", None)
    if pinned:
        tags = [t.strip() for t in str(pinned).split(",") if t.strip()]
    elif getattr(arguments, "model", None):
        tags = [str(arguments.model)]
    elif settings.models:
        tags = list(settings.models)
    else:
        return [served_tag(settings)]
    try:
        if len(tags) > 1 and settings.topology != "single":
            raise ConfigurationError(
                f"several models ({', '.join(tags)}) are served only with topology=single; "
                "use one deployment per model with topology=split"
            )
        if len(tags) > 1 and settings.variant:
            raise ConfigurationError(
                "EMBEDKIT_VARIANT picks a version of EMBEDKIT_MODEL; with several models "
                "name each version's tag in EMBEDKIT_MODELS instead"
            )
        if twice := sorted({t for t in tags if tags.count(t) > 1}):
            raise ConfigurationError(f"EMBEDKIT_MODELS names {', '.join(twice)} twice")
    except EmbedkitError as exc:
        log.error("embedkit refuses to start: %s", exc)
        raise
    return tags


_Cls = TypeVar("_Cls", bound=type)


def model_attributes(count: int) -> list[str]:
    """The service class attributes holding the served models: ``model``, ``model_1``, …"""
    return ["model", *(f"model_{i}" for i in range(1, count))]


def with_models(tags: Sequence[str]) -> Callable[[_Cls], _Cls]:
    """Class decorator (under ``@bentoml.service``): one ``BentoModel`` class attribute
    per tag. BentoML collects a service's models from its class attributes: that is what
    makes ``bentoml build`` pack every version and ``bentoml serve`` refuse, naming it,
    one that is not in the store before any worker starts."""
    import bentoml

    def attach(cls: _Cls) -> _Cls:
        for attr, tag in zip(model_attributes(len(tags)), tags, strict=True):
            setattr(cls, attr, bentoml.models.BentoModel(tag))
        service: Any = cls
        service.served_models = len(tags)  # read back by load_artifacts
        return cls

    return attach


def load_artifacts(service_cls: Any) -> list[Artifact]:
    """Every model :func:`with_models` attached, in order, each sha256-verified
    (:func:`load_artifact`: a tampered one stops startup naming it)."""
    attrs = model_attributes(getattr(service_cls, "served_models", 1))
    return [load_artifact(getattr(service_cls, attr)) for attr in attrs]


def refusal(
    manifest: Manifest, settings: Settings, *, isa: str, runtimes: Mapping[str, str]
) -> tuple[str, str] | None:
    """Why this variant must not serve here, as (metric reason, one-line reason); None
    when it may. fp32 (mode ``none``) always may: it is the fallback and the index space;
    class ``rejected`` never may (forced into the store or not, named or not).

    A verdict holds only where it was measured (INT8 kernels differ between VNNI and
    non-VNNI CPUs, BF16 between CPUs with and without it, and between runtimes and their
    versions): a mixed node pool must never put vectors of two kernels into one index.
    ``runtimes``: the version of each runtime installed here ("absent" if not).
    Format-1 manifests record no such binding.
    """
    q = manifest.quantization
    if q.mode == "none":
        return None
    if manifest.compatibility == "rejected":
        # Wherever it runs and whoever names it: the gate's verdict, not this machine's.
        forced = " (registered with --force)" if q.forced else ""
        return (
            "rejected",
            f"variant {manifest.variant} is class rejected{forced}: the quality gate "
            "rejected it and a rejected variant never serves",
        )
    if q.measured_on is None:
        return (
            "format",
            f"manifest format {manifest.format_version} records no measurement binding "
            "(ISA level, runtime, parent checksum); re-release it with this embedkit",
        )
    if q.measured_on.isa != isa:
        return "isa", f"measured on ISA level {q.measured_on.isa}, this CPU is {isa}"
    measured = q.measured_on
    here = runtimes.get(measured.runtime, "absent")
    if measured.runtime != manifest.runtime or measured.version != here:
        return (
            "runtime",
            f"measured with {measured.runtime} {measured.version}, this image has "
            f"{manifest.runtime} {runtimes.get(manifest.runtime, 'absent')}",
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
    checksum its manifest records: the newest such version that verifies.

    Every candidate records the same graph checksum, so any intact one is the parent; a
    copy that fails verification is skipped with one logged line and a counted load
    failure (it is never served), and if none verifies the newest one's error is raised.
    """
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
    newest_error: ArtifactError | None = None
    for model in sorted(stored, key=lambda m: m.info.creation_time, reverse=True):
        try:
            return Artifact.load(Path(model.path), tag=str(model.tag))
        except ArtifactError as exc:
            log.error("embedkit skips fp32 parent candidate %s: %s", model.tag, exc.message)
            metrics.get().model_load_failures.labels(reason=exc.code or "artifact_error").inc()
            newest_error = newest_error or exc
    assert newest_error is not None  # `stored` is not empty
    raise newest_error


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
