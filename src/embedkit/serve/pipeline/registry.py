"""The models one deployment serves, by name: the request's ``model`` picks one.

One front per model: a :class:`~embedkit.serve.pipeline.front.Front` per embedding model,
a :class:`~embedkit.serve.pipeline.rerank.RerankFront` per reranker (``task: rerank``),
each with its tokenizer, limits and its own
:class:`~embedkit.serve.pipeline.client.EmbedderClient`, so admission, the token budget
and its 429s, is per model. A request that names no model gets the first served model
of its route's task (the first overall is the deployment's default identity); one that
names a model of the other task is a 400 naming that task. :class:`ServedModels` offers
the single front's surface (routes, warm-up, ``/v1/models``, ``/info``, the OpenAPI
document), so ``service.py`` wires one or several models the same way. With several
models the Embedder is the in-process ``LocalEmbedder`` (``topology=single``, a
:class:`~embedkit.serve.seams.ModelEmbedders`), whose ``for_model(name)`` is one model's
calls on the shared runner threads (docs/design/serving.md, decision 5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from embedkit.core.errors import ConfigurationError, EmbedkitError, ModelNotFound, WrongTask
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.model.recipe import Task
from embedkit.serve.edge.http_errors import error_response
from embedkit.serve.edge.openapi import openapi_document
from embedkit.serve.edge.schemas import Lane
from embedkit.serve.engine.identity import ServedIdentities
from embedkit.serve.pipeline.front import Front, ModelFront
from embedkit.serve.pipeline.rerank import RerankFront
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.seams import Embedder, ModelEmbedders

# What a model of each task is called, and the routes that serve it (for the 400 a route
# of the other task answers).
_TASKS: dict[str, tuple[str, str, str]] = {
    "embed": ("an", "embedding model", "/v1/embeddings, /embed, /embed/query or /tokenize"),
    "rerank": ("a", "reranker", "/rerank, /v1/rerank or /v2/rerank"),
}

log = logging.getLogger(__name__)


def served_names(artifacts: Sequence[Artifact], settings: Settings) -> list[str]:
    """The name clients pass as ``model`` for each artifact: its manifest's name, the
    first one's ``served_model_name`` when set. Two alike stop startup with one line."""
    names = [a.manifest.name for a in artifacts]
    if settings.served_model_name:
        names[0] = settings.served_model_name
    if twice := sorted({n for n in names if names.count(n) > 1}):
        exc = ConfigurationError(
            f"several served models are named {', '.join(twice)}; a request's `model` could "
            "not tell them apart (serve one version per model name)"
        )
        log.error("embedkit refuses to start: %s", exc)
        raise exc
    return names


class ServedModels:
    """Every served model's front, by name, the default first."""

    def __init__(
        self,
        artifacts: Sequence[Artifact],
        settings: Settings,
        identities: ServedIdentities | None = None,
    ) -> None:
        """``identities``: what this process serves (each front publishes its model's
        identity there once warm); one of its own when not given."""
        names = served_names(artifacts, settings)
        self.identities = identities if identities is not None else ServedIdentities()
        self.settings = settings
        self.fronts: dict[str, ModelFront] = {
            name: (RerankFront if artifact.manifest.task == "rerank" else Front)(
                artifact, settings, name=name, default=i == 0, identities=self.identities
            )
            for i, (name, artifact) in enumerate(zip(names, artifacts, strict=True))
        }
        self._openapi: dict[str, Any] | None = None
        self.default = next(iter(self.fronts.values()))
        if len(self.fronts) > 1:  # a 429 then says whose queue is full
            for name, front in self.fronts.items():
                front.client.model = name

    @property
    def ready(self) -> bool:
        return all(front.ready for front in self.fronts.values())

    def pick(self, name: object, task: Task = "embed") -> ModelFront:
        """The front of model ``name`` (None: the first served model of ``task``); 404
        naming those served when unknown, 400 naming its task when it is of the other."""
        if name is None:
            front = next((f for f in self.fronts.values() if f.task == task), None)
            if front is None:
                raise WrongTask(
                    f"no {_TASKS[task][1]} (task: {task}) is served here; served: "
                    f"{self._listing()}",
                    param="model",
                )
            return front
        front = self.fronts.get(name) if isinstance(name, str) else None
        if front is None:
            served = ", ".join(repr(n) for n in self.fronts)
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {served} (see GET /v1/models)",
                param="model",
            )
        if front.task != task:
            article, noun, routes = _TASKS[front.task]
            wanted = " ".join(_TASKS[task][:2])
            raise WrongTask(
                f"model {name!r} is {article} {noun} (task: {front.task}), not {wanted}; "
                f"call {routes} with it (served: {self._listing()})",
                param="model",
            )
        return front

    def _listing(self) -> str:
        return ", ".join(f"{n!r} (task: {f.task})" for n, f in self.fronts.items())

    def _embedding(self, name: object) -> Front:
        return cast(Front, self.pick(name, "embed"))

    def _reranker(self, name: object) -> RerankFront:
        return cast(RerankFront, self.pick(name, "rerank"))

    def embedder(self, embedder: Embedder, front: ModelFront) -> Embedder:
        """``front``'s model's calls: the Embedder itself when it serves one model."""
        if len(self.fronts) == 1:
            return embedder
        if not isinstance(embedder, ModelEmbedders):  # startup allows several only so
            raise ConfigurationError("several models are served only with topology=single")
        return embedder.for_model(front.model_name)

    # --- routes: pick the model, then its front does the work
    async def openai(
        self, embedder: Embedder, body: dict[str, Any], request: RequestContext | None = None
    ) -> Any:
        try:
            front = self._embedding(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        return await front.openai(self.embedder(embedder, front), body, request)

    async def native(
        self,
        embedder: Embedder,
        body: dict[str, Any],
        lane: Lane,
        request: RequestContext | None = None,
    ) -> Any:
        try:
            front = self._embedding(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        return await front.native(self.embedder(embedder, front), body, lane, request)

    async def tokenize(self, body: dict[str, Any], request: RequestContext | None = None) -> Any:
        try:
            front = self._embedding(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        return await front.tokenize(body, request)

    async def rerank(
        self,
        embedder: Embedder,
        body: dict[str, Any],
        route: str,
        request: RequestContext | None = None,
    ) -> Any:
        """``/rerank`` (TEI's shape) or ``/v1/rerank``, ``/v2/rerank`` (Cohere's)."""
        try:
            front = self._reranker(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        if route == "/rerank":
            return await front.tei(self.embedder(embedder, front), body, request)
        return await front.cohere(self.embedder(embedder, front), body, route, request)

    # --- metadata
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [front.card() for front in self.fronts.values()]}

    def openapi(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The OpenAPI document: each route's `model` enum names the served models of its
        task; a task nobody serves has its routes left out."""
        embedding = [f for f in self.fronts.values() if isinstance(f, Front)]
        rerankers = [name for name, f in self.fronts.items() if f.task == "rerank"]
        if embedding:
            return embedding[0].openapi(spec, embedding, rerankers=rerankers)
        if self._openapi is None:
            self._openapi = openapi_document(
                spec, settings=self.settings, model=rerankers[0], rerankers=rerankers
            )
        return self._openapi

    async def info(self, embedder: Embedder) -> dict[str, Any]:
        """The default model's ``/info``; with several, each model's under ``models``."""
        info = await self.default.info(self.embedder(embedder, self.default))
        if len(self.fronts) > 1:
            first = dict(info)
            info["models"] = {
                name: first
                if front is self.default
                else await front.info(self.embedder(embedder, front))
                for name, front in self.fronts.items()
            }
        return info

    async def warmup(self, embedder: Embedder) -> None:
        for front in self.fronts.values():
            await front.warmup(self.embedder(embedder, front))
