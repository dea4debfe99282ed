"""The seam between the front's pipeline and the engine: what "something that embeds" is.

The pipeline (:class:`~embedkit.serve.pipeline.client.EmbedderClient`, the fronts, the
registry) calls an :class:`Embedder` and knows nothing else of it. Three things are one:

* :class:`~embedkit.serve.engine.embedder.LocalEmbedder`: the engine in the front's own
  process (``topology=single``), on its runner threads; it serves several models too
  (:class:`ModelEmbedders`);
* its one-model view (``LocalEmbedder.for_model``), when several models are served;
* :class:`RemoteEmbedder`: the Embedder service in its own process (``topology=split``),
  through BentoML's ``bentoml.depends`` proxy.

Each call may carry an :class:`EngineReport`, which the engine side fills in (how many
bulk runs an interactive call waited behind) and the client hands to every request that
rode in the call. No ORT here: the front side imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from embedkit.serve.edge.schemas import Item


@dataclass
class EngineReport:
    """What the engine side says about one Embedder call (the caller's, filled in by
    :class:`~embedkit.serve.engine.embedder.LocalEmbedder`; a remote Embedder leaves it
    empty: BentoML's dispatcher orders that work)."""

    bulk_runs_ahead: int | None = None

    def waited(self, runs: int) -> None:
        self.bulk_runs_ahead = max(self.bulk_runs_ahead or 0, runs)


class Embedder(Protocol):
    """Something that embeds: the Embedder's two batchable lanes and its description.

    ``items`` are ``(sent_at, ids[, pool_from])`` rows (:data:`~embedkit.serve.edge.schemas.Item`);
    the answer is one raw pooled vector per row, in order.
    """

    async def embed_query(
        self, items: list[Item], report: EngineReport | None = None
    ) -> np.ndarray: ...

    async def embed_bulk(
        self, items: list[Item], report: EngineReport | None = None
    ) -> np.ndarray: ...

    async def info(self) -> dict[str, Any]: ...


@runtime_checkable
class ModelEmbedders(Embedder, Protocol):
    """An :class:`Embedder` serving several models; itself answers for the default one."""

    def for_model(self, name: str) -> Embedder: ...


class RemoteEmbedder:
    """The Embedder service in its own process, through BentoML's proxy
    (``bentoml.depends(Embedder).to_async``): its APIs take the items only, so the report
    stays empty (``X-Embedkit-Bulk-Runs-Ahead`` is absent with ``topology=split``)."""

    def __init__(self, proxy: Any) -> None:
        # BentoML builds the proxy's methods at run time from the service's APIs: it has
        # no static type to check against; this class is where it gets one.
        self.proxy = proxy

    async def embed_query(
        self, items: list[Item], report: EngineReport | None = None
    ) -> np.ndarray:
        return np.asarray(await self.proxy.embed_query(items))

    async def embed_bulk(self, items: list[Item], report: EngineReport | None = None) -> np.ndarray:
        return np.asarray(await self.proxy.embed_bulk(items))

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.proxy.info()
        return info
