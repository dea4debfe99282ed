"""One small client of embedkit's own HTTP API, for every tool of ours that calls it.

`embedkit reembed`, the canary, the rollback drill and the container checks (deploy), and
the benchmarks (``embedkit_bench``: load, soak, peers, servers) all talk to a running
service. What they share lives here, once:

* the base URL (checked by :func:`check_url` where a person typed it), the API key
  (``Authorization: Bearer``, :func:`auth_headers`) and the timeout of one request;
* the request id: ``X-Request-Id`` sent when a caller names one, and the service's id of
  a refused request kept as a note on the exception (:func:`error_for`);
* the served identity: the ``X-Embedkit-Model`` header of every answer
  (:func:`served_header`, parsed by :func:`served_identity` into
  :class:`~embedkit.serve.engine.identity.ServedIdentity`) and ``/info``
  (:meth:`Client.info_identity`);
* readiness: ``/readyz`` polled until it answers 200 (:func:`wait_ready`, :func:`status`);
* the embedding routes: native ``/embed`` (:meth:`Client.embed`) and OpenAI
  ``/v1/embeddings`` (:meth:`Client.embeddings`, :func:`openai_vectors`);
* an error answer (the OpenAI-style ``{"error": {...}}`` body every route sends) mapped to
  the :mod:`embedkit.core.errors` class of its code, else of its status
  (:func:`error_for`), with ``Retry-After`` read as the server's estimate
  (:func:`retry_after`).

A broken connection or a timeout stays httpx's exception (:data:`TransportError`, a kind
of :data:`HTTPError`): callers tell it from an answer and name it in their messages. The
load generators' hot loops take a raw client from :func:`http_client` /
:func:`async_http_client` and add nothing per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from embedkit.core import errors
from embedkit.core.errors import EmbedkitError, InferenceError, InvalidInput, NotReady
from embedkit.serve.engine.identity import HEADER, ServedIdentity
from embedkit.serve.pipeline.trace import REQUEST_ID_HEADER

HTTPError = httpx.HTTPError  # an answer that never came (TransportError) or a bad URL
TransportError = httpx.TransportError  # connection refused or reset, a timeout
IDENTITY_HEADER = HEADER
READY_PATH = "/readyz"
INFO_PATH = "/info"
MODELS_PATH = "/v1/models"
EMBED_PATH = "/embed"  # the bulk route
QUERY_PATH = "/embed/query"  # the interactive route
OPENAI_PATH = "/v1/embeddings"
METRICS_PATH = "/metrics"
DEFAULT_TIMEOUT_S = 30.0


def _error_classes() -> dict[str, type[EmbedkitError]]:
    """error code -> its class, for every class of embedkit.core.errors."""
    out: dict[str, type[EmbedkitError]] = {}
    todo: list[type[EmbedkitError]] = [EmbedkitError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__ == errors.__name__ and cls.code is not None:
            out.setdefault(cls.code, cls)
    return out


_BY_CODE = _error_classes()
# An answer whose body names no code of ours (a framework's 404 or 405, a proxy's page).
_BY_STATUS: dict[int, type[EmbedkitError]] = {
    400: errors.InvalidInput,
    401: errors.Unauthorized,
    404: errors.ModelNotFound,
    413: errors.PayloadTooLarge,
    422: errors.InvalidDimensions,
    429: errors.Overloaded,
    503: errors.NotReady,
    504: errors.UpstreamTimeout,
}


# --- connection --------------------------------------------------------------------------


def check_url(url: str, option: str) -> str:
    """``url`` (its trailing ``/`` dropped) if it is an explicit http(s) URL with a host;
    else a one-line InvalidInput naming ``option``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidInput(f"{option}: {url!r} is not a URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidInput(
            f"{option}: {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:3000"
        )
    return url.rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header carrying ``api_key`` (none without one)."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def limits(connections: int, *, keepalive: int) -> httpx.Limits:
    """A connection pool of at most ``connections``, ``keepalive`` of them kept open."""
    return httpx.Limits(max_connections=connections, max_keepalive_connections=keepalive)


def _pool(limits: httpx.Limits | None) -> dict[str, Any]:
    return {"limits": limits} if limits is not None else {}


def http_client(
    base_url: str = "",
    *,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
    limits: httpx.Limits | None = None,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """A plain httpx client for our API (``base_url`` "" : absolute URLs per request)."""
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        headers=auth_headers(api_key),
        timeout=timeout,
        transport=transport,
        **_pool(limits),
    )


def async_http_client(
    base_url: str = "",
    *,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
    limits: httpx.Limits | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The async twin of :func:`http_client`, for load generators (one connection pool,
    ``limits`` sized to the concurrency; nothing added per request)."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=auth_headers(api_key),
        timeout=timeout,
        transport=transport,
        **_pool(limits),
    )


# --- answers -----------------------------------------------------------------------------


def retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the ``Retry-After`` header asks to wait (delta or HTTP date), None if none."""
    value = response.headers.get("retry-after") if response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_for(response: httpx.Response, what: str) -> EmbedkitError:
    """The exception an error answer to ``what`` stands for: the class of its body's error
    code (``invalid_api_key`` -> Unauthorized, ``quota_exceeded`` -> QuotaExceeded...) when
    that class has the answer's status, else the class of the status, else InferenceError.
    The message names the status, the code (or type) and the server's message; the
    service's request id, when it sent one, is a note on the exception."""
    status = response.status_code
    code = param = None
    try:
        error = response.json()["error"]
        code, param = error.get("code"), error.get("param")
        detail = f"{code or error.get('type')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError, AttributeError):
        detail = response.text[:200] or "(empty body)"
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None or cls.status != status:
        cls = _BY_STATUS.get(status, InferenceError)
    message = f"the service answered {status} to {what}: {detail}"
    exc: EmbedkitError
    if issubclass(cls, errors.Overloaded):
        wait_s = retry_after(response)
        exc = cls(message, retry_after_s=max(1, math.ceil(wait_s)) if wait_s is not None else 1)
    else:
        exc = cls(message, param=param if isinstance(param, str) else None)
    if rid := response.headers.get(REQUEST_ID_HEADER):
        exc.add_note(f"{REQUEST_ID_HEADER}: {rid}")
    return exc


def raise_for_error(response: httpx.Response, what: str) -> httpx.Response:
    """``response`` if it is a success (2xx), else :func:`error_for`'s exception."""
    if not response.is_success:
        raise error_for(response, what)
    return response


def served_header(response: httpx.Response) -> str | None:
    """The answer's ``X-Embedkit-Model`` header as sent, None without one."""
    return response.headers.get(HEADER)


def served_identity(response: httpx.Response) -> ServedIdentity:
    """The identity the answer's ``X-Embedkit-Model`` header names; ValueError if it has
    none or another header stands there."""
    return ServedIdentity.from_header(response.headers.get(HEADER, ""))


def request_id(response: httpx.Response) -> str | None:
    """The service's id of the request (``X-Request-Id``), as its log line has it."""
    return response.headers.get(REQUEST_ID_HEADER)


def openai_vectors(body: Any, dtype: Any = np.float64) -> np.ndarray:
    """The vectors of an OpenAI ``/v1/embeddings`` answer (float lists), in input order."""
    data = sorted(body["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in data], dtype=dtype)


# --- readiness -----------------------------------------------------------------------------


def status(url: str, *, timeout_s: float = 2.0) -> int:
    """The HTTP status of ``GET url`` (a probe, as the kubelet sends it); 0 when no answer."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError:
        return 0


def wait_ready(
    url: str,
    *,
    timeout_s: float = 180.0,
    path: str = READY_PATH,
    interval_s: float = 0.3,
    request_timeout_s: float = 2.0,
    stop: Callable[[int], str | None] | None = None,
) -> float:
    """Poll ``url`` + ``path`` until it answers 200; the seconds that took. NotReady when
    ``timeout_s`` passes, or with ``stop``'s reason as soon as it gives one (it is asked
    before each poll, with the number of polls so far: a server process that exited, a
    container that logged a refusal)."""
    start = time.monotonic()
    polls = 0
    while time.monotonic() - start < timeout_s:
        if stop is not None and (reason := stop(polls)) is not None:
            raise NotReady(reason)
        if status(url + path, timeout_s=request_timeout_s) == 200:
            return time.monotonic() - start
        polls += 1
        time.sleep(interval_s)
    raise NotReady(f"server at {url} not ready after {timeout_s:.0f} s")


# --- the client ----------------------------------------------------------------------------


class Client:
    """One embedkit service at ``url``: a connection pool, the API key on every request,
    ``timeout_s`` per request. Methods return the httpx answer (``check=False``) or raise
    :func:`error_for`'s exception on an error answer (``check=True``); a broken connection
    raises :data:`TransportError` either way."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.http = http_client(self.url, api_key=api_key, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        request_id: str | None = None,
        check: bool = False,
    ) -> httpx.Response:
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        response = self.http.request(method, path, json=json, headers=headers)
        return raise_for_error(response, f"{method} {path}") if check else response

    def get(self, path: str, *, check: bool = False) -> httpx.Response:
        return self.request("GET", path, check=check)

    def post(
        self, path: str, body: Any, *, request_id: str | None = None, check: bool = False
    ) -> httpx.Response:
        return self.request("POST", path, json=body, request_id=request_id, check=check)

    # routes

    def embed(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        path: str = EMBED_PATH,
        request_id: str | None = None,
        check: bool = True,
        **fields: Any,
    ) -> httpx.Response:
        """``POST /embed`` (or ``/embed/query``) of ``texts``; ``fields`` (encoding_format,
        dimensions, normalize...) go into the body as given."""
        body: dict[str, Any] = {"texts": list(texts), **fields}
        if model is not None:
            body["model"] = model
        return self.post(path, body, request_id=request_id, check=check)

    def embeddings(
        self,
        input: str | Sequence[str],
        *,
        model: str,
        request_id: str | None = None,
        check: bool = True,
        **fields: Any,
    ) -> httpx.Response:
        """``POST /v1/embeddings`` (OpenAI's shape: ``input``, ``model``, ``fields``)."""
        text = input if isinstance(input, str) else list(input)
        body = {"input": text, "model": model, **fields}
        return self.post(OPENAI_PATH, body, request_id=request_id, check=check)

    def models(self) -> list[dict[str, Any]]:
        """The model cards of ``/v1/models`` (each with its ``embedkit`` identity)."""
        cards = self.get(MODELS_PATH, check=True).json()["data"]
        return list(cards)

    def info_identity(self) -> ServedIdentity:
        """What the service serves, from ``/info``; a one-line InvalidInput when nothing
        answers or the answer holds no served identity (not embedkit, or not ready)."""
        try:
            response = self.get(INFO_PATH)
        except httpx.HTTPError as exc:
            raise InvalidInput(
                f"{self.url}: no answer on {INFO_PATH} ({type(exc).__name__}: {exc})"
            ) from exc
        served = response.json().get("served") if response.status_code == 200 else None
        if not served:
            raise InvalidInput(
                f"{self.url}{INFO_PATH} answered {response.status_code} without a served "
                "identity: not an embedkit server, or not ready"
            )
        return ServedIdentity.from_dict(served)

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 now."""
        try:
            return self.get(READY_PATH).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 180.0, **kw: Any) -> float:
        """:func:`wait_ready` on this client's URL."""
        return wait_ready(self.url, timeout_s=timeout_s, **kw)

    def metrics(self) -> str:
        """The Prometheus exposition of ``/metrics``."""
        return self.get(METRICS_PATH).text
