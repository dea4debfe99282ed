"""Which engine core serves an artifact: an embedding model's or a cross-encoder's.

Its own module because each core's module would otherwise import the other's
(:class:`~embedkit.serve.engine.reranker.RerankerCore` is an
:class:`~embedkit.serve.engine.embedder.EmbedderCore` with its own engine).
"""

from __future__ import annotations

from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.serve.engine import identity
from embedkit.serve.engine.embedder import EmbedderCore
from embedkit.serve.engine.reranker import RerankerCore


def build_core(
    artifact: Artifact,
    settings: Settings,
    *,
    default: bool = True,
    identities: identity.ServedIdentities | None = None,
    runs: int = 1,
) -> EmbedderCore:
    """The engine core for ``artifact``'s task: an :class:`EmbedderCore`, or for a
    cross-encoder (``task: rerank``) a :class:`~embedkit.serve.engine.reranker.RerankerCore`,
    which takes the same rows (a pair is ids plus where its document starts) and answers
    one raw score per row: the runner threads, lanes and batching do not tell them apart."""
    if artifact.manifest.task == "rerank":
        return RerankerCore(artifact, settings, default=default, identities=identities, runs=runs)
    return EmbedderCore(artifact, settings, default=default, identities=identities, runs=runs)
