"""The one served identity: what this process serves, built once at startup.

name:version, variant, compatibility class, precision, execution provider and CPU
ISA level — and, when a variant was refused at startup, which one and why (its
fp32 parent then serves). Every place that tells a client or an operator what is
served reads this object: the ``X-Embedkit-Model`` header on every response of our
routes (errors included), ``/info``, ``/v1/models``, the
``embedkit_served_model_info`` metric's labels and the startup log line.

The Embedder builds it (it alone knows the provider that attached and whether the
variant passed its startup checks); the front receives it from the Embedder during
warm-up, before it reports ready.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from embedkit.core import metrics
from embedkit.model.artifact import COMPATIBILITY_CLASSES, Artifact, Compatibility

log = logging.getLogger(__name__)

HEADER = "X-Embedkit-Model"


@dataclass(frozen=True)
class ServedIdentity:
    name: str
    version: str
    variant: str
    compatibility: Compatibility
    precision: str
    provider: str
    isa: str
    refused: str | None = None  # "<variant>: <reason>" when a variant was refused at startup

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def header_value(self) -> str:
        return (
            f"{self.tag}; variant={self.variant}; class={self.compatibility}; "
            f"precision={self.precision}; provider={self.provider}; isa={self.isa}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, **asdict(self)}

    def labels(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "compatibility": self.compatibility,
            "precision": self.precision,
            "provider": self.provider,
            "isa": self.isa,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServedIdentity:
        return cls(**{k: v for k, v in data.items() if k != "tag"})

    @classmethod
    def from_header(cls, value: str) -> ServedIdentity:
        """The inverse of :meth:`header_value` (clients such as `embedkit reembed` read it);
        ValueError on anything else."""
        tag, *pairs = (part.strip() for part in value.split(";"))
        name, sep, version = tag.rpartition(":")
        fields = dict(pair.partition("=")[::2] for pair in pairs)
        keys = {"variant", "class", "precision", "provider", "isa"}
        if not (sep and name and version) or set(fields) != keys or not all(fields.values()):
            raise ValueError(f"not an {HEADER} header: {value!r}")
        compatibility = next((c for c in COMPATIBILITY_CLASSES if c == fields["class"]), None)
        if compatibility is None:
            raise ValueError(f"unknown compatibility class in {HEADER}: {value!r}")
        return cls(
            name=name,
            version=version,
            variant=fields["variant"],
            compatibility=compatibility,
            precision=fields["precision"],
            provider=fields["provider"],
            isa=fields["isa"],
        )


def build(
    artifact: Artifact, *, provider: str, precision: str, isa: str, refused: str | None = None
) -> ServedIdentity:
    """The identity of ``artifact`` served on ``provider`` in ``precision`` (what the
    provider computes in: ``runtime.session.served_precision``) on a CPU of ISA ``isa``."""
    manifest = artifact.manifest
    tag = artifact.tag or ""
    version = tag.partition(":")[2] or "local"
    return ServedIdentity(
        name=manifest.name,
        version=version,
        variant=manifest.variant,
        compatibility=manifest.compatibility,
        precision=precision,
        provider=provider,
        isa=isa,
        refused=refused,
    )


_served: ServedIdentity | None = None
_published: dict[str, ServedIdentity] = {}  # by model name: every model this process serves


def publish(identity: ServedIdentity, *, default: bool = True) -> None:
    """Make ``identity`` this process's (``default``), or one more model it serves
    (several models, ``settings.models``), log it and expose it as metric labels, one
    series per model. Startup calls it once per model; a later call (tests building
    several Embedders in one process) replaces the default, or the model of the same
    name, labels included."""
    global _served
    gauge = metrics.get().served_model
    stale = {_served if default else None, _published.get(identity.name)} - {None, identity}
    for old in stale:
        if old is not None and _published.get(old.name) == old:
            gauge.remove(*old.labels().values())
            del _published[old.name]
    _published[identity.name] = identity
    if default:
        _served = identity
    gauge.labels(**identity.labels()).set(1)
    log.info("embedkit serving %s", identity.header_value())


def served(name: str | None = None) -> ServedIdentity | None:
    """The identity of model ``name``, or this process's (default) one; None until
    startup has built (or received) it."""
    return _served if name is None else _published.get(name)
