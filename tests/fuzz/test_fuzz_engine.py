"""Property-based engine tests: arbitrary unicode, lengths, list sizes and dimensions give
vectors of the right shape, finite, normalised, each equal to the text embedded alone
(no crossed-over rows inside a batch) — or one of our errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedkit.core.errors import EmbedkitError, InvalidDimensions, InvalidInput

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
