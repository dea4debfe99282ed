"""The inner (Embedder) service's work: one ORT engine, batched token ids → raw vectors.

The only module of this package that imports ONNX Runtime (through
:mod:`embedkit.runtime.engine`); the front side tokenises, post-processes and
shapes bodies with numpy only. At startup it decides what serves: a variant whose
approval does not hold here (other ISA level or runtime, reference vectors not
reproduced, a reindex variant nobody named) is refused with one log line and a
metric, and its fp32 parent serves; then it builds the served identity.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from embedkit.core import metrics
from embedkit.core.errors import EmbedkitError
from embedkit.core.settings import Settings
from embedkit.model import toolchain
from embedkit.model.artifact import Artifact, Manifest
from embedkit.runtime.engine import Engine, Telemetry
from embedkit.runtime.reference import reference_cosine
from embedkit.serve.edge.schemas import Item
from embedkit.serve.engine import identity
from embedkit.serve.engine.startup import find_parent, refusal, settle_gc
from embedkit.serve.seams import Embedder, EngineReport

log = logging.getLogger(__name__)


class EmbedderCore:
    """Owns the ORT engine; runs merged batches and records what they cost."""

    def __init__(
        self,
        artifact: Artifact,
        settings: Settings,
        *,
        default: bool = True,
        identities: identity.ServedIdentities | None = None,
        runs: int = 1,
    ) -> None:
        """``default``: the deployment's default model (the only one unless several are
        served, ``settings.models``): its identity is the process's, published to
        ``identities`` (what this process serves; a core alone gets its own). ``runs``:
        the runs made at once on its engine (:class:`~embedkit.runtime.engine.Engine`)."""
        isa = toolchain.detect_isa().level
        try:
            served, self.engine, note = self._open(artifact, settings, isa, runs)
        except EmbedkitError as exc:  # strict provider refusal, unloadable graph: one line
            log.error("embedkit refuses to start: %s", exc)
            metrics.get().model_load_failures.labels(reason=exc.code or "engine_error").inc()
            raise
        report = self.engine.provider_report
        if report.fallback:
            log.warning("embedkit provider fallback: %s", report.reason)
        self.artifact = served
        self.identity = identity.build(
            served,
            provider=self.engine.provider,
            precision=self.engine.precision.compute,
            isa=isa,
            refused=note,
        )
        self.identities = identities if identities is not None else identity.ServedIdentities()
        self.identities.publish(self.identity, default=default)
        self.ready = False

    def _open(
        self, artifact: Artifact, settings: Settings, isa: str, runs: int
    ) -> tuple[Artifact, Any, str | None]:
        """(what serves, its engine, the refusal note): see :func:`choose_served`."""
        return choose_served(artifact, settings, isa, runs)

    def _infer(self, items: Sequence[Item]) -> tuple[np.ndarray, Telemetry]:
        """Raw pooled vectors of ``items``, in order, and what the runs cost."""
        # A third element (include_prompt=false models only): positions pooling skips.
        prompted = any(len(item) == 3 for item in items)
        pool_from = [int(item[2]) if len(item) == 3 else 0 for item in items] if prompted else None
        vectors, tel = self.engine.embed_ids([item[1] for item in items], pool_from)
        return vectors, tel

    def warmup(self) -> None:
        self.engine.warmup()
        settle_gc(self.engine.settings)
        self.ready = True

    def embed(self, items: Sequence[Item], api_name: str) -> np.ndarray:
        m = metrics.get()
        model = self.identity.name
        start = time.time()
        for sent_at in {item[0] for item in items}:  # once per request, not per text
            m.queue_wait.labels(api=api_name, model=model).observe(max(0.0, start - sent_at))
        vectors, tel = self._infer(items)
        m.inference_time.labels(api=api_name, model=model).observe(tel.inference_s)
        m.padding_ratio.observe(tel.padding_ratio)
        for size, padded in zip(tel.sub_batch_sizes, tel.sub_batch_padded, strict=True):
            m.sub_batch_size.observe(size)
            m.sub_batch_tokens.observe(padded)
        return vectors

    def info(self) -> dict[str, Any]:
        """The engine's description, the served identity and the served manifest's summary."""
        return {
            **self.engine.info(),
            "identity": self.identity.as_dict(),
            "manifest": self.artifact.manifest.summary(),
        }


def _reproduces_vectors(engine: Any, manifest: Manifest) -> tuple[str, str] | None:
    """Why ``engine`` does not reproduce the manifest's reference vectors, or None."""
    ref = manifest.reference
    if ref is None:
        return None
    cos = reference_cosine(engine, ref)
    if cos >= ref.min_cosine:
        return None
    return (
        "reference_vectors",
        f"its reference vectors are not reproduced here (least cosine {cos:.6f} < "
        f"{ref.min_cosine})",
    )


def choose_served(
    artifact: Artifact,
    settings: Settings,
    isa: str,
    runs: int = 1,
    *,
    open_engine: Callable[[Artifact], Any] | None = None,
    reproduces: Callable[[Any, Manifest], tuple[str, str] | None] = _reproduces_vectors,
) -> tuple[Artifact, Any, str | None]:
    """(what serves, its engine, the refusal note): ``artifact`` unless its approval does
    not hold here (:func:`refusal`, then ``reproduces``: the manifest's reference results
    on this engine), then its fp32 parent, after one log line and a metric.
    ``open_engine`` defaults to an :class:`Engine` (a reranker's core passes its own)."""
    opener = open_engine or (lambda art: Engine(art, settings, runs=runs))
    manifest = artifact.manifest
    refused = refusal(manifest, settings, isa=isa, runtimes=toolchain.installed_runtimes())
    if refused is None:
        engine = opener(artifact)
        if manifest.variant == "fp32":
            return artifact, engine, None
        refused = reproduces(engine, manifest)
        if refused is None:
            return artifact, engine, None
    parent = find_parent(artifact)
    log.error(
        "embedkit refuses variant %s (%s): %s; serving its fp32 parent %s",
        manifest.variant,
        artifact.tag,
        refused[1],
        parent.tag,
    )
    metrics.get().variant_refusals.labels(variant=manifest.variant, reason=refused[0]).inc()
    return parent, opener(parent), f"{manifest.variant}: {refused[1]}"


class LocalEmbedder:
    """The Embedder inside the front's own process (``topology=single``): the same
    :class:`EmbedderCore`, offered with the ``bentoml.depends`` proxy's async surface so
    the front's client, coalescers and admission work unchanged.

    ORT runs happen on ``runs`` dedicated threads sharing the one session (its ``run`` is
    thread-safe and releases the GIL, so the event loop keeps parsing, tokenising and
    answering meanwhile). With several runs each uses one core (``serve.options.ort_runs``):
    on small batches, separate runs beat one run whose threads synchronise inside every
    operator, and a call of ``2 * SPLIT_ROWS`` rows or more is cut by length into parts
    of similar token counts, one per run, so a single big request still uses every core.
    Waiting calls leave interactive lane first: a query waits only for runs in progress,
    never for queued bulk calls. A call whose request was cancelled before its turn is
    skipped. How many bulk runs an interactive call waited behind is counted (the runs
    holding a runner when it queued, plus any that started while it waited: at most
    ``runs``, since none may start) and reported in the :class:`EngineReport` the caller
    passes with the call.

    Several models (``settings.models``; ``core`` maps each served name to its core, the
    default first): the same threads run every model's session, so models never run more
    batches at once than there are runs; waiting calls are queued by (model, lane), the
    interactive lanes of all models before any bulk lane, round-robin between models of
    one lane (docs/design/serving.md, decision 5). :meth:`for_model` is one model's surface.
    """

    LANES: tuple[str, ...] = ("query", "bulk")  # priority order
    SPLIT_ROWS = 8  # fewest rows per part when a call is split across runs

    def __init__(self, core: EmbedderCore | Mapping[str, EmbedderCore], runs: int = 1) -> None:
        self.cores: dict[str, EmbedderCore] = (
            dict(core) if isinstance(core, Mapping) else {"": core}
        )
        self.models = list(self.cores)
        self.core = self.cores[self.models[0]]  # the default model's
        self.runs = max(1, runs)
        self._queues: dict[tuple[str, str], deque[_Call]] = {
            (model, lane): deque() for lane in self.LANES for model in self.models
        }
        self._turn = dict.fromkeys(self.LANES, 0)  # per lane: the model whose turn is next
        self._wake = threading.Condition()
        # Under _wake: runners waiting for work, bulk runs holding a runner, bulk runs begun.
        self._idle = 0
        self._bulk_running = 0
        self._bulk_started = 0
        for i in range(self.runs):
            threading.Thread(target=self._serve, name=f"embedkit-ort-{i}", daemon=True).start()

    def for_model(self, name: str) -> Embedder:
        """Model ``name``'s async surface (``embed_query``, ``embed_bulk``, ``info``)."""
        return _ModelEmbedder(self, name)

    def _parts(self, items: list[Item]) -> list[list[int]]:
        """Row indices per run: all rows, or (big calls) runs of similar token counts,
        sorted by length so each part pads little."""
        k = min(self.runs, len(items) // self.SPLIT_ROWS)
        if k < 2:
            return [list(range(len(items)))]
        order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
        total = sum(len(item[1]) for item in items)
        parts: list[list[int]] = [[]]
        done = 0
        for i in order:
            if len(parts) < k and parts[-1] and done >= total * len(parts) / k:
                parts.append([])
            parts[-1].append(i)
            done += len(items[i][1])
        return parts

    async def _run(
        self,
        items: list[Item],
        lane: str,
        model: str | None = None,
        report: EngineReport | None = None,
    ) -> np.ndarray:
        key = (model if model is not None else self.models[0], lane)
        parts = self._parts(items)
        if len(parts) == 1:
            return await self._enqueue(items, key, report)
        results = await asyncio.gather(
            *(self._enqueue([items[i] for i in part], key, report) for part in parts)
        )
        out = np.empty((len(items), results[0].shape[1]), dtype=results[0].dtype)
        for part, vectors in zip(parts, results, strict=True):
            out[part] = vectors
        return out

    async def _enqueue(
        self, items: list[Item], key: tuple[str, str], report: EngineReport | None
    ) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        report = report if key[1] == "query" else None
        with self._wake:
            # A query that finds a runner idle (not claimed by a query queued before it,
            # of any model) waits for no bulk run.
            free = self._idle - sum(len(self._queues[(m, "query")]) for m in self.models)
            ahead = 0 if free > 0 else self._bulk_running
            self._queues[key].append((items, fut, loop, report, ahead - self._bulk_started))
            self._wake.notify()
        return await fut

    def _next(self) -> tuple[str, str, _Call]:
        with self._wake:
            while True:
                for lane in self.LANES:
                    n = len(self.models)
                    for k in range(n):
                        i = (self._turn[lane] + k) % n
                        queue = self._queues[(self.models[i], lane)]
                        if queue:
                            self._turn[lane] = (i + 1) % n
                            call = queue.popleft()
                            if lane == "bulk":
                                self._bulk_running += 1
                                self._bulk_started += 1
                            elif call[3] is not None:
                                ahead = call[4] + self._bulk_started
                                call[3].waited(ahead)
                                metrics.get().bulk_runs_ahead.observe(ahead)
                            return self.models[i], lane, call
                self._idle += 1
                self._wake.wait()
                self._idle -= 1

    def _serve(self) -> None:
        while True:
            model, lane, (items, fut, loop, _, _) = self._next()
            result: np.ndarray | None = None
            error: BaseException | None = None
            try:
                if fut.cancelled():
                    continue
                result = self.cores[model].embed(items, lane)
            except BaseException as exc:  # handed to the caller, who translates it
                error = exc
            finally:
                # Released before the caller hears back, so a query sent next does not
                # count a bulk run that has already ended.
                if lane == "bulk":
                    with self._wake:
                        self._bulk_running -= 1
            loop.call_soon_threadsafe(_settle, fut, result, error)

    async def embed_query(
        self, items: list[Item], report: EngineReport | None = None
    ) -> np.ndarray:
        return await self._run(items, "query", report=report)

    async def embed_bulk(self, items: list[Item], report: EngineReport | None = None) -> np.ndarray:
        return await self._run(items, "bulk", report=report)

    async def info(self) -> dict[str, Any]:
        return {**self.core.info(), "ort_runs": self.runs}


class _ModelEmbedder:
    """One model's calls on a shared :class:`LocalEmbedder` (its runner threads)."""

    def __init__(self, local: LocalEmbedder, model: str) -> None:
        if model not in local.cores:
            raise KeyError(model)
        self.local = local
        self.model = model

    async def embed_query(
        self, items: list[Item], report: EngineReport | None = None
    ) -> np.ndarray:
        return await self.local._run(items, "query", self.model, report)

    async def embed_bulk(self, items: list[Item], report: EngineReport | None = None) -> np.ndarray:
        return await self.local._run(items, "bulk", self.model, report)

    async def info(self) -> dict[str, Any]:
        return {**self.local.cores[self.model].info(), "ort_runs": self.local.runs}


# items, their future and loop, the caller's report (queries) and the bulk runs ahead at
# enqueue minus the bulk runs begun by then (so adding those begun since gives the count).
_Call = tuple[
    list[Item],
    "asyncio.Future[np.ndarray]",
    "asyncio.AbstractEventLoop",
    EngineReport | None,
    int,
]


def _settle(
    fut: asyncio.Future[np.ndarray], result: np.ndarray | None, exc: BaseException | None
) -> None:
    if fut.done():  # cancelled while it ran
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(cast(np.ndarray, result))
