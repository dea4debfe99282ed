"""Unit tests of the HTTP edge: schemas, routing, limits, encoding, auth, error mapping."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError
from starlette.types import Message

from embedkit.core.errors import (
    EmbedkitError,
    InferenceError,
    InputTooLong,
    InvalidDimensions,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UpstreamTimeout,
)
from embedkit.core.settings import Settings
from embedkit.runtime.vectors import decode_base64, encode_base64
from embedkit.serve.edge.bodies import dumps, native_body, openai_body
from embedkit.serve.edge.http_errors import (
    INTERNAL_MESSAGE,
    error_status_body,
    foreign_error,
    translate_upstream,
)
from embedkit.serve.edge.middleware import EdgeMiddleware
from embedkit.serve.edge.schemas import (
    EmbedBulkRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    routes_taking,
)
from embedkit.serve.edge.tenants import Tenants
from embedkit.serve.pipeline.jobs import EmbedJob, native_job, openai_job

MODEL = "all-minilm-l6-v2"
SETTINGS = Settings(max_client_batch=4, max_body_bytes=2048, max_concurrency=1)


@pytest.fixture(scope="module")
def tokenizer(fp32_artifact):
    from embedkit.runtime.tokens import TextTokenizer

    return TextTokenizer.from_artifact(fp32_artifact)


def openai(tokenizer, **body: Any) -> EmbedJob:
    req = EmbeddingsRequest.model_validate({"model": MODEL, **body})
    return openai_job(req, tokenizer, SETTINGS, served=MODEL, model_dim=384, normalize=True)


# --- schemas and jobs ------------------------------------------------------------------


@pytest.mark.parametrize("value", [[1, "a"], [True], [1.5], [["a"]], [[1], "a"], None, 3, {"a": 1}])
def test_openai_input_is_strict(value: object) -> None:
    with pytest.raises(ValidationError):
        EmbeddingsRequest.model_validate({"model": MODEL, "input": value})


def test_openai_routing_single_to_query_many_to_bulk(tokenizer) -> None:
    assert openai(tokenizer, input="one").lane == "query"
    assert openai(tokenizer, input=["one"]).lane == "query"
    assert openai(tokenizer, input=["one", "two"]).lane == "bulk"
    assert openai(tokenizer, input=[7592, 2088]).lane == "query"  # one token-id list
    assert openai(tokenizer, input=[[7592], [2088]]).lane == "bulk"


def test_openai_token_ids_get_special_tokens(tokenizer) -> None:
    assert openai(tokenizer, input=[7592, 2088]).ids == tokenizer.encode(["hello world"])
    job = openai(tokenizer, input="hello world")
    assert job.ids == [[101, 7592, 2088, 102]] and job.tokens == 4


@pytest.mark.parametrize(
    ("body", "error", "param"),
    [
        ({"input": []}, InvalidInput, "input"),
        ({"input": [[]]}, InvalidInput, "input"),
        ({"input": [""] * 5}, PayloadTooLarge, "input"),
        ({"input": "a", "dimensions": 0}, InvalidDimensions, "dimensions"),
        ({"input": "a", "dimensions": 385}, InvalidDimensions, "dimensions"),
        ({"input": "a", "model": "other"}, ModelNotFound, "model"),
    ],
)
def test_openai_job_errors(tokenizer, body, error, param) -> None:
    with pytest.raises(error) as info:
        openai(tokenizer, **body)
    assert info.value.param == param


def test_native_job(tokenizer) -> None:
    req = EmbedRequest(
        texts=["", "b"], normalize=False, truncate=True, dimensions=8, encoding_format="base64"
    )
    job = native_job(req, tokenizer, SETTINGS, lane="bulk", model_dim=384)
    assert job.ids[0] == [101, 102] and not job.normalize and job.dimensions == 8
    long = EmbedRequest.model_validate({"texts": ["a", "word " * 300], "truncate": False})
    with pytest.raises(InputTooLong, match=r"input\[1\]"):
        native_job(long, tokenizer, SETTINGS, lane="bulk", model_dim=384)
    with pytest.raises(ValidationError):
        EmbedRequest.model_validate({"texts": ["a"], "unknown": 1})


def test_chunking_is_a_bulk_route_field(tokenizer) -> None:
    cases: list[tuple[type[EmbeddingsRequest | EmbedRequest], dict[str, Any]]] = [
        (EmbeddingsRequest, {"model": MODEL, "input": "a"}),
        (EmbedRequest, {"texts": ["a"]}),
    ]
    for model, body in cases:  # refused as a field of another route (http_errors)
        with pytest.raises(ValidationError, match="chunking") as refused:
            model.model_validate({**body, "chunking": {}})
        assert refused.value.errors()[0]["type"] == "extra_forbidden"
    assert routes_taking("chunking") == ["/embed"]
    req = EmbedBulkRequest.model_validate(
        {"texts": ["a", "b " * 9], "chunking": {"max_tokens": 6, "overlap": 1}}
    )
    job = native_job(req, tokenizer, SETTINGS, lane="bulk", model_dim=384)
    assert job.chunks is not None and job.ids == job.chunks.ids
    b = 1038  # "b": 9 tokens in windows of 4 sharing 1, the last holding what is left
    assert job.ids == [
        [101, 1037, 102],
        [101, b, b, b, b, 102],
        [101, b, b, b, b, 102],
        [101, b, b, b, 102],
    ]
    body = json.loads(native_body(np.zeros((4, 2), np.float32), job, MODEL))
    assert [(c["index"], c["start"], c["end"]) for c in body["chunks"]] == [
        (0, 0, 1),
        (1, 0, 7),
        (1, 6, 13),
        (1, 12, 17),
    ]
    EmbedResponse.model_validate(body)
    assert "chunks" not in json.loads(
        native_body(np.zeros((1, 2), np.float32), replace(job, chunks=None), MODEL)
    )
    with pytest.raises(PayloadTooLarge, match="5 chunks"):  # max_client_batch bounds chunks
        native_job(
            EmbedBulkRequest.model_validate({"texts": ["b " * 17], "chunking": {"max_tokens": 6}}),
            tokenizer,
            SETTINGS,
            lane="bulk",
            model_dim=384,
        )


# --- bodies -----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 8)),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_base64_roundtrip_little_endian(vectors: np.ndarray) -> None:
    encoded = encode_base64(vectors)
    np.testing.assert_array_equal(decode_base64(encoded, vectors.shape[1]), vectors)
    # what the openai client does: np.frombuffer(base64.b64decode(s), dtype="float32")
    import base64

    raw = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(raw, vectors.ravel())


def test_openai_and_native_bodies() -> None:
    job = EmbedJob(
        ids=[[1, 2], [3]], lane="bulk", normalize=True, dimensions=None, encoding="float"
    )
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = json.loads(openai_body(vectors, job, MODEL))
    assert body == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0, 1.0, 2.0]},
            {"object": "embedding", "index": 1, "embedding": [3.0, 4.0, 5.0]},
        ],
        "model": MODEL,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    EmbeddingsResponse.model_validate(body)
    native = json.loads(native_body(vectors, job, MODEL))
    assert native["embeddings"] == vectors.tolist() and native["dimensions"] == 3
    assert native["usage"] == {"tokens": 3}
    EmbedResponse.model_validate(native)
    b64 = EmbedJob(ids=job.ids, lane="bulk", normalize=True, dimensions=None, encoding="base64")
    packed = json.loads(native_body(vectors, b64, MODEL))
    np.testing.assert_array_equal(decode_base64(packed["embeddings"], 3), vectors)


# --- errors ------------------------------------------------------------------------------


def test_error_status_body_and_retry_after() -> None:
    status, body, headers = error_status_body(Overloaded("full", retry_after_s=3))
    assert status == 429 and headers["retry-after"] == "3"
    assert json.loads(body) == {
        "error": {
            "message": "full",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    status, _, headers = error_status_body(InvalidDimensions("bad", param="dimensions"))
    assert status == 422 and "retry-after" not in headers


class _FakeBentoError(Exception):
    def __init__(self, status: int) -> None:
        from http import HTTPStatus

        super().__init__("Traceback (most recent call last): secret internals")
        self.error_code = HTTPStatus(status)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), UpstreamTimeout),
        (_FakeBentoError(503), Overloaded),  # dispatcher shed load: queue full
        (_FakeBentoError(504), UpstreamTimeout),
        (_FakeBentoError(500), InferenceError),
        (RuntimeError("boom at /secret/path"), InferenceError),
    ],
)
def test_translate_upstream_never_leaks(exc: Exception, expected: type) -> None:
    err = translate_upstream(exc)
    assert type(err) is expected
    assert "secret" not in err.message and "Traceback" not in err.message


def test_foreign_errors_become_ours() -> None:
    bentoml_400 = json.dumps(
        {
            "error": "1 validation error for Input",
            "detail": [{"type": "missing", "loc": ["body", "texts"], "msg": "Field required"}],
        }
    ).encode()
    err = foreign_error(400, bentoml_400)
    assert isinstance(err, InvalidInput) and "texts: Field required" in err.message
    assert isinstance(foreign_error(429, b'{"error": "Too many requests"}'), Overloaded)
    assert isinstance(foreign_error(504, b"{}"), UpstreamTimeout)
    assert isinstance(foreign_error(413, b'[{"error": "x"}]'), PayloadTooLarge)
    internal = foreign_error(500, b"")
    assert internal.status == 500 and internal.message == INTERNAL_MESSAGE


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        ("Bearer k1", None),
        ("bearer k2", None),  # the scheme in any case
        ("Bearer  k2 ", None),  # the key trimmed
        (None, "missing API key"),
        ("k1", "missing API key"),  # a key without the scheme
        ("Basic k1", "missing API key"),
        ("Bearer ", "missing API key"),
        ("Bearer nope", "invalid API key"),
    ],
)
def test_api_keys_name_the_default_tenant_and_no_keys_let_any_header_in(
    header: str | None, refused: str | None
) -> None:
    """``api_keys`` (no tenants file): each listed key, as a Bearer token, is the default
    tenant; anything else is a 401 that says what is wrong. With no key configured auth
    is off: whatever the header (none, an unknown key, another scheme), the default tenant.
    Tenants-file keys and revocation: tests/test_tenant_quotas.py."""
    off = Tenants([])
    assert not off.auth and off.identify(header) is off.default
    keyed = Tenants(["k1", "k2"])
    assert keyed.auth
    if refused is None:
        assert keyed.identify(header) is keyed.default
    else:
        with pytest.raises(Unauthorized, match=refused) as info:
            keyed.identify(header)
        assert info.value.status == 401


# --- the middleware, over an in-memory ASGI transport ------------------------------------


def _app(status: int = 200, body: bytes = b"", hold: asyncio.Event | None = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        received = b""
        while True:
            msg = await receive()
            received += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if hold is not None:
            await hold.wait()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body or received})

    return app


def _call(app: Any, settings_: Settings, *requests: dict[str, Any]) -> list[httpx.Response]:
    edge = EdgeMiddleware(app, settings_)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=edge)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.request(**r) for r in requests]

    return asyncio.run(run())


def test_middleware_auth_and_open_paths() -> None:
    keyed = Settings(api_keys=["k"])
    denied, allowed, open_ = _call(
        _app(),
        keyed,
        {"method": "POST", "url": "/embed", "json": {}},
        {"method": "POST", "url": "/embed", "json": {}, "headers": {"authorization": "Bearer k"}},
        {"method": "GET", "url": "/metrics"},
    )
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and open_.status_code == 200


def test_middleware_body_limit_with_and_without_length() -> None:
    big = b"x" * 4096

    async def chunks():
        for _ in range(4):
            yield big[:1024]

    by_length, streamed, small = _call(
        _app(),
        SETTINGS,
        {"method": "POST", "url": "/embed", "content": big},
        {"method": "POST", "url": "/embed", "content": chunks()},
        {"method": "POST", "url": "/embed", "content": b'{"a": 1}'},
    )
    assert by_length.status_code == streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"
    assert small.status_code == 200 and small.json() == {"a": 1}  # body replayed intact


def test_middleware_admission_control() -> None:
    hold = asyncio.Event()
    edge = EdgeMiddleware(_app(hold=hold), SETTINGS)  # max_concurrency=1

    async def run() -> tuple[int, httpx.Response]:
        transport = httpx.ASGITransport(app=edge)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.post("/embed", json={}))
            while edge.in_flight == 0:
                await asyncio.sleep(0.001)
            second = await client.post("/embed", json={})
            hold.set()
            return (await first).status_code, second

    first, second = asyncio.run(run())
    assert first == 200 and second.status_code == 429
    assert second.headers["retry-after"] == "1" and edge.in_flight == 0


def test_middleware_rewrites_foreign_errors_only() -> None:
    ours = json.dumps(EmbedkitError("x").to_openai()).encode()
    foreign, kept, empty_500 = (
        _call(
            _app(400, b'{"error": "bad", "detail": []}'),
            SETTINGS,
            {"method": "POST", "url": "/v1/embeddings", "json": {}},
        )[0],
        _call(_app(500, ours), SETTINGS, {"method": "POST", "url": "/embed", "json": {}})[0],
        _call(_app(500, b" "), SETTINGS, {"method": "POST", "url": "/embed", "json": {}})[0],
    )
    assert foreign.status_code == 400 and foreign.json()["error"]["type"] == "invalid_request_error"
    assert kept.json() == json.loads(ours)
    assert empty_500.status_code == 500
    assert empty_500.json()["error"]["message"] == INTERNAL_MESSAGE


def test_middleware_cancels_a_request_whose_client_left() -> None:
    """The client disconnects while the app is still working: the app is cancelled
    (its work dropped), admission is released, and a bodiless 499 closes the exchange
    (BentoML's timeout middleware would otherwise hold the request task until its timeout)."""
    cancelled = asyncio.Event()

    async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    edge = EdgeMiddleware(slow_app, SETTINGS)
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"{}", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        if len(messages) == 1:
            await asyncio.sleep(0.05)  # the client leaves a moment after sending
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/embed",
        "headers": [(b"content-type", b"application/json")],
    }

    async def run() -> None:
        await asyncio.wait_for(edge(scope, receive, send), timeout=5)

    asyncio.run(run())
    assert cancelled.is_set() and edge.in_flight == 0
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [499]


def test_dumps_handles_integers_beyond_64_bits() -> None:
    import json

    assert json.loads(dumps({"n": 10**30, "v": [0.5]})) == {"n": 10**30, "v": [0.5]}


# --- the front's routes in-process: quota on /tokenize, tokenising off the event loop -------


class _ZeroEmbedder:
    """An Embedder that answers zero vectors (the front's post-processing still runs)."""

    async def embed_query(self, items: list[Any], report: Any = None) -> np.ndarray:
        return np.zeros((len(items), 384), dtype=np.float32)

    async def embed_bulk(self, items: list[Any], report: Any = None) -> np.ndarray:
        return np.zeros((len(items), 384), dtype=np.float32)

    async def info(self) -> dict[str, Any]:
        return {}


@pytest.fixture(scope="module")
def front(fp32_artifact):
    from embedkit.serve.pipeline.front import Front

    return Front(fp32_artifact, Settings(front_coalescing=False))


def _as_tenant(tenant: Any, route: Any) -> Any:
    """``route`` (taking the request's context) run in one request of ``tenant``, as the
    edge would open it; returns the route's response and the request's context."""
    from embedkit.serve.pipeline.trace import RequestContext

    request = RequestContext("test", tenant=tenant)
    return asyncio.run(route(request)), request


def test_tokenize_is_charged_to_the_tenants_quota(front: Any) -> None:
    """/tokenize tokenises like the embedding routes, so its tokens cost the tenant the
    same: a bucket it spends answers the next call 429 quota_exceeded."""
    from embedkit.serve.edge.tenants import Tenant

    tenant = Tenant("small", rate=0.001, burst=20.0)  # refills nothing during the test
    body = {"texts": ["one short sentence to count", "and a second one"]}
    response, request = _as_tenant(tenant, lambda r: front.tokenize(dict(body), r))
    assert response.status_code == 200
    used = json.loads(response.body)["usage"]["tokens"]
    assert 10 < used <= 20  # a second call cannot be covered
    assert request.tokens == used and request.lane is None  # the log line: tokens, no lane
    assert tenant._level == pytest.approx(20.0 - used, abs=0.01), "/tokenize was not charged"
    response, _ = _as_tenant(tenant, lambda r: front.tokenize(dict(body), r))
    assert response.status_code == 429
    assert json.loads(response.body)["error"]["code"] == "quota_exceeded"


class _LaneEmbedder(_ZeroEmbedder):
    """Records which of the Embedder's lanes each call took."""

    def __init__(self) -> None:
        self.lanes: list[str] = []

    async def embed_query(self, items: list[Any], report: Any = None) -> np.ndarray:
        self.lanes.append("query")
        return await super().embed_query(items, report)

    async def embed_bulk(self, items: list[Any], report: Any = None) -> np.ndarray:
        self.lanes.append("bulk")
        return await super().embed_bulk(items, report)


@pytest.mark.parametrize(
    ("route", "texts", "asked", "lane"),
    [
        ("/v1/embeddings", 3, "query", "bulk"),  # over max_query_texts: demoted
        ("/v1/embeddings", 2, "query", "query"),  # at the cap: as asked
        ("/v1/embeddings", 1, None, "query"),  # inferred, unchanged
        ("/embed/query", 3, None, "bulk"),  # the route is the query lane: the same rule
        ("/embed/query", 3, "query", "bulk"),
        ("/embed/query", 2, None, "query"),
    ],
)
def test_more_than_max_query_texts_are_served_on_the_bulk_lane(
    fp32_artifact: Any, route: str, texts: int, asked: str | None, lane: str
) -> None:
    """Served (200), not refused, on the bulk lane, and X-Embedkit-Lane says so, as for
    a bulk-class tenant."""
    from embedkit.serve.edge.tenants import Tenant
    from embedkit.serve.pipeline.front import Front
    from embedkit.serve.pipeline.trace import RequestContext

    front = Front(fp32_artifact, Settings(front_coalescing=False, max_query_texts=2))
    embedder = _LaneEmbedder()
    inputs = [f"text number {i}" for i in range(texts)]
    request = RequestContext("test", tenant=Tenant("search"), asked_lane=asked)
    if route == "/v1/embeddings":
        body = {"input": inputs[0] if texts == 1 else inputs, "model": front.model_name}
        response = asyncio.run(front.openai(embedder, body, request))
    else:
        response = asyncio.run(front.native(embedder, {"texts": inputs}, "query", request))
    assert response.status_code == 200, response.body
    assert embedder.lanes == [lane] and request.lane == lane
    assert (b"x-embedkit-lane", lane.encode()) in request.headers()


def test_large_inputs_are_tokenised_off_the_event_loop(front: Any, monkeypatch: Any) -> None:
    """One large text (up to the 8 MiB body limit) would hold the event loop for as long
    as tokenising takes: above a size it is tokenised in a thread; small ones stay inline."""
    import threading

    threads: list[threading.Thread] = []
    encode = front.tokenizer.encode_counted

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(front.tokenizer, "encode_counted", recording)
    big, small = "many words in one long text " * 2000, "a few words"
    embedder = _ZeroEmbedder()

    async def run() -> list[tuple[str, bool]]:
        loop_thread = threading.current_thread()
        calls = {
            "tokenize big": lambda: front.tokenize({"texts": [big]}),
            "tokenize small": lambda: front.tokenize({"texts": [small]}),
            "embed big": lambda: front.native(embedder, {"texts": [big]}, "bulk"),
            "openai big": lambda: front.openai(embedder, {"input": big, "model": front.model_name}),
            "openai small": lambda: front.openai(
                embedder, {"input": small, "model": front.model_name}
            ),
        }
        seen = []
        for name, call in calls.items():
            threads.clear()
            response = await call()
            assert response.status_code == 200, (name, response.body)
            assert len(threads) == 1, name
            seen.append((name, threads[0] is loop_thread))
        return seen

    on_loop = dict(asyncio.run(run()))
    assert on_loop == {
        "tokenize big": False,
        "tokenize small": True,
        "embed big": False,
        "openai big": False,
        "openai small": True,
    }


# --- the seams: context in the scope, identities handed in, no context variables ---------


def test_the_edge_hands_the_request_context_to_the_route_in_request_state() -> None:
    """The route handler finds the edge's context in Starlette's ``request.state`` (the
    ASGI scope's ``state``), as an argument, and what it fills in comes back as headers."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from embedkit.serve.pipeline import trace

    seen: list[Any] = []

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = trace.of(Request(scope, receive).state)
        seen.append(request)
        assert request is not None
        request.lane = "bulk"
        await JSONResponse({})(scope, receive, send)

    (response,) = _call(
        route,
        Settings(api_keys=["k"]),
        {
            "method": "POST",
            "url": "/embed",
            "json": {},
            "headers": {"authorization": "Bearer k", "x-request-id": "r-1"},
        },
    )
    (request,) = seen
    assert request.request_id == "r-1" and request.tenant.name == "default"
    assert response.headers["x-request-id"] == "r-1"
    assert response.headers["x-embedkit-lane"] == "bulk"
    assert trace.of(object()) is None and trace.of({}) is None  # outside the edge


def test_the_served_identity_is_what_the_edge_was_given() -> None:
    """No process-wide identity: each edge answers with the identities handed to it."""
    from embedkit.serve.engine.identity import HEADER, ServedIdentities, ServedIdentity

    served = ServedIdentities()
    edge = EdgeMiddleware(_app(), SETTINGS, served)
    bare = EdgeMiddleware(_app(), SETTINGS)
    one = ServedIdentity("m", "v1", "fp32", "index-compatible", "fp32", "CPU", "avx2")
    served.publish(one)

    async def run(app: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/embed/query", json={})

    assert asyncio.run(run(edge)).headers[HEADER] == one.header_value()
    assert HEADER not in asyncio.run(run(bare)).headers
    assert served.served() == one and served.served("m") == one and served.served("x") is None


def test_no_context_variable_carries_serving_state() -> None:
    """The tenant, the request's trace and the engine's report travel as arguments."""
    import pathlib

    import embedkit.serve

    root = pathlib.Path(embedkit.serve.__file__).parent
    found = [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*.py"))
        if "ContextVar" in p.read_text() or "contextvars" in p.read_text()
    ]
    assert found == []
