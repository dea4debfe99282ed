"""The encodings benchmark's search (embedkit_bench.encodings) on small synthetic data:
binary and ubinary rank alike, rescoring re-ranks the first stage's candidates by the
float query · the codes, and the report's tables carry every row."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.quality.retrieval import RetrievalSet, score_metrics
from embedkit.runtime.vectors import QUANTIZED, calibrate_ranges, encode_codes
from embedkit_bench import encodings


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, RetrievalSet]:
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(300, 64)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:40] + 0.3 * rng.normal(size=(40, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(300)]
    data = RetrievalSet(
        name="synthetic",
        doc_ids=ids,
        docs=ids,
        query_ids=[f"q{i}" for i in range(40)],
        queries=[f"q{i}" for i in range(40)],
        qrels={f"q{i}": {f"d{i}": 1} for i in range(40)},
    )
    return queries, docs, calibrate_ranges(docs), data


def test_binary_and_ubinary_search_alike(data) -> None:
    queries, docs, ranges, _ = data
    for multiplier in (None, 2):
        a, b = (
            encodings.searcher(queries, docs, enc, ranges, rescore_multiplier=multiplier)(
                slice(0, 40)
            )
            for enc in ("binary", "ubinary")
        )
        assert np.array_equal(a, b)


def test_first_stage_is_minus_hamming(data) -> None:
    queries, docs, ranges, _ = data
    scores = encodings.searcher(queries, docs, "ubinary", ranges, rescore_multiplier=None)
    q = np.unpackbits(
        encode_codes(
            queries, "ubinary", normalize=True, dimensions=None, model_dim=64, ranges=None
        ),
        axis=1,
    )
    d = np.unpackbits(
        encode_codes(docs, "ubinary", normalize=True, dimensions=None, model_dim=64, ranges=None),
        axis=1,
    )
    hamming = (q[:, None, :] != d[None, :, :]).sum(2)
    assert np.array_equal(scores(slice(0, 40)), -hamming)


@pytest.mark.parametrize("encoding", QUANTIZED)
def test_rescoring_reranks_candidates_with_the_float_query(data, encoding) -> None:
    queries, docs, ranges, retrieval_set = data
    first = encodings.searcher(queries, docs, encoding, ranges, rescore_multiplier=None)
    again = encodings.searcher(queries, docs, encoding, ranges, rescore_multiplier=3)
    scores = again(slice(0, 40))
    kept = np.isfinite(scores)
    assert (kept.sum(1) == 300).all()  # 3 × 100 candidates of 300 documents: all of them
    codes = encode_codes(
        docs, encoding, normalize=True, dimensions=None, model_dim=64, ranges=ranges
    )
    if encoding in ("binary", "ubinary"):
        packed = codes.view(np.uint8)  # binary is ubinary - 128: the top bit flipped
        values = np.unpackbits(packed ^ np.uint8(0x80) if encoding == "binary" else packed, axis=1)
    else:
        values = codes
    assert np.allclose(scores, queries @ values.astype(np.float32).T, atol=1e-4)
    ndcg, recall = score_metrics(first, retrieval_set)
    assert 0 < ndcg <= 100 and 0 < recall <= 100


def test_markdown_has_every_row() -> None:
    rows = [{"encoding": "float32", "bytes": 1536, "ndcg_at_10": 60.0, "recall_at_100": 90.0}]
    rows += [
        {
            "encoding": e,
            "bytes": 48,
            "ndcg_at_10": 50.0,
            "recall_at_100": 80.0,
            "rescored_ndcg_at_10": 58.0,
            "rescored_recall_at_100": 88.0,
        }
        for e in QUANTIZED
    ]
    result = {
        "when": "now",
        "embedkit": "x",
        "machine": "m",
        "model": "mini",
        "dimensions": 384,
        "dataset": "scifact-train",
        "documents": 1,
        "queries": 1,
        "rescore_multiplier": 4,
        "ranges": {"texts": 9, "source": "s"},
        "rows": rows,
        "clipping": [{"dimensions": 64, "served_clipped": 0.1, "renormalised_clipped": 20.0}],
    }
    text = encodings.markdown(result, "embedkit bench-encodings")
    assert "| ubinary | 48 | 32× | 50.00 | 80.00 | 58.00 | 88.00 |" in text
    assert "| float32 | 1536 | 1× | 60.00 | 90.00 | — | — |" in text
    assert "`embedkit bench-encodings`" in text and "| 64 | 0.10 | 20.00 |" in text
