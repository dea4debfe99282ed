"""The one served identity: what this process serves, built once at startup.

name:version, variant, compatibility class, precision, execution provider and CPU
ISA level — and, when a variant was refused at startup, which one and why (its
fp32 parent then serves). Every place that tells a client or an operator what is
served reads this object: the ``X-Embedkit-Model`` header on every response of our
routes (errors included), ``/info``, ``/v1/models``, the
``embedkit_served_model_info`` metric's labels and the startup log line.

The Embedder builds it (it alone knows the provider that attached and whether the
variant passed its startup checks); the front receives it from the Embedder during
warm-up, before it reports ready. Both publish it to the process's
:class:`ServedIdentities`, one object built at startup (``service.py``) and handed to the
engine cores, the fronts and the edge as a constructor argument.
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


class ServedIdentities:
    """What this process serves: the default model's identity and every served model's,
    by name. Built empty at startup (``service.py``) and given to those who fill it in
    (the Embedder's cores, the fronts once warm) and those who read it (the edge's header
    and log line, ``/v1/models``). Publishing also logs the identity and exposes it as
    the ``embedkit_served_model_info`` gauge's labels, one series per model."""

    def __init__(self) -> None:
        self._default: ServedIdentity | None = None
        self._by_name: dict[str, ServedIdentity] = {}

    def publish(self, identity: ServedIdentity, *, default: bool = True) -> None:
        """Make ``identity`` the default (``default``), or one more model served (several
        models, ``settings.models``). Startup calls it once per model; a later call (the
        front receiving what the Embedder built) replaces the default, or the model of
        the same name, labels included."""
        gauge = metrics.get().served_model
        stale = {self._default if default else None, self._by_name.get(identity.name)}
        for old in stale - {None, identity}:
            if old is not None and self._by_name.get(old.name) == old:
                gauge.remove(*old.labels().values())
                del self._by_name[old.name]
        self._by_name[identity.name] = identity
        if default:
            self._default = identity
        gauge.labels(**identity.labels()).set(1)
        log.info("embedkit serving %s", identity.header_value())

    def served(self, name: str | None = None) -> ServedIdentity | None:
        """The identity of model ``name``, or the default one; None until startup has
        built (or received) it."""
        return self._default if name is None else self._by_name.get(name)
