"""A second server configuration: API keys on, tight admission and timeout limits.

Covers auth (bearer keys on inference and metadata routes, probes open), the
429 + Retry-After of admission control and the 504 of an upstream timeout.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

KEYS = ["key-one", "key-two"]
AUTH = {"authorization": "Bearer key-two"}


@pytest.fixture(scope="module")
def strict_server(model_tag, launcher):
    env = {
        "EMBEDKIT_API_KEYS": '["key-one", "key-two"]',
        "EMBEDKIT_MAX_CONCURRENCY": "1",
        "EMBEDKIT_REQUEST_TIMEOUT_S": "1",
    }
    return launcher.start(model_tag, env)


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
def test_probes_stay_open(strict_server, path: str) -> None:
    assert httpx.get(strict_server.url + path, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/embed", {"texts": ["a"]}),
        ("POST", "/embed/query", {"texts": ["a"]}),
        ("POST", "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "a"}),
        ("POST", "/tokenize", {"texts": ["a"]}),
        ("GET", "/v1/models", None),
        ("GET", "/info", None),
    ],
)
def test_routes_need_a_key(strict_server, method: str, path: str, body: object) -> None:
    url = strict_server.url + path
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-two"}):
        r = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.request(method, url, json=body, headers=AUTH, timeout=30).status_code == 200


def test_openai_client_with_key(strict_server) -> None:
    from openai import AuthenticationError, OpenAI

    good = OpenAI(base_url=strict_server.url + "/v1", api_key="key-one", max_retries=0)
    assert (
        len(good.embeddings.create(model="all-minilm-l6-v2", input="hi").data[0].embedding) == 384
    )
    bad = OpenAI(base_url=strict_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.embeddings.create(model="all-minilm-l6-v2", input="hi")


async def _burst(url: str, n: int, body: object) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
        return await asyncio.gather(*(client.post(url + "/embed", json=body) for _ in range(n)))


def test_queue_full_is_429_with_retry_after(strict_server) -> None:
    body = {"texts": [f"sentence number {i} about something" for i in range(64)]}
    responses = asyncio.run(_burst(strict_server.url, 4, body))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    # The front's concurrency admission (EMBEDKIT_MAX_CONCURRENCY=1), not the token budget
    # nor BentoML's own overload answers, each of which words its message differently.
    assert rejected.json()["error"] == {
        "message": "more than 1 requests in flight; retry later",
        "type": "rate_limit_error",
        "param": None,
        "code": "overloaded",
    }


def test_upstream_timeout_is_504_without_internals(strict_server) -> None:
    body = {"texts": ["word " * 300] * 400}  # ~400 x 256 tokens: well over the 1 s timeout
    r = httpx.post(strict_server.url + "/embed", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "timeout" and err["type"] == "server_error"
    assert "Traceback" not in r.text and "File " not in r.text
