"""Reference vectors (and a reranker's reference scores): a few fixed texts (pairs) whose
vectors (raw scores) a manifest stores, so each pod can check at startup that it computes
what the release measured.

Each text (pair) is run alone: dynamic INT8 picks activation scales per batch, so a
result depends on its batch-mates and only a batch of one is reproducible.
"""

from __future__ import annotations

import numpy as np

from embedkit.model.artifact import ReferenceScores, ReferenceVectors
from embedkit.runtime.engine import Engine
from embedkit.runtime.rerank import Reranker

# Short and long, English and not, digits and punctuation: where INT8 kernels differ.
REFERENCE_TEXTS = (
    "A man is playing a guitar on stage.",
    "Die Katze schläft auf dem warmen Sofa, während draußen der Regen fällt.",
    "Q3 revenue rose 12.5% to $4.2bn; operating margin fell 80 bp (see table 7).",
    " ".join(
        "Quantised encoders are checked at startup against vectors stored at release, "
        "because integer kernels differ between processors with and without VNNI."
        for _ in range(8)
    ),
)


def _encode_each(engine: Engine, texts: tuple[str, ...] | list[str]) -> np.ndarray:
    return np.vstack([engine.encode([t], normalize=True) for t in texts])


def reference_vectors(engine: Engine, min_cosine: float) -> ReferenceVectors:
    """This engine's vectors for :data:`REFERENCE_TEXTS`, for the manifest."""
    vectors = _encode_each(engine, REFERENCE_TEXTS)
    return ReferenceVectors(
        texts=list(REFERENCE_TEXTS),
        vectors=[[round(float(x), 6) for x in row] for row in vectors],
        min_cosine=min_cosine,
    )


def reference_cosine(engine: Engine, reference: ReferenceVectors) -> float:
    """Least cosine between this engine's vectors and the stored ones."""
    got = _encode_each(engine, reference.texts)
    want = np.asarray(reference.vectors, dtype=np.float32)
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    if got.shape != want.shape:
        return -1.0
    return float(np.min(np.sum(got * want, axis=1)))


# The same spread for pairs: a match, a near miss, other languages, a document over the limit.
REFERENCE_PAIRS = (
    ("A man is playing a guitar.", "A man is playing a guitar on stage."),
    ("A man is playing a guitar.", "A woman is slicing an onion."),
    ("Wo schläft die Katze?", REFERENCE_TEXTS[1]),
    ("Q3 operating margin", REFERENCE_TEXTS[2]),
    ("Why are quantised encoders checked at startup?", REFERENCE_TEXTS[3] * 4),
)


def _score_each(
    reranker: Reranker, pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]
) -> np.ndarray:
    return np.concatenate([reranker.score([p], raw=True) for p in pairs])


def reference_scores(reranker: Reranker, max_abs_diff: float) -> ReferenceScores:
    """This reranker's raw scores for :data:`REFERENCE_PAIRS`, for the manifest."""
    scores = _score_each(reranker, REFERENCE_PAIRS)
    return ReferenceScores(
        pairs=list(REFERENCE_PAIRS),
        scores=[round(float(x), 6) for x in scores],
        max_abs_diff=max_abs_diff,
    )


def reference_score_diff(reranker: Reranker, reference: ReferenceScores) -> float:
    """Largest |this reranker's raw score - the stored one| over the reference pairs."""
    got = _score_each(reranker, reference.pairs)
    return float(np.max(np.abs(got - np.asarray(reference.scores, dtype=np.float32))))
