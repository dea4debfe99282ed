"""The models one deployment serves, by name: the request's ``model`` picks one.

One :class:`~embedkit.serve.pipeline.front.Front` per model (its tokenizer, prompts, limits and
its own :class:`~embedkit.serve.pipeline.client.EmbedderClient`, so admission, the token budget
and its 429s, is per model); the first is the default, which a request that names no
model gets. :class:`ServedModels` offers the single front's surface (routes, warm-up,
``/v1/models``, ``/info``, the OpenAPI document), so ``service.py`` wires one or several
models the same way. With several models the Embedder is the in-process
``LocalEmbedder`` (``topology=single``, a :class:`~embedkit.serve.seams.ModelEmbedders`),
whose ``for_model(name)`` is one model's calls on the shared runner threads
(docs/design/serving.md, decision 5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from embedkit.core.errors import ConfigurationError, EmbedkitError, ModelNotFound
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.serve.edge.http_errors import error_response
from embedkit.serve.edge.schemas import Lane
from embedkit.serve.engine.identity import ServedIdentities
from embedkit.serve.pipeline.front import Front
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.seams import Embedder, ModelEmbedders

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
        self.fronts = {
            name: Front(artifact, settings, name=name, default=i == 0, identities=self.identities)
            for i, (name, artifact) in enumerate(zip(names, artifacts, strict=True))
        }
        self.default = next(iter(self.fronts.values()))
        if len(self.fronts) > 1:  # a 429 then says whose queue is full
            for name, front in self.fronts.items():
                front.client.model = name

    @property
    def ready(self) -> bool:
        return all(front.ready for front in self.fronts.values())

    def pick(self, name: object) -> Front:
        """The front of model ``name`` (None: the default); else 404 naming those served."""
        if name is None:
            return self.default
        front = self.fronts.get(name) if isinstance(name, str) else None
        if front is None:
            served = ", ".join(repr(n) for n in self.fronts)
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {served} (see GET /v1/models)",
                param="model",
            )
        return front

    def embedder(self, embedder: Embedder, front: Front) -> Embedder:
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
            front = self.pick(body.get("model"))
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
            front = self.pick(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        return await front.native(self.embedder(embedder, front), body, lane, request)

    async def tokenize(self, body: dict[str, Any], request: RequestContext | None = None) -> Any:
        try:
            front = self.pick(body.get("model"))
        except EmbedkitError as exc:
            return error_response(exc)
        return await front.tokenize(body, request)

    # --- metadata
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [front.card() for front in self.fronts.values()]}

    def openapi(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.default.openapi(spec, list(self.fronts.values()))

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
