"""The release pipeline: export → validate (contract + parity) → register.

A release never registers an artifact whose contract failed. The validation
report travels with the artifact (``records/validation.json``) and its
summary lands in the manifest, so the model store entry carries its own proof.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedkit import contract, signing
from embedkit.artifact import Artifact, finalize, register
from embedkit.export import Step, export
from embedkit.recipe import Recipe

ARTIFACTS_DIR = Path("artifacts")


@dataclass(frozen=True)
class Release:
    tag: str
    artifact: Artifact
    report: dict[str, Any]


def attach_parity(artifact: Artifact, report: dict[str, Any], records_dir: Path) -> Artifact:
    """Write the validation report beside the artifact and its summary into the manifest."""
    records_dir.mkdir(parents=True, exist_ok=True)
    report_file = records_dir / "validation.json"
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    fields = artifact.manifest.model_dump(exclude={"files"})
    fields["parity"] = contract.parity_summary(report)
    fields["records"] = {**fields["records"], "validation": "records/validation.json"}
    return finalize(artifact.path, fields)


def release(
    recipe: Recipe,
    *,
    workdir: Path | None = None,
    limit_per_segment: int | None = None,
    sign_key: Path | None = None,
    step: Step | None = None,
) -> Release:
    """Export, validate, (sign) and register ``recipe``'s model; raise ContractViolation on failure."""
    say = step or (lambda _m: None)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = Path(workdir) if workdir else ARTIFACTS_DIR
    base.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-{stamp}-", dir=base))
    out.rmdir()  # export() wants to create it
    artifact = export(recipe, out, step=say)
    reference_dir, _ = recipe.source.resolve()
    report = contract.validate(
        artifact, reference_dir=reference_dir, limit_per_segment=limit_per_segment, step=say
    )
    contract.require_passed(report)
    artifact = attach_parity(artifact, report, artifact.path / "records")
    if sign_key is not None:
        say(f"signing with key {signing.sign(artifact.path, sign_key)}")
    say("registering in the BentoML model store")
    tag = register(artifact)
    return Release(tag=tag, artifact=artifact, report=report)
