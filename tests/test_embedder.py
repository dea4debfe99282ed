"""The Embedder's core: a real engine over merged batches, and the metrics each batch records."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import REGISTRY

from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.serve.embedder import EmbedderCore


def _buckets(name: str) -> dict[str, float]:
    """Cumulative bucket counts of one of our histograms, by upper bound."""
    return {
        s.labels["le"]: s.value
        for metric in REGISTRY.collect()
        for s in metric.samples
        if s.name == f"{name}_bucket"
    }


def test_each_sub_batch_is_recorded_with_its_own_size(fp32_artifact: Artifact) -> None:
    """Four texts cut 3 + 1 (caller order, at most 3 per run) must land in the histograms
    as one run of 3 and one of 1 — not two runs of the mean, 2."""
    settings = Settings(
        providers=["CPUExecutionProvider"], token_aware_batching=False, max_sub_batch_size=3
    )
    core = EmbedderCore(fp32_artifact, settings)
    short, long = [101, 2000, 102], [101, *range(2000, 2018), 102]  # 3 and 20 tokens
    ids = [short, short, short, long]  # runs padded to 3×3 = 9 and 1×20 = 20 tokens
    sizes, tokens = _buckets("embedkit_sub_batch_size"), _buckets("embedkit_sub_batch_tokens")
    vectors = core.embed([(time.time(), row) for row in ids], "bulk")
    size_delta = {
        le: v - sizes.get(le, 0.0) for le, v in _buckets("embedkit_sub_batch_size").items()
    }
    token_delta = {
        le: v - tokens.get(le, 0.0) for le, v in _buckets("embedkit_sub_batch_tokens").items()
    }
    assert (size_delta["1.0"], size_delta["2.0"], size_delta["4.0"]) == (1, 1, 2)
    assert (token_delta["16.0"], token_delta["32.0"]) == (1, 2)
    want, _ = Engine(fp32_artifact, settings).embed_ids(ids)
    np.testing.assert_allclose(vectors, want, atol=1e-6)
