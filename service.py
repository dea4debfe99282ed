"""BentoML wiring for embedkit; thin: the work lives in the ``embedkit.serve`` modules.

    bentoml serve service:EmbeddingAPI          # from the repo root; see docs/service.md

Two services: ``Embedder`` owns the ONNX Runtime session (the 1.4 successor of a
runner) and exposes two batchable APIs, bulk and query, each with its own
adaptive-batching policy from settings; ``EmbeddingAPI`` is the HTTP front:
it validates, tokenises, routes to a lane through ``bentoml.depends`` (which is
what makes BentoML batch across requests) and shapes responses. A cross-encoder
(``task: rerank``) is served the same way: its pairs are the rows, its raw scores the
answers (``serve.engine.reranker``, ``serve.pipeline.rerank``).

Where the work is: ``serve.engine.embedder`` (the Embedder's engine),
``serve.pipeline.front`` (the routes' work and warm-up), ``serve.edge.schemas``
(request/response bodies), ``serve.edge.middleware`` (auth, limits, admission, error
rewriting), ``serve.pipeline.options`` (service options from settings),
``serve.engine.startup`` (artifact loading), ``serve.pipeline.registry`` (several models
in one deployment: the request's ``model`` picks one) and ``serve.seams`` (the
``Embedder`` protocol the front calls, whichever topology).

What is handed where, as arguments: the Embedder (``EmbeddingAPI.embedder``) to each
route's work; the request's context (``serve.pipeline.trace.RequestContext``: tenant,
lane asked, id, what served it), opened by the edge and put in the ASGI scope's state, to
the front from ``ctx.request.state``; what this process serves
(``serve.engine.identity.ServedIdentities``, :data:`IDENTITIES`) to the edge, the fronts
and the engine cores when they are built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

# ruff: noqa: E402  (the imports below need the path set first)
# A Bento carries the package's sources as src/embedkit beside this file (bentofile.yaml's
# include) instead of installing the package: put them first on the path. From the repo
# root this is the same tree an editable install points at.
_BUNDLED = Path(__file__).resolve().parent / "src"
if (_BUNDLED / "embedkit").is_dir() and str(_BUNDLED) not in sys.path:
    sys.path.insert(0, str(_BUNDLED))

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embedkit.core.errors import EmbedkitError
from embedkit.core.settings import get_settings
from embedkit.serve import seams
from embedkit.serve.edge import tenants
from embedkit.serve.edge.http_errors import error_response
from embedkit.serve.edge.middleware import EdgeMiddleware
from embedkit.serve.edge.schemas import (
    CohereRerankRequest,
    CohereRerankResponse,
    EmbedBulkRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    Item,
    RerankRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from embedkit.serve.engine.cores import build_core
from embedkit.serve.engine.embedder import LocalEmbedder
from embedkit.serve.engine.identity import ServedIdentities
from embedkit.serve.engine.startup import load_artifact, load_artifacts, served_tags, with_models
from embedkit.serve.pipeline.options import embedder_config, engine_settings, front_config, ort_runs
from embedkit.serve.pipeline.registry import ServedModels
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.pipeline.trace import of as request_context

SETTINGS = get_settings()
# A built Bento pins its model versions as a Bento argument (`bentoml build --arg model=TAG`
# or `--arg models=TAG,TAG`, kept in bento.yaml and restored whenever that Bento is served);
# else EMBEDKIT_MODELS, EMBEDKIT_MODEL, or the variant EMBEDKIT_VARIANT names
# (serve/startup.py). The first is the default model.
MODEL_TAGS = served_tags(SETTINGS, bentoml.use_arguments())
MODEL_TAG = MODEL_TAGS[0]
# What this process serves: filled in at startup by the engine cores (single topology, or
# the Embedder's process) and the fronts once warm; read by the edge and /v1/models.
IDENTITIES = ServedIdentities()


@bentoml.service(**embedder_config(SETTINGS))
class Embedder:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.core = build_core(load_artifact(type(self).model), SETTINGS, identities=IDENTITIES)

    @bentoml.on_startup
    def warm(self) -> None:
        self.core.warmup()

    def __is_ready__(self) -> bool:
        return self.core.ready

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.bulk_max_batch_size,
        max_latency_ms=SETTINGS.bulk_max_latency_ms,
    )
    def embed_bulk(self, items: list[Item]) -> np.ndarray:
        return self.core.embed(items, "bulk")

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.query_max_batch_size,
        max_latency_ms=SETTINGS.query_max_latency_ms,
    )
    def embed_query(self, items: list[Item]) -> np.ndarray:
        return self.core.embed(items, "query")

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return self.core.info()


async def _models(_: Request) -> Response:
    front: ServedModels = bentoml.get_current_service().front
    return JSONResponse(front.models())


async def _info(_: Request) -> Response:
    svc = bentoml.get_current_service()
    try:
        return JSONResponse(await svc.front.info(svc.embedder))
    except EmbedkitError as exc:
        return error_response(exc)


async def _docs(_: Request) -> Response:
    front: ServedModels = bentoml.get_current_service().front
    spec = cast("bentoml.Service[Any]", EmbeddingAPI).openapi_spec.asdict()
    return JSONResponse(front.openapi(spec))


# GET routes (BentoML APIs are POST-only); EdgeMiddleware covers them too. Our
# /docs.json shadows BentoML's (mounted apps match first) to describe our errors.
metadata_app = Starlette(
    routes=[Route("/v1/models", _models), Route("/info", _info), Route("/docs.json", _docs)]
)


@bentoml.asgi_app(metadata_app, path="/")
@bentoml.service(**front_config(SETTINGS))
@with_models(MODEL_TAGS)  # `model`, `model_1`, …: one BentoModel class attribute each
class EmbeddingAPI:
    if SETTINGS.topology == "split":
        remote = bentoml.depends(Embedder)

    def __init__(self) -> None:
        tenants.check_startup(SETTINGS)  # a bad tenants file stops startup (one line)
        # Every model loaded and verified before any session is built: one bad one stops
        # startup naming it. Several models share the runner threads (LocalEmbedder).
        self.front = ServedModels(load_artifacts(type(self)), SETTINGS, IDENTITIES)
        self._embedder: seams.Embedder | None = None
        if SETTINGS.topology == "single":
            runs = ort_runs(SETTINGS)
            cores = {
                name: build_core(
                    front.artifact,
                    engine_settings(SETTINGS),
                    default=front.default,
                    identities=IDENTITIES,
                    runs=runs,
                )
                for name, front in self.front.fronts.items()
            }
            self._embedder = self.local = LocalEmbedder(cores, runs=runs)

    @property
    def embedder(self) -> seams.Embedder:
        """The Embedder: in this process (single) or the Embedder service through
        BentoML's proxy (split; built on first use: the proxy is connected only after
        the startup hooks)."""
        if self._embedder is None:
            self._embedder = seams.RemoteEmbedder(self.remote.to_async)
        return self._embedder

    @bentoml.on_startup
    async def start_warmup(self) -> None:
        # In the background: the Embedder proxy is connected only after startup hooks.
        import asyncio

        async def warm() -> None:
            if SETTINGS.topology == "single":  # the engines' own warm-up, off the event loop
                for core in self.local.cores.values():
                    await asyncio.to_thread(core.warmup)
            await self.front.warmup(self.embedder)

        self._warm_task = asyncio.get_running_loop().create_task(warm())

    def __is_ready__(self) -> bool:
        return self.front.ready

    @bentoml.api(
        route="/v1/embeddings", input_spec=EmbeddingsRequest, output_spec=EmbeddingsResponse
    )
    async def embeddings(self, ctx: bentoml.Context, **body: Any) -> Any:
        """OpenAI-compatible embeddings (one input → query lane, several → bulk lane)."""
        return _answer(ctx, await self.front.openai(self.embedder, body, _request(ctx)))

    @bentoml.api(route="/embed", input_spec=EmbedBulkRequest, output_spec=EmbedResponse)
    async def embed(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Bulk embedding (throughput-tuned batching), with opt-in chunking of long texts."""
        return _answer(ctx, await self.front.native(self.embedder, body, "bulk", _request(ctx)))

    @bentoml.api(route="/embed/query", input_spec=EmbedRequest, output_spec=EmbedResponse)
    async def embed_query(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Interactive embedding (latency-tuned batching)."""
        return _answer(ctx, await self.front.native(self.embedder, body, "query", _request(ctx)))

    @bentoml.api(route="/tokenize", input_spec=TokenizeRequest, output_spec=TokenizeResponse)
    async def tokenize(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Token ids (special tokens included) and counts, as the model sees them."""
        return _answer(ctx, await self.front.tokenize(body, _request(ctx)))

    @bentoml.api(route="/rerank", input_spec=RerankRequest)
    async def rerank(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Rerank texts against a query (text-embeddings-inference's shape): a list of
        {index, score, text?}, highest score first."""
        return _answer(ctx, await self.front.rerank(self.embedder, body, "/rerank", _request(ctx)))

    @bentoml.api(
        route="/v1/rerank", input_spec=CohereRerankRequest, output_spec=CohereRerankResponse
    )
    async def rerank_v1(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Rerank documents (Cohere v1 / Jina shape): top_n results, best first."""
        return _answer(
            ctx, await self.front.rerank(self.embedder, body, "/v1/rerank", _request(ctx))
        )

    @bentoml.api(
        route="/v2/rerank", input_spec=CohereRerankRequest, output_spec=CohereRerankResponse
    )
    async def rerank_v2(self, ctx: bentoml.Context, **body: Any) -> Any:
        """Rerank documents (Cohere v2, what its current client posts): top_n results."""
        return _answer(
            ctx, await self.front.rerank(self.embedder, body, "/v2/rerank", _request(ctx))
        )


def _request(ctx: bentoml.Context) -> RequestContext | None:
    """The request's context, which the edge put in the ASGI scope's state."""
    return request_context(ctx.request.state)


def _answer(ctx: bentoml.Context, response: Response) -> Response:
    """``response`` as is: BentoML sets a route's status from ``ctx.response`` (200 unless
    told) when the route takes ``ctx``, even over a Response it returns."""
    ctx.response.status_code = response.status_code
    return response


# The decorator returns a bentoml.Service; type checkers still see the class.
cast("bentoml.Service[Any]", EmbeddingAPI).add_asgi_middleware(
    EdgeMiddleware, settings=SETTINGS, identities=IDENTITIES
)
