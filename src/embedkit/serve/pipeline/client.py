"""The front's side of the hand-off to the Embedder.

:class:`EmbedderClient` turns a job into calls on the Embedder's batchable APIs and
returns the raw pooled vectors: it admits work against a token budget, cuts it into
chunks of the lane's batch size, shares calls between concurrent requests
(:class:`~embedkit.serve.pipeline.coalesce.Coalescer`), retries a call once when its
connection broke, and translates every other failure into one of our errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from embedkit.core.errors import EmbedkitError, InferenceError, Overloaded
from embedkit.core.settings import Settings
from embedkit.serve.edge.http_errors import translate_upstream
from embedkit.serve.edge.schemas import Item, Lane, Row
from embedkit.serve.pipeline.coalesce import Coalescer
from embedkit.serve.pipeline.jobs import Job
from embedkit.serve.pipeline.options import ort_runs
from embedkit.serve.pipeline.trace import RequestContext
from embedkit.serve.seams import Embedder, EngineReport

log = logging.getLogger(__name__)

# One of the Embedder's lanes (``embed_query`` / ``embed_bulk``).
Call = Callable[[list[Item], EngineReport], Awaitable[np.ndarray]]
# A row with the request it belongs to, so the call that carries it (merged with other
# requests' rows by the coalescer) can tell each request which batch it rode in.
Tagged = tuple[RequestContext | None, Row]


class EmbedderClient:
    """Calls the Embedder through ``embedder`` (:class:`~embedkit.serve.seams.Embedder`:
    in this process, or the Embedder service through BentoML's proxy), passed to each call."""

    def __init__(self, settings: Settings, *, model: str = "") -> None:
        self.settings = settings
        self.model = model  # several models: each has its own client, so its own budget
        self.queued_tokens = 0  # admitted to the Embedder, not yet answered (see _admit)
        self.queued_query_tokens = 0  # the interactive lane's part of it
        self._batch_ids = itertools.count(1)
        # Set by the front once warm: before, a broken connection only means the
        # Embedder is not up yet, which is not worth a warning.
        self.warm = False
        self._coalescers: dict[Lane, Coalescer[Tagged]] = {}  # per lane; the proxy never changes

    def _batch_size(self, lane: Lane) -> int:
        s = self.settings
        return s.query_max_batch_size if lane == "query" else s.bulk_max_batch_size

    def _admit(self, tokens: int, lane: Lane = "bulk") -> None:
        """Token-budget admission: the Embedder's queue holds at most ``max_queued_tokens``
        (bounded work, so bounded queueing delay); the excess gets 429 + Retry-After.
        A request alone is always admitted. Queries count only queued queries: they run
        before any queued bulk work, so bulk work never delays nor sheds them. The budget
        is per model (each model's front has its own client): a flood on one model sheds
        only that model's work."""
        limit = self.settings.max_queued_tokens
        queued = self.queued_query_tokens if lane == "query" else self.queued_tokens
        if queued and queued + tokens > limit:
            whose = f"model {self.model}'s" if self.model else "the model"
            raise Overloaded(
                f"{whose} queue is full ({queued} tokens waiting, limit {limit}); "
                "retry after the indicated delay"
            )
        self.queued_tokens += tokens
        if lane == "query":
            self.queued_query_tokens += tokens

    async def embed(
        self, embedder: Embedder, job: Job, request: RequestContext | None = None
    ) -> np.ndarray:
        """Raw pooled vectors ``[len(job.ids), model_dim]`` from the job's lane, in order
        (a reranker's job: raw scores ``[pairs, 1]``); ``request`` learns the batches it
        rode in."""
        call: Call = embedder.embed_query if job.lane == "query" else embedder.embed_bulk
        # Chunks of the lane's batch size, one after another: the Embedder would split a
        # big job the same way, but a cancelled request (client gone) then stops after
        # the chunk in flight instead of leaving the whole job in the Embedder's queue.
        size = self._batch_size(job.lane)
        self._admit(job.tokens, job.lane)
        try:
            send = self._sender(job.lane, call, request)
            rows: list[Tagged] = [(request, row) for row in job.rows()]
            parts = [np.asarray(await send(rows[i : i + size])) for i in range(0, len(rows), size)]
        finally:
            self.queued_tokens -= job.tokens
            if job.lane == "query":
                self.queued_query_tokens -= job.tokens
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def info(self, embedder: Embedder) -> dict[str, Any]:
        """The Embedder's engine description (``/info``), failures translated."""
        try:
            info: dict[str, Any] = await asyncio.wait_for(
                embedder.info(), self.settings.request_timeout_s
            )
        except Exception as exc:
            raise translate_upstream(exc) from exc
        return info

    def _sender(
        self, lane: Lane, call: Call, request: RequestContext | None
    ) -> Callable[[list[Tagged]], Awaitable[Any]]:
        """One Embedder call per chunk, or via the lane's :class:`Coalescer` (shared by
        concurrent requests) when ``front_coalescing`` is on. On the query lane the
        coalescer takes tenants in turn, charged the chunk's tokens, and ``request``
        learns how many other tenants' calls left ahead of it."""
        if not self.settings.front_coalescing:
            return lambda ids: self._call(call, ids, lane)
        merger = self._coalescers.get(lane)
        if merger is None:
            s = self.settings
            # Interactive lane: continuous batching, one call in flight per ORT run the
            # engine side can do at once (its runner threads, or the Embedder's workers).
            slots = ort_runs(s) if s.topology == "single" else s.workers
            in_flight = slots if lane == "query" and s.query_continuous_batching else None
            merger = self._coalescers[lane] = Coalescer(
                lambda ids: self._call(call, ids, lane),
                self._batch_size(lane),
                max_in_flight=in_flight,
            )
        if lane != "query":  # bulk calls leave in arrival order: nothing waits on them
            return merger.submit
        tenant = None if request is None or request.tenant is None else request.tenant.name

        async def fair(rows: list[Tagged]) -> np.ndarray:
            vectors, ahead = await merger.submit_counted(rows, tenant, _tokens(rows))
            if request is not None:
                request.queued_behind(ahead)
            return vectors

        return fair

    async def _call(self, call: Call, tagged: list[Tagged], lane: Lane) -> Any:
        """One call to the Embedder (one batch, with an id its requests log), retried once
        if the connection broke.

        The proxy reuses keep-alive connections that the Embedder's server closes
        when idle (uvicorn: 5 s); a request racing that close fails with "Can not
        write request body" before the Embedder saw it — a 500 under plain load
        (tests/load). A worker restart breaks connections the same way. Embedding
        is idempotent, so one retry is safe; anything else is translated, never leaked.
        """
        rows = [row for _, row in tagged]
        requests = {id(r): r for r, _ in tagged if r is not None}.values()
        batch = f"{lane}-{next(self._batch_ids)}"
        for attempt in (1, 2):
            sent_at = time.time()
            report = EngineReport()  # the engine side fills it (single topology)
            try:
                result = await asyncio.wait_for(
                    call([_item(sent_at, row) for row in rows], report),
                    self.settings.request_timeout_s,
                )
                for request in requests:
                    request.rode(batch, report.bulk_runs_ahead)
                return result
            except EmbedkitError:
                raise
            except Exception as exc:  # the proxy's BentoML/aiohttp errors
                if attempt == 1 and _broken_connection(exc):
                    level = logging.WARNING if self.warm else logging.DEBUG
                    log.log(level, "embedder connection broke (%s); retrying once", exc)
                    continue
                err = translate_upstream(exc)
                if isinstance(err, InferenceError):
                    log.exception("embedder call failed")
                raise err from exc
        raise AssertionError("unreachable")


def _tokens(rows: list[Tagged]) -> int:
    return sum(len(row if isinstance(row, list) else row[0]) for _, row in rows)


def _item(sent_at: float, row: Row) -> Item:
    return (sent_at, *row) if isinstance(row, tuple) else (sent_at, row)


def _broken_connection(exc: BaseException) -> bool:
    """A connection-level failure (reset, closed, refused), not a timeout or an answer."""
    import aiohttp

    return isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, TimeoutError)
