"""Property-based engine tests: arbitrary unicode, lengths, list sizes and dimensions give
vectors of the right shape, finite, normalised, each equal to the text embedded alone
(no crossed-over rows inside a batch) — or one of our errors. The same for prompted rows
of a model whose pooling leaves the prompt out, cut from either side, in every encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedkit.core.errors import EmbedkitError, InvalidDimensions, InvalidInput
from embedkit.core.settings import Settings
from embedkit.runtime.vectors import QUANTIZED, calibrate_ranges, encode_codes
from embedkit.serve.edge.schemas import EmbedRequest
from embedkit.serve.pipeline.jobs import native_job

DIM = 384
any_text = st.text(max_size=80) | st.text(
    st.characters(codec="utf-8"), min_size=200, max_size=1500
)  # beyond the 256-token limit: truncated


@pytest.fixture(scope="module")
def engine(fp32_artifact):
    from embedkit.runtime.engine import Engine

    return Engine(fp32_artifact)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(any_text, min_size=1, max_size=6),
    dimensions=st.none() | st.integers(min_value=-2, max_value=DIM + 2),
    normalize=st.booleans(),
)
def test_encode_any_unicode_batch(
    engine, texts: list[str], dimensions: int | None, normalize: bool
) -> None:
    try:
        got = engine.encode(texts, dimensions=dimensions, normalize=normalize)
    except InvalidDimensions:
        assert dimensions is not None and not 1 <= dimensions <= DIM
        return
    width = dimensions or DIM
    assert got.shape == (len(texts), width) and got.dtype == np.float32
    assert np.isfinite(got).all()
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(texts):  # each row is its own text's vector
        alone = engine.encode([text], dimensions=dimensions, normalize=normalize)[0]
        assert np.abs(got[i] - alone).max() <= 1e-4, i


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(
        st.none()
        | st.integers()
        | st.binary(max_size=5)
        | st.lists(st.text(max_size=3), max_size=2),
        min_size=1,
        max_size=4,
    )
    | st.just([])
)
def test_non_text_items_are_invalid_input(engine, items: list[object]) -> None:
    with pytest.raises(InvalidInput):
        engine.encode(items)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.lists(st.integers(min_value=0, max_value=30_521), max_size=300), max_size=5))
def test_embed_ids_any_lengths(engine, ids: list[list[int]]) -> None:
    """Raw ids (as the Embedder receives them): empty, over the limit or fine — never a crash."""
    try:
        vectors, tel = engine.embed_ids(ids)
    except EmbedkitError as exc:
        assert exc.status in (400, 413), exc
        assert not ids or any(len(r) == 0 or len(r) > engine.tokenizer.max_length for r in ids)
        return
    assert vectors.shape == (len(ids), DIM) and np.isfinite(vectors).all()
    assert tel.texts == len(ids) and tel.tokens == sum(map(len, ids))


@pytest.fixture(scope="module")
def prompt_engine(prompt_artifact):
    """The tiny E5-style model (tests/tiny_models.py): prompts, include_prompt=false."""
    from embedkit.runtime.engine import Engine

    return Engine(prompt_artifact, Settings(providers=["CPUExecutionProvider"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(
        st.text(max_size=40)
        | st.builds(lambda w, k: f"a{w} " * k, st.text(max_size=4), st.integers(70, 100)),
        min_size=1,
        max_size=4,
    ),
    prompt_name=st.sampled_from([None, "query", "passage"]),
    direction=st.sampled_from([None, "right", "left"]),
    encoding=st.sampled_from(["float", *QUANTIZED]),
)
def test_prompted_rows_cut_either_side_pool_alone(
    prompt_engine, texts: list[str], prompt_name: str | None, direction: str | None, encoding: str
) -> None:
    """Rows (texts over the 64-token limit among them) behind a prompt whose positions the
    pooling skips: each row's vector is finite and the one it gets embedded alone."""
    tok, prompts = prompt_engine.tokenizer, prompt_engine.prompts
    req = EmbedRequest.model_validate(
        {"texts": texts, "prompt_name": prompt_name, "truncation_direction": direction}
    )
    job = native_job(req, tok, Settings(), lane="bulk", model_dim=32, prompts=prompts)
    prompt = prompts.resolve(prompt_name)
    if prompt is not None:  # the skipped positions are the prompt's, whichever side is cut
        assert job.pool_from == [prompt.pool_from] * len(texts)
        assert all(row[: prompt.pool_from] == [101, *prompt.ids] for row in job.ids)
    raw, _ = prompt_engine.embed_ids(job.ids, job.pool_from)
    assert raw.shape == (len(texts), 32) and np.isfinite(raw).all()
    for i, row in enumerate(job.ids):
        alone, _ = prompt_engine.embed_ids([row], None if prompt is None else [prompt.pool_from])
        assert np.abs(raw[i] - alone[0]).max() <= 1e-4, i
    if encoding in QUANTIZED:
        codes = encode_codes(
            raw,
            encoding,
            normalize=True,
            dimensions=None,
            model_dim=32,
            ranges=calibrate_ranges(raw),
        )
        assert codes.shape == (len(texts), 4 if encoding.endswith("binary") else 32)
