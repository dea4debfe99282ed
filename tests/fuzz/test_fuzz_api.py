"""Property-based request parsing: whatever JSON arrives, the answer is a job or one of
our 4xx errors — never another exception (which the service would turn into a 500).

A job is checked too: every output encoding, prompt (named, the model's default, unknown)
and truncation side gives rows framed as the tokenizer frames them, the prompt whole at
their start (the positions an include_prompt=false pooling skips), the text cut on the side
asked, and a response body of the right shape for the encoding."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from embedkit.core.errors import EmbedkitError
from embedkit.core.settings import Settings
from embedkit.model.artifact import EncodingRanges
from embedkit.runtime.prompts import Prompt, Prompts
from embedkit.runtime.vectors import QUANTIZED, RANGED, encode_codes, postprocess
from embedkit.serve.edge.bodies import dumps, native_body, openai_body
from embedkit.serve.edge.http_errors import (
    INTERNAL_MESSAGE,
    error_status_body,
    foreign_error,
    is_openai_error_body,
)
from embedkit.serve.edge.schemas import EmbedBulkRequest, EmbeddingsRequest, EmbedRequest, Lane
from embedkit.serve.pipeline.jobs import EmbedJob, native_job, openai_job

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
ENCODINGS = ["float", "base64", "int8", "uint8", "binary", "ubinary"]
formats = st.sampled_from(ENCODINGS) | json_scalars
# E5-style prompts, and the empty one sentence-transformers allows.
PROMPTS = {"query": "query: ", "passage": "Represent this passage: ", "empty": ""}
prompt_names = st.none() | st.sampled_from([*PROMPTS, "nope"]) | json_scalars
directions = st.none() | st.sampled_from(["right", "left"]) | json_scalars
# int8/uint8 buckets: calibrated on normalised vectors, or none (a model released before).
RANGES = EncodingRanges(min=[-0.2] * DIM, max=[0.2] * DIM, normalized=True, texts=1, source="x")
ranges = st.none() | st.just(RANGES)


@pytest.fixture(scope="module")
def tokenizer(fp32_artifact):
    from embedkit.runtime.tokens import TextTokenizer

    return TextTokenizer.from_artifact(fp32_artifact)


@pytest.fixture(scope="module")
def prompts(fp32_artifact, tokenizer) -> dict[str | None, Prompts]:
    """The default model given prompts and include_prompt=false pooling, by its default
    prompt's name (None: no default)."""
    manifest = fp32_artifact.manifest.model_copy(
        update={"prompts": PROMPTS, "pooling_mask_input": "pooling_mask"}
    )
    return {
        default: Prompts(manifest.model_copy(update={"default_prompt_name": default}), tokenizer)
        for default in (None, "passage")
    }


def _check_rows(
    tokenizer, job: EmbedJob, items: list[Any], prompt: Prompt | None, direction: str | None
) -> None:
    """``job.ids``: per item (a text, or a token-id list), [CLS] prompt item [SEP] with the
    item cut on the side asked to fit; the prompt always whole; ``truncated`` counts cuts."""
    head = list(prompt.ids) if prompt else []
    if items and isinstance(items[0], str):  # the prompt is tokenised with the text
        content = [
            ids
            for ids, _ in tokenizer.encode_content(
                [prompt.apply([t])[0] if prompt else t for t in items]
            )
        ]
    else:
        content = [[*head, *row] for row in items]
    room = tokenizer.max_length - 2
    side = direction or tokenizer.spec.truncation_side
    assert job.truncated == sum(len(c) > room for c in content)
    event(f"prompt {prompt.name if prompt else None}, {side} side, {job.truncated > 0} cut")
    assert len(job.ids) == len(items)
    for row, full in zip(job.ids, content, strict=True):
        cls, sep = tokenizer.frame
        assert row[:1] == cls and row[-1:] == sep and len(row) <= tokenizer.max_length
        assert row[1 : 1 + len(head)] == head  # whichever side is cut
        if len(full) <= room:
            assert row[1:-1] == full
        elif side == "right":
            assert row[1:-1] == full[:room]
        else:  # the item loses its start, behind the whole prompt
            assert row[1 + len(head) : -1] == full[len(full) - (room - len(head)) :]
    if prompt is None:
        assert job.pool_from is None
    else:  # include_prompt=false: the pooling skips [CLS] and the prompt, nothing else
        assert job.pool_from == [1 + len(head)] * len(items)


def _check_encoding(job: EmbedJob, *, openai: bool, ranges: EncodingRanges | None) -> None:
    """Encoding rules, then what the front would answer for this job (random vectors in
    place of the model's): a body of the encoding's shape, ``dimensions`` wide."""
    assert not job.base64_codes or job.encoding in QUANTIZED
    if job.encoding in RANGED:
        assert ranges is not None and ranges.normalized == job.normalize
    event(f"encoding {job.encoding}, base64_codes {job.base64_codes}")
    n, width = len(job.ids), job.dimensions or DIM
    raw = np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32)
    if job.encoding in QUANTIZED:
        bounds = None if ranges is None else np.array([ranges.min, ranges.max])
        out = encode_codes(
            raw,
            job.encoding,
            normalize=job.normalize,
            dimensions=job.dimensions,
            model_dim=DIM,
            ranges=bounds,
        )
        wide = -(-width // 8) if job.encoding in ("binary", "ubinary") else width
        dtype = np.uint8 if job.encoding in ("uint8", "ubinary") else np.int8
        assert out.shape == (n, wide) and out.dtype == dtype
    else:
        out = postprocess(raw, normalize=job.normalize, dimensions=job.dimensions, model_dim=DIM)
        assert out.shape == (n, width)
    if openai:
        rows = [e["embedding"] for e in json.loads(openai_body(out, job, MODEL))["data"]]
    else:
        body = json.loads(native_body(out, job, MODEL, dimensions=width))
        assert body["dimensions"] == width and body["encoding_format"] == job.encoding
        assert body["truncated"] == job.truncated
        rows = body["embeddings"]
        if isinstance(rows, str):  # one base64 string of the whole array
            assert len(base64.b64decode(rows)) == out.nbytes
            return
    assert len(rows) == n
    for got, want in zip(rows, out, strict=True):
        if isinstance(got, str):  # base64 per row: float32 or the codes' bytes
            assert len(base64.b64decode(got)) == want.nbytes
        else:
            assert len(got) == len(want)


def _client_error(exc: EmbedkitError) -> None:
    assert 400 <= exc.status < 500, exc
    assert "\n" not in exc.message and exc.message


def _openai(
    tokenizer,
    model: Prompts,
    body: dict[str, Any],
    normalize: bool,
    ranges: EncodingRanges | None,
) -> EmbedJob | None:
    """The body through schema and job (checked), or None where either refuses it."""
    try:
        req = EmbeddingsRequest.model_validate(body)
    except ValidationError:
        return None  # BentoML answers these 400 (rewritten into our body by EdgeMiddleware)
    try:
        job = openai_job(
            req,
            tokenizer,
            SETTINGS,
            served=MODEL,
            model_dim=DIM,
            normalize=normalize,
            prompts=model,
            ranges=ranges,
        )
    except EmbedkitError as exc:
        _client_error(exc)
        return None
    items = (
        [req.input] if isinstance(req.input, str) or isinstance(req.input[0], int) else req.input
    )
    assert job.lane == ("query" if len(items) == 1 else "bulk")
    assert job.encoding == req.encoding_format and job.normalize == normalize
    _check_rows(tokenizer, job, items, model.resolve(req.prompt_name), req.truncation_direction)
    _check_encoding(job, openai=True, ranges=ranges)
    return job


def _native(
    tokenizer, model: Prompts, body: dict[str, Any], lane: Lane, ranges: EncodingRanges | None
) -> EmbedJob | None:
    try:
        req = EmbedRequest.model_validate(body)
    except ValidationError:
        return None
    try:
        job = native_job(
            req, tokenizer, SETTINGS, lane=lane, model_dim=DIM, prompts=model, ranges=ranges
        )
    except EmbedkitError as exc:
        _client_error(exc)
        return None
    assert job.lane == lane and job.encoding == req.encoding_format
    _check_rows(tokenizer, job, req.texts, model.resolve(req.prompt_name), req.truncation_direction)
    _check_encoding(job, openai=False, ranges=ranges)
    return job


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "input": inputs,
            "model": st.just(MODEL) | st.text(max_size=20) | json_scalars,
            "dimensions": dimensions,
            "encoding_format": formats,
            "base64_codes": st.booleans() | json_scalars,
            "prompt_name": prompt_names,
            "truncate": st.booleans() | json_scalars,
            "truncation_direction": directions,
            "user": json_scalars,
        },
    ),
    default=st.sampled_from([None, "passage"]),
    normalize=st.booleans(),
    ranges=ranges,
)
def test_openai_request_is_a_job_or_a_client_error(
    tokenizer,
    prompts,
    body: dict[str, Any],
    default: str | None,
    normalize: bool,
    ranges: EncodingRanges | None,
) -> None:
    _openai(tokenizer, prompts[default], body, normalize, ranges)


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
            "base64_codes": st.booleans() | json_scalars,
            "prompt_name": prompt_names,
            "truncation_direction": directions,
        },
    ),
    lane=st.sampled_from(["query", "bulk"]),
    default=st.sampled_from([None, "passage"]),
    ranges=ranges,
)
def test_native_request_is_a_job_or_a_client_error(
    tokenizer,
    prompts,
    body: dict[str, Any],
    lane: Lane,
    default: str | None,
    ranges: EncodingRanges | None,
) -> None:
    _native(tokenizer, prompts[default], body, lane, ranges)


# Requests the schema accepts (the ones above mostly fail it): long texts and token lists,
# so both sides cut, every encoding, prompt and side, and the refusals a valid body can
# still meet (unknown prompt, int8 without ranges, base64_codes with float, truncate off).
# Beyond the 256-token limit: a random word (a token at least) repeated 260+ times; built
# by repetition, as drawing hundreds of items would make the tests several times slower.
repeats = st.integers(min_value=260, max_value=300)
vocab_ids = st.integers(min_value=0, max_value=30_521)
long_texts = st.text(max_size=80) | st.builds(
    lambda word, k: f"a{word} " * k, st.text(max_size=6), repeats
)
id_lists = st.lists(vocab_ids, min_size=1, max_size=20) | st.builds(
    lambda ids, k: ids * k, st.lists(vocab_ids, min_size=1, max_size=3), repeats
)
WELL_FORMED = {  # omitted or null: the default
    "prompt_name": st.sampled_from([None, *PROMPTS, "nope"]),
    "truncation_direction": st.sampled_from([None, "right", "left"]),
    "encoding_format": st.sampled_from(ENCODINGS),
}
OPTIONAL = {
    "dimensions": st.integers(min_value=1, max_value=DIM),
    "base64_codes": st.booleans(),
    "truncate": st.booleans(),
}
WELL = settings(FUZZ, max_examples=100)


@WELL
@given(
    body=st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "input": long_texts
            | st.lists(long_texts, min_size=1, max_size=6)
            | id_lists
            | st.lists(id_lists, min_size=1, max_size=6),
            **WELL_FORMED,
        },
        optional=OPTIONAL,
    ),
    default=st.sampled_from([None, "passage"]),
    normalize=st.booleans(),
    ranges=ranges,
)
def test_well_formed_openai_request_gets_its_rows_and_encoding(
    tokenizer,
    prompts,
    body: dict[str, Any],
    default: str | None,
    normalize: bool,
    ranges: EncodingRanges | None,
) -> None:
    event("job" if _openai(tokenizer, prompts[default], body, normalize, ranges) else "refused")


@WELL
@given(
    body=st.fixed_dictionaries(
        {"texts": st.lists(long_texts, min_size=1, max_size=6), **WELL_FORMED},
        optional={**OPTIONAL, "normalize": st.booleans()},
    ),
    lane=st.sampled_from(["query", "bulk"]),
    default=st.sampled_from([None, "passage"]),
    ranges=ranges,
)
def test_well_formed_native_request_gets_its_rows_and_encoding(
    tokenizer,
    prompts,
    body: dict[str, Any],
    lane: Lane,
    default: str | None,
    ranges: EncodingRanges | None,
) -> None:
    event("job" if _native(tokenizer, prompts[default], body, lane, ranges) else "refused")


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
