"""The HTTP edge: request/response schemas, limits, auth and the one error → HTTP mapping.

Nothing here runs a model or knows about BentoML services; ``embedkit.serve.serving``
drives the pipeline and ``service.py`` wires both into BentoML. Every error a
client can meet leaves through :func:`error_response` as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` body — including the
errors BentoML itself produces (its validation 400s, its empty 5xx bodies),
which :class:`EdgeMiddleware` rewrites, so the OpenAI client and the native
routes see one shape.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from embedkit.core.errors import (
    EmbedkitError,
    InferenceError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UpstreamTimeout,
)
from embedkit.core.settings import Settings
from embedkit.runtime.vectors import check_dimensions, encode_base64

Lane = Literal["query", "bulk"]
EncodingFormat = Literal["float", "base64"]

# Routes that need an API key (when keys are configured), obey the body limit,
# count against admission control and answer errors in the OpenAI shape.
INFERENCE_ROUTES = frozenset({"/v1/embeddings", "/embed", "/embed/query", "/tokenize"})
METADATA_ROUTES = frozenset({"/v1/models", "/info"})
PROTECTED_ROUTES = INFERENCE_ROUTES | METADATA_ROUTES


# --- request schemas -----------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``. Strict types: ``[1, "a"]`` or ``[true]`` is a 400."""

    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A text, a list of texts, a list of token ids or a list of token-id lists."
    )
    model: StrictStr = Field(description="Served model name (see GET /v1/models).")
    encoding_format: EncodingFormat = Field(
        default="float", description="'base64': little-endian float32 bytes, base64-encoded."
    )
    dimensions: StrictInt | None = Field(
        default=None, description="Matryoshka truncation to this many dimensions (re-normalised)."
    )
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")


class EmbedRequest(BaseModel):
    """Native ``POST /embed`` and ``POST /embed/query``."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="Texts to embed; empty strings are allowed.")
    normalize: StrictBool = Field(
        default=True, description="L2-normalise (after truncation to `dimensions`)."
    )
    truncate: StrictBool = Field(
        default=True,
        description="Truncate texts over the model's token limit; false answers 413 instead.",
    )
    dimensions: StrictInt | None = Field(
        default=None, description="Keep only the first n dimensions."
    )
    encoding_format: EncodingFormat = Field(
        default="float",
        description="'base64': `embeddings` is one base64 string of a row-major "
        "little-endian float32 [n, dimensions] array (~4x smaller than JSON).",
    )


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: token ids (special tokens included) as the model sees them."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr]
    truncate: StrictBool = Field(
        default=True, description="false: texts over the limit answer 413."
    )


# --- response schemas (for the OpenAPI document; bodies are written by hand) ---


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: OpenAIUsage


class TokenUsage(BaseModel):
    tokens: int


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] | str
    model: str
    dimensions: int
    encoding_format: EncodingFormat = "float"
    usage: TokenUsage


class TokenizeResponse(BaseModel):
    ids: list[list[int]]
    counts: list[int]
    max_length: int
    usage: TokenUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- jobs: a validated request, ready for the Embedder --------------------------


@dataclass(frozen=True)
class EmbedJob:
    """What the pipeline needs from any embedding route, after validation and tokenisation."""

    ids: list[list[int]]
    lane: Lane
    normalize: bool
    dimensions: int | None
    encoding: EncodingFormat

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.ids)


def check_count(n: int, settings: Settings, *, param: str) -> None:
    """Empty → 400; more items than ``max_client_batch`` → 413."""
    if n == 0:
        raise InvalidInput(f"{param} must not be empty", param=param)
    if n > settings.max_client_batch:
        raise PayloadTooLarge(
            f"{param} has {n} items, more than the limit of {settings.max_client_batch} per request",
            param=param,
        )


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ModelNotFound(
            f"model {requested!r} is not served here; use {served!r} (see GET /v1/models)",
            param="model",
        )


def openai_job(
    req: EmbeddingsRequest,
    tokenizer: Any,
    settings: Settings,
    *,
    served: str,
    model_dim: int,
    normalize: bool,
) -> EmbedJob:
    """Validate an OpenAI request and tokenise it (truncating, like sentence-transformers).

    Routing: one input goes to the latency-tuned query lane, several to the bulk lane.
    ``normalize`` is the manifest's (OpenAI has no such parameter).
    """
    check_model(req.model, served)
    check_dimensions(req.dimensions, model_dim)
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    check_count(len(raw), settings, param="input")
    if isinstance(raw[0], int):  # one token-id list (pydantic guarantees homogeneity)
        ids = tokenizer.check_ids([raw], truncate=True)
    elif isinstance(raw[0], list):
        ids = tokenizer.check_ids(raw, truncate=True)
    else:
        ids = tokenizer.encode(raw, truncate=True)
    return EmbedJob(
        ids=ids,
        lane="query" if len(ids) == 1 else "bulk",
        normalize=normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
    )


def native_job(
    req: EmbedRequest, tokenizer: Any, settings: Settings, *, lane: Lane, model_dim: int
) -> EmbedJob:
    check_dimensions(req.dimensions, model_dim)
    check_count(len(req.texts), settings, param="texts")
    ids = tokenizer.encode(req.texts, truncate=req.truncate)
    return EmbedJob(
        ids=ids,
        lane=lane,
        normalize=req.normalize,
        dimensions=req.dimensions,
        encoding=req.encoding_format,
    )


# --- response bodies ---------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """Compact JSON, the same numbers as ``json.dumps`` (floats come from ``tolist()``:
    float64 shortest repr either way; non-ASCII text stays UTF-8 instead of ``\\u`` escapes)
    but ~15x faster on 384 floats (docs/benchmarks/serving-tuning.md). orjson writes NaN as
    null where json refused it; ``vectors.postprocess`` already refuses non-finite vectors.
    orjson refuses integers beyond 64 bits; such a body (a client's echoed value) goes
    through the stdlib instead of failing."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def openai_body(vectors: np.ndarray, job: EmbedJob, model: str) -> bytes:
    if job.encoding == "base64":
        items: Sequence[Any] = [encode_base64(row) for row in vectors]
    else:
        items = vectors.tolist()
    tokens = job.tokens
    return dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def native_body(vectors: np.ndarray, job: EmbedJob, model: str) -> bytes:
    embeddings: Any = encode_base64(vectors) if job.encoding == "base64" else vectors.tolist()
    return dumps(
        {
            "embeddings": embeddings,
            "model": model,
            "dimensions": int(vectors.shape[1]),
            "encoding_format": job.encoding,
            "usage": {"tokens": job.tokens},
        }
    )


def tokenize_body(ids: list[list[int]], max_length: int) -> bytes:
    counts = [len(row) for row in ids]
    return dumps(
        {"ids": ids, "counts": counts, "max_length": max_length, "usage": {"tokens": sum(counts)}}
    )


# --- errors → HTTP (the one place) -------------------------------------------------

INTERNAL_MESSAGE = "internal error while embedding; the server log has details"


def error_status_body(exc: EmbedkitError) -> tuple[int, bytes, dict[str, str]]:
    """Status, OpenAI-shaped JSON body and headers for an error. 5xx messages stay generic
    for unexpected failures (no stack trace or internal detail ever leaves)."""
    headers = {"content-type": "application/json"}
    if isinstance(exc, Overloaded):
        headers["retry-after"] = str(max(1, exc.retry_after_s))
    return exc.status, dumps(exc.to_openai()), headers


def error_response(exc: EmbedkitError) -> Any:
    from starlette.responses import Response

    _count_rejection(exc)
    status, body, headers = error_status_body(exc)
    return Response(body, status_code=status, headers=headers)


def translate_upstream(exc: BaseException) -> EmbedkitError:
    """An exception from the call to the Embedder → one of ours (never leaks its text).

    BentoML's dispatcher sheds load with 503 when a batch cannot meet its deadline:
    that is a full queue, so the client gets 429 + Retry-After.
    """
    import asyncio

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


def check_auth(authorization: str | None, keys: Sequence[str]) -> None:
    """Bearer-token check; no keys configured means auth is off."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise Unauthorized("invalid API key")


# --- the OpenAPI document ------------------------------------------------------------

ERROR_STATUSES = {
    "400": "Malformed JSON, wrong types, empty input, non-JSON Content-Type.",
    "401": "Missing or invalid API key (only when keys are configured).",
    "404": "Unknown model.",
    "413": "Too many items, body too large, or a text over the token limit with truncate=false.",
    "422": "dimensions out of range.",
    "429": "Overloaded: retry after the Retry-After header.",
    "500": "Internal error (details only in the server log).",
    "503": "Not ready yet.",
    "504": "The model did not answer in time.",
}


def openapi_document(
    spec: dict[str, Any], *, settings: Settings, model: str, model_dim: int, vocab_size: int
) -> dict[str, Any]:
    """BentoML's generated document made honest: our error body and statuses on every
    route, the limits the server enforces as schema constraints, and the GET routes
    (a mounted Starlette app BentoML does not describe)."""
    import copy

    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    models: tuple[type[BaseModel], ...] = (
        ErrorDetail,
        ErrorResponse,
        ModelCard,
        ModelList,
        EmbeddingItem,
        OpenAIUsage,
        EmbeddingsResponse,
        TokenUsage,
        EmbedResponse,
        TokenizeResponse,
    )
    for cls in models:
        schema = cls.model_json_schema(ref_template=template)
        schema.pop("$defs", None)
        schemas[cls.__name__] = schema
    # BentoML flattens `list[...] | str` response fields to the list: use ours.
    responses = {
        "/v1/embeddings": "EmbeddingsResponse",
        "/embed": "EmbedResponse",
        "/embed/query": "EmbedResponse",
        "/tokenize": "TokenizeResponse",
    }
    error = {
        "content": {
            "application/json": {"schema": {"$ref": template.format(model="ErrorResponse")}}
        }
    }
    limits = {"minItems": 1, "maxItems": settings.max_client_batch}
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1},
        "minItems": 1,
    }
    for path in INFERENCE_ROUTES:
        op = spec.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        for code, text in ERROR_STATUSES.items():
            op["responses"][code] = {"description": text, **error}
        op["responses"]["200"] = {
            "description": "OK",
            "content": {
                "application/json": {"schema": {"$ref": template.format(model=responses[path])}}
            },
        }
        op["requestBody"]["required"] = True
        props = op["requestBody"]["content"]["application/json"]["schema"].get("properties", {})
        for prop in props.values():  # BentoML flattens Optional[X] to X: OpenAPI 3.0 nullable
            if "default" in prop and prop["default"] is None:
                prop["nullable"] = True
        if "texts" in props:
            props["texts"].update(limits)
        if "dimensions" in props:
            props["dimensions"].update(minimum=1, maximum=model_dim)
        if "model" in props:
            props["model"]["enum"] = [model]
        if "input" in props:
            props["input"].pop("type", None)  # BentoML adds "string" beside the anyOf
            props["input"]["anyOf"] = [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, **limits},
                ids,
                {"type": "array", "items": ids, **limits},
            ]
    ok = {"description": "OK"}
    spec.setdefault("paths", {})["/v1/models"] = {
        "get": {
            "responses": {
                "200": {
                    **ok,
                    "content": {
                        "application/json": {"schema": {"$ref": template.format(model="ModelList")}}
                    },
                },
                "401": {"description": ERROR_STATUSES["401"], **error},
            }
        }
    }
    spec["paths"]["/info"] = {
        "get": {
            "responses": {
                "200": {**ok, "content": {"application/json": {"schema": {"type": "object"}}}},
                **{
                    c: {"description": ERROR_STATUSES[c], **error}
                    for c in ("401", "429", "500", "504")
                },
            }
        }
    }
    return spec


# --- the edge middleware -----------------------------------------------------------


class EdgeMiddleware:
    """ASGI middleware on the front service, for our routes only.

    In order: auth, body-size limit (Content-Length first, then counted while
    reading, so a huge body is never buffered), admission control (in-flight
    requests per worker above ``max_concurrency`` → 429 + Retry-After), and the
    rewrite of any non-OpenAI error body into ours; a request whose client
    disconnects is cancelled. BentoML's own concurrency and
    timeout middlewares sit outside this one and answer in their own shape, so
    service.py sets their limits above ours.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in PROTECTED_ROUTES:
            await self.app(scope, receive, send)
            return
        raw_receive = receive
        try:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            check_auth(headers.get("authorization"), self.settings.api_keys)
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
            if (
                scope["method"] == "POST"
            ):  # body fully read: raw_receive now only reports a disconnect
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
        _count_rejection(exc)
        status, body, headers = error_status_body(exc)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw.extend(keep)
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


async def _drop_if_disconnected(app: Any, receive: Any) -> bool:
    """Run the request, cancelling it if the client goes away first: work nobody will
    read is dropped (the front sends big jobs to the Embedder in chunks, so at most
    the chunk in flight still runs) instead of holding queue slots and CPU.
    True if it was dropped."""
    import asyncio

    from embedkit.core import metrics

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


def _count_rejection(exc: EmbedkitError) -> None:
    from embedkit.core import metrics

    metrics.get().rejected_requests.labels(reason=exc.code or exc.type).inc()


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
        if _is_ours(body):
            await self.send(self.start)
            await self.send({"type": "http.response.body", "body": body})
        else:
            keep = [(k, v) for k, v in self.start.get("headers", ()) if k.lower() == b"allow"]
            await self.send_error(self.send, foreign_error(status, body), keep)


def _is_ours(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("error"), dict) and "type" in data["error"]
    )
