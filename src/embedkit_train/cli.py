"""Training commands (tooling, not shipped in the Bento or the image): ``train-reranker``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedkit.cli.common import app, one_line_errors, out, progress
from embedkit_train.rerank import DEFAULT_SCIFACT, METRICS_FILE, TrainConfig, TrainingReport

_D = TrainConfig()


@app.command("train-reranker")
@one_line_errors
def train_reranker_cmd(
    out_dir: Annotated[
        Path, typer.Option("--out", help="New model directory (e.g. artifacts/trained/NAME).")
    ],
    scifact: Annotated[
        Path, typer.Option(help="SciFact train in the BEIR layout (corpus may be gzipped).")
    ] = DEFAULT_SCIFACT,
    base: Annotated[
        str | None,
        typer.Option(help="Start: recipe name or model directory (default: the packaged MiniLM)."),
    ] = None,
    embedder: Annotated[
        str | None,
        typer.Option(
            help="Embedding artifact dir or tag that mines negatives and gives the top N "
            "(default: the default model's fp32 export)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = _D.seed,
    split_seed: Annotated[int, typer.Option(help="Seed of the held-back claims.")] = _D.split_seed,
    held_out: Annotated[int, typer.Option(min=1, help="Claims never trained on.")] = _D.held_out,
    negatives: Annotated[int, typer.Option(min=0, help="Hard negatives per claim.")] = _D.negatives,
    mine_depth: Annotated[
        int, typer.Option(min=1, help="Draw negatives from the embedder's top N.")
    ] = _D.mine_depth,
    loss: Annotated[
        str, typer.Option(help="SciFact's loss: bce (pairs) or listwise (claim vs negatives).")
    ] = _D.loss,
    epochs: Annotated[float, typer.Option(min=0.01)] = _D.epochs,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after N steps.")] = None,
    learning_rate: Annotated[float, typer.Option(min=1e-8)] = _D.learning_rate,
    warmup_ratio: Annotated[float, typer.Option(min=0.0, max=0.99)] = _D.warmup_ratio,
    batch_size: Annotated[int, typer.Option(min=1)] = _D.batch_size,
    max_length: Annotated[int, typer.Option(min=16, help="Tokens of a pair.")] = _D.max_length,
    sts_pairs: Annotated[
        int, typer.Option(min=0, help="STS train pairs mixed in (of 5,749).")
    ] = _D.sts_pairs or 0,
    freeze_embeddings: Annotated[
        bool, typer.Option(help="Keep the start's word embeddings unchanged.")
    ] = _D.freeze_embeddings,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast while training.")] = _D.bf16,
    rerank_depth: Annotated[
        int, typer.Option(min=1, help="Held-back: rerank the embedder's top N.")
    ] = _D.rerank_depth,
    evaluate: Annotated[
        bool, typer.Option(help="Export the model and score the held-back claims and STS test.")
    ] = True,
) -> None:
    """Train a reranker (CrossEncoder) from the packaged MiniLM on SciFact train (hard
    negatives from our embedding model) and STS train; report held-back nDCG@10 before and
    after reranking and STS test Spearman (docs/rerank-training.md)."""
    from embedkit.core.settings import get_settings
    from embedkit_train.rerank import run

    if loss not in ("bce", "listwise"):
        raise typer.BadParameter(f"{loss!r} is not bce or listwise", param_hint="--loss")
    config = TrainConfig(
        seed=seed,
        split_seed=split_seed,
        held_out=held_out,
        negatives=negatives,
        mine_depth=mine_depth,
        loss=loss,  # checked above
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_ratio=warmup_ratio,
        batch_size=batch_size,
        max_length=max_length,
        sts_pairs=sts_pairs,
        freeze_embeddings=freeze_embeddings,
        bf16=bf16,
        rerank_depth=rerank_depth,
    )
    with progress("train-reranker") as step:
        report = run(
            config,
            out_dir,
            scifact_dir=scifact,
            base=base,
            embedder=embedder,
            evaluate_after=evaluate,
            cache_dir=get_settings().eval_cache_dir,
            step=step,
        )
    out.print(summary(report, out_dir), highlight=False, soft_wrap=True)


def summary(report: TrainingReport, out_dir: Path) -> str:
    """A few lines for the terminal; the whole report is in the metrics file."""
    t = report.timings_s
    lines = [
        f"model: {out_dir} (metrics: {out_dir / METRICS_FILE})",
        f"trained on {report.data['scifact_rows']} SciFact rows "
        f"({report.data['train_queries']} claims) and {report.data['sts_pairs']} STS pairs, "
        f"{report.train['steps']} steps; recipe {t['recipe']:.0f} s "
        f"(mining {t['prepare_and_mine']:.0f} s, training {t['train']:.0f} s)",
    ]
    if report.held_out is not None:
        h = report.held_out
        lines.append(
            f"held-back nDCG@10 ({h.queries} claims, top {h.depth}): "
            f"{h.ndcg_at_10_before:.2f} → {h.ndcg_at_10_after:.2f} ({h.gain:+.2f}); "
            f"STS test Spearman {report.sts_test_spearman:.2f}"
        )
    return "\n".join(lines)


@app.command("eval-reranker")
@one_line_errors
def eval_reranker_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A CrossEncoder directory.")],
    scifact: Annotated[
        Path, typer.Option(help="SciFact train in the BEIR layout (corpus may be gzipped).")
    ] = DEFAULT_SCIFACT,
    embedder: Annotated[
        str | None, typer.Option(help="Embedding artifact dir or tag (default: fp32 export).")
    ] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the held-back claims.")] = _D.split_seed,
    held_out: Annotated[int, typer.Option(min=1, help="Held-back claims.")] = _D.held_out,
    rerank_depth: Annotated[
        int, typer.Option(min=1, help="Rerank the embedder's top N.")
    ] = _D.rerank_depth,
) -> None:
    """Score a CrossEncoder directory as train-reranker does (held-back nDCG@10 before and
    after reranking, STS test Spearman), through its ONNX export."""
    from embedkit.core.settings import get_settings
    from embedkit_train.rerank import evaluate_model

    config = TrainConfig(split_seed=split_seed, held_out=held_out, rerank_depth=rerank_depth)
    with progress("eval-reranker") as step:
        held, rho = evaluate_model(
            model_dir,
            config,
            scifact_dir=scifact,
            embedder=embedder,
            cache_dir=get_settings().eval_cache_dir,
            step=step,
        )
    out.print(
        f"held-back nDCG@10 ({held.queries} claims, top {held.depth}): "
        f"{held.ndcg_at_10_before:.2f} → {held.ndcg_at_10_after:.2f} ({held.gain:+.2f}); "
        f"STS test Spearman {rho:.2f}",
        highlight=False,
    )
