"""The embedding engine: token ids → pooled vectors, no torch. The graph runs on ONNX
Runtime or, for an ``openvino-*`` variant, on OpenVINO: both behind
:class:`~embedkit.runtime.compiled.CompiledModel`, so everything here is shared.

On CPU the biggest waste is padding: a random batch of 32 STS Benchmark
sentences pads to ~2.5× its real tokens. So a batch is sorted by token length,
cut into sub-batches under a padded-token budget and a size cap, each padded
only to its own longest text, run, and put back in the caller's order.
Post-processing (L2 normalisation, Matryoshka truncation, NaN/Inf check) is
plain numpy in :mod:`embedkit.runtime.vectors`, which the HTTP front service shares.

Never import torch or transformers from here (a test checks it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import InferenceError, InputTooLong, InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model.artifact import MODEL_FILE, Artifact, resolve
from embedkit.runtime.chunking import Chunking, ChunkPlan, plan_chunks, pool
from embedkit.runtime.compiled import CompiledModel, ProviderReport
from embedkit.runtime.openvino import OpenVINOModel  # imports openvino itself only when used
from embedkit.runtime.prompts import Prompts, pool_starts
from embedkit.runtime.session import (
    Precision,
    Runner,
    ShapeProfile,
    create_session,
    require_approved,
    served_precision,
    trt_fp16_decision,
)
from embedkit.runtime.tokens import TextTokenizer, pad_batch, validate_texts
from embedkit.runtime.vectors import check_dimensions, postprocess


@dataclass(frozen=True)
class Telemetry:
    """What one call cost; the service exports these as metrics."""

    texts: int
    tokens: int
    padded_tokens: int
    sub_batches: int
    inference_s: float
    provider: str
    sub_batch_sizes: tuple[int, ...] = ()  # texts per ORT run, for per-run histograms
    sub_batch_padded: tuple[int, ...] = ()  # padded tokens per ORT run

    @property
    def padding_ratio(self) -> float:
        """Padded tokens per real token (1.0 = no padding)."""
        return self.padded_tokens / self.tokens if self.tokens else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "padding_ratio": self.padding_ratio}

    @classmethod
    def of_call(
        cls,
        lengths: Sequence[int],
        groups: Sequence[Sequence[int]],
        padded: Sequence[int],
        inference_s: float,
        provider: str,
    ) -> Telemetry:
        """A call's cost from its rows' token lengths and the sub-batches it ran as."""
        return cls(
            texts=len(lengths),
            tokens=sum(lengths),
            padded_tokens=sum(padded),
            sub_batches=len(groups),
            inference_s=inference_s,
            provider=provider,
            sub_batch_sizes=tuple(len(g) for g in groups),
            sub_batch_padded=tuple(padded),
        )


def plan_sub_batches(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    max_size: int,
    token_aware: bool = True,
    run_cost_tokens: int = 32,
) -> list[list[int]]:
    """Group indices into sub-batches; each is padded to its own longest text.

    Token-aware: sort longest first, then cut the sorted run where it minimises
    ``padded tokens + run_cost_tokens × runs`` (an exact dynamic programme over
    cut points), with every sub-batch at most ``max_size`` texts and
    ``size × longest <= max_tokens`` (a single text always fits). A greedy
    fill-the-budget split leaves ~1.6× padding on a random batch of 32 sts-test
    sentences; this leaves ~1.15×. Otherwise: caller order, cut only by ``max_size``.
    """
    n = len(lengths)
    if not token_aware:
        return [list(range(i, min(i + max_size, n))) for i in range(0, n, max_size)]
    order = sorted(range(n), key=lambda i: lengths[i], reverse=True)
    longest = [lengths[i] for i in order]  # longest[i] pads a group starting at i
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the first j texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(0, j - max_size) - 1, -1):
            size = j - i
            if size > 1 and longest[i] * size > max_tokens:
                break  # longest[i] only grows as i falls, so no earlier start fits
            cost = best[i] + run_cost_tokens + longest[i] * size
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    groups.reverse()
    return groups


@dataclass(frozen=True)
class Graph:
    """An artifact's graph compiled on the runtime its manifest names (:func:`open_graph`)."""

    runner: CompiledModel
    session: Any  # ONNX Runtime's session, None on OpenVINO
    provider_report: ProviderReport
    precision: Precision

    @property
    def provider(self) -> str:
        return self.provider_report.active[0]


def open_graph(
    artifact: Artifact, settings: Settings, max_length: int, *, judging: bool, runs: int = 1
) -> Graph:
    """``artifact``'s graph on OpenVINO (its ``openvino-*`` modes) or ONNX Runtime, shaped
    for ``max_length`` tokens; refused unless its precision is approved (``judging``: the
    gate's own runs, which exist to judge unapproved artifacts). The embedding engine and
    the reranker share it."""
    manifest = artifact.manifest
    profile = ShapeProfile.for_engine(manifest.inputs, settings, max_length)
    trt_fp16 = trt_fp16_decision(manifest, settings, judging=judging)
    runner: CompiledModel
    session: Any = None
    if manifest.runtime == "openvino":
        ov = OpenVINOModel(
            artifact.model_path,
            manifest.quantization.mode,
            settings,
            inputs=manifest.inputs,
            output=manifest.output,
            streams=runs,
        )
        runner, report = ov, ov.report
    else:
        session, report = create_session(
            artifact.model_path,
            settings,
            profile=profile,
            trt_fp16=trt_fp16,
            cache_tag=manifest.files.get(MODEL_FILE, "")[:16] or None,
        )
        runner = Runner.for_session(
            session, report, settings, inputs=manifest.inputs, output=manifest.output
        )
    precision = served_precision(manifest, report.active[0], trt_fp16=trt_fp16)
    if not judging:
        require_approved(precision)
    return Graph(runner, session, report, precision)


class Engine:
    """One artifact's ONNX session and tokenizer, created once and reused; thread-safe.

    Reduced precision on a GPU provider (TensorRT FP16, an FP16/INT8 variant) needs the
    quality gate's approval in the manifest: without it TensorRT builds FP32 engines and
    an unapproved variant is refused. ``judging=True`` is for the gate's own runs, which
    exist to judge unapproved artifacts.
    """

    def __init__(
        self,
        artifact: Artifact,
        settings: Settings | None = None,
        *,
        judging: bool = False,
        runs: int = 1,
    ) -> None:
        """``runs``: how many calls the caller runs at once (the service's parallel runs,
        each on ``intra_op_threads`` cores: ``serve.pipeline.options.ort_runs``). ONNX
        Runtime's session takes concurrent runs as it is; OpenVINO needs a stream per run,
        or they queue behind one another."""
        self.settings = settings or get_settings()
        self.judging = judging
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.dimension = self.manifest.embedding_config.dimension
        self.tokenizer = TextTokenizer.from_artifact(artifact)
        self.prompts = Prompts(self.manifest, self.tokenizer)
        graph = open_graph(
            artifact, self.settings, self.tokenizer.max_length, judging=judging, runs=runs
        )
        self.runner: CompiledModel = graph.runner
        self.session: Any = graph.session  # ONNX Runtime's (its profiler reads it), if any
        self.provider_report = graph.provider_report
        self.provider = graph.provider
        # What a served-identity object reads: precision (weights/compute/approval) + provider.
        self.precision: Precision = graph.precision

    @classmethod
    def load(cls, tag_or_dir: str | Path, settings: Settings | None = None) -> Engine:
        """Resolve a BentoML tag or artifact directory (sha256-verified) and build the engine."""
        return cls(resolve(tag_or_dir), settings)

    @property
    def provider_info(self) -> ProviderReport:
        return self.provider_report

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.manifest.name,
            "tag": self.artifact.tag,
            "path": str(self.artifact.path),
            "model_id": self.manifest.model_id,
            "dimension": self.dimension,
            "max_length": self.tokenizer.max_length,
            "normalize": self.manifest.embedding_config.normalize,
            **self.prompts.describe(),
            "quantization": self.manifest.quantization.mode,
            "runtime": self.manifest.runtime,
            **(
                {"openvino": self.runner.describe()}
                if isinstance(self.runner, OpenVINOModel)
                else {}
            ),
            "providers": self.provider_report.as_dict(),
            "precision": self.precision.as_dict(),
            "session": {
                "graph_optimization_level": s.graph_optimization_level,
                "intra_op_threads": s.intra_op_threads,
                "inter_op_threads": s.inter_op_threads,
                "execution_mode": s.execution_mode,
                "enable_cpu_mem_arena": s.enable_cpu_mem_arena,
                "enable_mem_pattern": s.enable_mem_pattern,
                "arena_shrinkage": s.arena_shrinkage,
                "allow_spinning": s.allow_spinning,
                "spin_duration_us": s.spin_duration_us if s.allow_spinning else 0,
                "io_binding": self.runner.io_binding,
                "device": self.runner.device,
            },
            "batching": {
                "token_aware_batching": s.token_aware_batching,
                "max_batch_tokens": s.max_batch_tokens,
                "max_sub_batch_size": s.max_sub_batch_size,
                "sub_batch_cost_tokens": s.sub_batch_cost_tokens,
            },
        }

    def embed_ids(
        self, ids: Sequence[Sequence[int]], pool_from: Sequence[int] | None = None
    ) -> tuple[np.ndarray, Telemetry]:
        """Raw pooled float32 ``[n, dim]`` for token-id lists (special tokens included), in
        the caller's order. ``pool_from[i]``: leading positions of row ``i`` (its prompt)
        that the pooling skips; used only by a graph with a pooling-mask input."""
        if not ids:
            raise InvalidInput("input must not be an empty list", param="input")
        lengths = [len(row) for row in ids]
        if pool_from is not None and len(pool_from) != len(ids):
            raise InvalidInput(f"{len(pool_from)} pooling offsets for {len(ids)} inputs")
        for i, n in enumerate(lengths):
            if n == 0:
                raise InvalidInput(f"input[{i}] has no tokens", param="input")
            if n > self.tokenizer.max_length:
                raise InputTooLong(
                    f"input[{i}] has {n} tokens, more than the model's limit of "
                    f"{self.tokenizer.max_length}",
                    param="input",
                )
        groups = self.plan(lengths)
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        padded: list[int] = []
        elapsed = 0.0
        for group in groups:
            input_ids, mask = pad_batch([ids[i] for i in group], self.tokenizer.pad_id)
            padded.append(input_ids.size)
            pooling = self._pooling_mask(mask, group, pool_from)
            start = time.perf_counter()
            vectors = self.runner.run(input_ids, mask, pooling)
            elapsed += time.perf_counter() - start
            if vectors.shape != (len(group), self.dimension):
                raise InferenceError(
                    f"the graph returned shape {list(vectors.shape)}, "
                    f"expected [{len(group)}, {self.dimension}]"
                )
            out[group] = vectors
        telemetry = Telemetry.of_call(lengths, groups, padded, elapsed, self.provider)
        return out, telemetry

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """The runs (index groups, each padded to its longest) that :meth:`embed_ids` makes
        of texts of these token lengths under this engine's settings."""
        s = self.settings
        return plan_sub_batches(
            lengths,
            max_tokens=s.max_batch_tokens,
            max_size=s.max_sub_batch_size,
            token_aware=s.token_aware_batching,
            run_cost_tokens=s.sub_batch_cost_tokens,
        )

    def _pooling_mask(
        self, mask: np.ndarray, group: Sequence[int], pool_from: Sequence[int] | None
    ) -> np.ndarray | None:
        """The attention mask with each row's prompt zeroed (include_prompt: false), or None
        (the runner then pools over the attention mask)."""
        if pool_from is None or self.manifest.pooling_mask_input is None:
            return None
        pooling = mask.copy()
        for row, i in enumerate(group):
            pooling[row, : pool_from[i]] = 0
        return pooling

    def encode_with_telemetry(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        prompt_name: str | None = None,
    ) -> tuple[np.ndarray, Telemetry]:
        """:meth:`encode` plus the call's :class:`Telemetry`."""
        items = validate_texts(texts)
        check_dimensions(dimensions, self.dimension)  # fail before spending inference
        prompt = self.prompts.resolve(prompt_name)
        if prompt is not None:
            items = prompt.apply(items)
        # A manifest cutting from the left keeps the prompt whole, as the served routes do.
        keep = len(prompt.ids) if prompt is not None else 0
        ids, _ = self.tokenizer.encode_counted(items, truncate=truncate, keep=keep)
        raw, telemetry = self.embed_ids(ids, pool_starts(prompt, len(ids)))
        if normalize is None:
            normalize = self.manifest.embedding_config.normalize
        vectors = postprocess(
            raw, normalize=normalize, dimensions=dimensions, model_dim=self.dimension
        )
        return vectors, telemetry

    def encode(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """Validate → prompt → tokenise → embed → post-process; ``normalize=None`` follows
        the manifest. ``prompt_name`` names one of the model's prompts; None means its
        ``default_prompt_name`` (if any), as in ``SentenceTransformer.encode``."""
        vectors, _ = self.encode_with_telemetry(
            texts,
            normalize=normalize,
            dimensions=dimensions,
            truncate=truncate,
            prompt_name=prompt_name,
        )
        return vectors

    def encode_chunked(
        self,
        texts: Sequence[str],
        chunking: Chunking,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
    ) -> tuple[np.ndarray, ChunkPlan]:
        """Texts split into token windows (:mod:`embedkit.runtime.chunking`), embedded as
        rows, pooled per text (``mean``) or kept per chunk (``none``, in ``plan.chunks``
        order), then post-processed. The same path as ``/embed`` with ``chunking``."""
        items = validate_texts(texts)
        check_dimensions(dimensions, self.dimension)
        plan = plan_chunks(items, self.tokenizer, chunking)
        raw, _ = self.embed_ids(plan.ids)
        if normalize is None:
            normalize = self.manifest.embedding_config.normalize
        vectors = postprocess(
            pool(raw, plan), normalize=normalize, dimensions=dimensions, model_dim=self.dimension
        )
        return vectors, plan

    def warmup(self) -> None:
        """Run the shortest and the longest shapes once so the first request pays no setup,
        and let the runtime prepare what it prepares per shape."""
        texts = ["warm up", "word " * self.tokenizer.max_length]  # the second truncates to max
        self.embed_ids(self.tokenizer.encode(texts))
        s = self.settings
        self.runner.warm_up(s.max_sub_batch_size, s.max_batch_tokens, self.tokenizer.max_length)
