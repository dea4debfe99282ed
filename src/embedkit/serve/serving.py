"""What the two BentoML services do, kept out of ``service.py`` so it stays wiring only.

* :func:`load_artifact` — the served artifact from the BentoML model store,
  checksums verified before anything is served; a missing or tampered
  artifact logs one clear line, counts ``model_load_failures`` and stops startup.
* :class:`EmbedderCore` — the inner service's work: one ORT :class:`Engine`,
  batched token ids → raw pooled vectors, with metrics.
* :class:`Front` — the front service's work: validate and tokenise (no ORT
  session here), hand ids to the Embedder's batchable API for the request's
  lane, post-process per request, shape the body; and the warm-up that also
  pushes BentoML's dispatcher through its unbatched training requests.

Tokenising in the front means tokens are counted once and exactly for usage,
and the inner process spends its CPU on inference only.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError, EmbedkitError, InferenceError, Overloaded
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.runtime.tokens import TextTokenizer
from embedkit.runtime.vectors import postprocess
from embedkit.serve import api
from embedkit.serve.coalesce import Coalescer

log = logging.getLogger("embedkit.serve.serving")

# One item of the Embedder's batchable APIs: (time the front handed it over, token ids).
# The timestamp lets the Embedder measure queue wait across the process boundary.
Item = tuple[float, list[int]]
_OFFLOAD_ITEMS = 64  # tokenise bigger requests in a thread, off the event loop
_WARM_TEXT = "warm up the whole request path"


# --- startup ---------------------------------------------------------------------


def load_artifact(model: Any) -> Artifact:
    """The artifact behind a ``bentoml.models.BentoModel`` reference, sha256-verified.

    Reads the local store only (``BentoModel``'s own resolve would try BentoCloud).
    """
    tag = str(model.tag)
    try:
        stored = model.stored
        if stored is None:
            raise ArtifactError(
                f"model {tag!r} is not in the BentoML model store; register it first "
                "(embedkit.model.artifact.register / `embedkit release`)"
            )
        return Artifact.load(Path(stored.path), tag=str(stored.tag))
    except ArtifactError as exc:
        log.error("embedkit refuses to start: %s", exc)
        metrics.get().model_load_failures.labels(reason=exc.code or "artifact_error").inc()
        raise


def settle_gc(settings: Settings) -> None:
    """After warm-up, keep the garbage collector out of the request path.

    Everything loaded at startup (model, tokenizer, BentoML, pydantic schemas) is
    moved to the permanent generation, and young collections run less often.
    Measured on the idle 2-core machine: the p99 of single-text requests fell
    from 160–250 ms to ~60 ms and throughput rose ~12 % (docs/benchmarks/http.md):
    full collections over hundreds of thousands of startup objects were the tail.
    """
    if settings.gc_tuning:
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)


def tracing_config(settings: Settings) -> dict[str, Any]:
    """BentoML ``tracing`` options: with tracing off, every URL is excluded from its
    OpenTelemetry middleware, which otherwise makes (and drops) a span per request."""
    if settings.tracing:
        return {}
    from bentoml._internal.configuration.containers import BentoMLContainer

    if BentoMLContainer.config.tracing.exporter_type.get():
        log.warning(
            "a BentoML tracing exporter is configured but EMBEDKIT_TRACING is off: "
            "embedkit's services are excluded from tracing (set EMBEDKIT_TRACING=true)"
        )
    return {"tracing": {"excluded_urls": [".*"]}}


def embedder_config(settings: Settings) -> dict[str, Any]:
    """``@bentoml.service`` options of the inner service (resources, workers, threads).

    ``threads=1``: one ORT run at a time per worker, each using ``intra_op_threads``
    cores; more would oversubscribe. ``runner_connection`` works around BentoML
    1.4.40's inter-service client refresh bug (failures with >100 requests in
    flight or after 300 s).
    """
    resources: dict[str, Any] = (
        {"gpu": 1} if settings.gpu else {"cpu": str(settings.intra_op_threads)}
    )
    return {
        "name": "embedder",
        "workers": settings.workers,
        "threads": 1,
        "resources": resources,
        "traffic": {"timeout": settings.request_timeout_s},
        "runner_connection": {"max_requests": 1_000_000_000, "max_age": 1e9},
        # Internal hop: the front's access log already records the request; a line per
        # batch here costs CPU the model needs.
        "logging": {"access": {"enabled": False}},
        **tracing_config(settings),
    }


def front_config(settings: Settings) -> dict[str, Any]:
    """``@bentoml.service`` options of the front service.

    One worker: on 2 cores a second front process only competes with ORT (measured,
    docs/service.md). BentoML's timeout sits above ours so our 504 (OpenAI body)
    answers first; admission control is ours too (``api.EdgeMiddleware``).
    """
    return {
        "name": "embedkit",
        "workers": 1,
        "traffic": {"timeout": settings.request_timeout_s + 5},
        "logging": {"access": {"enabled": settings.access_log}},
        **tracing_config(settings),
    }


def batching_policy(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each lane's policy as ``/info`` shows it: BentoML's knobs and the front's part."""
    front = "coalescing" if settings.front_coalescing else "none"
    query_front = (
        "continuous" if front == "coalescing" and settings.query_continuous_batching else front
    )
    return {
        "bulk": {
            "max_batch_size": settings.bulk_max_batch_size,
            "max_latency_ms": settings.bulk_max_latency_ms,
            "front": front,
        },
        "query": {
            "max_batch_size": settings.query_max_batch_size,
            "max_latency_ms": settings.query_max_latency_ms,
            "front": query_front,
        },
    }


# --- the inner service -------------------------------------------------------------


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
        for _ in range(tel.sub_batches):  # per-run means: Telemetry keeps totals only
            m.sub_batch_size.observe(tel.texts / tel.sub_batches)
            m.sub_batch_tokens.observe(tel.padded_tokens / tel.sub_batches)
        return vectors

    def info(self) -> dict[str, Any]:
        return self.engine.info()


# --- the front service -------------------------------------------------------------

Call = Callable[[list[Item]], Awaitable[Any]]


class Front:
    """Validation, routing and response shaping; talks to the Embedder through ``embedder``.

    ``embedder`` is the ``bentoml.depends`` proxy (its ``to_async`` side) with
    ``embed_query``, ``embed_bulk`` and ``info``.
    """

    def __init__(self, artifact: Artifact, settings: Settings) -> None:
        self.settings = settings
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.tokenizer = TextTokenizer.from_artifact(artifact)
        self.dimension = self.manifest.embedding.dimension
        self.model_name = settings.served_model_name or self.manifest.name
        self.ready = False
        self.queued_tokens = 0  # admitted to the Embedder, not yet answered (see _admit)
        self._openapi: dict[str, Any] | None = None
        self._coalescers: dict[str, Coalescer] = {}  # per lane; the proxy never changes

    # --- the pipeline
    async def _job(self, build: Callable[[], api.EmbedJob], n: int) -> api.EmbedJob:
        if n > _OFFLOAD_ITEMS:
            return await asyncio.to_thread(build)
        return build()

    def _admit(self, tokens: int) -> None:
        """Token-budget admission: the Embedder's queue holds at most ``max_queued_tokens``
        (bounded work, so bounded queueing delay); the excess gets 429 + Retry-After."""
        limit = self.settings.max_queued_tokens
        if self.queued_tokens and self.queued_tokens + tokens > limit:
            raise Overloaded(
                f"the model queue is full ({self.queued_tokens} tokens waiting, limit {limit}); "
                "retry after the indicated delay"
            )
        self.queued_tokens += tokens

    async def embed(self, embedder: Any, job: api.EmbedJob, route: str) -> np.ndarray:
        call: Call = embedder.embed_query if job.lane == "query" else embedder.embed_bulk
        # Chunks of the lane's batch size, one after another: the Embedder would split a
        # big job the same way, but a cancelled request (client gone) then stops after
        # the chunk in flight instead of leaving the whole job in the Embedder's queue.
        s = self.settings
        size = s.query_max_batch_size if job.lane == "query" else s.bulk_max_batch_size
        self._admit(job.tokens)
        try:
            send = self._sender(job.lane, call)
            parts = [
                np.asarray(await send(job.ids[i : i + size])) for i in range(0, len(job.ids), size)
            ]
        finally:
            self.queued_tokens -= job.tokens
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        vectors = postprocess(
            np.asarray(raw),
            normalize=job.normalize,
            dimensions=job.dimensions,
            model_dim=self.dimension,
        )
        m = metrics.get()
        m.texts_embedded.labels(route=route).inc(len(job.ids))
        m.tokens_embedded.labels(route=route).inc(job.tokens)
        return vectors

    def _sender(self, lane: api.Lane, call: Call) -> Callable[[list[list[int]]], Awaitable[Any]]:
        """One Embedder call per chunk, or via the lane's :class:`Coalescer` (shared by
        concurrent requests) when ``front_coalescing`` is on."""
        if not self.settings.front_coalescing:
            return lambda ids: self._call(call, ids)
        merger = self._coalescers.get(lane)
        if merger is None:
            s = self.settings
            size = s.query_max_batch_size if lane == "query" else s.bulk_max_batch_size
            # Interactive lane: continuous batching, one call per Embedder worker in flight.
            in_flight = s.workers if lane == "query" and s.query_continuous_batching else None
            merger = self._coalescers[lane] = Coalescer(
                lambda ids: self._call(call, ids), size, max_in_flight=in_flight
            )
        return merger.submit

    async def _call(self, call: Call, ids: list[list[int]]) -> Any:
        """One call to the Embedder, retried once if the connection broke.

        The proxy reuses keep-alive connections that the Embedder's server closes
        when idle (uvicorn: 5 s); a request racing that close fails with "Can not
        write request body" before the Embedder saw it — a 500 under plain load
        (tests/load). A worker restart breaks connections the same way. Embedding
        is idempotent, so one retry is safe; anything else is translated, never leaked.
        """
        for attempt in (1, 2):
            sent_at = time.time()
            try:
                return await asyncio.wait_for(
                    call([(sent_at, row) for row in ids]), self.settings.request_timeout_s
                )
            except EmbedkitError:
                raise
            except Exception as exc:  # the proxy's BentoML/aiohttp errors
                if attempt == 1 and _broken_connection(exc):
                    # before ready the Embedder is simply not up yet: no warning then
                    level = logging.WARNING if self.ready else logging.DEBUG
                    log.log(level, "embedder connection broke (%s); retrying once", exc)
                    continue
                err = api.translate_upstream(exc)
                if isinstance(err, InferenceError):
                    log.exception("embedder call failed")
                raise err from exc
        raise AssertionError("unreachable")

    async def _guard(self, work: Awaitable[bytes]) -> Any:
        from starlette.responses import Response

        try:
            return Response(await work, media_type="application/json")
        except EmbedkitError as exc:
            return api.error_response(exc)
        except Exception:
            log.exception("unexpected error in the front service")
            return api.error_response(InferenceError(api.INTERNAL_MESSAGE))

    # --- routes (bodies already schema-validated by BentoML)
    async def openai(self, embedder: Any, body: dict[str, Any]) -> Any:
        async def work() -> bytes:
            req = api.EmbeddingsRequest.model_construct(**body)
            n = 1 if isinstance(req.input, str) else len(req.input)
            job = await self._job(
                lambda: api.openai_job(
                    req,
                    self.tokenizer,
                    self.settings,
                    served=self.model_name,
                    model_dim=self.dimension,
                    normalize=self.manifest.embedding.normalize,
                ),
                n,
            )
            vectors = await self.embed(embedder, job, "/v1/embeddings")
            return api.openai_body(vectors, job, self.model_name)

        return await self._guard(work())

    async def native(self, embedder: Any, body: dict[str, Any], lane: api.Lane) -> Any:
        route = "/embed/query" if lane == "query" else "/embed"

        async def work() -> bytes:
            req = api.EmbedRequest.model_construct(**body)
            job = await self._job(
                lambda: api.native_job(
                    req, self.tokenizer, self.settings, lane=lane, model_dim=self.dimension
                ),
                len(req.texts),
            )
            vectors = await self.embed(embedder, job, route)
            return api.native_body(vectors, job, self.model_name)

        return await self._guard(work())

    async def tokenize(self, body: dict[str, Any]) -> Any:
        async def work() -> bytes:
            req = api.TokenizeRequest.model_construct(**body)
            api.check_count(len(req.texts), self.settings, param="texts")
            ids = self.tokenizer.encode(req.texts, truncate=req.truncate)
            return api.tokenize_body(ids, self.tokenizer.max_length)

        return await self._guard(work())

    def models(self) -> dict[str, Any]:
        created = int(_iso_to_epoch(self.manifest.created_at))
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "embedkit",
                }
            ],
        }

    def openapi(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self._openapi is None:
            self._openapi = api.openapi_document(
                spec,
                settings=self.settings,
                model=self.model_name,
                model_dim=self.dimension,
                vocab_size=self.tokenizer.vocab_size,
            )
        return self._openapi

    async def info(self, embedder: Any) -> dict[str, Any]:
        s = self.settings
        try:
            engine = await asyncio.wait_for(embedder.info(), s.request_timeout_s)
        except Exception as exc:
            raise api.translate_upstream(exc) from exc
        return {
            "model": self.model_name,
            "tag": self.artifact.tag,
            "manifest": self.manifest.summary(),
            "provider": engine.get("providers", {}),
            "engine": engine,
            "batching": batching_policy(s),
            "routing": {
                "/v1/embeddings": "one input → query lane, several → bulk lane",
                "/embed": "bulk",
                "/embed/query": "query",
            },
            "limits": {
                "max_client_batch": s.max_client_batch,
                "max_body_bytes": s.max_body_bytes,
                "max_length": self.tokenizer.max_length,
                "dimensions": [1, self.dimension],
                "max_concurrency": s.max_concurrency,
                "max_queued_tokens": s.max_queued_tokens,
                "request_timeout_s": s.request_timeout_s,
            },
            "auth": bool(s.api_keys),
            "tracing": s.tracing,
            "ready": self.ready,
        }

    # --- warm-up
    async def warmup(self, embedder: Any, *, deadline_s: float = 300.0) -> None:
        """Run every lane through the full path until BentoML's dispatcher is past its
        unbatched training requests (~33 per batchable API), then mark ready.

        Waits for the Embedder to come up: until BentoML has connected the proxy
        (after the startup hooks) and the Embedder answers, calls fail and are retried.
        """
        give_up = time.monotonic() + deadline_s
        job = api.native_job(
            api.EmbedRequest(texts=[_WARM_TEXT]),
            self.tokenizer,
            self.settings,
            lane="query",
            model_dim=self.dimension,
        )
        while True:
            try:
                await self.embed(embedder, job, "warmup")
                break
            except Exception as exc:  # not connected / not up yet
                if time.monotonic() > give_up:
                    log.error("embedkit warm-up gave up after %.0f s: %s", deadline_s, exc)
                    raise
                await asyncio.sleep(0.25)
        lanes: tuple[api.Lane, ...] = ("query", "bulk")
        for lane in lanes:
            lane_job = api.EmbedJob(
                ids=job.ids * (1 if lane == "query" else 2),
                lane=lane,
                normalize=True,
                dimensions=None,
                encoding="float",
            )
            for _ in range(6):
                await asyncio.gather(
                    *(self.embed(embedder, lane_job, "warmup") for _ in range(8)),
                    return_exceptions=True,
                )
        settle_gc(self.settings)
        self.ready = True
        log.info("embedkit front service warm and ready (model %s)", self.model_name)


def _broken_connection(exc: BaseException) -> bool:
    """A connection-level failure (reset, closed, refused), not a timeout or an answer."""
    import aiohttp

    return isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, TimeoutError)


def _iso_to_epoch(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0
