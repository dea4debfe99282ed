"""Release commands: the release pipeline and the performance gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from embedkit.cli.common import (
    ModelOpt,
    app,
    err,
    one_line_errors,
    out,
    progress,
    progress_bar,
)
from embedkit.core.errors import InvalidInput


@app.command("release")
@one_line_errors
def release_cmd(
    model: ModelOpt = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where artifacts are built (default: artifacts_dir).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="At most this many STS sentences per genre in parity.")
    ] = None,
    variants: Annotated[
        bool,
        typer.Option(
            help="Also build fused/INT8 variants, gate them per segment, and make the "
            "fastest approved one the default (takes minutes)."
        ),
    ] = False,
    force: Annotated[
        list[str] | None,
        typer.Option(help="Register this variant even if the gate rejects it (recorded)."),
    ] = None,
    sign: Annotated[
        Path | None, typer.Option(help="Ed25519 private key (PEM) to sign the manifests with.")
    ] = None,
    bench: Annotated[
        bool,
        typer.Option(
            help="Store a short benchmark and profiler summary with each version "
            "(~10 s each); the runtime parameters are always stored."
        ),
    ] = True,
    override_perf_gate: Annotated[
        str | None,
        typer.Option(
            help="Release even if the performance gate against the previous :latest fails; "
            "the REASON goes into the release records."
        ),
    ] = None,
    perf_gate_config: Annotated[
        Path | None,
        typer.Option(help="Performance gate thresholds (default: config/perf-gate.yaml)."),
    ] = None,
    calibration_texts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Calibrate the int8/uint8 output-encoding ranges on at most this many STS "
            "sentences (default: all ~10.6k, ~30 s on 2 cores; fewer is quicker, coarser).",
        ),
    ] = None,
    variants_config: Annotated[
        Path | None,
        typer.Option(
            help="With --variants: YAML of the variants to build (presets: NAME: {kind, "
            "options}) and how much evaluation (evaluation:) and timing (timing:) each gets; "
            "default: the target CPU's candidates, every segment at full size.",
        ),
    ] = None,
    export_to: Annotated[
        Path | None,
        typer.Option(
            help="Also write the default version to DIR/NAME-VERSION.bentomodel (bentoml "
            "models export), for a build machine to import: a release Job on the serving "
            "nodes' ISA (deploy/k8s/jobs/release).",
        ),
    ] = None,
) -> None:
    """Export → validate → variants and gate (optional) → performance gate against the
    previous :latest → records → sign → register.

    Prints the default version's tag (each registered version goes to stderr). A
    performance regression registers nothing (exit 1) unless --override-perf-gate gives
    the reason."""
    from embedkit.model.recipe import find_recipe
    from embedkit.model.signing import load_private_key
    from embedkit.release import perfgate
    from embedkit.release.pipeline import VariantsConfig, load_variants_config, release

    if sign is not None:
        load_private_key(sign)  # fail before minutes of export, not after
    # Read (and checked) before minutes of export, as the key is.
    thresholds = perfgate.load_thresholds(perf_gate_config) if perf_gate_config else None
    if override_perf_gate is not None and not override_perf_gate.strip():
        raise InvalidInput("--override-perf-gate needs the reason (it goes into the records)")
    if variants_config is not None and not variants:
        raise InvalidInput("--variants-config applies to --variants; add --variants")
    candidates = load_variants_config(variants_config) if variants_config else VariantsConfig()
    if export_to is not None and export_to.exists() and not export_to.is_dir():
        raise InvalidInput(f"--export-to {export_to} is a file, not a folder")
    recipe = find_recipe(model)
    with progress(f"release {recipe.name}") as step:
        result = release(
            recipe,
            workdir=workdir,
            limit_per_segment=limit,
            variants=variants,
            presets=candidates.presets,
            force=force or (),
            sign_key=sign,
            step=step,
            bench=bench,
            candidate_options=candidates.candidate_options(),
            perf_thresholds=thresholds,
            override_perf_gate=override_perf_gate,
            calibration_texts=calibration_texts,
        )
    for version in result.versions:  # in registration order: the default last
        role = "default" if version.tag == result.tag else "candidate"
        state = "approved" if version.approved else "forced, not approved"
        speed = f", {version.throughput:.1f} texts/s" if version.throughput else ""
        line = f"  registered {version.name} ({role}, {state}{speed}): {version.tag}"
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    if result.summary_markdown:
        err.print(result.summary_markdown, markup=False, highlight=False)
    if export_to is not None:
        import bentoml

        export_to.mkdir(parents=True, exist_ok=True)
        archive = bentoml.models.export_model(
            result.tag, str(export_to / result.tag.replace(":", "-"))
        )
        err.print(f"  exported {result.tag}: {archive}", markup=False, highlight=False)
    print(result.tag)


@app.command()
@one_line_errors
def gate(
    baseline: Annotated[
        str, typer.Option(help="Baseline: model tag, artifact dir, runtime record or bench.json.")
    ],
    candidate: Annotated[
        str | None,
        typer.Option(help="Candidate tag or artifact dir (default: the baseline's artifact)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Candidate setting override KEY=VALUE (repeatable); "
            "EMBEDKIT_* variables apply too.",
        ),
    ] = None,
    short: Annotated[bool, typer.Option(help="The short run CI uses.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Thresholds file (default: config/perf-gate.yaml).")
    ] = None,
) -> None:
    """Fail (exit 1) if the candidate is slower or worse than the baseline, measured in this run."""
    from embedkit.core.settings import get_settings
    from embedkit.model.artifact import resolve
    from embedkit.release import perfgate
    from embedkit.release.measure import calls_for

    th = perfgate.load_thresholds(config) if config else perfgate.load_thresholds()
    if short:
        th = th.shortened()
    base = perfgate.load_baseline(baseline)
    overrides: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or key not in perfgate.RUNTIME_FIELDS:
            fields = ", ".join(perfgate.RUNTIME_FIELDS)
            raise InvalidInput(f"--set takes KEY=VALUE with KEY one of {fields}; got {item!r}")
        overrides[key] = value
    settings = perfgate.settings_from_record({"settings": overrides}, get_settings())
    art = resolve(candidate) if candidate else base.artifact
    changes = ", ".join(f"{k}={v}" for k, v in overrides.items())
    label = (candidate or "the baseline's artifact") + (f" with {changes}" if changes else "")
    cand = perfgate.Config(label, art, settings)
    sizes = set(th.throughput_batch_sizes) | set(th.latency_batch_sizes)
    total = sum(calls_for(th.texts, b, 2, rounds=th.rounds) for b in sizes)
    with progress_bar("gate") as update:
        calls = iter(range(1, total + 1))
        result = perfgate.run_gate(
            base, cand, th, on_call=lambda name: update(next(calls, total), total, name)
        )
    if report:
        report.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    out.print(result.markdown(), markup=False, highlight=False, soft_wrap=True)
    if not result.passed:
        raise typer.Exit(1)
