"""The runtime seam: a compiled model that runs padded batches.

The engine (token-aware batching, prompts, chunking, post-processing) is one; what runs
the graph is one of two runtimes, both behind :class:`CompiledModel`:
:class:`~embedkit.runtime.session.Runner` (ONNX Runtime, every provider) and
:class:`~embedkit.runtime.openvino.OpenVINOModel` (OpenVINO's CPU plugin: fp32, BF16,
INT8). :func:`compile_model` picks by the artifact's runtime (its manifest's mode), so
a variant always runs where the gate measured it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from embedkit.core.errors import InferenceError
from embedkit.model.artifact import POOLING_MASK_INPUT


class CompiledModel(Protocol):
    """One graph compiled for one device; thread-safe. ``run`` takes int64 ``[batch, seq]``
    ids and masks padded to the batch's longest text and returns float32 ``[batch, dim]``
    (a reranker's ``[batch, 1]`` scores, with the pairs' ``token_type_ids``)."""

    io_binding: bool
    device: str

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling_mask: np.ndarray | None = None,
        *,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def warm_up(self, max_batch: int, max_tokens: int, max_length: int) -> None:
        """Whatever the runtime prepares per shape, for the shapes batching can form."""


@dataclass(frozen=True)
class ProviderReport:
    """What was asked for, what the runtime offers and what actually runs."""

    requested: list[str]
    available: list[str]
    active: list[str]
    fallback: bool
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def graph_feeds(
    inputs: Sequence[str],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pooling_mask: np.ndarray | None = None,
    token_type_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The arrays for the inputs a graph declares (``token_type_ids`` as zeros unless given:
    a pair's tell the query's tokens from the document's)."""
    known = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        # Only an include_prompt=false graph declares it; no prompt: pool what attends.
        POOLING_MASK_INPUT: attention_mask if pooling_mask is None else pooling_mask,
    }
    out: dict[str, np.ndarray] = {}
    for name in inputs:
        if name in known:
            out[name] = known[name]
        elif name == "token_type_ids":
            out[name] = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        else:
            raise InferenceError(f"the graph wants an input {name!r} the engine cannot provide")
    return out
