"""The reranker: (query, document) pairs → one relevance score each, no torch.

A cross-encoder artifact (``task: rerank``) runs on the same seam as the embedding engine
(:func:`~embedkit.runtime.engine.open_graph`, ONNX Runtime or OpenVINO) with the same
token-aware batching (:func:`~embedkit.runtime.engine.plan_sub_batches`): a pair is one
row, sorted by length and cut into sub-batches under the padded-token budget. The graph
returns the raw score (the classifier's logit); the activation the model names (the
manifest's ``rerank.activation``, Sigmoid by default, as ``CrossEncoder.predict``) is
applied here, so raw scores stay one flag away.

Never import torch or transformers from here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedkit.core.errors import InferenceError, InputTooLong, InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Telemetry, open_graph, plan_sub_batches
from embedkit.runtime.tokens import Direction, PairTokenizer, pad_batch, pad_type_ids
from embedkit.runtime.vectors import activate

Pair = tuple[str, str]


def validate_pairs(pairs: object) -> list[Pair]:
    """A non-empty list of ``(query, document)`` string pairs, or :class:`InvalidInput`
    naming the first bad item. Empty strings are accepted, as in ``CrossEncoder.predict``."""
    if isinstance(pairs, str) or not isinstance(pairs, list | tuple):
        raise InvalidInput(
            f"pairs must be a list of [query, document], got {type(pairs).__name__}",
            param="pairs",
        )
    if not pairs:
        raise InvalidInput("pairs must not be an empty list", param="pairs")
    out: list[Pair] = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidInput(f"pairs[{i}] must be a [query, document] pair", param="pairs")
        query, document = pair
        if not isinstance(query, str) or not isinstance(document, str):
            raise InvalidInput(f"pairs[{i}] must hold two strings", param="pairs")
        out.append((query, document))
    return out


class Reranker:
    """One cross-encoder artifact's graph and pair tokenizer, created once; thread-safe."""

    def __init__(
        self,
        artifact: Artifact,
        settings: Settings | None = None,
        *,
        judging: bool = False,
        runs: int = 1,
    ) -> None:
        self.settings = settings or get_settings()
        self.judging = judging
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.config = self.manifest.rerank_config  # refuses an embedding artifact by task
        self.tokenizer = PairTokenizer.from_artifact(artifact)
        graph = open_graph(
            artifact, self.settings, self.tokenizer.max_length, judging=judging, runs=runs
        )
        self.runner = graph.runner
        self.session = graph.session
        self.provider_report = graph.provider_report
        self.provider = graph.provider
        self.precision = graph.precision

    def info(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "tag": self.artifact.tag,
            "path": str(self.artifact.path),
            "model_id": self.manifest.model_id,
            "task": self.manifest.task,
            "max_length": self.tokenizer.max_length,
            "activation": self.config.activation,
            "truncation": self.config.truncation,
            "quantization": self.manifest.quantization.mode,
            "runtime": self.manifest.runtime,
            "providers": self.provider_report.as_dict(),
            "precision": self.precision.as_dict(),
        }

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """The runs (index groups, each padded to its longest pair) :meth:`score_ids` makes."""
        s = self.settings
        return plan_sub_batches(
            lengths,
            max_tokens=s.max_batch_tokens,
            max_size=s.max_sub_batch_size,
            token_aware=s.token_aware_batching,
            run_cost_tokens=s.sub_batch_cost_tokens,
        )

    def score_ids(
        self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, Telemetry]:
        """Raw float32 scores ``[n]`` of tokenised pairs, in the caller's order."""
        if not ids:
            raise InvalidInput("pairs must not be an empty list", param="pairs")
        if len(type_ids) != len(ids):
            raise InvalidInput(f"{len(type_ids)} token type rows for {len(ids)} pairs")
        lengths = [len(row) for row in ids]
        for i, n in enumerate(lengths):
            if n == 0:
                raise InvalidInput(f"pair {i} has no tokens", param="pairs")
            if n > self.tokenizer.max_length:
                raise InputTooLong(
                    f"pair {i} has {n} tokens, more than the model's limit of "
                    f"{self.tokenizer.max_length}",
                    param="pairs",
                )
        groups = self.plan(lengths)
        out = np.empty(len(ids), dtype=np.float32)
        padded: list[int] = []
        elapsed = 0.0
        for group in groups:
            input_ids, mask = pad_batch([ids[i] for i in group], self.tokenizer.pad_id)
            types = pad_type_ids([type_ids[i] for i in group], input_ids.shape[1])
            padded.append(input_ids.size)
            start = time.perf_counter()
            scores = self.runner.run(input_ids, mask, token_type_ids=types)
            elapsed += time.perf_counter() - start
            if scores.shape != (len(group), 1):
                raise InferenceError(
                    f"the graph returned shape {list(scores.shape)}, expected [{len(group)}, 1]"
                )
            out[group] = scores[:, 0]
        telemetry = Telemetry.of_call(lengths, groups, padded, elapsed, self.provider)
        return out, telemetry

    def score_with_telemetry(
        self,
        pairs: Sequence[Pair],
        *,
        raw: bool = False,
        truncate: bool = True,
        direction: Direction | None = None,
    ) -> tuple[np.ndarray, Telemetry]:
        """:meth:`score` plus the call's :class:`Telemetry`."""
        items = validate_pairs(pairs)
        ids, types, _ = self.tokenizer.encode_pairs(items, truncate=truncate, direction=direction)
        scores, telemetry = self.score_ids(ids, types)
        return (scores if raw else activate(scores, self.config.activation)), telemetry

    def score(
        self,
        pairs: Sequence[Pair],
        *,
        raw: bool = False,
        truncate: bool = True,
        direction: Direction | None = None,
    ) -> np.ndarray:
        """Validate → tokenise (only the document cut) → score → activation; float32 ``[n]``.
        ``raw=True`` skips the activation (``CrossEncoder.predict(activation_fn=Identity())``)."""
        scores, _ = self.score_with_telemetry(
            pairs, raw=raw, truncate=truncate, direction=direction
        )
        return scores

    def warmup(self) -> None:
        """Run the shortest and the longest pair once so the first request pays no setup."""
        self.score([("warm up", "warm up"), ("warm up", "word " * self.tokenizer.max_length)])
        s = self.settings
        self.runner.warm_up(s.max_sub_batch_size, s.max_batch_tokens, self.tokenizer.max_length)
