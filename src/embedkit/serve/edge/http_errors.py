"""The one place an error becomes an HTTP answer.

Every error a client can meet leaves as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` body with the status its
:class:`~embedkit.core.errors.EmbedkitError` class carries: our own errors, the
Embedder call's failures (:func:`translate_upstream`) and the bodies BentoML writes
itself — its validation 400s, empty 5xx bodies, 429/504 middlewares
(:func:`foreign_error`, applied by :class:`~embedkit.serve.edge.middleware.EdgeMiddleware`) —
so the OpenAI client and the native routes see one shape. 5xx messages stay generic:
no stack trace or internal detail ever leaves (the server log has it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from embedkit.core import metrics
from embedkit.core.errors import (
    EmbedkitError,
    InferenceError,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    UnknownParameter,
    UnsupportedParameter,
    UpstreamTimeout,
)
from embedkit.serve.edge.bodies import dumps
from embedkit.serve.edge.schemas import routes_taking

INTERNAL_MESSAGE = "internal error while embedding; the server log has details"


def error_status_body(exc: EmbedkitError) -> tuple[int, bytes, dict[str, str]]:
    """Status, OpenAI-shaped JSON body and headers (``retry-after`` when overloaded)."""
    headers = {"content-type": "application/json"}
    if isinstance(exc, Overloaded):
        headers["retry-after"] = str(max(1, exc.retry_after_s))
    return exc.status, dumps(exc.to_openai()), headers


def count_rejection(exc: EmbedkitError) -> None:
    """Every error answer counts once in ``rejected_requests{reason}``."""
    metrics.get().rejected_requests.labels(reason=exc.code or exc.type).inc()


def error_response(exc: EmbedkitError) -> Any:
    """The error as a Starlette response (for route handlers; the middleware sends raw ASGI)."""
    from starlette.responses import Response

    count_rejection(exc)
    status, body, headers = error_status_body(exc)
    return Response(body, status_code=status, headers=headers)


def translate_upstream(exc: BaseException) -> EmbedkitError:
    """An exception from the call to the Embedder → one of ours (never leaks its text).

    BentoML's dispatcher sheds load with 503 when a batch cannot meet its deadline:
    that is a full queue, so the client gets 429 + Retry-After.
    """
    if isinstance(exc, EmbedkitError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout("the model did not answer in time; retry later")
    status = getattr(getattr(exc, "error_code", None), "value", None)
    if status in (429, 503):
        return Overloaded("the model queue is full; retry after the indicated delay")
    if status == 504:
        return UpstreamTimeout("the model did not answer in time; retry later")
    return InferenceError(INTERNAL_MESSAGE)


def _validation_message(detail: list[Any]) -> str:
    """One line from pydantic's error list: the field path (union-member tags such as
    ``list[int]`` dropped) and the first message; a union that matched no member says so."""
    first = detail[0]
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    members = [p for p in path if "[" in p or p in ("str", "int", "bool", "float")]
    loc = ".".join(p for p in path if p not in members)
    msg = str(first.get("msg", "invalid value"))
    if members and len(detail) > 1:
        msg = f"matches none of the accepted forms (e.g. {msg.lower()})"
    return f"{loc}: {msg}" if loc else msg


def _field_error(detail: list[Any]) -> EmbedkitError | None:
    """A request field the route does not take: one another route takes is refused by
    name (:class:`UnsupportedParameter`); one no route takes as OpenAI refuses it (400,
    "Unrecognized request argument supplied: X"). None when no such field was sent."""
    extra = [  # dotted below the body: chunking.size
        ".".join(str(p) for p in d["loc"] if p != "body")
        for d in detail
        if isinstance(d, dict) and d.get("type") == "extra_forbidden" and d.get("loc")
    ]
    for field in extra:
        if routes := routes_taking(field):
            return UnsupportedParameter(
                f"{field} is not supported on this route; it is a field of {', '.join(routes)}",
                param=field,
            )
    if not extra:
        return None
    plural = "s" if len(extra) > 1 else ""
    return UnknownParameter(
        f"Unrecognized request argument{plural} supplied: {', '.join(extra)}", param=extra[0]
    )


def foreign_error(status: int, body: bytes) -> EmbedkitError:
    """BentoML's own error body (validation 400, empty 5xx, 429/504 middlewares) → ours."""
    message = ""
    try:
        data = json.loads(body) if body else None
        if isinstance(data, list) and data:
            data = data[0]
        if isinstance(data, dict):
            detail = data.get("detail")
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                if status == 400 and (field_error := _field_error(detail)) is not None:
                    return field_error
                message = _validation_message(detail)
            elif isinstance(data.get("error"), str):
                message = data["error"]
    except ValueError:
        message = ""
    if status == 400:
        message = message or "request body is not valid JSON for this route"
        return InvalidInput(f"invalid request: {message}".replace("\n", " "))
    if status == 413:
        return PayloadTooLarge(message or "request too large")
    if status == 429:
        return Overloaded("too many requests in flight; retry later")
    if status == 503:
        return NotReady("the service is not ready or overloaded; retry later")
    if status == 504:
        return UpstreamTimeout("the request timed out")
    if 400 <= status < 500:
        default = "method not allowed" if status == 405 else "invalid request"
        err = InvalidInput(message or default)
        err.status = status
        return err
    return InferenceError(INTERNAL_MESSAGE)


def is_openai_error_body(body: bytes) -> bool:
    """Whether an error body already has our shape (and so passes through unchanged)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("error"), dict) and "type" in data["error"]
    )
