"""Property-based request parsing: whatever JSON arrives, the answer is a job or one of
our 4xx errors — never another exception (which the service would turn into a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from embedkit.core.errors import EmbedkitError
from embedkit.core.settings import Settings
from embedkit.serve.edge.bodies import dumps
from embedkit.serve.edge.http_errors import (
    INTERNAL_MESSAGE,
    error_status_body,
    foreign_error,
    is_openai_error_body,
)
from embedkit.serve.edge.schemas import EmbedBulkRequest, EmbeddingsRequest, EmbedRequest, Lane
from embedkit.serve.pipeline.jobs import native_job, openai_job

SETTINGS = Settings(max_client_batch=16)
MODEL = "all-minilm-l6-v2"
DIM = 384
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
texts = st.text(max_size=300)
token_ids = st.lists(st.integers(min_value=-5, max_value=40_000), max_size=20)
inputs = (
    texts
    | st.lists(texts, max_size=20)
    | token_ids
    | st.lists(token_ids, max_size=20)
    | json_values
)
dimensions = st.none() | st.integers(min_value=-3, max_value=DIM + 3) | json_scalars
formats = st.sampled_from(["float", "base64"]) | json_scalars


@pytest.fixture(scope="module")
def tokenizer(fp32_artifact):
    from embedkit.runtime.tokens import TextTokenizer

    return TextTokenizer.from_artifact(fp32_artifact)


def _client_error(exc: EmbedkitError) -> None:
    assert 400 <= exc.status < 500, exc
    assert "\n" not in exc.message and exc.message


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "input": inputs,
            "model": st.just(MODEL) | st.text(max_size=20) | json_scalars,
            "dimensions": dimensions,
            "encoding_format": formats,
            "user": json_scalars,
        },
    )
)
def test_openai_request_is_a_job_or_a_client_error(tokenizer, body: dict[str, Any]) -> None:
    try:
        req = EmbeddingsRequest.model_validate(body)
    except ValidationError:
        return  # BentoML answers these 400 (rewritten into our body by EdgeMiddleware)
    try:
        job = openai_job(req, tokenizer, SETTINGS, served=MODEL, model_dim=DIM, normalize=True)
    except EmbedkitError as exc:
        _client_error(exc)
        return
    n = 1 if isinstance(req.input, str) or isinstance(req.input[0], int) else len(req.input)
    assert len(job.ids) == n and job.lane == ("query" if n == 1 else "bulk")
    assert all(0 < len(row) <= tokenizer.max_length for row in job.ids)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "texts": st.lists(texts, max_size=20) | json_values,
            "normalize": json_scalars,
            "truncate": st.booleans() | json_scalars,
            "dimensions": dimensions,
            "encoding_format": formats,
        },
    ),
    lane=st.sampled_from(["query", "bulk"]),
)
def test_native_request_is_a_job_or_a_client_error(
    tokenizer, body: dict[str, Any], lane: Lane
) -> None:
    try:
        req = EmbedRequest.model_validate(body)
    except ValidationError:
        return
    try:
        job = native_job(req, tokenizer, SETTINGS, lane=lane, model_dim=DIM)
    except EmbedkitError as exc:
        _client_error(exc)
        return
    assert len(job.ids) == len(req.texts) and job.lane == lane


@FUZZ
@given(
    texts=st.lists(texts, min_size=1, max_size=6),
    chunking=st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.none() | st.integers(min_value=-3, max_value=260) | json_scalars,
            "overlap": st.integers(min_value=-3, max_value=260) | json_scalars,
            "aggregate": st.sampled_from(["mean", "none"]) | json_scalars,
        },
    )
    | json_values,
)
def test_chunked_request_is_a_job_or_a_client_error(
    tokenizer, texts: list[str], chunking: Any
) -> None:
    try:
        req = EmbedBulkRequest.model_validate({"texts": texts, "chunking": chunking})
    except ValidationError:
        return
    try:
        job = native_job(req, tokenizer, SETTINGS, lane="bulk", model_dim=DIM)
    except EmbedkitError as exc:
        _client_error(exc)
        return
    if job.chunks is None:
        assert chunking is None
        return
    limit = req.chunking.max_tokens if req.chunking and req.chunking.max_tokens else 256
    assert all(0 < len(row) <= limit for row in job.ids) and len(job.ids) <= 16
    assert sorted({c.index for c in job.chunks.chunks}) == list(range(len(texts)))
    assert all(0 <= c.start <= c.end <= len(texts[c.index]) for c in job.chunks.chunks)


@FUZZ
@given(
    status=st.integers(min_value=400, max_value=599),
    body=st.binary(max_size=200) | json_values.map(dumps),
)
def test_foreign_error_bodies_always_map_to_ours(status: int, body: bytes) -> None:
    """Whatever BentoML (or anything under us) answers, the client sees our shape."""
    err = foreign_error(status, body)
    code, out, headers = error_status_body(err)
    assert 400 <= code < 600 and headers["content-type"] == "application/json"
    assert is_openai_error_body(out)
    if code == 500:
        assert err.message == INTERNAL_MESSAGE  # nothing from below leaks
