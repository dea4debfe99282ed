"""A validated, tokenised request, ready for the Embedder: what every embedding route builds.

The checks BentoML's schema validation cannot make live here: the served model name,
item counts against ``max_client_batch``, ``dimensions`` against the model, token
ids against the vocabulary and texts against the token limit (via the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedkit.core.errors import EncodingUnavailable, InvalidInput, ModelNotFound, PayloadTooLarge
from embedkit.core.settings import Settings
from embedkit.model.artifact import EncodingRanges
from embedkit.runtime.vectors import QUANTIZED, RANGED, check_dimensions
from embedkit.serve.schemas import EmbeddingsRequest, EmbedRequest, EncodingFormat, Lane


@dataclass(frozen=True)
class EmbedJob:
    """What the pipeline needs from any embedding route, after validation and tokenisation."""

    ids: list[list[int]]
    lane: Lane
    normalize: bool
    dimensions: int | None
    encoding: EncodingFormat
    truncated: int = 0  # how many inputs truncation cut
    base64_codes: bool = False

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
    ranges: EncodingRanges | None = None,
) -> EmbedJob:
    """Validate an OpenAI request and tokenise it (truncating, like sentence-transformers,
    unless ``truncate`` is false).

    Routing: one input goes to the latency-tuned query lane, several to the bulk lane.
    ``normalize`` is the manifest's (OpenAI has no such parameter).
    """
    check_model(req.model, served)
    check_dimensions(req.dimensions, model_dim)
    check_encoding(
        req.encoding_format, normalize=normalize, base64_codes=req.base64_codes, ranges=ranges
    )
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    check_count(len(raw), settings, param="input")
    side = {"truncate": req.truncate, "direction": req.truncation_direction}
    if isinstance(raw[0], int):  # one token-id list (pydantic guarantees homogeneity)
        ids, cut = tokenizer.check_ids_counted([raw], **side)
    elif isinstance(raw[0], list):
        ids, cut = tokenizer.check_ids_counted(raw, **side)
    else:
        ids, cut = tokenizer.encode_counted(raw, **side)
    return EmbedJob(
        ids=ids,
        lane="query" if len(ids) == 1 else "bulk",
        normalize=normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        truncated=cut,
        base64_codes=req.base64_codes,
    )


def native_job(
    req: EmbedRequest,
    tokenizer: Any,
    settings: Settings,
    *,
    lane: Lane,
    model_dim: int,
    ranges: EncodingRanges | None = None,
) -> EmbedJob:
    check_dimensions(req.dimensions, model_dim)
    check_encoding(
        req.encoding_format, normalize=req.normalize, base64_codes=req.base64_codes, ranges=ranges
    )
    check_count(len(req.texts), settings, param="texts")
    ids, cut = tokenizer.encode_counted(
        req.texts, truncate=req.truncate, direction=req.truncation_direction
    )
    return EmbedJob(
        ids=ids,
        lane=lane,
        normalize=req.normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
        truncated=cut,
        base64_codes=req.base64_codes,
    )
