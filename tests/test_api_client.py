"""embedkit.client.api, the one client of our HTTP API, without a server: what it sends
(headers, bodies, URLs) and how it reads answers (error bodies to exceptions, the served
identity, Retry-After, readiness). The service is httpx's in-memory transport."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import numpy as np
import pytest

from embedkit.client import api
from embedkit.core.errors import (
    InferenceError,
    InvalidDimensions,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RevokedKey,
    Unauthorized,
    UnknownPrompt,
)
from embedkit.serve.engine.identity import HEADER, ServedIdentity

IDENTITY = ServedIdentity(
    "all-minilm-l6-v2", "v1", "fp32", "index-compatible", "fp32", "CPUExecutionProvider", "avx2"
)
URL = "http://embedkit.test"


def error_body(code: str | None, message: str = "no", type_: str = "x", param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def answer(status: int, body: object = None, **headers: str) -> httpx.Response:
    request = httpx.Request("POST", URL + "/embed")
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


class Recorder:
    """A service that records each request and answers with ``reply(request)``."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.reply = reply or (lambda r: httpx.Response(200, json={}))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.reply(request)

    def client(self, url: str = URL, **kw) -> api.Client:
        return api.Client(url, transport=httpx.MockTransport(self), **kw)

    @property
    def last_body(self) -> dict:
        return json.loads(self.requests[-1].content)


# --- error answers to exceptions ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_input", InvalidInput),
        (400, "unknown_prompt", UnknownPrompt),
        (401, "invalid_api_key", Unauthorized),
        (401, "revoked_api_key", RevokedKey),
        (404, "model_not_found", ModelNotFound),
        (422, "invalid_dimensions", InvalidDimensions),
        (429, "overloaded", Overloaded),
        (429, "quota_exceeded", QuotaExceeded),
        (503, "not_ready", NotReady),
        (500, "inference_error", InferenceError),
    ],
)
def test_an_error_code_becomes_its_class(status: int, code: str, cls: type) -> None:
    exc = api.error_for(answer(status, error_body(code, "what went wrong")), "lines 1-4")
    assert type(exc) is cls
    assert str(exc) == f"the service answered {status} to lines 1-4: {code}: what went wrong"


def test_a_code_of_another_status_falls_back_to_the_status() -> None:
    """The code names a class only when that class has the answer's status."""
    exc = api.error_for(answer(401, error_body("overloaded")), "x")
    assert type(exc) is Unauthorized


@pytest.mark.parametrize(
    ("status", "body", "cls", "detail"),
    [
        (404, "<html>Not Found</html>", ModelNotFound, "<html>Not Found</html>"),
        (502, "bad gateway", InferenceError, "bad gateway"),
        (500, "", InferenceError, "(empty body)"),
        (413, {"error": "too big"}, PayloadTooLarge, '{"error":"too big"}'),
        (405, error_body(None, "no such method", "invalid_request_error"), InferenceError,
         "invalid_request_error: no such method"),
    ],
)  # fmt: skip
def test_an_answer_without_our_error_body_is_still_one_clear_line(
    status: int, body: object, cls: type, detail: str
) -> None:
    exc = api.error_for(answer(status, body), "GET /x")
    assert isinstance(exc, cls)
    assert str(exc) == f"the service answered {status} to GET /x: {detail}"


def test_retry_after_param_and_request_id_travel_with_the_exception() -> None:
    over = api.error_for(
        answer(429, error_body("quota_exceeded"), **{"Retry-After": "2.5", "X-Request-Id": "r1"}),
        "x",
    )
    assert isinstance(over, QuotaExceeded) and over.retry_after_s == 3
    assert over.__notes__ == ["X-Request-Id: r1"]
    assert "r1" not in str(over)  # the CLI's one line stays as it was
    bad = api.error_for(answer(422, error_body("invalid_dimensions", param="dimensions")), "x")
    assert bad.param == "dimensions" and not getattr(bad, "__notes__", None)


def test_retry_after_reads_seconds_and_dates() -> None:
    assert api.retry_after(None) is None
    assert api.retry_after(answer(429, {})) is None
    assert api.retry_after(answer(429, {}, **{"Retry-After": "7"})) == 7.0
    assert api.retry_after(answer(429, {}, **{"Retry-After": "-3"})) == 0.0
    assert api.retry_after(answer(429, {}, **{"Retry-After": "soon"})) is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait_s = api.retry_after(answer(503, {}, **{"Retry-After": later}))
    assert wait_s is not None and 25 < wait_s <= 30


def test_check_raises_the_mapped_error_and_passes_success() -> None:
    svc = Recorder(lambda r: httpx.Response(401, json=error_body("invalid_api_key")))
    with svc.client() as client:
        with pytest.raises(Unauthorized, match="answered 401 to POST /embed: invalid_api_key"):
            client.embed(["a"])
        assert client.embed(["a"], check=False).status_code == 401
    ok = api.raise_for_error(answer(200, {}), "x")
    assert ok.status_code == 200


# --- what the client sends -------------------------------------------------------------


def test_api_key_request_id_and_base_url() -> None:
    svc = Recorder()
    with svc.client(URL + "/", api_key="k-123", timeout_s=7) as client:
        assert client.url == URL
        client.embed(["a", "b"], request_id="req-1")
        client.get("/info")
    first, second = svc.requests
    assert str(first.url) == URL + "/embed" and first.method == "POST"
    assert first.headers["authorization"] == "Bearer k-123"
    assert first.headers["x-request-id"] == "req-1"
    assert second.headers["authorization"] == "Bearer k-123"
    assert "x-request-id" not in second.headers
    assert first.extensions["timeout"]["read"] == 7
    with Recorder().client() as anonymous:
        assert "authorization" not in anonymous.http.headers
    assert api.auth_headers(None) == {} and api.auth_headers("") == {}


def test_embedding_bodies() -> None:
    svc = Recorder()
    with svc.client() as client:
        client.embed(("a", "b"))
        assert svc.last_body == {"texts": ["a", "b"]}
        client.embed(["a"], model="m", encoding_format="base64")
        assert svc.last_body == {"texts": ["a"], "encoding_format": "base64", "model": "m"}
        client.embed(["q"], path=api.QUERY_PATH)
        assert svc.requests[-1].url.path == "/embed/query"
        client.embeddings("one", model="m")
        assert svc.last_body == {"input": "one", "model": "m"}
        client.embeddings(("a", "b"), model="m", dimensions=4)
        assert svc.last_body == {"input": ["a", "b"], "model": "m", "dimensions": 4}
        assert svc.requests[-1].url.path == "/v1/embeddings"


def test_the_load_generators_raw_clients() -> None:
    sync = api.http_client(api_key="k", limits=api.limits(4, keepalive=2))
    assert sync.headers["authorization"] == "Bearer k"
    sync.close()
    plain = api.async_http_client(timeout=3)
    assert "authorization" not in plain.headers and plain.timeout.read == 3


# --- reading answers -------------------------------------------------------------------


def test_the_served_identity_header() -> None:
    response = answer(200, {}, **{HEADER: IDENTITY.header_value(), "X-Request-Id": "abc"})
    assert api.served_header(response) == IDENTITY.header_value()
    assert api.served_identity(response) == IDENTITY
    assert api.request_id(response) == "abc"
    assert api.served_header(answer(200, {})) is None
    with pytest.raises(ValueError, match="not an X-Embedkit-Model header"):
        api.served_identity(answer(200, {}, **{HEADER: "all-minilm-l6-v2"}))


def test_info_identity_and_its_one_line_refusals() -> None:
    info = {"served": IDENTITY.as_dict(), "ready": True}
    with Recorder(lambda r: httpx.Response(200, json=info)).client() as client:
        assert client.info_identity() == IDENTITY
    not_ready = Recorder(lambda r: httpx.Response(503, json={"ready": False})).client()
    with not_ready, pytest.raises(InvalidInput, match=r"^http://embedkit.test/info answered 503"):
        not_ready.info_identity()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with Recorder(refuse).client() as client:
        with pytest.raises(InvalidInput, match=r"embedkit.test: no answer on /info \(ConnectError"):
            client.info_identity()
        assert client.ready() is False
        with pytest.raises(api.TransportError):
            client.embed(["a"])


def test_models_and_openai_vectors() -> None:
    cards = {"data": [{"id": "m", "embedkit": IDENTITY.as_dict()}]}
    with Recorder(lambda r: httpx.Response(200, json=cards)).client() as client:
        assert client.models() == cards["data"]
    body = {"data": [{"index": 1, "embedding": [3.0, 4.0]}, {"index": 0, "embedding": [1, 2]}]}
    got = api.openai_vectors(body)
    assert got.dtype == np.float64 and got.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert api.openai_vectors(body, dtype=np.float32).dtype == np.float32


# --- URLs and readiness ----------------------------------------------------------------


def test_check_url() -> None:
    assert api.check_url("http://127.0.0.1:3000/", "--stable") == "http://127.0.0.1:3000"
    with pytest.raises(InvalidInput, match="--stable: 'localhost:3000' is not an http"):
        api.check_url("localhost:3000", "--stable")
    with pytest.raises(InvalidInput, match="--candidate: 'ftp://x' is not an http"):
        api.check_url("ftp://x", "--candidate")


def test_wait_ready_polls_until_200(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([0, 503, 200])
    asked: list[str] = []

    def status(url: str, *, timeout_s: float) -> int:
        asked.append(url)
        return next(answers)

    monkeypatch.setattr(api, "status", status)
    polls: list[int] = []

    def stop(n: int) -> str | None:
        polls.append(n)
        return None

    seconds = api.wait_ready(URL, timeout_s=10, interval_s=0, stop=stop)
    assert seconds >= 0 and asked == [URL + "/readyz"] * 3 and polls == [0, 1, 2]


def test_wait_ready_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "status", lambda url, *, timeout_s: 503)
    with pytest.raises(NotReady, match=r"^server at http://embedkit.test not ready after 0 s$"):
        api.wait_ready(URL, timeout_s=0.05, interval_s=0.01)
    with pytest.raises(NotReady, match=r"^exited early$"):
        api.wait_ready(URL, stop=lambda n: "exited early" if n == 2 else None, interval_s=0)


def test_status_is_zero_without_an_answer() -> None:
    assert api.status("http://127.0.0.1:9/readyz", timeout_s=2) == 0  # discard port
