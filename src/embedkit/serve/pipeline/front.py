"""The front (HTTP) service's work, route by route, and its warm-up.

Each embedding route: validate and tokenise (:mod:`embedkit.serve.pipeline.jobs`; no ORT
session here), hand the ids to the Embedder
(:class:`~embedkit.serve.pipeline.client.EmbedderClient`), post-process per request
(normalisation and Matryoshka truncation, so requests with different options share one
batch) and write the body (:mod:`embedkit.serve.edge.bodies`).
Tokenising here means tokens are counted once and exactly for usage, and the
Embedder's process spends its CPU on inference only. What every model's front shares,
whatever its task, is :class:`ModelFront`; a reranker's routes are
:class:`~embedkit.serve.pipeline.rerank.RerankFront`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar, TypeVar, cast

import numpy as np

from embedkit.core import metrics
from embedkit.core.errors import EmbedkitError, InferenceError, InvalidInput, Overloaded
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.model.recipe import Task
from embedkit.runtime.chunking import pool
from embedkit.runtime.prompts import Prompts
from embedkit.runtime.tokens import TextTokenizer
from embedkit.runtime.vectors import finish
from embedkit.serve.edge.bodies import native_body, openai_body, tokenize_body
from embedkit.serve.edge.http_errors import INTERNAL_MESSAGE, error_response
from embedkit.serve.edge.openapi import openapi_document
from embedkit.serve.edge.schemas import (
    RERANK_ROUTES,
    TRUNCATED_HEADER,
    EmbedBulkRequest,
    EmbeddingsRequest,
    EmbedRequest,
    Lane,
    TokenizeRequest,
)
from embedkit.serve.engine import identity
from embedkit.serve.engine.startup import settle_gc
from embedkit.serve.pipeline import trace
from embedkit.serve.pipeline.client import EmbedderClient
from embedkit.serve.pipeline.jobs import (
    EmbedJob,
    RerankJob,
    check_count,
    native_job,
    openai_job,
    prompted_ids,
)
from embedkit.serve.pipeline.options import batching_policy
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.seams import Embedder

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_J = TypeVar("_J", EmbedJob, RerankJob)  # a job of either task

# Requests above either size are tokenised in a thread, off the event loop; smaller ones
# inline, where a thread hop (~50 µs) would cost more than it frees. Tokenising runs at
# ~0.7 µs a character (MiniLM's tokenizer, 2-core EPYC): 2,048 characters hold the loop
# ~1.5 ms at most, while one text near the 8 MiB body limit would hold it for seconds.
_OFFLOAD_ITEMS = 64
_OFFLOAD_CHARS = 2048  # characters of text, or token ids of token-id input
_WARM_TEXT = "warm up the whole request path"


class ModelFront:
    """What every served model's front does, whatever its task: its name and served
    identity, its :class:`~embedkit.serve.pipeline.client.EmbedderClient` (admission, lanes,
    coalescing), tokenising off the loop, charging tenants, error shaping and warm-up.
    :class:`Front` embeds; :class:`~embedkit.serve.pipeline.rerank.RerankFront` reranks.
    Each talks to the Embedder through ``embedder`` (:class:`~embedkit.serve.seams.Embedder`),
    passed to each route with the request's
    :class:`~embedkit.serve.pipeline.trace.RequestContext` (None outside a request)."""

    task: ClassVar[Task] = "embed"

    def __init__(
        self,
        artifact: Artifact,
        settings: Settings,
        *,
        name: str | None = None,
        default: bool = True,
        identities: identity.ServedIdentities | None = None,
    ) -> None:
        """``name``: what clients pass as ``model`` (default: ``served_model_name``, else
        the artifact's name); ``default``: the deployment's default model (the only one
        unless several are served, :mod:`embedkit.serve.pipeline.registry`);
        ``identities``: what this process serves, where warm-up publishes this model's."""
        self.settings = settings
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.model_name = name or settings.served_model_name or self.manifest.name
        self.default = default
        # This model's served identity, received from the Embedder during warm-up.
        self.identity: identity.ServedIdentity | None = None
        self.identities = identities if identities is not None else identity.ServedIdentities()
        self.client = EmbedderClient(settings)  # this model's own token budget
        self.ready = False

    # --- the pipeline
    async def _job(self, build: Callable[[], _T], inputs: Sequence[object]) -> _T:
        """``build()`` (which tokenises ``inputs``), in a thread when they are large."""
        if len(inputs) > _OFFLOAD_ITEMS or _size(inputs) > _OFFLOAD_CHARS:
            return await asyncio.to_thread(build)
        return build()

    async def _charge(self, tokens: int, request: RequestContext | None) -> None:
        """``tokens`` charged to the request's tenant (429 when spent) and counted as its
        usage; every route charges, /tokenize too, though it runs no model."""
        if request is None or request.tenant is None:
            return
        request.tokens = tokens
        await request.tenant.charge(tokens)  # the shared store: one round trip

    def _query_cap(self) -> int | None:
        """Most rows a job may carry on the query lane before it is moved to bulk."""
        return self.settings.max_query_texts

    async def _for_tenant(
        self, job: _J, route: str, request: RequestContext | None
    ) -> tuple[_J, RequestContext | None]:
        """The job on the lane its request gets, charged to its tenant's quota (429 when
        spent). /v1/embeddings takes the lane from ``X-Embedkit-Lane`` when sent (else one
        input → query, several → bulk); on a native or rerank route the route is the lane
        and a header naming the other one is refused. A bulk-class tenant's job, and an
        embedding job of more than ``max_query_texts`` texts, runs on the bulk lane
        whatever was asked (docs/service.md § Tenants, § Lanes)."""
        if request is None or request.tenant is None:  # warm-up, in-process use
            return job, None
        lane: str = job.lane
        asked = request.asked_lane
        if asked is not None and asked != lane:
            if route in RERANK_ROUTES:
                raise InvalidInput(
                    f"{trace.LANE_HEADER}: {asked} contradicts {route}, which runs on the "
                    f"{lane} lane; drop the header",
                    param=trace.LANE_HEADER,
                )
            if route != "/v1/embeddings":
                other = "/embed/query" if asked == "query" else "/embed"
                raise InvalidInput(
                    f"{trace.LANE_HEADER}: {asked} contradicts {route}, which is the {lane} "
                    f"lane; call {other} for the {asked} lane, or drop the header",
                    param=trace.LANE_HEADER,
                )
            lane = asked
        lane = request.tenant.lane(lane)
        # The query lane runs ahead of all bulk work: a big job there would be bulk work
        # jumping that queue. Served, not refused, so a client stuck with its route works.
        cap = self._query_cap()
        if lane == "query" and cap is not None and len(job.ids) > cap:
            lane = "bulk"
        request.lane = lane
        await self._charge(job.tokens, request)
        return (job if lane == job.lane else replace(job, lane=cast(Lane, lane))), request

    async def _run(
        self, embedder: Embedder, job: _J, route: str, request: RequestContext | None
    ) -> tuple[np.ndarray, _J]:
        """The Embedder's raw answer to ``job`` (on the lane its request gets) and the job
        as it ran; a job shed by the queue is refunded to its tenant."""
        job, request = await self._for_tenant(job, route, request)
        try:
            raw = await self.client.embed(embedder, job, request)
        except Overloaded:  # shed by the queue, not run: not the tenant's to pay
            if request is not None and request.tenant is not None:
                await request.tenant.refund(job.tokens)
            raise
        m = metrics.get()
        if request is not None and request.tenant is not None:
            m.tenant_tokens.labels(tenant=request.tenant.name, lane=job.lane).inc(job.tokens)
        return raw, job

    async def _guard(self, work: Awaitable[tuple[bytes, int]]) -> Any:
        """``work`` gives the body and how many inputs truncation cut (a header)."""
        from starlette.responses import Response

        # This model's identity (several models: the middleware's would be the default's).
        served = {} if self.identity is None else {identity.HEADER: self.identity.header_value()}
        try:
            body, truncated = await work
            return Response(
                body,
                media_type="application/json",
                headers={TRUNCATED_HEADER: str(truncated), **served},
            )
        except EmbedkitError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unexpected error in the front service")
            response = error_response(InferenceError(INTERNAL_MESSAGE))
        response.headers.update(served)
        return response

    def card(self) -> dict[str, Any]:
        """This model's entry in ``/v1/models``: OpenAI's fields, its task and token limit,
        and the served identity (version, variant, class, ...)."""
        served = self.identity or (self.identities.served() if self.default else None)
        return {
            "id": self.model_name,
            "object": "model",
            "created": int(_iso_to_epoch(self.manifest.created_at)),
            "owned_by": "embedkit",
            "task": self.task,
            "embedkit": None if served is None else served.as_dict(),
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card()]}

    async def info(self, embedder: Embedder) -> dict[str, Any]:
        """``/info``: the engine's description, the served identity and the settings every
        task shares; a task's front adds its routing and limits."""
        s = self.settings
        engine = await self.client.info(embedder)
        served = engine.pop("identity", None)
        return {
            "model": self.model_name,
            "served": served,
            "tag": (served or {}).get("tag", self.artifact.tag),
            "manifest": engine.pop("manifest", None) or self.manifest.summary(),
            "provider": engine.get("providers", {}),
            "engine": engine,
            "topology": s.topology,  # docs/design/serving.md
            "batching": batching_policy(s),
        }

    # --- warm-up
    def _warm_jobs(self) -> tuple[Any, dict[Lane, Any]]:
        """The first job of warm-up and one job per lane to repeat."""
        raise NotImplementedError

    async def _warm_call(self, embedder: Embedder, job: Any) -> object:
        """One warm-up call through the whole path (admission, client, Embedder)."""
        return await self._run(embedder, job, "warmup", None)

    async def warmup(self, embedder: Embedder, *, deadline_s: float = 300.0) -> None:
        """Run every lane through the full path until BentoML's dispatcher is past its
        unbatched training requests (~33 per batchable API), then mark ready.

        Waits for the Embedder to come up: until BentoML has connected the proxy
        (after the startup hooks) and the Embedder answers, calls fail and are retried.
        """
        give_up = time.monotonic() + deadline_s
        first, lane_jobs = self._warm_jobs()
        while True:
            try:
                await self._warm_call(embedder, first)
                break
            except Exception as exc:  # not connected / not up yet
                if time.monotonic() > give_up:
                    log.error("embedkit warm-up gave up after %.0f s: %s", deadline_s, exc)
                    raise
                await asyncio.sleep(0.25)
        for lane_job in lane_jobs.values():
            for _ in range(6):
                await asyncio.gather(
                    *(self._warm_call(embedder, lane_job) for _ in range(8)),
                    return_exceptions=True,
                )
        # The Embedder decided what serves; the front says so from now on.
        info = await self.client.info(embedder)
        self.identity = identity.ServedIdentity.from_dict(info["identity"])
        self.identities.publish(self.identity, default=self.default)
        settle_gc(self.settings)
        self.ready = self.client.warm = True
        log.info(
            "embedkit front service warm and ready (model %s, serving %s)",
            self.model_name,
            self.identity.header_value(),
        )


class Front(ModelFront):
    """An embedding model's routes: validate and tokenise, embed, post-process, write."""

    def __init__(
        self,
        artifact: Artifact,
        settings: Settings,
        *,
        name: str | None = None,
        default: bool = True,
        identities: identity.ServedIdentities | None = None,
    ) -> None:
        super().__init__(artifact, settings, name=name, default=default, identities=identities)
        self.tokenizer = TextTokenizer.from_artifact(artifact)
        self.prompts = Prompts(self.manifest, self.tokenizer)
        self.dimension = self.manifest.embedding_config.dimension
        ranges = self.manifest.encoding_ranges
        self.ranges = None if ranges is None else np.array([ranges.min, ranges.max])
        self._openapi: dict[str, Any] | None = None

    async def embed(
        self,
        embedder: Embedder,
        job: EmbedJob,
        route: str,
        request: RequestContext | None = None,
    ) -> np.ndarray:
        raw, job = await self._run(embedder, job, route, request)
        if job.chunks is not None:
            raw = pool(raw, job.chunks)
        vectors = finish(
            raw,
            job.encoding,
            normalize=job.normalize,
            dimensions=job.dimensions,
            model_dim=self.dimension,
            ranges=self.ranges,
        )
        m = metrics.get()
        model = self.manifest.name  # the identity's name, as the Embedder's metrics label it
        m.texts_embedded.labels(route=route, model=model).inc(len(job.ids))
        m.tokens_embedded.labels(route=route, model=model).inc(job.tokens)
        return vectors

    # --- routes (bodies already schema-validated by BentoML)
    async def openai(
        self, embedder: Embedder, body: dict[str, Any], request: RequestContext | None = None
    ) -> Any:
        async def work() -> tuple[bytes, int]:
            req = EmbeddingsRequest.model_construct(**body)
            raw = req.input
            inputs: Sequence[object] = [raw] if isinstance(raw, str) or _is_ids(raw) else raw
            job = await self._job(
                lambda: openai_job(
                    req,
                    self.tokenizer,
                    self.settings,
                    served=self.model_name,
                    model_dim=self.dimension,
                    normalize=self.manifest.embedding_config.normalize,
                    prompts=self.prompts,
                    ranges=self.manifest.encoding_ranges,
                ),
                inputs,
            )
            vectors = await self.embed(embedder, job, "/v1/embeddings", request)
            return openai_body(vectors, job, self.model_name), job.truncated

        return await self._guard(work())

    async def native(
        self,
        embedder: Embedder,
        body: dict[str, Any],
        lane: Lane,
        request: RequestContext | None = None,
    ) -> Any:
        route = "/embed/query" if lane == "query" else "/embed"

        async def work() -> tuple[bytes, int]:
            req = EmbedBulkRequest.model_construct(**body)  # chunking stays None on /embed/query
            job = await self._job(
                lambda: native_job(
                    req,
                    self.tokenizer,
                    self.settings,
                    lane=lane,
                    model_dim=self.dimension,
                    prompts=self.prompts,
                    ranges=self.manifest.encoding_ranges,
                ),
                req.texts,
            )
            vectors = await self.embed(embedder, job, route, request)
            dims = job.dimensions or self.dimension
            return native_body(vectors, job, self.model_name, dimensions=dims), job.truncated

        return await self._guard(work())

    async def tokenize(self, body: dict[str, Any], request: RequestContext | None = None) -> Any:
        async def work() -> tuple[bytes, int]:
            req = TokenizeRequest.model_construct(**body)
            check_count(len(req.texts), self.settings, param="texts")
            ids, _, cut = await self._job(
                lambda: prompted_ids(
                    req.texts,
                    self.tokenizer,
                    self.prompts,
                    req.prompt_name,
                    truncate=req.truncate,
                    direction=req.truncation_direction,
                ),
                req.texts,
            )
            await self._charge(sum(len(row) for row in ids), request)  # what usage reports
            return tokenize_body(ids, self.tokenizer.max_length, truncated=cut), cut

        return await self._guard(work())

    def card(self) -> dict[str, Any]:
        """This model's ``/v1/models`` entry, with its dimension and prompts."""
        card = super().card()
        served = card.pop("embedkit")
        return {
            **card,
            "dimensions": self.dimension,
            "max_length": self.tokenizer.max_length,
            **self.prompts.describe(),
            "embedkit": served,
        }

    def openapi(
        self, spec: dict[str, Any], served: Sequence[Front] = (), *, rerankers: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The OpenAPI document; with several ``served`` embedding models (this one first),
        the model enum names them all and each limit is the widest (each model checks its
        own); ``rerankers``: the served rerankers' names, for the rerank routes."""
        if self._openapi is None:
            fronts = list(served) or [self]
            self._openapi = openapi_document(
                spec,
                settings=self.settings,
                model=self.model_name,
                models=[f.model_name for f in fronts],
                model_dim=max(f.dimension for f in fronts),
                vocab_size=max(f.tokenizer.vocab_size for f in fronts),
                prompts=list(dict.fromkeys(p for f in fronts for p in f.prompts.texts)),
                max_length=max(f.tokenizer.max_length for f in fronts),
                frame_tokens=sum(len(part) for part in self.tokenizer.frame),
                rerankers=rerankers,
            )
        return self._openapi

    async def info(self, embedder: Embedder) -> dict[str, Any]:
        s = self.settings
        return {
            **await super().info(embedder),
            **self.prompts.describe(),
            "routing": {
                "/v1/embeddings": "X-Embedkit-Lane if sent, else one input → query lane, "
                "several → bulk lane; a bulk-class tenant, or more than max_query_texts "
                "inputs: bulk",
                "/embed": "bulk",
                "/embed/query": "query; a bulk-class tenant, or more than max_query_texts "
                "texts: bulk",
            },
            "limits": {
                "max_client_batch": s.max_client_batch,
                "max_query_texts": s.max_query_texts,
                "max_body_bytes": s.max_body_bytes,
                "max_length": self.tokenizer.max_length,
                "truncation_side": self.tokenizer.spec.truncation_side,
                "dimensions": [1, self.dimension],
                "max_concurrency": s.max_concurrency,
                "max_queued_tokens": s.max_queued_tokens,
                "request_timeout_s": s.request_timeout_s,
            },
            "encodings": {  # docs/service.md § Output encodings
                "int8_ranges": None
                if (r := self.manifest.encoding_ranges) is None
                else {"texts": r.texts, "source": r.source, "normalized": r.normalized},
            },
            "auth": bool(s.api_keys or s.tenants_file),
            "tracing": s.tracing,
            "ready": self.ready,
        }

    # --- warm-up
    def _warm_jobs(self) -> tuple[EmbedJob, dict[Lane, EmbedJob]]:
        job = native_job(
            EmbedRequest(texts=[_WARM_TEXT]),
            self.tokenizer,
            self.settings,
            lane="query",
            model_dim=self.dimension,
        )
        lanes: dict[Lane, EmbedJob] = {
            lane: EmbedJob(
                ids=job.ids * (1 if lane == "query" else 2),
                lane=lane,
                normalize=True,
                dimensions=None,
                encoding="float",
            )
            for lane in ("query", "bulk")
        }
        return job, lanes

    async def _warm_call(self, embedder: Embedder, job: Any) -> object:
        return await self.embed(embedder, job, "warmup")


def _is_ids(raw: object) -> bool:
    """One token-id list (OpenAI's ``input: [int, ...]``)."""
    return isinstance(raw, list) and bool(raw) and isinstance(raw[0], int)


def _size(inputs: Sequence[object]) -> int:
    """What tokenising ``inputs`` costs: characters of texts, ids of token-id lists."""
    return sum(len(x) for x in inputs if isinstance(x, str | list))


def _iso_to_epoch(stamp: str) -> float:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0
