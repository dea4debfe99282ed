"""The int8/uint8 output encodings' ranges, calibrated once per release.

The served model encodes the vendored STS Benchmark train sentences (the evaluation
data shipped in the package, :mod:`embedkit.model.evaldata`) and each dimension's
min and max go into the manifest (:class:`~embedkit.model.artifact.EncodingRanges`).
Serving reads them from there and never recalibrates, so the same text always maps
to the same codes; a release's variants inherit their fp32 parent's ranges, so their
codes share its buckets.
"""

from __future__ import annotations

import numpy as np

from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.model.artifact import Artifact, EncodingRanges, amend
from embedkit.runtime.engine import Engine
from embedkit.runtime.vectors import calibrate_ranges

SOURCE = "stsbenchmark/sts-train"


def calibrate(
    artifact: Artifact, settings: Settings | None = None, *, limit: int | None = None
) -> EncodingRanges:
    """Ranges of ``artifact``'s vectors (normalised as the manifest says, every dimension)
    over the first ``limit`` unique train sentences (all ~10.6k by default)."""
    texts = evaldata.sts_sentences("train")[:limit]
    normalized = artifact.manifest.embedding_config.normalize
    vectors = Engine(artifact, settings).encode(texts, normalize=normalized)
    ranges = calibrate_ranges(np.asarray(vectors, dtype=np.float32))
    return EncodingRanges(
        min=ranges[0].tolist(),
        max=ranges[1].tolist(),
        normalized=normalized,
        texts=len(texts),
        source=SOURCE,
    )


def with_ranges(artifact: Artifact, ranges: EncodingRanges) -> Artifact:
    """``artifact`` with ``ranges`` in its manifest, not written: the release writes each
    version's manifest once, at its end (:func:`embedkit.model.artifact.seal`)."""
    return amend(artifact, {"encoding_ranges": ranges.model_dump(mode="json")})
