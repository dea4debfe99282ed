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
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Telemetry
from embedkit.runtime.rerank import Reranker
from embedkit.runtime.tokens import segment_types
from embedkit.serve.edge.schemas import Item
from embedkit.serve.engine.embedder import EmbedderCore


class RerankerCore(EmbedderCore):
    """Owns a cross-encoder's session; scores merged batches of pairs."""

    def _open(
        self, artifact: Artifact, settings: Settings, isa: str, runs: int
    ) -> tuple[Artifact, Any, str | None]:
        # No reranker variants exist yet (`embedkit release` refuses --variants for one):
        # the fp32 export serves, so there is no approval to check or parent to fall to.
        return artifact, Reranker(artifact, settings, runs=runs), None

    def _infer(self, items: Sequence[Item]) -> tuple[np.ndarray, Telemetry]:
        ids = [item[1] for item in items]
        types = [
            segment_types(len(item[1]), int(item[2]) if len(item) == 3 else len(item[1]))
            for item in items
        ]
        scores, tel = self.engine.score_ids(ids, types)
        return scores[:, None], tel
