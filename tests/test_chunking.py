"""Chunking: the window planner (spans, overlap, frame tokens, limits) and the engine's
chunked encoding (a short text is its plain vector; ``mean`` is the mean of ``none``)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedkit.core.errors import InvalidChunking, PayloadTooLarge
from embedkit.core.settings import Settings
from embedkit.runtime.chunking import Chunking, plan_chunks, windows
from embedkit.runtime.engine import Engine
from embedkit.runtime.tokens import TextTokenizer
from embedkit.runtime.vectors import postprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Distinct words that are one word piece each, so a chunk's span re-tokenises to its ids.
WORDS = "the cat sat on a mat and then it ran to see my dog who was not there at all".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tok(fp32_artifact) -> TextTokenizer:
    return TextTokenizer.from_artifact(fp32_artifact)


@pytest.fixture(scope="module")
def engine(fp32_artifact) -> Engine:
    return Engine(fp32_artifact, Settings(intra_op_threads=2))


def long_text(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


# --- windows -------------------------------------------------------------------------------


@given(n=st.integers(0, 600), room=st.integers(1, 300), data=st.data())
def test_windows_cover_the_text_with_exact_overlap(n: int, room: int, data) -> None:
    overlap = data.draw(st.integers(0, room - 1))
    cut = windows(n, room, overlap)
    assert cut[0][0] == 0 and cut[-1][1] == n
    assert all(0 < end - start <= room for start, end in cut) or n == 0
    for (s1, e1), (s2, e2) in itertools.pairwise(cut):
        assert e1 - s1 == room  # only the last window is short
        assert e1 - s2 == overlap and e2 > e1  # shares exactly `overlap`, adds new tokens
    if n > room:
        assert len(cut) == 1 + -(-(n - room) // (room - overlap))


# --- the planner on the real tokenizer -----------------------------------------------------


def test_a_text_within_the_limit_is_one_plain_chunk(tok: TextTokenizer) -> None:
    texts = ["hello world", "", "  ", long_text(100)]
    plan = plan_chunks(texts, tok, Chunking(max_tokens=128, overlap=16))
    assert plan.ids == tok.encode(texts)  # identical rows to a plain request
    assert [c.index for c in plan.chunks] == [0, 1, 2, 3]
    assert [(c.start, c.end) for c in plan.chunks[:3]] == [(0, 11), (0, 0), (0, 2)]
    assert plan.chunks[3].tokens == 102 and plan.chunks[3].end == len(texts[3])


@pytest.mark.parametrize(("max_tokens", "overlap"), [(32, 0), (32, 8), (10, 7), (256, 64)])
def test_chunks_are_framed_windows_whose_spans_slice_the_text(
    tok: TextTokenizer, max_tokens: int, overlap: int
) -> None:
    text = long_text(700)
    plan = plan_chunks(["short", text], tok, Chunking(max_tokens=max_tokens, overlap=overlap))
    ((content, _),) = tok.encode_content([text])
    prefix, suffix = tok.frame
    rows = [(r, c) for r, c in zip(plan.ids, plan.chunks, strict=True) if c.index == 1]
    assert plan.chunks[0].index == 0 and len(rows) == len(plan.ids) - 1 > 1
    rebuilt: list[int] = []
    for k, (row, chunk) in enumerate(rows):
        assert row[:1] == prefix and row[-1:] == suffix and len(row) == chunk.tokens
        assert len(row) <= max_tokens
        body = row[1:-1]
        assert tok.encode_content([text[chunk.start : chunk.end]])[0][0] == body
        if k:
            assert rebuilt[len(rebuilt) - overlap :] == body[:overlap]
            body = body[overlap:]
        rebuilt += body
    assert rebuilt == content  # the windows cover the text, each token once but the overlap
    starts = [c.start for _, c in rows]
    assert starts == sorted(starts) and rows[-1][1].end == len(text)


@pytest.mark.parametrize(
    ("chunking", "param", "match"),
    [
        (Chunking(max_tokens=0), "chunking.max_tokens", "between 3 and 256"),
        (Chunking(max_tokens=2), "chunking.max_tokens", "between 3 and 256"),
        (Chunking(max_tokens=257), "chunking.max_tokens", "got 257"),
        (Chunking(max_tokens=64, overlap=64), "chunking.overlap", "between 0 and 61"),
        (Chunking(max_tokens=64, overlap=62), "chunking.overlap", "got 62"),
        (Chunking(overlap=-1), "chunking.overlap", "between 0 and 253"),
        (Chunking(aggregate="max"), "chunking.aggregate", "mean, none"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_name_the_field(tok, chunking: Chunking, param: str, match: str) -> None:
    with pytest.raises(InvalidChunking, match=match) as err:
        plan_chunks(["a"], tok, chunking)
    assert err.value.param == param and err.value.status == 422


def test_the_row_limit_counts_chunks(tok: TextTokenizer) -> None:
    text = long_text(100)  # 100 content tokens: 4 chunks of 30
    assert len(plan_chunks([text], tok, Chunking(max_tokens=32), max_rows=4).ids) == 4
    with pytest.raises(PayloadTooLarge, match="split into 8 chunks") as err:
        plan_chunks([text, text], tok, Chunking(max_tokens=32), max_rows=7)
    assert err.value.param == "chunking"


# --- the engine ----------------------------------------------------------------------------


def test_engine_chunked_short_texts_are_the_plain_vectors(engine: Engine) -> None:
    texts = ["a short sentence", "", long_text(50)]
    plain = engine.encode(texts)
    for how in ("mean", "none"):
        got, plan = engine.encode_chunked(texts, Chunking(aggregate=how))
        assert len(plan.ids) == 3
        np.testing.assert_allclose(got, plain, atol=1e-6)


def test_engine_mean_is_the_token_weighted_mean_of_the_raw_chunk_vectors(engine: Engine) -> None:
    texts = [long_text(400), "short one", long_text(150)]
    raw, plan = engine.encode_chunked(texts, Chunking(64, 16, aggregate="none"), normalize=False)
    assert raw.shape == (len(plan.ids), 384) and len(plan.ids) > 3
    # Each chunk is an ordinary row: the same vector as embedding its ids plainly.
    np.testing.assert_allclose(raw, engine.embed_ids(plan.ids)[0], atol=1e-6)
    each, _ = engine.encode_chunked(texts, Chunking(64, 16, aggregate="none"))
    np.testing.assert_allclose(
        each, postprocess(raw, normalize=True, dimensions=None, model_dim=384), atol=1e-6
    )
    mean, _ = engine.encode_chunked(texts, Chunking(64, 16))
    raw_mean, _ = engine.encode_chunked(texts, Chunking(64, 16), normalize=False)
    for i in range(len(texts)):
        mine = [k for k, c in enumerate(plan.chunks) if c.index == i]
        weights = np.array([plan.chunks[k].tokens for k in mine], dtype=np.float64)
        want = (raw[mine] * weights[:, None]).sum(0) / weights.sum()
        assert (len(mine) > 1) == (i != 1)  # the long texts have unequal chunks: a real weighting
        np.testing.assert_allclose(raw_mean[i], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean[i], want / np.linalg.norm(want), atol=1e-6)


def test_engine_chunked_dimensions(engine: Engine) -> None:
    texts = [long_text(300)]
    full, plan = engine.encode_chunked(texts, Chunking(128, 32), normalize=False)
    for how in ("mean", "none"):
        got, _ = engine.encode_chunked(
            texts, Chunking(128, 32, aggregate=how), dimensions=32, normalize=False
        )
        rows = full[:, :32] if how == "mean" else engine.embed_ids(plan.ids)[0][:, :32]
        np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-6)  # Matryoshka after pooling
        unit, _ = engine.encode_chunked(texts, Chunking(128, 32, aggregate=how), dimensions=32)
        np.testing.assert_allclose(
            unit, rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6
        )


# --- the retrieval comparison (embedkit chunk-retrieval) -----------------------------------


def test_chunk_retrieval_arms_on_a_tiny_set(engine: Engine) -> None:
    from embedkit.core.errors import InvalidInput
    from embedkit.quality.retrieval import RetrievalSet, rank_metrics
    from embedkit_bench import chunked_retrieval

    docs = [long_text(300), "a dog ran", long_text(40)]
    data = RetrievalSet(
        name="tiny",
        doc_ids=["d0", "d1", "d2"],
        docs=docs,
        query_ids=["q0", "q1"],
        queries=["the cat sat on a mat", "my dog"],
        qrels={"q0": {"d0": 1}, "q1": {"d1": 1}},
    )
    report = chunked_retrieval.run(engine, data, [(64, 16)])
    assert [a.arm for a in report.arms] == ["truncate", "mean", "unit-mean"]
    assert report.long_documents == 1 and report.arms[0].tokens == 256 + 5 + 42
    _, plan = engine.encode_chunked(docs, Chunking(64, 16))
    assert report.arms[1].rows == len(plan.ids) and report.arms[1].tokens == sum(map(len, plan.ids))
    table = chunked_retrieval.markdown_table(report)
    assert table.count("\n") == 4 and "| mean | 64 / 16 |" in table
    # the mean arm is the API's: the same vectors scored as the report says
    vectors, _ = engine.encode_chunked(docs, Chunking(64, 16))
    queries = engine.encode(data.queries, normalize=True)
    assert rank_metrics(queries, vectors, data) == (
        report.arms[1].ndcg_at_10,
        report.arms[1].recall_at_100,
    )
    assert chunked_retrieval.parse_window("128:32") == (128, 32)
    with pytest.raises(InvalidInput, match="MAX_TOKENS:OVERLAP"):
        chunked_retrieval.parse_window("128")
    with pytest.raises(InvalidChunking):  # refused before any corpus is encoded
        chunked_retrieval.run(engine, data, [(64, 64)])
