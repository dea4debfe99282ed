"""A validated, tokenised request, ready for the Embedder: what every embedding route builds.

The checks BentoML's schema validation cannot make live here: the served model name,
item counts against ``max_client_batch``, ``dimensions`` against the model, token
ids against the vocabulary and texts against the token limit (via the tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from embedkit.core.errors import EncodingUnavailable, InvalidInput, ModelNotFound, PayloadTooLarge
from embedkit.core.settings import Settings
from embedkit.model.artifact import EncodingRanges
from embedkit.runtime.chunking import Chunking, ChunkPlan, plan_chunks
from embedkit.runtime.prompts import Prompts, pool_starts
from embedkit.runtime.tokens import Direction, PairTokenizer, segment_split
from embedkit.runtime.vectors import QUANTIZED, RANGED, check_dimensions
from embedkit.serve.edge.schemas import EmbeddingsRequest, EmbedRequest, EncodingFormat, Lane, Row


class Job(Protocol):
    """What the Embedder client needs of a job, whatever its task: its lane, the tokens
    it queues (admission) and its rows."""

    @property
    def lane(self) -> Lane: ...

    @property
    def tokens(self) -> int: ...

    def rows(self) -> list[Row]: ...


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
    truncated: int = 0  # how many inputs truncation cut
    base64_codes: bool = False

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


def check_encoding(
    encoding: str, *, normalize: bool, base64_codes: bool, ranges: EncodingRanges | None
) -> None:
    """int8/uint8 need the manifest's calibrated ranges, for vectors normalised as they
    were; ``base64_codes`` needs codes. Refused before any inference."""
    if base64_codes and encoding not in QUANTIZED:
        raise InvalidInput(
            f"base64_codes applies to the int8/uint8/binary/ubinary encodings, not {encoding!r} "
            "(encoding_format 'base64' already sends float32 bytes)",
            param="base64_codes",
        )
    if encoding not in RANGED:
        return
    if ranges is None:
        raise EncodingUnavailable(
            f"encoding_format {encoding!r} needs int8 ranges calibrated at release, and this "
            "model's manifest has none (released before output encodings); use float, "
            "base64, binary or ubinary, or serve a model released with `embedkit release`",
            param="encoding_format",
        )
    if normalize != ranges.normalized:
        state = "normalised" if ranges.normalized else "unnormalised"
        raise EncodingUnavailable(
            f"this model's {encoding} ranges were calibrated on {state} vectors; "
            f"normalize={str(normalize).lower()} cannot use them",
            param="normalize",
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
    ranges: EncodingRanges | None = None,
) -> EmbedJob:
    """Validate an OpenAI request and tokenise it (truncating, like sentence-transformers,
    unless ``truncate`` is false).

    Routing: one input goes to the latency-tuned query lane, several to the bulk lane.
    The lane never picks the prompt: that is ``prompt_name``, else the model's default.
    Token-id input gets the prompt's tokens before its own. ``normalize`` is the
    manifest's (OpenAI has no such parameter).
    """
    check_model(req.model, served)
    check_dimensions(req.dimensions, model_dim)
    prompt = prompts.resolve(req.prompt_name) if prompts else None
    check_encoding(
        req.encoding_format, normalize=normalize, base64_codes=req.base64_codes, ranges=ranges
    )
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    check_count(len(raw), settings, param="input")
    side = {"truncate": req.truncate, "direction": req.truncation_direction}
    prefix = prompt.ids if prompt else ()
    if isinstance(raw[0], int):  # one token-id list (pydantic guarantees homogeneity)
        ids, cut = tokenizer.check_ids_counted([raw], prefix=prefix, **side)
    elif isinstance(raw[0], list):
        ids, cut = tokenizer.check_ids_counted(raw, prefix=prefix, **side)
    else:
        # As prompted_ids: a cut from the left keeps the prompt whole.
        texts = prompt.apply(raw) if prompt else raw
        ids, cut = tokenizer.encode_counted(texts, keep=len(prefix), **side)
    return EmbedJob(
        ids=ids,
        lane="query" if len(ids) == 1 else "bulk",
        normalize=normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        pool_from=pool_starts(prompt, len(ids)),
        truncated=cut,
        base64_codes=req.base64_codes,
    )


def prompted_ids(
    texts: list[str],
    tokenizer: Any,
    prompts: Prompts | None,
    prompt_name: str | None,
    *,
    truncate: bool,
    direction: Direction | None = None,
) -> tuple[list[list[int]], list[int] | None, int]:
    """Token ids of ``texts`` behind their prompt (the named one, else the model's
    default), the pooling offsets it implies and how many texts truncation cut (from
    ``direction``, default the manifest's side); ``/tokenize`` shows the same ids.

    A cut from the left keeps the prompt whole and takes the text's start (``keep``).
    sentence-transformers with ``truncation_side="left"`` cuts the prompt first and still
    has its include_prompt=false pooling skip the prompt's length, i.e. the text's first
    tokens: no one wants that, and nothing checks it (PyTorch parity is checked on the
    manifest's side, always "right" from export, where the prompt is never cut). Kept
    this way, the skipped positions are exactly the prompt's, and the vector is PyTorch's
    for the prompt + the part of the text that survives (tests/test_prompts.py). The
    prompt is an instruction: losing it changes what the vector means, unlike losing the
    start of a long text — which is what a client asking for a left cut chose.
    """
    prompt = prompts.resolve(prompt_name) if prompts else None
    ids, cut = tokenizer.encode_counted(
        prompt.apply(texts) if prompt else texts,
        truncate=truncate,
        direction=direction,
        keep=len(prompt.ids) if prompt else 0,
    )
    return ids, pool_starts(prompt, len(ids)), cut


def native_job(
    req: EmbedRequest,
    tokenizer: Any,
    settings: Settings,
    *,
    lane: Lane,
    model_dim: int,
    prompts: Prompts | None = None,
    ranges: EncodingRanges | None = None,
) -> EmbedJob:
    check_dimensions(req.dimensions, model_dim)
    check_encoding(
        req.encoding_format, normalize=req.normalize, base64_codes=req.base64_codes, ranges=ranges
    )
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
        ids, pool_from, cut = plan.ids, None, 0
    else:
        ids, pool_from, cut = prompted_ids(
            req.texts,
            tokenizer,
            prompts,
            req.prompt_name,
            truncate=req.truncate,
            direction=req.truncation_direction,
        )
    return EmbedJob(
        ids=ids,
        lane=lane,
        normalize=req.normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        pool_from=pool_from,
        chunks=plan,
        truncated=cut,
        base64_codes=req.base64_codes,
    )


@dataclass(frozen=True)
class RerankJob:
    """One query against its documents, tokenised as pairs: one row per document."""

    ids: list[list[int]]
    # Per row, where the document starts (its first token of type id 1): the row's
    # token type ids in one number (runtime.tokens.segment_split).
    splits: list[int]
    lane: Lane = "query"
    truncated: int = 0  # how many documents truncation cut

    @property
    def tokens(self) -> int:
        """Every token of every pair the model reads (what usage reports)."""
        return sum(len(row) for row in self.ids)

    def rows(self) -> list[Row]:
        return list(zip(self.ids, self.splits, strict=True))


def check_documents(n: int, settings: Settings, *, param: str) -> None:
    """No documents → 400; more than ``max_rerank_documents`` → 413 naming the limit."""
    if n == 0:
        raise InvalidInput(f"{param} must not be empty", param=param)
    limit = settings.max_rerank_documents
    if n > limit:
        raise PayloadTooLarge(
            f"{param} has {n} documents, more than the limit of {limit} per rerank request "
            "(max_rerank_documents)",
            param=param,
        )


def rerank_job(
    query: str,
    documents: Sequence[str],
    tokenizer: PairTokenizer,
    settings: Settings,
    *,
    param: str,
    truncate: bool = True,
    direction: Direction | None = None,
) -> RerankJob:
    """Validate a rerank request and tokenise its pairs: (query, document) per document,
    only the document cut (a query that leaves a document no room is a 413 naming it).
    ``param``: the documents' field (``texts`` on /rerank, ``documents`` elsewhere)."""
    if not query:
        raise InvalidInput("query must not be empty", param="query")
    check_documents(len(documents), settings, param=param)
    ids, types, cut = tokenizer.encode_pairs(
        [(query, d) for d in documents], truncate=truncate, direction=direction
    )
    return RerankJob(ids=ids, splits=[segment_split(row) for row in types], truncated=cut)
