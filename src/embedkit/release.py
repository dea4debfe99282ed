"""The release pipeline: export → validate (contract + parity) → variants + gate → register.

A release never registers an artifact whose contract failed, nor a variant the
quality gate rejected (unless forced, which its manifest records). Reports
travel with each artifact (``records/``) and their summaries land in its
manifest, so the model store entry carries its own proof. The default version
(the fastest approved one) is registered last, so ``NAME:latest`` is it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedkit.bench import records
from embedkit.core.settings import get_settings
from embedkit.model import signing
from embedkit.model.artifact import Artifact, finalize, register
from embedkit.model.export import Step, export
from embedkit.model.recipe import Recipe
from embedkit.quality import contract


@dataclass(frozen=True)
class Registered:
    name: str
    tag: str
    throughput: float | None
    approved: bool | None


@dataclass(frozen=True)
class Release:
    tag: str  # the default version
    artifact: Artifact
    report: dict[str, Any]
    versions: list[Registered] = field(default_factory=list)
    summary_markdown: str | None = None


def attach_records(
    artifact: Artifact, records: dict[str, Path], manifest_updates: dict[str, Any]
) -> Artifact:
    """Copy report files into ``records/`` and re-finalise the manifest with ``manifest_updates``."""
    target = artifact.path / "records"
    target.mkdir(exist_ok=True)
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    names = dict(fields["records"])
    for key, src in records.items():
        dest = target / Path(src).name
        if Path(src).resolve() != dest.resolve():
            dest.write_bytes(Path(src).read_bytes())
        names[key] = dest.relative_to(artifact.path).as_posix()
    fields.update(manifest_updates)
    fields["records"] = names
    return finalize(artifact.path, fields)


def attach_parity(artifact: Artifact, report: dict[str, Any]) -> Artifact:
    """Store the validation report beside the artifact and its summary in the manifest."""
    (artifact.path / "records").mkdir(exist_ok=True)
    report_file = artifact.path / "records" / "validation.json"
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return attach_records(
        artifact, {"validation": report_file}, {"parity": contract.parity_summary(report)}
    )


def release(
    recipe: Recipe,
    *,
    workdir: Path | None = None,
    limit_per_segment: int | None = None,
    variants: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    force: Sequence[str] = (),
    sign_key: Path | None = None,
    step: Step | None = None,
    bench: bool = True,
) -> Release:
    """Export, validate, optionally build and gate variants, sign and register.

    Every registered version carries release records (:mod:`embedkit.bench.records`): its
    runtime parameters and, with ``bench``, a short benchmark and profiler summary.

    Raises ContractViolation when the fp32 contract fails (nothing registered).
    """
    say = step or (lambda _m: None)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = Path(workdir) if workdir else get_settings().artifacts_dir
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-{stamp}-", dir=base))
    artifact = export(recipe, root / "fp32", step=say)
    reference_dir, _ = recipe.source.resolve()
    report = contract.validate(
        artifact, reference_dir=reference_dir, limit_per_segment=limit_per_segment, step=say
    )
    contract.require_passed(report)
    artifact = attach_parity(artifact, report)

    # (name, artifact, throughput, approved); the fp32 parent is always approved by its contract.
    entries: list[tuple[str, Artifact, float | None, bool | None]] = []
    summary = None
    if variants:
        from embedkit.quality import evaluate as quality

        candidates, speeds = quality.run_candidates(
            artifact, root / "variants", presets=presets, reference_dir=reference_dir, say=say
        )
        summary = quality.summary_markdown(candidates, speeds, quality.load_thresholds())
        (root / "variants" / "summary.md").write_text(summary + "\n")
        entries.append(("fp32", artifact, speeds.get("fp32"), True))
        for c in candidates:
            if not c.verdict.approved and c.name not in force:
                say(f"not registering {c.name}: {c.verdict.summary()[:200]}")
                continue
            stamped = quality.stamp_verdict(c.artifact, c.verdict, force=c.name in force)
            files = quality.write_report(c.report, stamped.path / "records", c.verdict)
            stamped = attach_records(stamped, {f"quality.{k}": v for k, v in files.items()}, {})
            entries.append((c.name, stamped, c.throughput, c.verdict.approved))
    else:
        entries.append(("fp32", artifact, None, True))

    # The fastest approved version serves by default. The fp32 parent competes too: its
    # contract approves it, and the offline-fused graph measured slower than ORT's own
    # runtime fusion on this CPU (docs/quantization.md), so "fused when no INT8 passes"
    # would serve a slower artifact for nothing.
    approved = [e for e in entries if e[3]]
    default = max(approved, key=lambda e: e[2] or 0.0)
    ordered = [e for e in entries if e is not default] + [default]  # default last → :latest
    registered: list[Registered] = []
    for name, art, speed, ok in ordered:
        role = "default" if (name, art) == default[:2] else "candidate"
        # Records before signing: attaching them re-finalises the manifest.
        say(f"release records for {name}" + (" (short benchmark, profile)" if bench else ""))
        files, perf = records.write_records(art, name, root / "records" / name, bench=bench)
        art = attach_records(art, files, {"performance": perf})
        if sign_key is not None:
            say(f"signing {name} with key {signing.sign(art.path, sign_key)}")
        say(f"registering {name} ({role})")
        tag = register(art, labels={"variant": name, "role": role})
        registered.append(Registered(name, tag, speed, ok))
    return Release(
        tag=registered[-1].tag,
        artifact=art,  # the default, registered last, with its records
        report=report,
        versions=registered,
        summary_markdown=summary,
    )
