"""Response bodies, written by hand as compact JSON bytes (no pydantic on the way out).

Their shapes are described for clients by the response models in
:mod:`embedkit.serve.edge.schemas`; a unit test checks the two agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson

from embedkit.runtime.vectors import codes_base64, encode_base64
from embedkit.serve.pipeline.jobs import EmbedJob


def dumps(obj: Any) -> bytes:
    """Compact JSON, the same numbers as ``json.dumps`` (floats come from ``tolist()``:
    float64 shortest repr either way; non-ASCII text stays UTF-8 instead of ``\\u`` escapes)
    but an order of magnitude faster on a 384-float body (docs/benchmarks/serving-tuning.md,
    change 2). orjson writes NaN as null where json refused it; ``vectors.postprocess``
    already refuses non-finite vectors. orjson refuses integers beyond 64 bits; such a body
    (a client's echoed value) goes through the stdlib instead of failing."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _wire(array: np.ndarray, job: EmbedJob) -> Any:
    """``array`` (float32 vectors, or int8/uint8 codes) as the request's encoding asks:
    JSON numbers, base64 of float32 bytes, or base64 of the codes' raw bytes."""
    if job.encoding == "base64":
        return encode_base64(array)
    if job.base64_codes:
        return codes_base64(array)
    return array.tolist()


def openai_body(vectors: np.ndarray, job: EmbedJob, model: str) -> bytes:
    items: Sequence[Any] = (
        [_wire(row, job) for row in vectors]
        if job.encoding == "base64" or job.base64_codes
        else vectors.tolist()
    )
    tokens = job.tokens
    return dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def native_body(
    vectors: np.ndarray, job: EmbedJob, model: str, *, dimensions: int | None = None
) -> bytes:
    """``dimensions``: those embedded, where the array is narrower (packed binary codes)."""
    body: dict[str, Any] = {
        "embeddings": _wire(vectors, job),
        "model": model,
        "dimensions": dimensions or int(vectors.shape[1]),
        "encoding_format": job.encoding,
        "usage": {"tokens": job.tokens},
        "truncated": job.truncated,
    }
    if job.chunks is not None:
        body["chunks"] = [asdict(c) for c in job.chunks.chunks]
    return dumps(body)


def tokenize_body(ids: list[list[int]], max_length: int, *, truncated: int = 0) -> bytes:
    counts = [len(row) for row in ids]
    return dumps(
        {
            "ids": ids,
            "counts": counts,
            "max_length": max_length,
            "usage": {"tokens": sum(counts)},
            "truncated": truncated,
        }
    )


def tei_rerank_body(scores: np.ndarray, order: Sequence[int], texts: Sequence[str] | None) -> bytes:
    """``/rerank``: ``[{index, score, text?}]`` in ``order`` (highest score first)."""
    values = scores.tolist()
    return dumps(
        [
            {"index": i, "score": values[i], **({} if texts is None else {"text": texts[i]})}
            for i in order
        ]
    )


def cohere_rerank_body(
    scores: np.ndarray,
    order: Sequence[int],
    documents: Sequence[str] | None,
    *,
    request_id: str,
    model: str,
    tokens: int,
    api_version: str,
) -> bytes:
    """``/v1/rerank``, ``/v2/rerank``: Cohere's body (``id``, ``results``, ``meta`` with its
    ``billed_units``) with Jina's ``model`` and ``usage``; ``order`` already cut to top_n."""
    values = scores.tolist()
    results = [
        {
            "index": i,
            "relevance_score": values[i],
            **({} if documents is None else {"document": {"text": documents[i]}}),
        }
        for i in order
    ]
    searches = -(-len(scores) // 100)  # Cohere's search unit: a query with ≤ 100 documents
    return dumps(
        {
            "id": request_id,
            "model": model,
            "results": results,
            "usage": {"total_tokens": tokens},
            "meta": {
                "api_version": {"version": api_version},
                "billed_units": {"search_units": searches, "input_tokens": tokens},
            },
        }
    )
