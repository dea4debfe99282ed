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
from embedkit.runtime.prompts import Prompts, pool_starts
from embedkit.runtime.vectors import check_dimensions
from embedkit.serve.schemas import EmbeddingsRequest, EmbedRequest, EncodingFormat, Lane, Row


@dataclass(frozen=True)
class EmbedJob:
    """What the pipeline needs from any embedding route, after validation and tokenisation."""

    ids: list[list[int]]
    lane: Lane
    normalize: bool
    dimensions: int | None
    encoding: EncodingFormat
    # Per row, the leading positions (its prompt) the pooling skips; None: none skipped.
    pool_from: list[int] | None = None
    chunks: ChunkPlan | None = None  # with chunking: what each row of ``ids`` is

    @property
    def tokens(self) -> int:
        """Every token the model reads, the prompt's included (usage counts them)."""
        return sum(len(row) for row in self.ids)

    def rows(self) -> list[Row]:
        """What the Embedder receives: ids, paired with ``pool_from`` only where set."""
        if self.pool_from is None:
            return list(self.ids)
        return list(zip(self.ids, self.pool_from, strict=True))


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
    prompts: Prompts | None = None,
) -> EmbedJob:
    """Validate an OpenAI request and tokenise it (truncating, like sentence-transformers).

    Routing: one input goes to the latency-tuned query lane, several to the bulk lane.
    The lane never picks the prompt: that is ``prompt_name``, else the model's default.
    Token-id input gets the prompt's tokens before its own. ``normalize`` is the
    manifest's (OpenAI has no such parameter).
    """
    check_model(req.model, served)
    check_dimensions(req.dimensions, model_dim)
    prompt = prompts.resolve(req.prompt_name) if prompts else None
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    check_count(len(raw), settings, param="input")
    prefix = prompt.ids if prompt else ()
    if isinstance(raw[0], int):  # one token-id list (pydantic guarantees homogeneity)
        ids = tokenizer.check_ids([raw], truncate=True, prefix=prefix)
    elif isinstance(raw[0], list):
        ids = tokenizer.check_ids(raw, truncate=True, prefix=prefix)
    else:
        ids = tokenizer.encode(prompt.apply(raw) if prompt else raw, truncate=True)
    return EmbedJob(
        ids=ids,
        lane="query" if len(ids) == 1 else "bulk",
        normalize=normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        pool_from=pool_starts(prompt, len(ids)),
    )


def prompted_ids(
    texts: list[str],
    tokenizer: Any,
    prompts: Prompts | None,
    prompt_name: str | None,
    *,
    truncate: bool,
) -> tuple[list[list[int]], list[int] | None]:
    """Token ids of ``texts`` behind their prompt (the named one, else the model's
    default) and the pooling offsets it implies; ``/tokenize`` shows the same ids."""
    prompt = prompts.resolve(prompt_name) if prompts else None
    ids = tokenizer.encode(prompt.apply(texts) if prompt else texts, truncate=truncate)
    return ids, pool_starts(prompt, len(ids))


def native_job(
    req: EmbedRequest,
    tokenizer: Any,
    settings: Settings,
    *,
    lane: Lane,
    model_dim: int,
    prompts: Prompts | None = None,
) -> EmbedJob:
    check_dimensions(req.dimensions, model_dim)
    check_count(len(req.texts), settings, param="texts")
    plan = None
    options = getattr(req, "chunking", None)  # only /embed's model has it
    if options is not None:
        # A prompt would have to open every window (and be left out of include_prompt=false
        # pooling per window): not built yet, so refused rather than silently dropped.
        if prompts and prompts.resolve(req.prompt_name) is not None:
            raise InvalidInput(
                "chunking with a prompt (prompt_name, or the model's default prompt) is not "
                "supported yet; send the texts without chunking",
                param="chunking",
            )
        # Chunks are rows like texts: max_client_batch bounds them too. No chunk is over
        # the limit, so ``truncate`` has nothing to do.
        chunking = Chunking(**dict(options))
        plan = plan_chunks(req.texts, tokenizer, chunking, max_rows=settings.max_client_batch)
        ids, pool_from = plan.ids, None
    else:
        ids, pool_from = prompted_ids(
            req.texts, tokenizer, prompts, req.prompt_name, truncate=req.truncate
        )
    return EmbedJob(
        ids=ids,
        lane=lane,
        normalize=req.normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        pool_from=pool_from,
        chunks=plan,
    )
