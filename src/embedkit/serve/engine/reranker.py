"""The engine core of a served cross-encoder: rows of (query, document) pairs → raw scores.

:class:`RerankerCore` is an :class:`~embedkit.serve.engine.embedder.EmbedderCore` whose
engine is a :class:`~embedkit.runtime.rerank.Reranker`: the runner threads, the lanes,
the metrics and the served identity are the embedding core's. A pair arrives as a row
like a text, ``(sent_at, ids, split)``, ``split`` being where its document starts (the
first token with type id 1, :func:`~embedkit.runtime.tokens.segment_split`), and leaves
as one raw score, a ``[n, 1]`` "vector": the activation is the front's, per request
(``raw_scores``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact, Manifest
from embedkit.runtime.engine import Telemetry
from embedkit.runtime.reference import reference_score_diff
from embedkit.runtime.rerank import Reranker
from embedkit.runtime.tokens import segment_types
from embedkit.serve.edge.schemas import Item
from embedkit.serve.engine.embedder import EmbedderCore, choose_served


def _reproduces_scores(reranker: Reranker, manifest: Manifest) -> tuple[str, str] | None:
    """Why ``reranker`` does not reproduce the manifest's reference scores, or None."""
    ref = manifest.reference_scores
    if ref is None:
        return None
    diff = reference_score_diff(reranker, ref)
    if diff <= ref.max_abs_diff:
        return None
    return (
        "reference_scores",
        f"its reference scores are not reproduced here (max abs diff {diff:.3g} > "
        f"{ref.max_abs_diff:g})",
    )


class RerankerCore(EmbedderCore):
    """Owns a cross-encoder's session; scores merged batches of pairs."""

    def _open(
        self, artifact: Artifact, settings: Settings, isa: str, runs: int
    ) -> tuple[Artifact, Any, str | None]:
        """As an embedding model's (:func:`~embedkit.serve.engine.embedder.choose_served`): a
        variant whose verdict does not hold here, or whose reference scores this machine
        does not reproduce, is refused and its fp32 parent serves."""
        return choose_served(
            artifact,
            settings,
            isa,
            runs,
            open_engine=lambda art: Reranker(art, settings, runs=runs),
            reproduces=_reproduces_scores,
        )

    def _infer(self, items: Sequence[Item]) -> tuple[np.ndarray, Telemetry]:
        ids = [item[1] for item in items]
        types = [
            segment_types(len(item[1]), int(item[2]) if len(item) == 3 else len(item[1]))
            for item in items
        ]
        scores, tel = self.engine.score_ids(ids, types)
        return scores[:, None], tel
