"""Reference vectors: a few fixed texts whose vectors a manifest stores, so each pod can
check at startup that it computes what the release measured.

Each text is encoded alone: dynamic INT8 picks activation scales per batch, so a
vector depends on its batch-mates and only a batch of one is reproducible.
"""

from __future__ import annotations

import numpy as np

from embedkit.model.artifact import ReferenceVectors
from embedkit.runtime.engine import Engine

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
