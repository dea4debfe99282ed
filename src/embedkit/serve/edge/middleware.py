"""The edge: ASGI middleware on the front service, guarding our routes only.

Every request gets an id (the client's ``X-Request-Id`` when valid, else a fresh one),
sent back on every response, errors included, and logged with what served it in one
JSON line. Its :class:`~embedkit.serve.pipeline.trace.RequestContext` goes to the route
handler in the ASGI scope's ``state`` (Starlette's ``request.state``). In order: auth
(the key names the tenant, :mod:`embedkit.serve.edge.tenants`), the ``X-Embedkit-Lane``
header's value, body-size limit (Content-Length first, then counted while reading, so a
huge body is never buffered), admission control (in-flight requests per worker above
``max_concurrency`` → 429 + Retry-After), and the rewrite of any non-OpenAI error body
into ours (:func:`~embedkit.serve.edge.http_errors.foreign_error`); a request whose client
disconnects is cancelled. BentoML's own concurrency and timeout middlewares sit outside
this one and answer in their own shape, so ``serve.options.front_config`` sets their
limits above ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, get_args

from starlette.types import Receive, Scope, Send

from embedkit.core import metrics
from embedkit.core.errors import (
    EmbedkitError,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
)
from embedkit.core.settings import Settings
from embedkit.serve.edge.http_errors import (
    count_rejection,
    error_status_body,
    foreign_error,
    is_openai_error_body,
)
from embedkit.serve.edge.schemas import PROTECTED_ROUTES, Lane
from embedkit.serve.edge.tenants import Tenants
from embedkit.serve.engine import identity
from embedkit.serve.pipeline import trace

LANES = get_args(Lane)


def request_logger() -> logging.Logger:
    """``embedkit.requests``: bare JSON lines on stdout, for a log collector to parse.
    BentoML configures only its own loggers, so this one gets its handler here, once."""
    logger = logging.getLogger("embedkit.requests")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class EdgeMiddleware:
    """Auth, body limit, admission control and error rewriting for ``PROTECTED_ROUTES``."""

    def __init__(
        self, app: Any, settings: Settings, identities: identity.ServedIdentities | None = None
    ) -> None:
        """``identities``: what this process serves (startup fills it in; the header and
        the log line read it)."""
        self.app = app
        self.settings = settings
        self.identities = identities if identities is not None else identity.ServedIdentities()
        self.in_flight = 0
        self.tenants = Tenants.from_settings(settings)  # startup refused a bad file already
        self.log = request_logger() if settings.request_log else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tenants.store is not None:
            # Its heartbeat runs in this worker's loop (the first scope is the lifespan's):
            # the fleet's live processes are counted before the first request.
            self.tenants.store.start()
        if scope["type"] != "http" or scope["path"] not in PROTECTED_ROUTES:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request = trace.RequestContext(trace.request_id(headers.get("x-request-id")))
        traced = _Traced(_with_identity(send, self.identities.served()), request)
        trace.attach(scope, request)  # the route handler takes it from request.state
        try:
            await self._serve(scope, receive, traced, headers, request)
        finally:
            if self.log is not None:
                _log_request(self.log, scope, request, traced, started, self.identities)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        request: trace.RequestContext,
    ) -> None:
        raw_receive = receive
        try:
            request.tenant = self.tenants.identify(headers.get("authorization"))
            asked = headers.get(trace.LANE_HEADER.lower())
            if asked is not None:
                if asked.strip().lower() not in LANES:
                    raise InvalidInput(
                        f"{trace.LANE_HEADER} must be 'query' or 'bulk', not {asked!r}",
                        param=trace.LANE_HEADER,
                    )
                request.asked_lane = asked.strip().lower()
            if scope["method"] == "POST":
                # BentoML would also accept multipart and pickle bodies (pickle → 415,
                # a malformed multipart body → 500): our routes take JSON only.
                media = headers.get("content-type", "application/json").split(";")[0].strip()
                if media.lower() != "application/json":
                    raise InvalidInput(f"Content-Type must be application/json, not {media!r}")
                receive = await self._bounded_body(headers, receive)
            if self.in_flight >= self.settings.max_concurrency:
                raise Overloaded(
                    f"more than {self.settings.max_concurrency} requests in flight; retry later"
                )
        except EmbedkitError as exc:
            await self._send_error(send, exc)
            return
        self.in_flight += 1
        try:
            app = self.app(scope, receive, _ErrorRewriter(send, self._send_error))
            if scope["method"] == "POST":
                # The body is fully read: raw_receive now only reports a disconnect.
                if await _drop_if_disconnected(app, raw_receive):
                    # Nobody reads this, but BentoML's timeout middleware (outside us) waits
                    # for a response start until request_timeout_s and would hold the
                    # request task — and a graceful shutdown — that long. 499: nginx's
                    # "client closed request", also what the access log then shows.
                    await send({"type": "http.response.start", "status": 499, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
            else:
                await app
        finally:
            self.in_flight -= 1

    async def _bounded_body(self, headers: dict[str, str], receive: Any) -> Any:
        limit = self.settings.max_body_bytes
        too_large = PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _send_error(
        self, send: Any, exc: EmbedkitError, keep: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        count_rejection(exc)
        status, body, headers = error_status_body(exc)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw.extend(keep)
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


class _Traced:
    """``send`` that adds the request's id (and lane, bulk runs ahead) to the response
    start and remembers its status and, when the front named it (several models), the
    identity of the model that answered, for the log line."""

    def __init__(self, send: Send, request: trace.RequestContext) -> None:
        self.send = send
        self.request = request
        self.status: int | None = None
        self.served: str | None = None

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.served = _header(message, identity.HEADER)
            message = {**message, "headers": [*message.get("headers", ()), *self.request.headers()]}
        await self.send(message)


def _log_request(
    log: logging.Logger,
    scope: Scope,
    request: trace.RequestContext,
    traced: _Traced,
    started: float,
    identities: identity.ServedIdentities,
) -> None:
    """One JSON line per request: what came in, who sent it, what served it."""
    default = identities.served()
    served = traced.served or (None if default is None else default.header_value())
    tenant = request.tenant
    line = {
        "event": "embedkit.request",
        "time": time.time(),
        "request_id": request.request_id,
        "method": scope["method"],
        "route": scope["path"],
        "status": traced.status,
        "tenant": None if tenant is None else tenant.name,
        "lane": request.lane,
        "batches": request.batches,
        "bulk_runs_ahead": request.bulk_runs_ahead,
        "other_tenant_runs_ahead": request.other_tenant_runs_ahead,
        "tokens": request.tokens,
        "ms": round((time.perf_counter() - started) * 1000, 2),
        "served": served,
    }
    log.info(json.dumps(line, separators=(",", ":")))


def _header(message: Any, name: str) -> str | None:
    """A header's value on an ASGI response start (None when absent)."""
    key = name.lower().encode()
    return next(
        (v.decode("latin-1") for k, v in message.get("headers", ()) if k.lower() == key), None
    )


def _with_identity(send: Send, served: identity.ServedIdentity | None) -> Send:
    """``send`` that adds the served identity's header to every response start (errors
    and 499s included) once startup has built it (``served``). A response that names its
    model already (several models: the front of the model a request picked) keeps its own."""
    if served is None:
        return send
    header = (identity.HEADER.lower().encode(), served.header_value().encode("latin-1"))

    async def sending(message: Any) -> None:
        start = message["type"] == "http.response.start"
        if start and _header(message, identity.HEADER) is None:
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return sending


async def _drop_if_disconnected(app: Any, receive: Any) -> bool:
    """Run the request, cancelling it if the client goes away first: work nobody will
    read is dropped (the front sends big jobs to the Embedder in chunks, so at most
    the chunk in flight still runs) instead of holding queue slots and CPU.
    True if it was dropped."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(app)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        dropped = not task.done()
        if dropped:
            task.cancel()
            metrics.get().dropped_requests.inc()
        await asyncio.gather(task, return_exceptions=True)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
        return dropped
    finally:
        for t in (task, watcher):
            t.cancel()


class _ErrorRewriter:
    """Wraps ``send``: error responses whose body is not already ours are rewritten."""

    def __init__(self, send: Any, send_error: Any) -> None:
        self.send = send
        self.send_error = send_error
        self.start: dict[str, Any] | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await self.send(message)
                return
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status, body = self.start["status"], b"".join(self.chunks)
        if is_openai_error_body(body):
            await self.send(self.start)
            await self.send({"type": "http.response.body", "body": body})
        else:
            keep = [(k, v) for k, v in self.start.get("headers", ()) if k.lower() == b"allow"]
            await self.send_error(self.send, foreign_error(status, body), keep)
