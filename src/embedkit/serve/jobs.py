"""A validated, tokenised request, ready for the Embedder: what every embedding route builds.

The checks BentoML's schema validation cannot make live here: the served model name,
item counts against ``max_client_batch``, ``dimensions`` against the model, token
ids against the vocabulary and texts against the token limit (via the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedkit.core.errors import InvalidInput, ModelNotFound, PayloadTooLarge
from embedkit.core.settings import Settings
from embedkit.runtime.chunking import Chunking, ChunkPlan, plan_chunks
from embedkit.runtime.vectors import check_dimensions
from embedkit.serve.schemas import EmbeddingsRequest, EmbedRequest, EncodingFormat, Lane


@dataclass(frozen=True)
class EmbedJob:
    """What the pipeline needs from any embedding route, after validation and tokenisation."""

    ids: list[list[int]]
    lane: Lane
    normalize: bool
    dimensions: int | None
    encoding: EncodingFormat
    chunks: ChunkPlan | None = None  # with chunking: what each row of ``ids`` is

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.ids)


def check_count(n: int, settings: Settings, *, param: str) -> None:
    """Empty → 400; more items than ``max_client_batch`` → 413."""
    if n == 0:
        raise InvalidInput(f"{param} must not be empty", param=param)
    limit = settings.max_client_batch
    if n > limit:
        raise PayloadTooLarge(
            f"{param} has {n} items, more than the limit of {limit} per request",
            param=param,
        )


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ModelNotFound(
            f"model {requested!r} is not served here; use {served!r} (see GET /v1/models)",
            param="model",
        )


def openai_job(
    req: EmbeddingsRequest,
    tokenizer: Any,
    settings: Settings,
    *,
    served: str,
    model_dim: int,
    normalize: bool,
) -> EmbedJob:
    """Validate an OpenAI request and tokenise it (truncating, like sentence-transformers).

    Routing: one input goes to the latency-tuned query lane, several to the bulk lane.
    ``normalize`` is the manifest's (OpenAI has no such parameter).
    """
    check_model(req.model, served)
    check_dimensions(req.dimensions, model_dim)
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    check_count(len(raw), settings, param="input")
    if isinstance(raw[0], int):  # one token-id list (pydantic guarantees homogeneity)
        ids = tokenizer.check_ids([raw], truncate=True)
    elif isinstance(raw[0], list):
        ids = tokenizer.check_ids(raw, truncate=True)
    else:
        ids = tokenizer.encode(raw, truncate=True)
    return EmbedJob(
        ids=ids,
        lane="query" if len(ids) == 1 else "bulk",
        normalize=normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
    )


def native_job(
    req: EmbedRequest, tokenizer: Any, settings: Settings, *, lane: Lane, model_dim: int
) -> EmbedJob:
    check_dimensions(req.dimensions, model_dim)
    check_count(len(req.texts), settings, param="texts")
    plan = None
    options = getattr(req, "chunking", None)  # only /embed's model has it
    if options is not None:
        # Chunks are rows like texts: max_client_batch bounds them too. No chunk is over
        # the limit, so ``truncate`` has nothing to do.
        chunking = Chunking(**dict(options))
        plan = plan_chunks(req.texts, tokenizer, chunking, max_rows=settings.max_client_batch)
        ids = plan.ids
    else:
        ids = tokenizer.encode(req.texts, truncate=req.truncate)
    return EmbedJob(
        ids=ids,
        lane=lane,
        normalize=req.normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        chunks=plan,
    )
