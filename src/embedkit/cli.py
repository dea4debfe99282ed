"""The `embedkit` command line: a thin face over the library.

Every command turns an :class:`EmbedkitError` (and file-system errors) into
one line on stderr and a non-zero exit; long steps show rich progress.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from embedkit.core.errors import EmbedkitError, InvalidInput

if TYPE_CHECKING:
    from rich.table import Table

    from embedkit.bench.canary import CanaryResult

app = typer.Typer(
    name="embedkit",
    help="Export, verify, release and serve sentence-transformers models on ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Map our errors (and OS errors) to a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmbedkitError as exc:
            err.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            err.print(
                f"error:{where}: {exc.strerror or exc}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner whose text follows the pipeline's steps (stderr, so stdout stays clean)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(title)

        def step(message: str) -> None:
            bar.update(task, description=f"{title}: {message}")
            err.print(f"  · {message}", highlight=False)

        yield step


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Recipe name, recipe file, model directory or hub id."),
]


@app.command("export")
@one_line_errors
def export_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="New artifact directory.")],
    model: ModelOpt = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the recipe's).")] = None,
) -> None:
    """Export a sentence-transformers model to a pooled ONNX artifact."""
    from embedkit.model.export import export
    from embedkit.model.recipe import find_recipe

    recipe = find_recipe(model)
    with progress(f"export {recipe.name}") as step:
        artifact = export(recipe, output, opset=opset, step=step)
    out.print(f"exported {artifact.manifest.name} → {artifact.path}", highlight=False)


@app.command()
@one_line_errors
def validate(
    artifact: Annotated[str, typer.Argument(help="Artifact directory or model tag.")],
    reference: Annotated[
        str | None,
        typer.Option(help="PyTorch reference (recipe/dir); default: the artifact's recipe."),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    limit: Annotated[
        int | None, typer.Option(help="At most this many STS sentences per genre (quick run).")
    ] = None,
) -> None:
    """Check operators, shapes, batch invariance and parity; exit 1 on failure."""
    from embedkit.model.artifact import resolve
    from embedkit.model.recipe import find_recipe
    from embedkit.quality import contract

    art = resolve(artifact)
    recipe = find_recipe(reference or art.manifest.name)
    reference_dir, _ = recipe.source.resolve()
    with progress(f"validate {art.manifest.name}") as step:
        result = contract.validate(
            art, reference_dir=reference_dir, limit_per_segment=limit, step=step
        )
    if report:
        report.write_text(json.dumps(result, indent=2, default=str) + "\n")
    _print_contract(result)
    if not result["passed"]:
        raise typer.Exit(1)


def _print_contract(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"contract: {result['name']} ({result['quantization']})")
    for col in ("check / segment", "n", "min cos", "max |Δ|", "result"):
        table.add_column(col)
    for key in ("operators", "shapes", "batch_invariance"):
        section = result.get(key)
        if section:
            table.add_row(key, "", "", "", "pass" if section["passed"] else "FAIL")
    rows = [
        *((f"parity {n}", seg) for n, seg in result.get("parity", {}).get("segments", {}).items()),
        *((f"prompt {n}", seg) for n, seg in result.get("prompts", {}).get("prompts", {}).items()),
    ]
    for label, seg in rows:
        table.add_row(
            label,
            str(seg["count"]),
            f"{seg['min_cosine']:.7f}",
            f"{seg['max_abs_diff']:.2e}",
            "pass" if seg["passed"] else "FAIL",
        )
    out.print(table)
    gpu = result.get("operators", {}).get("gpu_unsupported_ops", {})
    for provider, ops in gpu.items():
        found = "all ops implemented" if not ops else "not implemented: " + ", ".join(ops)
        out.print(f"{provider}: {found}")
    out.print("PASSED" if result.get("passed") else "FAILED", style="bold")


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
) -> None:
    """Export → validate → variants and gate (optional) → performance gate against the
    previous :latest → records → sign → register.

    Prints the default version's tag (each registered version goes to stderr). A
    performance regression registers nothing (exit 1) unless --override-perf-gate gives
    the reason."""
    from embedkit.bench import perfgate
    from embedkit.model.recipe import find_recipe
    from embedkit.model.signing import load_private_key
    from embedkit.release import VariantsConfig, load_variants_config, release

    if sign is not None:
        load_private_key(sign)  # fail before minutes of export, not after
    # Read (and checked) before minutes of export, as the key is.
    thresholds = perfgate.load_thresholds(perf_gate_config) if perf_gate_config else None
    if override_perf_gate is not None and not override_perf_gate.strip():
        raise InvalidInput("--override-perf-gate needs the reason (it goes into the records)")
    if variants_config is not None and not variants:
        raise InvalidInput("--variants-config applies to --variants; add --variants")
    candidates = load_variants_config(variants_config) if variants_config else VariantsConfig()
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
    print(result.tag)


@app.command()
@one_line_errors
def optimize(
    parent: Annotated[str, typer.Argument(help="fp32 artifact directory or model tag.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New artifact directory.")],
) -> None:
    """Fused FP32 variant (ORT transformer optimiser: attention / LayerNorm / GELU fusion)."""
    from embedkit.model.artifact import resolve
    from embedkit.variants.quantize import build_variant

    with progress("optimize"):
        art = build_variant(resolve(parent), "fused-fp32", output)
    out.print(f"fused-fp32 → {art.path}", highlight=False)


@app.command()
@one_line_errors
def quantize(
    parent: Annotated[str, typer.Argument(help="fp32 artifact directory or model tag.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New artifact directory.")],
    mode: Annotated[
        str, typer.Option(help="dynamic-int8 | static-int8 | fp16 (or a preset name)")
    ] = "dynamic-int8",
    weight_type: Annotated[str | None, typer.Option(help="s8 | u8 (INT8 modes)")] = None,
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-tensor")] = None,
    reduce_range: Annotated[bool | None, typer.Option("--reduce-range/--full-range")] = None,
    method: Annotated[
        str | None, typer.Option(help="static calibration: minmax | entropy | percentile")
    ] = None,
    calibration_size: Annotated[
        int | None, typer.Option(help="static: calibration sentences")
    ] = None,
) -> None:
    """Quantised variant (dynamic/static INT8, FP16); gate it with `embedkit evaluate`."""
    from embedkit.model.artifact import resolve
    from embedkit.variants.quantize import build_variant, candidate_presets

    presets = candidate_presets()
    options: dict[str, Any] = {}
    if mode in presets:
        options = dict(presets[mode])
        mode = options.pop("kind")
    given = {
        "weight_type": weight_type,
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "method": method,
        "size": calibration_size,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    with progress(f"quantize {mode}"):
        art = build_variant(resolve(parent), mode, output, **options)
    out.print(f"{mode} {art.manifest.quantization.settings} → {art.path}", highlight=False)


@app.command()
@one_line_errors
def evaluate(
    variant: Annotated[str, typer.Argument(help="Variant artifact directory or model tag.")],
    fp32: Annotated[str, typer.Option(help="The fp32 artifact it derives from (dir or tag).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where quality.{json,md,png} go.")] = Path(
        "quality-report"
    ),
    max_pairs: Annotated[int | None, typer.Option(help="Subsample STS pairs (quick run).")] = None,
    lang_pairs: Annotated[int | None, typer.Option(help="Subsample pairs per language.")] = None,
    languages: Annotated[
        list[str] | None,
        typer.Option("--language", help="Only this language's segment (repeatable; default all)."),
    ] = None,
    retrieval: Annotated[
        bool, typer.Option(help="Also score retrieval on SciFact train, if present (minutes).")
    ] = True,
    retrieval_docs: Annotated[
        int | None, typer.Option(help="Bound the retrieval corpus (quick run).")
    ] = None,
    retrieval_queries: Annotated[
        int | None, typer.Option(help="Bound the retrieval queries (quick run).")
    ] = None,
) -> None:
    """Per-segment quality report (genre, file, length, language, retrieval) and the gate's
    class; exits 1 when the variant is rejected."""
    from embedkit.core.settings import get_settings
    from embedkit.model.artifact import resolve
    from embedkit.quality.evaluate import evaluate as evaluate_variant
    from embedkit.quality.gate import gate
    from embedkit.quality.report import write_report
    from embedkit.quality.segments import LANGUAGES

    with progress("evaluate"):
        report = evaluate_variant(
            resolve(variant),
            fp32=resolve(fp32),
            max_pairs=max_pairs,
            lang_pairs=lang_pairs,
            languages=tuple(languages or LANGUAGES),
            retrieval=retrieval,
            retrieval_docs=retrieval_docs,
            retrieval_queries=retrieval_queries,
            cache_dir=get_settings().eval_cache_dir,
        )
    verdict = gate(report)
    write_report(report, out_dir, verdict)
    out.print(verdict.summary(), markup=False, highlight=False)
    out.print(f"report: {out_dir}/quality.md", highlight=False)
    if verdict.compatibility == "rejected":
        raise typer.Exit(1)


@app.command("chunk-retrieval")
@one_line_errors
def chunk_retrieval_cmd(
    artifact: Annotated[
        str | None,
        typer.Argument(help="Artifact dir or tag (default: artifacts/bench-fp32)."),
    ] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(help="MAX_TOKENS:OVERLAP of a chunked index (repeatable).", metavar="N:M"),
    ] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Bound the corpus (judged documents always kept).", min=1)
    ] = None,
    max_queries: Annotated[int | None, typer.Option(help="Bound the queries.", min=1)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """SciFact retrieval with long documents chunked (mean) vs truncated; prints markdown."""
    import datetime
    import subprocess

    from embedkit.bench.inprocess import default_artifact
    from embedkit.bench.roofline import machine
    from embedkit.quality import chunked_retrieval
    from embedkit.quality.retrieval import load_beir
    from embedkit.runtime.engine import Engine

    windows = [chunked_retrieval.parse_window(w) for w in window or []]
    commit = subprocess.run(  # the code that runs, even if HEAD moves meanwhile
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with progress("chunk-retrieval") as step:
        data = load_beir(max_docs=max_docs, max_queries=max_queries)
        engine = Engine.load(default_artifact(artifact))
        report = chunked_retrieval.run(
            engine, data, windows or chunked_retrieval.DEFAULT_WINDOWS, step=step
        )
    if json_out:
        json_out.write_text(report.model_dump_json(indent=2))
    host = machine()
    out.print(
        f"`{_invocation()}` — started {started}, commit {commit or '?'}, {host['cpu']} "
        f"({host['cores']} cores, {host['isa']['level']}); model {engine.manifest.name} "
        f"({engine.artifact.tag or engine.artifact.path.name})\n\n"
        f"{report.dataset}: {report.documents:,} documents ({report.long_documents:,} over "
        f"{report.max_length} tokens), {report.queries} queries\n\n"
        + chunked_retrieval.markdown_table(report),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@one_line_errors
def keygen(
    private: Annotated[Path, typer.Option(help="Where to write the private key (PEM, 0600).")],
    public: Annotated[Path, typer.Option(help="Where to write the public key (PEM).")],
) -> None:
    """Create an Ed25519 key pair for signing releases."""
    from embedkit.model.signing import generate_keypair

    if private.exists():
        raise InvalidInput(f"{private} exists; refusing to overwrite a private key")
    out.print(f"key id {generate_keypair(private, public)}", highlight=False)


@app.command("verify")
@one_line_errors
def verify_cmd(
    target: Annotated[str, typer.Argument(help="Model tag or artifact directory.")],
    trusted_key: Annotated[
        list[str],
        typer.Option("--trusted-key", help="Public key (PEM path or base64); repeatable."),
    ],
) -> None:
    """Verify an artifact's checksums and its signature against trusted keys."""
    from embedkit.model.artifact import resolve
    from embedkit.model.signing import Trust

    art = resolve(target, trust=Trust(True, tuple(trusted_key)))
    out.print(f"ok: {art.tag or art.path} verified and signed by a trusted key", highlight=False)


def _read_lines(source: Path | None) -> Iterator[str]:
    if source is None or str(source) == "-":
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    if source.is_dir():
        raise InvalidInput(f"{source} is a directory, not a text file")
    with open(source, encoding="utf-8") as fh:
        for line in fh:
            yield line.rstrip("\r\n")


@app.command()
@one_line_errors
def encode(
    model: Annotated[str, typer.Option("--model", "-m", help="Model tag or artifact directory.")],
    input: Annotated[
        Path | None, typer.Argument(help="Text file, one text per line (default: stdin).")
    ] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="Default: the model's.")
    ] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka truncation.")] = None,
    truncate: Annotated[bool, typer.Option(help="Truncate texts over the token limit.")] = True,
    chunk: Annotated[int, typer.Option(help="Texts per engine call.", min=1)] = 256,
) -> None:
    """Embed texts (one per line) and print one JSON array per line, in input order."""
    from embedkit.runtime.engine import Engine

    engine = Engine.load(model)
    buffer: list[str] = []
    offset = 0

    def flush() -> None:
        nonlocal offset
        if not buffer:
            return
        try:
            vectors = engine.encode(
                buffer, normalize=normalize, dimensions=dimensions, truncate=truncate
            )
        except EmbedkitError as exc:
            # The engine names items of this chunk (`input[i]`); the user thinks in lines.
            exc.message = re.sub(
                r"input\[(\d+)\]", lambda m: f"line {offset + int(m.group(1)) + 1}", exc.message
            )
            raise
        lines = (json.dumps(v) for v in vectors.tolist())
        sys.stdout.write("\n".join(lines) + "\n")
        offset += len(buffer)
        buffer.clear()

    for line in _read_lines(input):
        buffer.append(line)
        if len(buffer) >= chunk:
            flush()
    flush()
    if offset == 0:
        raise InvalidInput("no input texts (expected one text per line)")


@app.command()
@one_line_errors
def config(
    markdown: Annotated[
        bool, typer.Option(help="Print the reference table (docs/configuration.md).")
    ] = False,
) -> None:
    """Show the effective settings (from EMBEDKIT_* variables), or document them all."""
    from embedkit.core.settings import Settings, get_settings

    if not markdown:
        out.print_json(get_settings().model_dump_json())
        return
    rows = [
        "# Configuration",
        "",
        "Every field of `embedkit.core.settings.Settings` is read from `EMBEDKIT_<FIELD>` "
        "(lists as JSON). Generated by `embedkit config --markdown`.",
        "",
        "| variable | default | what and why |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        # Defaults that depend on the machine or the install location, written as words.
        default = {
            "intra_op_threads": "cores this process may use",
            "data_dir": "embedkit/data/evaldata (in the package)",
        }.get(name, default)
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `EMBEDKIT_{name.upper()}` | `{default}` | {text} |")
    print("\n".join(rows))


@app.command()
@one_line_errors
def info(target: Annotated[str, typer.Argument(help="Model tag or artifact directory.")]) -> None:
    """Print an artifact's manifest (after verifying its checksums)."""
    from embedkit.model.artifact import manifest_json, resolve

    art = resolve(target)
    out.print_json(manifest_json(art))
    if art.manifest.records:
        out.print("records:", highlight=False)
        for name, rel in art.manifest.records.items():
            out.print(f"  {name}: {art.path / rel}", highlight=False)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"{option} must list positive integers, got {text!r}")
    return values


def _named_targets(items: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=TAG_OR_DIR`` (or a bare tag/dir, named after itself) → {name: target}."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, target = item.partition("=")
        if not sep:
            name, target = Path(item.rstrip("/")).name or item, item
        if not name or not target:
            raise InvalidInput(f"{option} takes NAME=TAG_OR_DIR, got {item!r}")
        out[name] = target
    return out


@contextmanager
def _bar(title: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar with a total (stderr); the callback takes (done, total, description)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(title, total=None)

        def update(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{title}: {description}")

        yield update


@app.command()
@one_line_errors
def bench(
    artifact: Annotated[
        str | None,
        typer.Argument(help="Model tag or artifact directory (default: the served model)."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where bench.{json,md} and PNGs go.")
    ] = Path("bench-report"),
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Also run the engine on this variant: NAME=TAG_OR_DIR (repeatable)."),
    ] = None,
    registered: Annotated[
        bool, typer.Option(help="Add every registered variant of the model from the BentoML store.")
    ] = True,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    max_texts: Annotated[
        int, typer.Option(help="STS sentences in the short corpus.", min=8)
    ] = 1024,
    long_texts: Annotated[
        int, typer.Option(help="Texts in the long corpus (0: skip).", min=0)
    ] = 128,
    torch: Annotated[bool, typer.Option(help="Include PyTorch (needs the export extra).")] = True,
    http: Annotated[
        bool, typer.Option(help="Also start a server and sweep HTTP concurrency.")
    ] = False,
    url: Annotated[str | None, typer.Option(help="Sweep this running server instead.")] = None,
    http_seconds: Annotated[float, typer.Option(help="Seconds per HTTP phase.", min=1)] = 10.0,
    concurrency: Annotated[str, typer.Option(help="HTTP concurrencies.")] = "1,4,16,64",
) -> None:
    """PyTorch, naive ORT and the engine (+ variants) side by side; JSON, markdown and plots."""
    from embedkit.bench.inprocess import registered_variants
    from embedkit.bench.report import bench_and_report
    from embedkit.core.settings import get_settings
    from embedkit.model.artifact import resolve

    art = resolve(artifact or get_settings().model)
    variants = _named_targets(variant, "--variant")
    if registered:
        for name, tag in registered_variants(art.manifest.name, exclude_tag=art.tag).items():
            variants.setdefault(name, tag)
    command = "embedkit bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    with _bar("bench") as update:
        paths = bench_and_report(
            art.tag or art.path,
            out_dir,
            variants=dict(variants),
            http=http,
            url=url,
            http_seconds=http_seconds,
            concurrencies=tuple(_ints(concurrency, "--concurrency")),
            batch_sizes=_ints(batch_sizes, "--batch-sizes"),
            max_texts=max_texts,
            long_texts=long_texts,
            include_torch=torch,
            command=command.strip(),
            on_progress=update,
        )
    for kind, path in paths.items():
        out.print(f"{kind}: {path}", highlight=False)


@app.command("profile")
@one_line_errors
def profile_cmd(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="NAME=TAG_OR_DIR or TAG_OR_DIR (default: the served model)."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Traces, profile.json and profile.md.")
    ] = Path("profile-report"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    batches: Annotated[int, typer.Option(help="Batches profiled per batch size.", min=1)] = 8,
    top: Annotated[int, typer.Option(help="Operators kept per profile.", min=1)] = 10,
) -> None:
    """ORT profiling: top operators by share of kernel time, per variant and batch size."""
    from embedkit.bench.profiling import markdown, profile
    from embedkit.core.settings import get_settings

    named = _named_targets(targets, "TARGET") or {"default": get_settings().model}
    sizes = _ints(batch_sizes, "--batch-sizes")
    with _bar("profile") as update:
        total = len(named) * len(sizes)
        steps = iter(range(1, total + 1))
        report = profile(
            named,
            out_dir,
            batch_sizes=sizes,
            max_batches=batches,
            top=top,
            on_step=lambda what: update(next(steps), total, what),
        )
    out.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {out_dir}/profile.md (raw traces beside it)", highlight=False)


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
    from embedkit.bench import perfgate
    from embedkit.bench.inprocess import calls_for
    from embedkit.core.settings import get_settings
    from embedkit.model.artifact import resolve

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
    with _bar("gate") as update:
        calls = iter(range(1, total + 1))
        result = perfgate.run_gate(
            base, cand, th, on_call=lambda name: update(next(calls, total), total, name)
        )
    if report:
        report.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    out.print(result.markdown(), markup=False, highlight=False, soft_wrap=True)
    if not result.passed:
        raise typer.Exit(1)


# --- benchmarks, soak and Bentos (scripts/bench-engine, bench-http, soak, build-bento) --------


def _env_pairs(items: list[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` items → {key: value}."""
    pairs: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def script_main(name: str) -> None:
    """Run command ``name`` as ``scripts/NAME`` (the thin wrappers in scripts/)."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    command.main(sys.argv[1:], prog_name=f"scripts/{name}")


def _invocation() -> str:
    """This run's command line for a report: `embedkit CMD …` or `scripts/NAME …`."""
    import shlex

    name = Path(sys.argv[0]).name
    return shlex.join(["embedkit" if name == "embedkit" else f"scripts/{name}", *sys.argv[1:]])


EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        metavar="KEY=VALUE",
        help="Extra environment for the server it starts (repeatable).",
    ),
]
ArtifactOpt = Annotated[
    str | None,
    typer.Option(
        help="Artifact dir or tag (default: artifacts/bench-fp32, exported on first use)."
    ),
]


@app.command("bench-engine")
@one_line_errors
def bench_engine_cmd(
    artifact: Annotated[
        str | None,
        typer.Argument(
            envvar="EMBEDKIT_BENCH_ARTIFACT",
            show_envvar=True,
            help="Artifact dir or tag (default: artifacts/bench-fp32, exported on first use).",
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    max_texts: Annotated[int, typer.Option(help="Texts per batch size.", min=1)] = 1024,
    seed: Annotated[int, typer.Option(help="Shuffle seed of the STS stream.")] = 0,
    torch: Annotated[bool, typer.Option(help="Include the PyTorch baseline.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """PyTorch vs naive ORT vs the engine in-process, on shuffled STS sentences.

    Systems run interleaved, batch by batch; session and batching settings
    come from EMBEDKIT_* variables like everywhere else.
    """
    from embedkit.bench.inprocess import default_artifact, run_inprocess_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run_inprocess_bench(
            default_artifact(artifact),
            _ints(batch_sizes, "--batch-sizes"),
            max_texts,
            seed=seed,
            include_torch=torch,
        )
    except EmbedkitError as exc:  # exit 2, as scripts/bench-engine always has
        err.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@app.command("bench-http")
@one_line_errors
def bench_http_cmd(
    url: Annotated[
        str | None, typer.Option(help="Benchmark a running server instead of starting one.")
    ] = None,
    artifact: ArtifactOpt = None,
    seconds: Annotated[float, typer.Option(help="Seconds per phase.")] = 20.0,
    concurrency: Annotated[int, typer.Option(help="Clients of the single-text phases.")] = 16,
    bulk_concurrency: Annotated[int, typer.Option(help="Clients of the 32-text phase.")] = 4,
    api_key: Annotated[str | None, typer.Option(help="Bearer token to send.")] = None,
    env: EnvOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here.")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the started server's BENTOML_HOME and log.")
    ] = False,
) -> None:
    """HTTP routes (closed loop) beside the in-process engine on the same texts.

    Single texts to /embed/query and /v1/embeddings at --concurrency, 32-text
    requests to /embed at --bulk-concurrency, then the engine in-process; prints
    HTTP bulk texts/s over in-process. Speed is noisy on shared machines:
    compare ratios, and rerun.
    """
    from embedkit.bench.http import http_vs_engine
    from embedkit.bench.inprocess import default_artifact

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = _env_pairs(env, "--env")
    results = http_vs_engine(
        default_artifact(artifact),
        url=url,
        env_extra=extra,
        seconds=seconds,
        concurrency=concurrency,
        bulk_concurrency=bulk_concurrency,
        api_key=api_key,
        keep=keep,
        echo=lambda line: print(line, flush=True),
    )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


@app.command("bench-stages")
@one_line_errors
def bench_stages_cmd(
    artifact: ArtifactOpt = None,
    arm: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LABEL[:KEY=VALUE,...]",
            help="A server configuration to profile (repeatable; default: the two topologies).",
        ),
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,16",
    seconds: Annotated[float, typer.Option(help="Seconds per phase.", min=2)] = 10.0,
    rate: Annotated[int, typer.Option(help="py-spy samples per second.", min=10)] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Where a served single-text request's CPU goes: core-ms per request, per process and
    stage (py-spy over the server's process tree), beside the in-process engine."""
    from rich.table import Table

    from embedkit.bench.inprocess import default_artifact
    from embedkit.bench.stages import stages_by_arm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arms: dict[str, dict[str, str]] = {}
    for spec in arm or ["split:EMBEDKIT_TOPOLOGY=split", "single:EMBEDKIT_TOPOLOGY=single"]:
        label, _, pairs = spec.partition(":")
        arms[label] = _env_pairs([p for p in pairs.split(",") if p], "--arm")
    clients = _ints(concurrency, "--concurrency")
    result = stages_by_arm(
        default_artifact(artifact),
        arms,
        concurrencies=clients,
        seconds=seconds,
        rate=rate,
        echo=lambda line: print(line, flush=True),
    )
    table = Table(title="core-ms per request (single text, /v1/embeddings)")
    for name in ("process", "stage", *result["labels"]):
        table.add_column(name)
    for row in result["table"]:
        table.add_row(*row)
    out.print(table)
    result["command"] = _invocation()
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command("bench-encodings")
@one_line_errors
def bench_encodings_cmd(
    artifact: ArtifactOpt = None,
    max_docs: Annotated[int | None, typer.Option(help="Bound the corpus (quick run).")] = None,
    max_queries: Annotated[int | None, typer.Option(help="Bound the queries (quick run).")] = None,
    rescore_multiplier: Annotated[
        int, typer.Option(help="Rescoring keeps this many × 100 first-stage candidates.", min=1)
    ] = 4,
    calibration_texts: Annotated[
        int | None,
        typer.Option(help="Calibration sentences when the manifest has no ranges (all: None)."),
    ] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write the tables here (docs/encodings.md).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Bytes per vector and SciFact-train retrieval (nDCG@10, recall@100) for each output
    encoding (float32, int8, uint8, binary, ubinary), with and without rescoring."""
    from embedkit.bench import encodings
    from embedkit.bench.inprocess import default_artifact
    from embedkit.model.artifact import resolve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with progress("bench-encodings") as say:
        result = encodings.run(
            resolve(default_artifact(artifact)),
            max_docs=max_docs,
            max_queries=max_queries,
            rescore_multiplier=rescore_multiplier,
            calibration_texts=calibration_texts,
            say=say,
        )
    text = encodings.markdown(result, _invocation())
    out.print(text, markup=False, highlight=False, soft_wrap=True)
    if markdown_out:
        markdown_out.write_text(text)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command("bench-peers")
@one_line_errors
def bench_peers_cmd(
    rounds: Annotated[int, typer.Option(help="Rounds over every workload.", min=1)] = 2,
    seconds: Annotated[int, typer.Option(help="Measured seconds per phase.", min=1)] = 10,
    workloads: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of single-c1, single-c16, single-c64, batch32-c4, "
            "long64-c1 (default: all)."
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running embedkit server instead of starting one.")
    ] = None,
    artifact: ArtifactOpt = None,
    env: EnvOpt = None,
    min_cosine: Annotated[
        float, typer.Option(help="Fail when the servers' vectors agree less than this.")
    ] = 0.999,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where peers.json and peers.md go.")
    ] = Path("docs/benchmarks"),
    note: Annotated[
        str, typer.Option(help="A line placed at the top of peers.md (e.g. 'shakedown run').")
    ] = "",
) -> None:
    """embedkit and Infinity side by side in one run, alternating, with wrk.

    Builds Infinity in its own venv (build/peers/infinity, once; ~2 min), exports the
    same model for it, starts both servers, checks their vectors agree, runs every
    workload against each in turn and, each round, the engine in-process on the same texts.
    Prints the table and writes OUT/peers.json and OUT/peers.md.
    """
    from rich.table import Table

    from embedkit.bench import peers

    chosen = peers.parse_workloads(workloads)  # bad names fail before anything is built
    extra = _env_pairs(env, "--env")
    say = lambda line: err.print(f"  · {line}", markup=False, highlight=False)  # noqa: E731
    with _bar("bench-peers") as update:
        report = peers.run_peers(
            artifact,
            workloads=chosen,
            rounds=rounds,
            seconds=seconds,
            url=url,
            env_extra=extra,
            min_cosine=min_cosine,
            say=say,
            on_phase=update,
        )
    table = Table(title=f"embedkit vs Infinity ({report['machine']['cpu']}, {report['date']})")
    for column in peers.TABLE_COLUMNS:
        table.add_column(column)
    for row in peers.table_rows(report["summary"]):
        table.add_row(*row)
    # Nine columns: a pipe or a narrow terminal would squeeze them into unreadable stubs.
    (out if out.width >= 170 else Console(width=170)).print(table)
    out.print("last three columns: embedkit / Infinity", highlight=False)
    p = report["parity"]
    out.print(f"parity: min cosine {p['min_cosine']:.6f} over {p['texts']} texts", highlight=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "peers.md").write_text(peers.markdown(report, command=_invocation(), note=note))
    out.print(f"report: {out_dir}/peers.md, {out_dir}/peers.json", highlight=False)


@app.command("soak")
@one_line_errors
def soak_cmd(
    seconds: Annotated[float, typer.Option(help="Length of the soak.")] = 60.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up before it.")] = 20.0,
    concurrency: Annotated[int, typer.Option(help="Closed-loop clients.")] = 4,
    max_requests: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    short: Annotated[int, typer.Option(help="Distinct short texts in the pool.")] = 1500,
    long: Annotated[int, typer.Option(help="Distinct long (truncated) texts.")] = 60,
    url: Annotated[
        str | None, typer.Option(help="An already running server (loopback); else start one.")
    ] = None,
    pid: Annotated[int | None, typer.Option(help="PID of that server (for its RSS).")] = None,
    artifact: ArtifactOpt = None,
    env: EnvOpt = None,
    model: Annotated[str, typer.Option(help="Served model name.")] = "all-minilm-l6-v2",
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write OUT.json and OUT.md.")
    ] = None,
) -> None:
    """A sustained mixed workload, every vector checked, server memory watched.

    Loopback only and bounded (--seconds, --max-requests). Exits 1 on a wrong
    vector, a status other than 200/429/503 or server memory that does not level
    off: RSS growth of 5 % or more after the soak's first quarter (docs/soak.md).
    """
    import signal

    from embedkit.bench import loadtest
    from embedkit.bench.soak import SoakPlan, passed, run_soak

    def interrupted(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through run_soak: its server never outlives us

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = SoakPlan(seconds, warmup_seconds, concurrency, max_requests, short, long, model)
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        report = run_soak(
            artifact,
            plan,
            url=url,
            pid=pid,
            env_extra=_env_pairs(env, "--env"),
            command=_invocation(),
            say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    md = loadtest.markdown(report)
    print(md)
    if out_path:
        loadtest.dump(report, out_path.with_suffix(".json"))
        out_path.with_suffix(".md").write_text(md)
    if not passed(report):
        raise typer.Exit(1)


def _check_variants(values: list[str] | None) -> list[str] | None:
    from embedkit.bento import VARIANTS

    for value in values or []:
        if value not in VARIANTS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(sorted(VARIANTS))}")
    return values


@app.command("build-bento")
@one_line_errors
def build_bento_cmd(
    model_tag: Annotated[str, typer.Option(help="Exact model tag (name:version).")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            callback=_check_variants, help="cpu | gpu; repeatable (default: every variant)."
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
    from embedkit import bento

    built = []
    with progress("build-bento") as step:
        for name in variant or list(bento.VARIANTS):
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
    from embedkit import bento

    print(bento.render_bentofile(bento.bentofile(bento.get_variant(variant))), end="")


@app.command("lock")
@one_line_errors
def lock_cmd() -> None:
    """Re-resolve the hash-pinned locks (needs the package index): the CPU image's serving
    requirements (locks/serving-cpu.txt, from pyproject's pins) and the SBOM tool's."""
    from embedkit import bento, supply

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
    from embedkit import bento, supply

    dest = out_dir or supply.RECORDS / image.rsplit("/", 1)[-1].replace(":", "-")
    with progress("image record") as step:
        step("SBOM tool (locks/sbom-tool.txt, hash-checked)")
        tool = supply.install_sbom_tool()
        step(f"SBOM of {image}")
        sbom = supply.image_sbom(image, tool)
        if bento_tag and model is None:
            import bentoml

            model = bentoml.bentos.get(bento_tag).info.labels.get("model")
        record = supply.write_record(
            image,
            supply.inspect_image(image),
            sbom,
            dest,
            lock=bento.VARIANTS["cpu"].lock,
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
    from embedkit import supply

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
    from embedkit import supply
    from embedkit.model.signing import Trust

    keys = trusted_key or list(Trust.from_settings().trusted_keys)
    loaded = supply.verify_deploy(record, overlay, keys)
    err.print(
        f"verified: {', '.join(map(str, overlay))} run {loaded.digest} "
        f"(signed record {record}, SBOM {loaded.sbom_components} components)",
        highlight=False,
        soft_wrap=True,
    )


class VectorFormat(StrEnum):
    npy = "npy"
    jsonl = "jsonl"


class BadLine(StrEnum):
    skip = "skip"
    stop = "stop"


@app.command("reembed")
@one_line_errors
def reembed_cmd(
    input: Annotated[Path, typer.Argument(help="JSONL corpus, one document a line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")],
    url: Annotated[str, typer.Option(help="The embedkit service.")] = "http://127.0.0.1:3000",
    id_field: Annotated[str, typer.Option(help="The documents' id field.")] = "id",
    text_field: Annotated[str, typer.Option(help="The documents' text field.")] = "text",
    chunk_size: Annotated[
        int, typer.Option(help="Lines per request and per checkpoint.", min=1)
    ] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.", min=1)] = 2,
    format: Annotated[
        VectorFormat, typer.Option(help="npy: float32 shards; jsonl: {id, embedding} lines.")
    ] = VectorFormat.npy,
    on_bad_line: Annotated[
        BadLine, typer.Option(help="skip: to rejects.jsonl, named on stderr; stop: exit 1.")
    ] = BadLine.skip,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="EMBEDKIT_REEMBED_API_KEY", help="Bearer token to send."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 120.0,
    max_wait: Annotated[
        float, typer.Option(help="Seconds of 429/503 retries per chunk before giving up.")
    ] = 600.0,
    model: Annotated[
        str | None,
        typer.Option(help="Which served model (GET /v1/models ids); default: the first."),
    ] = None,
) -> None:
    """Embed a JSONL corpus through a running service's bulk route, resumably.

    Vectors are written in checkpointed chunks with the served identity of the model
    that made them; rerun the same command after a crash to resume (docs/reembed.md).
    Prints a JSON summary on stdout.
    """
    from embedkit import reembed

    options = reembed.Options(
        url=url,
        input=input,
        out=out,
        id_field=id_field,
        text_field=text_field,
        chunk_size=chunk_size,
        concurrency=concurrency,
        format=format.value,
        on_bad_line=on_bad_line.value,
        api_key=api_key,
        timeout_s=timeout,
        max_wait_s=max_wait,
        model=model,
    )

    def warn(line: str) -> None:
        err.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)

    with _bar("reembed") as update:
        summary = reembed.run(options, progress=update, warn=warn)
    result = {
        "served": summary.identity.header_value(),
        "documents": summary.documents,
        "embedded": summary.embedded,
        "rejected": summary.rejected,
        "chunks_resumed": summary.chunks_resumed,
        "retries": summary.retries,
        "seconds": round(summary.seconds, 2),
        "docs_per_s": round(summary.embedded / summary.seconds, 1) if summary.seconds else None,
        "out": str(out),
    }
    print(json.dumps(result), flush=True)


def _canary_tables(result: CanaryResult) -> list[Table]:
    """The canary's identities side by side, then its checks (`canary`, `rollback-drill`)."""
    from rich.table import Table

    from embedkit.bench.canary import report_lines

    table = Table(title=f"embedkit canary — {result.rule}", title_justify="left")
    for column in ("", f"stable {result.stable.url}", f"candidate {result.candidate.url}"):
        table.add_column(column, overflow="fold")
    for row in report_lines(result):
        table.add_row(*row)
    checks = Table(show_header=False, box=None)
    if result.refused:
        checks.add_row("[red]REFUSED[/red]", result.refused)
    for what, figure, ok in result.checks:
        checks.add_row("[green]ok[/green]" if ok else "[red]FAIL[/red]", f"{what}: {figure}")
    for side in (result.stable, result.candidate):
        for error in side.errors[:3]:
            checks.add_row("[red]error[/red]", f"{side.url}: {error}")
    return [table, checks]


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
    from embedkit.bench.canary import TextSet, run_canary

    if batch_size < 1:
        raise InvalidInput(f"--batch-size must be at least 1, not {batch_size}")
    result = run_canary(
        stable,
        candidate,
        texts=TextSet.default(pairs, long),
        batch_size=batch_size,
        max_p95_ratio=max_p95_ratio,
    )
    for part in _canary_tables(result):
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

    from embedkit import drill as drills

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
        for part in _canary_tables(result.canary):
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
    from embedkit import pools
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
    from embedkit import pools
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


if __name__ == "__main__":  # pragma: no cover
    app()
