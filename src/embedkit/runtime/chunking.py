"""Long texts as overlapping token windows (opt-in chunking), and the vectors they give.

A text over ``max_tokens`` would be cut at the model's limit; with chunking it is split
into windows of content tokens instead, each framed by the model's special tokens like
any text ([CLS] … [SEP]: a window holds ``max_tokens`` minus the frame), consecutive
windows sharing ``overlap`` tokens. Every window is an ordinary row for the engine, so
batching, the token budget and usage apply to chunks as to texts.

Aggregation ``mean``: per text, the mean of its chunks' raw pooled vectors weighted by
their token counts, then post-processed like any vector (``dimensions``, ``normalize``).
For a mean-pooling model that is the mean of every token embedding the chunks pooled:
mean pooling carried across the windows. On SciFact it retrieved better than the mean
of unit chunk vectors, which lets a short tail chunk outvote a full one (docs/chunking.md).
A text within ``max_tokens`` is one chunk, so its vector is the plain one.

Plain numpy and the tokenizer: the HTTP front plans and pools with this module too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from embedkit.core.errors import InvalidChunking, PayloadTooLarge
from embedkit.runtime.tokens import TextTokenizer

Aggregate = Literal["mean", "none"]
AGGREGATES: tuple[Aggregate, ...] = ("mean", "none")


@dataclass(frozen=True)
class Chunking:
    """What a request asks for; ``max_tokens=None`` is the model's limit."""

    max_tokens: int | None = None
    overlap: int = 0
    aggregate: Aggregate = "mean"


@dataclass(frozen=True)
class Chunk:
    """One window: the text it came from, its character span there, its tokens (frame too)."""

    index: int
    start: int
    end: int
    tokens: int


@dataclass(frozen=True)
class ChunkPlan:
    """Rows for the engine (token ids, framed) and what each row is, in text order."""

    ids: list[list[int]]
    chunks: list[Chunk]
    texts: int
    aggregate: Aggregate

    def first_rows(self) -> np.ndarray:
        """The row of each text's first chunk (every text has at least one)."""
        starts = [
            k for k, c in enumerate(self.chunks) if k == 0 or c.index != self.chunks[k - 1].index
        ]
        return np.asarray(starts, dtype=np.intp)


def window_room(chunking: Chunking, tokenizer: TextTokenizer) -> tuple[int, int]:
    """``(content tokens per window, overlap)``, or :class:`InvalidChunking` naming the field.

    ``max_tokens`` counts the frame, so it must leave room for one content token and
    stay within the model's limit; ``overlap`` must leave each window one new token.
    """
    prefix, suffix = tokenizer.frame
    frame = len(prefix) + len(suffix)
    limit = tokenizer.max_length
    max_tokens = limit if chunking.max_tokens is None else chunking.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidChunking("chunking.max_tokens must be an integer", param="chunking.max_tokens")
    if not frame < max_tokens <= limit:
        raise InvalidChunking(
            f"chunking.max_tokens must be between {frame + 1} and {limit} for this model "
            f"(its limit; each chunk also carries {frame} special tokens), got {max_tokens}",
            param="chunking.max_tokens",
        )
    room = max_tokens - frame
    overlap = chunking.overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < room:
        raise InvalidChunking(
            f"chunking.overlap must be between 0 and {room - 1}: a chunk of max_tokens "
            f"{max_tokens} holds {room} text tokens besides its {frame} special tokens, "
            f"got {overlap}",
            param="chunking.overlap",
        )
    if chunking.aggregate not in AGGREGATES:
        raise InvalidChunking(
            f"chunking.aggregate must be one of {', '.join(AGGREGATES)}, "
            f"got {chunking.aggregate!r}",
            param="chunking.aggregate",
        )
    return room, overlap


def windows(n: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` windows over ``n`` content tokens: at most ``room`` each, starting
    ``room - overlap`` apart, the last ending at ``n`` (it holds what is left). ``n <= room``
    (an empty text too) is one window."""
    out = [(0, min(n, room))]
    while out[-1][1] < n:
        start = out[-1][0] + room - overlap
        out.append((start, min(start + room, n)))
    return out


def plan_chunks(
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    chunking: Chunking,
    *,
    max_rows: int | None = None,
) -> ChunkPlan:
    """Split each text into framed token windows with their character spans.

    ``max_rows`` bounds the chunks of one request (:class:`PayloadTooLarge` above it),
    counted before any row is built. A text without content tokens (empty, blank) is one
    chunk of the frame alone spanning the whole text, as a plain request embeds it.
    """
    room, overlap = window_room(chunking, tokenizer)
    encoded = tokenizer.encode_content(texts)
    cuts = [windows(len(ids), room, overlap) for ids, _ in encoded]
    rows = sum(len(c) for c in cuts)
    if max_rows is not None and rows > max_rows:
        raise PayloadTooLarge(
            f"the texts split into {rows} chunks, more than the limit of {max_rows} per "
            "request; raise chunking.max_tokens or send fewer texts",
            param="chunking",
        )
    prefix, suffix = tokenizer.frame
    ids_out: list[list[int]] = []
    chunks: list[Chunk] = []
    for index, ((ids, spans), text, cut) in enumerate(zip(encoded, texts, cuts, strict=True)):
        for start, end in cut:
            row = [*prefix, *ids[start:end], *suffix]
            span = (spans[start][0], spans[end - 1][1]) if end > start else (0, len(text))
            ids_out.append(row)
            chunks.append(Chunk(index=index, start=span[0], end=span[1], tokens=len(row)))
    return ChunkPlan(ids=ids_out, chunks=chunks, texts=len(texts), aggregate=chunking.aggregate)


def mean_per_text(
    vectors: np.ndarray, plan: ChunkPlan, *, weights: np.ndarray | None = None
) -> np.ndarray:
    """``[texts, dim]``: each text's (weighted) mean over its chunks' rows of ``vectors``."""
    starts = plan.first_rows()
    rows = np.asarray(vectors, dtype=np.float64)
    if weights is None:
        weights = np.ones(len(rows))
    w = np.asarray(weights, dtype=np.float64)
    sums = np.add.reduceat(rows * w[:, None], starts, axis=0)
    return sums / np.add.reduceat(w, starts)[:, None]


def pool(raw: np.ndarray, plan: ChunkPlan) -> np.ndarray:
    """Raw pooled chunk rows → the request's raw rows, before post-processing: per chunk
    (``none``) or per text their token-weighted mean (``mean``)."""
    if plan.aggregate == "none":
        return raw
    weights = np.array([c.tokens for c in plan.chunks], dtype=np.float64)
    return mean_per_text(raw, plan, weights=weights)
