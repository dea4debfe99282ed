"""A served reranker's routes: ``/rerank`` (text-embeddings-inference's shape) and
``/v1/rerank``, ``/v2/rerank`` (Cohere's and Jina's).

The same path as an embedding request
(:class:`~embedkit.serve.pipeline.front.ModelFront`): validate and tokenise the (query,
document) pairs here (:func:`~embedkit.serve.pipeline.jobs.rerank_job`), hand them to the
Embedder as rows on the interactive lane (admission, coalescing, the runner threads'
query-first order and the tenant's quota are the embedding routes'), then apply the
model's activation per request (``raw_scores``), rank and write the body
(:mod:`embedkit.serve.edge.bodies`). Nothing here imports ONNX Runtime.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import numpy as np

from embedkit.core import metrics
from embedkit.core.errors import InferenceError, InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.tokens import Direction, PairTokenizer
from embedkit.runtime.vectors import activate
from embedkit.serve.edge.bodies import cohere_rerank_body, tei_rerank_body
from embedkit.serve.edge.schemas import CohereRerankRequest, Lane, RerankRequest
from embedkit.serve.engine import identity
from embedkit.serve.pipeline.front import ModelFront
from embedkit.serve.pipeline.jobs import RerankJob, rerank_job
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.seams import Embedder

_WARM_QUERY = "warm up"
_WARM_DOCUMENT = "warm up the whole request path"


def rank(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Indices of ``scores`` highest first (ties: the earlier document first), the first
    ``top_n`` of them (None: all)."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:top_n]]


def check_top_n(top_n: int | None) -> int | None:
    if top_n is not None and top_n < 1:
        raise InvalidInput(f"top_n must be at least 1, got {top_n}", param="top_n")
    return top_n


def document_text(document: object) -> str:
    """A document as its text: a string, or an object's ``text`` (schema-validated)."""
    if isinstance(document, str):
        return document
    if isinstance(document, dict):
        return cast(str, document["text"])
    return cast(str, getattr(document, "text"))  # noqa: B009 - a pydantic object


class RerankFront(ModelFront):
    """A cross-encoder's front (``task: rerank``)."""

    task = "rerank"

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
        self.config = self.manifest.rerank_config
        self.tokenizer = PairTokenizer.from_artifact(artifact)

    def _query_cap(self) -> int | None:
        # A rerank call is interactive whatever its size (a search waits on it); what
        # bounds it is max_rerank_documents, checked with the request.
        return None

    async def score(
        self,
        embedder: Embedder,
        job: RerankJob,
        route: str,
        request: RequestContext | None = None,
    ) -> np.ndarray:
        """Raw scores ``[pairs]`` of the job, in document order."""
        raw, job = await self._run(embedder, job, route, request)
        scores = np.asarray(raw, dtype=np.float32)[:, 0]
        if not np.isfinite(scores).all():
            raise InferenceError("the model produced a non-finite score")
        m = metrics.get()
        model = self.manifest.name
        m.pairs_reranked.labels(route=route, model=model).inc(len(job.ids))
        m.tokens_embedded.labels(route=route, model=model).inc(job.tokens)
        return scores

    async def _scored(
        self,
        embedder: Embedder,
        query: str,
        documents: list[str],
        route: str,
        request: RequestContext | None,
        *,
        param: str,
        truncate: bool = True,
        direction: Direction | None = None,
    ) -> tuple[np.ndarray, RerankJob]:
        job = await self._job(
            lambda: rerank_job(
                query,
                documents,
                self.tokenizer,
                self.settings,
                param=param,
                truncate=truncate,
                direction=direction,
            ),
            documents,
        )
        return await self.score(embedder, job, route, request), job

    # --- routes (bodies already schema-validated by BentoML)
    async def tei(
        self, embedder: Embedder, body: dict[str, Any], request: RequestContext | None = None
    ) -> Any:
        """``POST /rerank``: a list of ``{index, score, text?}``, highest score first."""

        async def work() -> tuple[bytes, int]:
            req = RerankRequest.model_construct(**body)
            side = req.truncation_direction
            raw, job = await self._scored(
                embedder,
                req.query,
                req.texts,
                "/rerank",
                request,
                param="texts",
                truncate=req.truncate,
                direction=None if side is None else cast(Direction, side.lower()),
            )
            scores = raw if req.raw_scores else activate(raw, self.config.activation)
            texts = req.texts if req.return_text else None
            return tei_rerank_body(scores, rank(scores), texts), job.truncated

        return await self._guard(work())

    async def cohere(
        self,
        embedder: Embedder,
        body: dict[str, Any],
        route: str,
        request: RequestContext | None = None,
    ) -> Any:
        """``POST /v1/rerank`` and ``/v2/rerank``: ``{id, model, results, usage, meta}``,
        results highest ``relevance_score`` (the activated score) first, ``top_n`` of them."""

        async def work() -> tuple[bytes, int]:
            req = CohereRerankRequest.model_construct(**body)
            top_n = check_top_n(req.top_n)
            documents = [document_text(d) for d in req.documents]
            raw, job = await self._scored(
                embedder, req.query, documents, route, request, param="documents"
            )
            scores = activate(raw, self.config.activation)
            body_bytes = cohere_rerank_body(
                scores,
                rank(scores, top_n),
                documents if req.return_documents else None,
                request_id=request.request_id if request is not None else uuid.uuid4().hex,
                model=self.model_name,
                tokens=job.tokens,
                api_version=route.split("/")[1].removeprefix("v"),
            )
            return body_bytes, job.truncated

        return await self._guard(work())

    # --- metadata
    def card(self) -> dict[str, Any]:
        """This reranker's ``/v1/models`` entry: its token limit and activation."""
        card = super().card()
        served = card.pop("embedkit")
        return {
            **card,
            "max_length": self.tokenizer.max_length,
            "activation": self.config.activation,
            "embedkit": served,
        }

    async def info(self, embedder: Embedder) -> dict[str, Any]:
        s = self.settings
        return {
            **await super().info(embedder),
            "task": self.task,
            "activation": self.config.activation,
            "routing": {
                route: "query; a bulk-class tenant: bulk"
                for route in ("/rerank", "/v1/rerank", "/v2/rerank")
            },
            "limits": {
                "max_rerank_documents": s.max_rerank_documents,
                "max_body_bytes": s.max_body_bytes,
                "max_length": self.tokenizer.max_length,
                "truncation": self.config.truncation,
                "truncation_side": self.tokenizer.spec.truncation_side,
                "max_concurrency": s.max_concurrency,
                "max_queued_tokens": s.max_queued_tokens,
                "request_timeout_s": s.request_timeout_s,
            },
            "auth": bool(s.api_keys or s.tenants_file),
            "tracing": s.tracing,
            "ready": self.ready,
        }

    # --- warm-up
    def _warm_jobs(self) -> tuple[RerankJob, dict[Lane, RerankJob]]:
        job = rerank_job(
            _WARM_QUERY, [_WARM_DOCUMENT], self.tokenizer, self.settings, param="documents"
        )
        lanes: dict[Lane, RerankJob] = {
            "query": job,
            "bulk": RerankJob(ids=job.ids * 2, splits=job.splits * 2, lane="bulk"),
        }
        return job, lanes
