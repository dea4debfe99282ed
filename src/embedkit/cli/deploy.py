"""Deployment commands: Bentos, the image and its records, canary, rollback drill, pools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from embedkit.cli.common import (
    app,
    check_variants,
    err,
    one_line_errors,
    out,
    progress,
)
from embedkit.core.errors import InvalidInput


@app.command("build-bento")
@one_line_errors
def build_bento_cmd(
    model_tag: Annotated[str, typer.Option(help="Exact model tag (name:version).")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            callback=check_variants,
            help="cpu | gpu | batch; repeatable (default: cpu and gpu, the serving images).",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Build contexts, logs and Dockerfiles (default: build/bento)."),
    ] = None,
) -> None:
    """Build the CPU/GPU Bentos offline, pinned to one exact model version.

    Logs go to stderr; stdout ends with one Bento tag per line, in variant
    order (scripts/build-bento releases the model first when given no tag).
    """
    from embedkit.deploy import bento

    built = []
    with progress("build-bento") as step:
        for name in variant or list(bento.SERVING_VARIANTS):
            step(f"{name}: bentoml build")
            built.append(bento.build(name, model_tag, out_dir or bento.BUILD_ROOT))
    for b in built:
        err.print(f"{b.variant}: {b.tag} (Dockerfile: {b.dockerfile})", highlight=False)
        for warning in b.warnings:
            err.print(f"warning: {warning}", style="yellow", highlight=False)
    for b in built:  # last lines, machine-readable
        print(b.tag)


@app.command("bentofile")
@one_line_errors
def bentofile_cmd(
    variant: Annotated[str, typer.Option(help="cpu | gpu")] = "cpu",
) -> None:
    """Print the bentofile.yaml that `bentoml build` at the repo root uses (cpu), or the
    GPU one: `embedkit bentofile > bentofile.yaml` regenerates the committed file."""
    from embedkit.deploy import bento

    print(bento.render_bentofile(bento.bentofile(bento.get_variant(variant))), end="")


@app.command("lock")
@one_line_errors
def lock_cmd() -> None:
    """Re-resolve the hash-pinned locks (needs the package index): the CPU image's serving
    requirements (locks/serving-cpu.txt, from pyproject's pins), the batch image's
    (locks/batch-cpu.txt: those plus the `batch` extra) and the SBOM tool's."""
    from embedkit.deploy import bento, supply

    for variant in bento.VARIANTS.values():
        if variant.lock is not None:
            err.print(f"{bento.lock(variant)}: {variant.name} image", highlight=False)
    err.print(f"{supply.lock_sbom_tool()}: {supply.SBOM_TOOL}", highlight=False)


# --- the image supply chain: record (SBOM + digest), sign, pin by digest, verify ----------

image_app = typer.Typer(
    help="A built image's signed record, its digest in the overlays, the deploy-time check "
    "(docs/deployment.md, Supply chain).",
    no_args_is_help=True,
)
app.add_typer(image_app, name="image")
RecordArg = Annotated[
    Path, typer.Argument(help="Image record directory (`embedkit image record`).")
]
OverlaysOpt = Annotated[
    list[Path], typer.Option("--overlay", help="Kustomization directory; repeatable.")
]


@image_app.command("record")
@one_line_errors
def image_record_cmd(
    image: Annotated[str, typer.Argument(help="Local image reference (scripts/build-image).")],
    sign: Annotated[
        Path | None, typer.Option(help="Ed25519 private key (PEM) that signs the record.")
    ] = None,
    bento_tag: Annotated[str | None, typer.Option("--bento", help="The Bento it holds.")] = None,
    model: Annotated[str | None, typer.Option(help="The model tag it serves.")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Record directory (default: build/image/records/NAME-TAG)."),
    ] = None,
) -> None:
    """SBOM (cyclonedx-py inside the image + dpkg status) and digest of IMAGE, written as a
    record and signed; prints the record directory."""
    from embedkit.deploy import bento, supply

    dest = out_dir or supply.RECORDS / image.rsplit("/", 1)[-1].replace(":", "-")
    with progress("image record") as step:
        step("SBOM tool (locks/sbom-tool.txt, hash-checked)")
        tool = supply.install_sbom_tool()
        step(f"SBOM of {image}")
        sbom = supply.image_sbom(image, tool)
        variant = "cpu"
        if bento_tag:
            import bentoml

            labels = bentoml.bentos.get(bento_tag).info.labels
            model = model or labels.get("model")
            variant = labels.get("variant", variant)  # the batch image has its own lock
        record = supply.write_record(
            image,
            supply.inspect_image(image),
            sbom,
            dest,
            lock=bento.get_variant(variant).lock,
            bento=bento_tag,
            model=model,
        )
        if sign is not None:
            step("sign")
            supply.sign_record(dest, sign)
    err.print(
        f"{image}: {record.digest}, SBOM {record.sbom_components} components"
        + ("" if sign else " (unsigned: `embedkit image verify` will refuse it)"),
        highlight=False,
        soft_wrap=True,
    )
    print(dest)


@image_app.command("pin")
@one_line_errors
def image_pin_cmd(
    record: RecordArg,
    overlay: OverlaysOpt,
    name: Annotated[
        str | None, typer.Option(help="Registry repository (newName) to pull the digest from.")
    ] = None,
) -> None:
    """Write the record's digest into each overlay's kustomize `images:` (`digest:`)."""
    from embedkit.deploy import supply

    loaded = supply.ImageRecord.load(record)
    for kustomization in overlay:
        path = supply.pin(kustomization, loaded.digest, name)
        err.print(f"{path}: {loaded.digest}", highlight=False, soft_wrap=True)


@image_app.command("verify")
@one_line_errors
def image_verify_cmd(
    record: RecordArg,
    overlay: OverlaysOpt,
    trusted_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Trusted public key (PEM path or base64); default: settings.trusted_keys."
        ),
    ] = None,
) -> None:
    """The deploy gate, before `kubectl apply -k` / `podman kube play`: the record's signature
    under a trusted key, its SBOM unchanged, every image the overlays render == its digest."""
    from embedkit.deploy import supply
    from embedkit.model.signing import Trust

    keys = trusted_key or list(Trust.from_settings().trusted_keys)
    loaded = supply.verify_deploy(record, overlay, keys)
    err.print(
        f"verified: {', '.join(map(str, overlay))} run {loaded.digest} "
        f"(signed record {record}, SBOM {loaded.sbom_components} components)",
        highlight=False,
        soft_wrap=True,
    )


@app.command("canary")
@one_line_errors
def canary_cmd(
    stable: Annotated[
        str, typer.Option(help="URL of the stable service, e.g. http://127.0.0.1:3000.")
    ],
    candidate: Annotated[str, typer.Option(help="URL of the candidate, behind its own Service.")],
    pairs: Annotated[int, typer.Option(help="STS Benchmark test pairs sent to both.")] = 200,
    long: Annotated[int, typer.Option(help="Long documents (~256 tokens) sent to both.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Texts per request.")] = 16,
    max_p95_ratio: Annotated[
        float | None,
        typer.Option(
            help="Most candidate/stable p95 latency (default: 1 + p95_rise_max of "
            "config/perf-gate.yaml)."
        ),
    ] = None,
) -> None:
    """Compare a candidate server with the stable one before it takes user traffic: same
    texts, vectors judged by the candidate's class, errors and p95. Exit 0 = promote,
    1 = roll back (docs/deployment.md, Canary)."""
    from embedkit.deploy.canary import TextSet, canary_tables, run_canary

    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, not {batch_size}")
    result = run_canary(
        stable,
        candidate,
        texts=TextSet.default(pairs, long),
        batch_size=batch_size,
        max_p95_ratio=max_p95_ratio,
    )
    for part in canary_tables(result):
        out.print(part)
    if result.passed:
        out.print("[bold green]PROMOTE[/bold green]: the candidate may join the stable Service")
        return
    out.print("[bold red]ROLL BACK[/bold red]: " + "; ".join(result.reasons), soft_wrap=True)
    raise typer.Exit(1)


@app.command("rollback-drill")
@one_line_errors
def rollback_drill_cmd(
    stable: Annotated[str, typer.Option(help="The stable release, NAME:VERSION.")],
    candidate: Annotated[str, typer.Option(help="The candidate, another version of NAME.")],
    trusted_key: Annotated[
        Path, typer.Option(help="Public key both releases are signed with (the pods' ConfigMap).")
    ],
    workdir: Annotated[
        Path, typer.Option(help="Bentos, played manifests, the images record, the report.")
    ] = Path("build/rollback-drill"),
    reuse_image: Annotated[
        bool, typer.Option(help="Reuse the images a previous drill in WORKDIR built.")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="Write the report here (default WORKDIR/report.txt).")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds a pod may take to be ready.")] = 240,
) -> None:
    """Deploy a stable and a candidate release with `podman kube play` (overlays cpu and
    canary), run the canary check, roll back (`podman kube down` of the candidate) and check
    pod by pod that only the stable version answers. Exit 0 only if every step did what it
    should (docs/deployment.md, Rollback drill)."""
    from rich.table import Table

    from embedkit.deploy import drill as drills
    from embedkit.deploy.canary import canary_tables

    drills.check_tags(stable, candidate)
    if ready_timeout <= 0:
        raise InvalidInput(f"--ready-timeout must be positive, not {ready_timeout}")
    if not trusted_key.is_file():
        raise InvalidInput(f"--trusted-key: {trusted_key} is not a file")
    result = drills.run_drill(
        stable,
        candidate,
        trusted_key,
        workdir,
        reuse_image=reuse_image,
        ready_timeout_s=ready_timeout,
        progress=lambda what: err.print(f"[dim]… {what}[/dim]"),
    )
    screen = Console(record=True, width=120)
    screen.print(
        f"[bold]rollback drill[/bold] {result.started}: stable {stable}, candidate {candidate}\n"
        f"code {result.code['commit'] or '?'} (clean tree: {result.code['clean']}); "
        f"{result.machine}",
        highlight=False,
    )
    steps = Table(show_header=True, title_justify="left")
    for column in ("", "step", "s", "what happened"):
        steps.add_column(column, overflow="fold")
    for i, name in enumerate(drills.STEPS):
        done = result.steps[i] if i < len(result.steps) else None
        if done is None:
            steps.add_row("[dim]—[/dim]", name, "", "[dim]not run[/dim]")
            continue
        mark = "[green]ok[/green]" if done.ok else "[red]FAIL[/red]"
        steps.add_row(mark, name, f"{done.seconds:.0f}", done.detail)
    screen.print(steps)
    if result.canary is not None:
        for part in canary_tables(result.canary):
            screen.print(part)
    verdict = "[bold green]PASSED[/bold green]" if result.passed else "[bold red]FAILED[/bold red]"
    screen.print(f"{verdict} in {result.seconds:.0f} s", highlight=False)
    path = report or workdir / "report.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(screen.export_text())
    path.with_suffix(".json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    err.print(f"report: {path} (and {path.with_suffix('.json').name})")
    if not result.passed:
        raise typer.Exit(1)


# --- pools on Kubernetes (deploy/k8s): patches generated from a release's records -------------

pools_app = typer.Typer(
    help="Generate the deploy/k8s patches a release's records allow (docs/deployment.md, Pools).",
    no_args_is_help=True,
)
app.add_typer(pools_app, name="pools")
K8sOpt = Annotated[Path, typer.Option(help="The kustomize tree (deploy/k8s of the project).")]
ISA_OVERLAYS = ("cpu", "canary")


@pools_app.command("isa")
@one_line_errors
def pools_isa_cmd(
    target: Annotated[str, typer.Argument(help="Model tag or artifact dir the pool serves.")],
    overlay: Annotated[str, typer.Option(help="cpu (stable) or canary (the candidate).")] = "cpu",
    k8s: K8sOpt = Path("deploy/k8s"),
) -> None:
    """Write OVERLAY/isa-affinity.yaml: node affinity to the ISA level the served variant's
    verdict was measured on (`embedkit.dev/isa-level`), none for fp32."""
    from embedkit.deploy import pools
    from embedkit.model.artifact import resolve

    if overlay not in ISA_OVERLAYS:
        raise InvalidInput(f"--overlay is one of {', '.join(ISA_OVERLAYS)}, not {overlay!r}")
    artifact = resolve(target)
    patch = pools.isa_patch(artifact)
    path = pools.write_patch(
        patch, k8s / "overlays" / overlay / "isa-affinity.yaml", f"`embedkit pools isa {target}`"
    )
    level = pools.isa_level(artifact)
    err.print(f"{path}: " + (f"nodes labelled {pools.ISA_LABEL}={level}" if level else "any node"))


@pools_app.command("release")
@one_line_errors
def pools_release_cmd(
    level: Annotated[
        str, typer.Argument(help="The node pool's ISA level (`embedkit info` on one of its nodes).")
    ],
    k8s: K8sOpt = Path("deploy/k8s"),
) -> None:
    """Write jobs/release/isa-affinity.yaml: the release Job runs on nodes labelled
    `embedkit.dev/isa-level=LEVEL`, so its gate and default are that pool's."""
    from embedkit.deploy import pools

    patch = pools.release_job_patch(level)
    path = pools.write_patch(
        patch, k8s / "jobs" / "release" / "isa-affinity.yaml", f"`embedkit pools release {level}`"
    )
    err.print(f"{path}: the release runs on nodes labelled {pools.ISA_LABEL}={level}")


@pools_app.command("mixed")
@one_line_errors
def pools_mixed_cmd(
    target: Annotated[str, typer.Argument(help="Model tag or artifact dir both pools serve.")],
    gpu_check: Annotated[
        Path | None,
        typer.Option(help="gpu-check.json (default: the one recorded with the release)."),
    ] = None,
    k8s: K8sOpt = Path("deploy/k8s"),
) -> None:
    """Write overlays/mixed/parity-verdict.yaml if the GPU check measured both pools' vectors
    compatible for this model and precision; exit 1 with the reasons otherwise."""
    from embedkit.deploy import pools
    from embedkit.model.artifact import resolve

    artifact = resolve(target)
    verdict = pools.mixed_verdict(artifact, pools.load_gpu_check(artifact, gpu_check))
    if not verdict.allowed:
        raise InvalidInput(verdict.summary())
    path = pools.write_patch(
        pools.verdict_patch(verdict),
        k8s / "overlays" / "mixed" / "parity-verdict.yaml",
        f"`embedkit pools mixed {target}`",
    )
    err.print(f"{path}: {verdict.summary()}", highlight=False)
