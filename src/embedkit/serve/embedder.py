"""The inner (Embedder) service's work: one ORT engine, batched token ids → raw vectors.

The only module of this package that imports ONNX Runtime (through
:mod:`embedkit.runtime.engine`); the front side tokenises, post-processes and
shapes bodies with numpy only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedkit.core import metrics
from embedkit.core.errors import EmbedkitError
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.serve.schemas import Item
from embedkit.serve.startup import settle_gc

log = logging.getLogger(__name__)


class EmbedderCore:
    """Owns the ORT engine; runs merged batches and records what they cost."""

    def __init__(self, artifact: Artifact, settings: Settings) -> None:
        try:
            self.engine = Engine(artifact, settings)
        except EmbedkitError as exc:  # strict provider refusal, unloadable graph: one line
            log.error("embedkit refuses to start: %s", exc)
            metrics.get().model_load_failures.labels(reason=exc.code or "engine_error").inc()
            raise
        report = self.engine.provider_report
        if report.fallback:
            log.warning("embedkit provider fallback: %s", report.reason)
        self.ready = False

    def warmup(self) -> None:
        self.engine.warmup()
        settle_gc(self.engine.settings)
        self.ready = True

    def embed(self, items: Sequence[Item], api_name: str) -> np.ndarray:
        m = metrics.get()
        start = time.time()
        for sent_at in {item[0] for item in items}:  # once per request, not per text
            m.queue_wait.labels(api=api_name).observe(max(0.0, start - sent_at))
        vectors, tel = self.engine.embed_ids([item[1] for item in items])
        m.inference_time.labels(api=api_name).observe(tel.inference_s)
        m.padding_ratio.observe(tel.padding_ratio)
        for size, padded in zip(tel.sub_batch_sizes, tel.sub_batch_padded, strict=True):
            m.sub_batch_size.observe(size)
            m.sub_batch_tokens.observe(padded)
        return vectors

    def info(self) -> dict[str, Any]:
        return self.engine.info()
