"""Retrieval with long documents chunked instead of truncated (``embedkit chunk-retrieval``).

SciFact abstracts (:mod:`embedkit.quality.retrieval`) average ~340 word pieces with the
title; ~70 % exceed all-MiniLM-L6-v2's 256. Each arm indexes the corpus one way and is
scored with the same query vectors (queries are short: never chunked):

* ``truncate``: the plain path, each document cut at the model's limit;
* ``mean``: what ``/embed`` with ``chunking`` returns (:meth:`Engine.encode_chunked`):
  the token-weighted mean of the raw pooled chunk vectors, normalised;
* ``unit-mean``: the alternative ``mean`` was chosen over, from the same chunk vectors:
  the plain mean of the unit chunk vectors, re-normalised.

Tokens embedded (chunk frames and overlap included) are the cost, exact and
machine-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.errors import InvalidInput
from embedkit.quality.retrieval import RetrievalSet, rank_metrics
from embedkit.runtime.chunking import Chunking, mean_per_text, pool
from embedkit.runtime.engine import Engine
from embedkit.runtime.vectors import postprocess

DEFAULT_WINDOWS = ((256, 0), (256, 64), (128, 32))


class ArmResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    arm: str = Field(description="truncate | mean | unit-mean")
    max_tokens: int
    overlap: int
    rows: int = Field(description="Rows embedded (documents or chunks).")
    tokens: int = Field(description="Tokens embedded, special tokens included.")
    ndcg_at_10: float
    recall_at_100: float


class ChunkRetrievalReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    dataset: str
    documents: int
    queries: int
    max_length: int
    long_documents: int = Field(description="Documents over the model's token limit.")
    arms: list[ArmResult]


def parse_window(text: str) -> tuple[int, int]:
    """``MAX_TOKENS:OVERLAP`` (e.g. ``128:32``) → ints; else :class:`InvalidInput`."""
    try:
        size, overlap = (int(part) for part in text.split(":"))
    except ValueError:
        raise InvalidInput(f"--window {text!r}: expected MAX_TOKENS:OVERLAP, e.g. 128:32") from None
    return size, overlap


def run(
    engine: Engine,
    data: RetrievalSet,
    windows: Sequence[tuple[int, int]] = DEFAULT_WINDOWS,
    *,
    step: Callable[[str], None] = lambda _: None,
) -> ChunkRetrievalReport:
    """Truncation, then each ``(max_tokens, overlap)`` window with both aggregations."""
    limit = engine.tokenizer.max_length
    chunkings = [Chunking(size, overlap, aggregate="none") for size, overlap in windows]
    for chunking in chunkings:  # bad options fail before minutes of encoding
        engine.encode_chunked(["x"], chunking)
    step(f"{len(data.queries)} queries")
    queries = engine.encode(data.queries, normalize=True)
    step(f"{len(data.docs)} documents, truncated at {limit}")
    truncated = engine.tokenizer.encode(data.docs)
    ndcg, recall = rank_metrics(queries, engine.encode(data.docs, normalize=True), data)
    arms = [
        ArmResult(
            arm="truncate",
            max_tokens=limit,
            overlap=0,
            rows=len(data.docs),
            tokens=sum(len(r) for r in truncated),
            ndcg_at_10=ndcg,
            recall_at_100=recall,
        )
    ]
    for chunking in chunkings:
        step(f"{len(data.docs)} documents, chunks of {chunking.max_tokens}/{chunking.overlap}")
        raw, plan = engine.encode_chunked(data.docs, chunking, normalize=False)
        dim = raw.shape[1]
        unit = postprocess(raw, normalize=True, dimensions=None, model_dim=dim)
        docs = {  # the same numbers Engine.encode_chunked(..., Chunking(aggregate="mean")) gives
            "mean": postprocess(
                pool(raw, replace(plan, aggregate="mean")),
                normalize=True,
                dimensions=None,
                model_dim=dim,
            ),
            "unit-mean": postprocess(
                mean_per_text(unit, plan), normalize=True, dimensions=None, model_dim=dim
            ),
        }
        for arm, vectors in docs.items():
            ndcg, recall = rank_metrics(queries, vectors, data)
            arms.append(
                ArmResult(
                    arm=arm,
                    max_tokens=int(chunking.max_tokens or limit),
                    overlap=chunking.overlap,
                    rows=len(plan.ids),
                    tokens=sum(c.tokens for c in plan.chunks),
                    ndcg_at_10=ndcg,
                    recall_at_100=recall,
                )
            )
    counts = engine.tokenizer.count_tokens(data.docs)
    return ChunkRetrievalReport(
        dataset=data.name,
        documents=len(data.docs),
        queries=len(data.queries),
        max_length=limit,
        long_documents=sum(1 for n in counts if n > limit),
        arms=arms,
    )


def markdown_table(report: ChunkRetrievalReport) -> str:
    """The arms as a markdown table, deltas against truncation."""
    base = report.arms[0]
    lines = [
        "| index | max_tokens / overlap | rows | tokens (× truncate) | nDCG@10 | Δ | "
        "recall@100 | Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in report.arms:
        lines.append(
            f"| {a.arm} | {a.max_tokens} / {a.overlap} | {a.rows:,} | {a.tokens:,} "
            f"({a.tokens / base.tokens:.2f}×) | {a.ndcg_at_10:.2f} | "
            f"{a.ndcg_at_10 - base.ndcg_at_10:+.2f} | {a.recall_at_100:.2f} | "
            f"{a.recall_at_100 - base.recall_at_100:+.2f} |"
        )
    return "\n".join(lines)
