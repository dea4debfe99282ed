"""Model commands: export, validate, optimize, quantize, evaluate, encode, info, config, keys."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from embedkit.cli.common import (
    ModelOpt,
    app,
    one_line_errors,
    out,
    progress,
)
from embedkit.core.errors import EmbedkitError, InvalidInput


@app.command("export")
@one_line_errors
def export_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="New artifact directory.")],
    model: ModelOpt = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the recipe's).")] = None,
) -> None:
    """Export a sentence-transformers model to a pooled ONNX artifact (a CrossEncoder, task
    rerank, to a graph scoring pairs)."""
    from embedkit.model.export import export
    from embedkit.model.recipe import find_recipe

    recipe = find_recipe(model)
    with progress(f"export {recipe.name}") as step:
        artifact = export(recipe, output, opset=opset, step=step)
    task = artifact.manifest.task
    out.print(
        f"exported {artifact.manifest.name} (task: {task}) → {artifact.path}", highlight=False
    )


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
    """Check operators, shapes, batch invariance and parity (a reranker's: of pair scores,
    and its truncation); exit 1 on failure."""
    from embedkit.model.artifact import resolve
    from embedkit.model.recipe import find_recipe
    from embedkit.quality import contract, pair_contract

    art = resolve(artifact)
    source = art.manifest.source
    if reference is None and source is not None and Path(source.path).is_dir():
        # The directory it was exported from (format 5), as a recipe name may not exist.
        reference_dir = Path(source.path)
    else:
        recipe = find_recipe(reference or art.manifest.name)
        reference_dir, _ = recipe.source.resolve()
    checks = pair_contract if art.manifest.task == "rerank" else contract
    with progress(f"validate {art.manifest.name}") as step:
        result = checks.validate(
            art, reference_dir=reference_dir, limit_per_segment=limit, step=step
        )
    if report:
        report.write_text(json.dumps(result, indent=2, default=str) + "\n")
    from embedkit.quality.report import contract_lines

    for line in contract_lines(result):
        out.print(line)
    if not result["passed"]:
        raise typer.Exit(1)


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
        str,
        typer.Option(
            help="dynamic-int8 | static-int8 | fp16 | openvino-fp32 | openvino-bf16 | "
            "openvino-int8 (or a preset name)"
        ),
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
    """Quantised variant (dynamic/static INT8, FP16, OpenVINO fp32/BF16/INT8); gate it with
    `embedkit evaluate`."""
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
