"""The real service over HTTP: every route, the OpenAI client, the error table,
parity with the in-process engine, batching seen in /metrics, >100 in flight."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.runtime.vectors import decode_base64

MODEL = "all-minilm-l6-v2"
DIM = 384


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    pairs = evaldata.sts("test")[:40]
    out = [s for pair in pairs for s in (pair.sentence1, pair.sentence2)]
    return [*out, "", "word " * 400]  # an empty string and one over the 256-token limit


@pytest.fixture(scope="module")
def engine(fp32_artifact):
    from embedkit.runtime.engine import Engine

    return Engine(fp32_artifact)


def post(server, path: str, body: object = None, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos.min()
    assert np.abs(got - want).max() <= 1e-4


# --- routes --------------------------------------------------------------------------


def test_probes_and_metrics_are_open(server) -> None:
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200


def test_models_lists_the_served_name(server) -> None:
    body = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == MODEL and body["data"][0]["object"] == "model"


def test_info_reports_model_provider_policy_limits(server) -> None:
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert info["tag"] == server.tag
    assert info["manifest"]["dimension"] == DIM
    assert info["provider"]["active"][0] == "CPUExecutionProvider"
    assert set(info["batching"]) == {"bulk", "query"}
    assert info["batching"]["query"]["max_batch_size"] >= 2
    assert info["batching"]["query"]["front"] == "continuous"
    assert info["batching"]["bulk"]["front"] == "coalescing"
    assert info["tracing"] is False
    # one process, one single-core ORT run per core (docs/design/serving.md)
    assert info["topology"] == "single"
    assert info["engine"]["ort_runs"] == Settings().intra_op_threads
    assert info["engine"]["session"]["intra_op_threads"] == 1
    assert info["limits"]["max_client_batch"] >= 1 and info["auth"] is False


def test_tokenize_counts_special_tokens(server, engine) -> None:
    body = post(server, "/tokenize", {"texts": ["hello world", ""]}).json()
    assert body["ids"] == engine.tokenizer.encode(["hello world", ""])
    assert body["counts"] == [4, 2] and body["usage"]["tokens"] == 6


def test_embed_routes_match_in_process_engine(server, engine, texts) -> None:
    want = engine.encode(texts)
    for path in ("/embed", "/embed/query"):
        body = post(server, path, {"texts": texts}).json()
        assert body["model"] == MODEL and body["dimensions"] == DIM
        assert body["usage"]["tokens"] == sum(len(r) for r in engine.tokenizer.encode(texts))
        assert_parity(np.array(body["embeddings"], dtype=np.float32), want)


def test_embed_base64_dimensions_and_raw(server, engine, texts) -> None:
    body = post(
        server,
        "/embed",
        {"texts": texts[:8], "encoding_format": "base64", "dimensions": 64, "normalize": False},
    ).json()
    got = decode_base64(body["embeddings"], 64)
    assert body["dimensions"] == 64
    assert_parity(got, engine.encode(texts[:8], dimensions=64, normalize=False))


def test_openai_client_unchanged(server, engine, texts) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    batch = client.embeddings.create(model=MODEL, input=texts[:16])  # default: base64 on the wire
    assert [d.index for d in batch.data] == list(range(16))
    assert_parity(
        np.array([d.embedding for d in batch.data], dtype=np.float32), engine.encode(texts[:16])
    )
    n_tokens = sum(len(r) for r in engine.tokenizer.encode(texts[:16]))
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == n_tokens
    one = client.embeddings.create(
        model=MODEL, input=texts[0], dimensions=32, encoding_format="float"
    )
    assert_parity(
        np.array([one.data[0].embedding], dtype=np.float32), engine.encode(texts[:1], dimensions=32)
    )
    ids = engine.tokenizer.encode(texts[:2])
    content = [row[1:-1] for row in ids]  # OpenAI token input carries no special tokens
    by_ids = client.embeddings.create(model=MODEL, input=content)
    assert_parity(
        np.array([d.embedding for d in by_ids.data], dtype=np.float32), engine.encode(texts[:2])
    )
    single_ids = client.embeddings.create(model=MODEL, input=content[0])
    assert len(single_ids.data) == 1
    with pytest.raises(NotFoundError, match="not served here"):
        client.embeddings.create(model="gpt-nope", input="x")


# --- the error table -------------------------------------------------------------------

TOO_MANY = {"texts": [""] * 2049}
ERRORS = [
    # (path, body, status, code, param)
    ("/v1/embeddings", b"{not json", 400, "invalid_input", None),
    ("/embed", b"[1, 2", 400, "invalid_input", None),
    ("/v1/embeddings", {"model": MODEL, "input": [1, "a"]}, 400, "invalid_input", None),
    ("/v1/embeddings", {"model": MODEL, "input": [True]}, 400, "invalid_input", None),
    ("/v1/embeddings", {"input": "x"}, 400, "invalid_input", None),
    ("/embed", {"texts": "just a string"}, 400, "invalid_input", None),
    ("/embed", {"texts": ["a", None]}, 400, "invalid_input", None),
    ("/embed", {"texts": ["a"], "normalise": True}, 400, "unknown_parameter", "normalise"),
    ("/embed", {"texts": ["a"], "truncate": 0}, 400, "invalid_input", None),
    ("/v1/embeddings", {"model": MODEL, "input": []}, 400, "invalid_input", "input"),
    ("/v1/embeddings", {"model": MODEL, "input": [[]]}, 400, "invalid_input", "input"),
    ("/v1/embeddings", {"model": MODEL, "input": [10**9]}, 400, "invalid_input", "input"),
    ("/embed", {"texts": []}, 400, "invalid_input", "texts"),
    ("/embed/query", {"texts": []}, 400, "invalid_input", "texts"),
    ("/tokenize", {"texts": []}, 400, "invalid_input", "texts"),
    ("/embed", TOO_MANY, 413, "payload_too_large", "texts"),
    ("/v1/embeddings", {"model": MODEL, "input": [""] * 2049}, 413, "payload_too_large", "input"),
    ("/embed", {"texts": ["ok", "word " * 400], "truncate": False}, 413, "input_too_long", "input"),
    ("/embed", {"texts": ["a"], "dimensions": 0}, 422, "invalid_dimensions", "dimensions"),
    ("/embed/query", {"texts": ["a"], "dimensions": 385}, 422, "invalid_dimensions", "dimensions"),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "dimensions": 999},
        422,
        "invalid_dimensions",
        "dimensions",
    ),
    ("/v1/embeddings", {"model": "other", "input": "a"}, 404, "model_not_found", "model"),
    # chunking (/embed only; limits from the model: 256 tokens, 2 of them special)
    *[
        ("/embed", {"texts": ["a"], "chunking": c}, 422, "invalid_chunking", f"chunking.{p}")
        for c, p in [
            ({"max_tokens": 64, "overlap": 64}, "overlap"),
            ({"max_tokens": 64, "overlap": 100}, "overlap"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": -5}, "max_tokens"),
            ({"max_tokens": 257}, "max_tokens"),
            ({"overlap": -1}, "overlap"),
        ]
    ],
    ("/embed", {"texts": ["a"], "chunking": {"aggregate": "max"}}, 400, "invalid_input", None),
    (
        "/embed",
        {"texts": ["a"], "chunking": {"size": 9}},
        400,
        "unknown_parameter",
        "chunking.size",
    ),
    ("/embed", {"texts": ["a"], "chunking": {"max_tokens": "9"}}, 400, "invalid_input", None),
    (
        "/embed",
        {"texts": ["w " * 3000], "chunking": {"max_tokens": 3}},
        413,
        "payload_too_large",
        "chunking",
    ),
    ("/embed/query", {"texts": ["a"], "chunking": {}}, 400, "unsupported_parameter", "chunking"),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "chunking": {}},
        400,
        "unsupported_parameter",
        "chunking",
    ),
    # a model released before output encodings has no int8 ranges
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "encoding_format": "uint8"},
        422,
        "encoding_unavailable",
        "encoding_format",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), ERRORS)
def test_error_table(server, path, body, status, code, param) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path,
            content=body,
            timeout=30,
            headers={"content-type": "application/json"},
        )
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    if "chunking" in str(body):  # a chunking refusal names the field
        assert "chunking" in err["message"], err["message"]


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/vnd.bentoml+pickle", "text/plain"]
)
def test_only_json_bodies(server, content_type: str) -> None:
    r = httpx.post(
        server.url + "/embed", content=b"hello", timeout=30, headers={"content-type": content_type}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"


def test_unsupported_method_keeps_allow_header(server) -> None:
    r = httpx.request("TRACE", server.url + "/embed", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["message"] == "method not allowed"


def test_too_long_names_the_item(server) -> None:
    r = post(server, "/embed", {"texts": ["ok", "word " * 400], "truncate": False})
    assert "input[1]" in r.json()["error"]["message"]


def test_body_over_limit_is_413_before_parsing(server) -> None:
    big = b'{"texts": ["' + b"a" * (8 * 1024 * 1024) + b'"]}'
    r = httpx.post(
        server.url + "/embed", content=big, timeout=60, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_every_response_names_the_served_version(server) -> None:
    """The identity header on every route's answer: the bulk route (a request the front
    splits into several engine calls), the query lane, OpenAI, tokenize, and errors raised
    at the edge (405, 413), by validation (400) and by the route (404)."""
    from embedkit.serve.engine.identity import HEADER, ServedIdentity

    served = ServedIdentity.from_dict(httpx.get(server.url + "/info", timeout=30).json()["served"])
    big = b'{"texts": ["' + b"a" * (8 * 1024 * 1024) + b'"]}'
    answers = {
        "bulk": post(server, "/embed", {"texts": [f"text {i}" for i in range(300)]}),
        "query": post(server, "/embed/query", {"texts": ["a query"]}),
        "openai": post(server, "/v1/embeddings", {"model": MODEL, "input": ["a", "b"]}),
        "tokenize": post(server, "/tokenize", {"texts": ["a"]}),
        "400": post(server, "/embed", {"texts": "not a list"}),
        "404": post(server, "/v1/embeddings", {"model": "other", "input": "a"}),
        "405": httpx.request("TRACE", server.url + "/embed", timeout=10),
        "413": httpx.post(
            server.url + "/embed",
            content=big,
            timeout=60,
            headers={"content-type": "application/json"},
        ),
    }
    statuses = {k: r.status_code for k, r in answers.items()}
    assert statuses == {
        **dict.fromkeys(("bulk", "query", "openai", "tokenize"), 200),
        **{k: int(k) for k in ("400", "404", "405", "413")},
    }
    for what, response in answers.items():
        assert response.headers.get(HEADER) == served.header_value(), what


def test_chunking_mean_matches_in_process(server, engine, texts) -> None:
    from embedkit.runtime.chunking import Chunking

    docs = [*evaldata.long_texts(300, 2), *texts[:5], texts[-1]]
    chunking = Chunking(max_tokens=128, overlap=32)
    options = asdict(chunking)
    want, plan = engine.encode_chunked(docs, chunking)
    body = post(server, "/embed", {"texts": docs, "chunking": options}).json()
    assert_parity(np.array(body["embeddings"], dtype=np.float32), want)
    truncated = sum(len(r) for r in engine.tokenizer.encode(docs))
    assert body["usage"]["tokens"] == sum(len(r) for r in plan.ids) > truncated  # every chunk
    assert [c["index"] for c in body["chunks"]] == [c.index for c in plan.chunks]
    raw = post(
        server,
        "/embed",
        {
            "texts": docs,
            "chunking": options,
            "dimensions": 48,
            "normalize": False,
            "encoding_format": "base64",
        },
    ).json()
    got = decode_base64(raw["embeddings"], 48)
    assert got.shape == (len(docs), 48)
    assert_parity(got, engine.encode_chunked(docs, chunking, normalize=False, dimensions=48)[0])
    # A text within max_tokens is one chunk: its vector is the plain one.
    plain = post(server, "/embed", {"texts": texts[:5], "chunking": {}}).json()
    assert_parity(np.array(plain["embeddings"], dtype=np.float32), engine.encode(texts[:5]))


def test_chunking_none_returns_each_chunk_with_its_span(server, engine) -> None:
    from embedkit.runtime.chunking import Chunking

    # Words of one word piece each: a span re-tokenises to exactly its chunk's tokens.
    docs = ["a short one", "the cat sat on the mat " * 70, "and ran to see my dog " * 30]
    chunking = Chunking(max_tokens=96, overlap=16, aggregate="none")
    body = post(server, "/embed", {"texts": docs, "chunking": asdict(chunking)}).json()
    chunks, rows = body["chunks"], np.array(body["embeddings"], dtype=np.float32)
    assert len(rows) == len(chunks) > len(docs) and body["dimensions"] == DIM
    want, plan = engine.encode_chunked(docs, chunking)
    assert_parity(rows, want)
    for c, ids in zip(chunks, plan.ids, strict=True):
        assert engine.tokenizer.encode([docs[c["index"]][c["start"] : c["end"]]])[0] == ids
        assert c["tokens"] == len(ids) <= 96
    for i, doc in enumerate(docs):
        mine = [c for c in chunks if c["index"] == i]
        assert mine[0]["start"] == 0 and mine[-1]["end"] == len(doc.rstrip())
        for a, b in itertools.pairwise(mine):
            assert a["start"] < b["start"] < a["end"] < b["end"]  # overlapping, in order


def test_empty_strings_embed(server, engine) -> None:
    body = post(server, "/embed", {"texts": ["", ""]}).json()
    assert_parity(np.array(body["embeddings"], dtype=np.float32), engine.encode(["", ""]))


# --- batching and concurrency ----------------------------------------------------------

_CALLS = re.compile(
    r'^embedkit_inference_seconds_count\{api="(?P<api>\w+)",model="[^"]+"\} (?P<value>\S+)$'
)


def batch_calls(metrics: str, lane: str) -> float:
    """Batched inference calls of ``lane`` so far (each one ORT call of merged requests)."""
    return sum(
        float(m["value"]) for m in map(_CALLS.match, metrics.splitlines()) if m and m["api"] == lane
    )


async def _burst(url: str, path: str, bodies: Sequence[object]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(url + path, json=b) for b in bodies))


@pytest.mark.parametrize(
    ("path", "body", "lane"),
    [
        ("/embed/query", {"texts": ["a short query"]}, "query"),
        ("/embed", {"texts": ["first text", "second text"]}, "bulk"),
        ("/v1/embeddings", {"model": MODEL, "input": "one text"}, "query"),
        ("/v1/embeddings", {"model": MODEL, "input": ["one", "two"]}, "bulk"),
    ],
)
def test_concurrent_requests_are_batched(server, path, body, lane) -> None:
    before = batch_calls(server.metrics(), lane)
    responses = asyncio.run(_burst(server.url, path, [body] * 48))
    assert all(r.status_code == 200 for r in responses)
    total = batch_calls(server.metrics(), lane) - before
    # The front merges requests that arrive together into one call
    # (embedkit.serve.pipeline.coalesce; with topology=split BentoML also merges queued
    # calls): fewer inference calls than requests is the proof they were merged.
    assert 0 < total < 48, "requests were not merged into fewer batches"


def test_more_than_100_requests_in_flight(server, engine) -> None:
    """Regression: BentoML 1.4.40's inter-service client failed beyond 100 in flight."""
    bodies = [{"texts": [f"request number {i}"]} for i in range(150)]
    responses = asyncio.run(_burst(server.url, "/embed/query", bodies))
    assert [r.status_code for r in responses] == [200] * 150
    got = np.array([r.json()["embeddings"][0] for r in responses], dtype=np.float32)
    assert_parity(got, engine.encode([b["texts"][0] for b in bodies]))


def test_token_budget_admission_is_our_429(server) -> None:
    """Past ``max_queued_tokens`` (16 384) waiting for the Embedder, the front refuses with
    its own 429, which names the queued tokens and the limit — unlike BentoML's dispatcher
    shedding (503, translated to a 429 without numbers) or the concurrency limit."""
    big = {"texts": ["word " * 120] * 160}  # ~19.5k tokens: alone, always admitted

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=120) as client:
            first = asyncio.create_task(client.post(server.url + "/embed", json=big))
            await asyncio.sleep(0.3)  # admitted alone before the first small request arrives
            small: list[httpx.Response] = []
            while not first.done():
                # the bulk lane: queries count only queued queries (docs/service.md § Tenants)
                small.append(await client.post(server.url + "/embed", json={"texts": ["a"]}))
                await asyncio.sleep(0.05)
            return await first, small

    first, small = asyncio.run(run())
    assert first.status_code == 200, first.text
    assert {r.status_code for r in small} <= {200, 429}, [r.text for r in small]
    refused = [r for r in small if r.status_code == 429]
    assert refused, "no request arrived while the big one was queued"
    for r in refused:
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["type"] == "rate_limit_error"
        assert re.fullmatch(
            r"the model queue is full \(\d+ tokens waiting, limit 16384\); "
            r"retry after the indicated delay",
            err["message"],
        ), err["message"]
    # Admission is released with the answer: the next request is served.
    assert post(server, "/embed/query", {"texts": ["a"]}).status_code == 200


def test_our_metrics_are_exported(server) -> None:
    # Its own traffic, so the counters below do not depend on which tests ran before.
    assert post(server, "/embed", {"texts": ["counted"]}).status_code == 200
    assert post(server, "/embed", {"texts": []}).status_code == 400
    text = server.metrics()
    for name in (
        "embedkit_texts_embedded_total",
        "embedkit_tokens_embedded_total",
        "embedkit_padding_ratio_bucket",
        "embedkit_sub_batch_size_bucket",
        "embedkit_sub_batch_tokens_bucket",
        "embedkit_queue_wait_seconds_bucket",
        "embedkit_inference_seconds_bucket",
        "embedkit_rejected_requests_total",
    ):
        assert name in text, name
    assert re.search(
        r'embedkit_texts_embedded_total\{model="all-minilm-l6-v2",route="/embed"\} [1-9]', text
    )
    assert re.search(r'embedkit_rejected_requests_total\{reason="invalid_input"\} [1-9]', text)


def test_openapi_document_is_honest(server) -> None:
    doc = httpx.get(server.url + "/docs.json", timeout=10).json()
    paths = doc["paths"]
    for route in ("/v1/embeddings", "/embed", "/embed/query", "/tokenize"):
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "401", "413", "422", "429", "500", "504"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert "get" in paths["/v1/models"] and "get" in paths["/info"]
    body = paths["/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["dimensions"]["maximum"] == DIM
    assert body["properties"]["texts"]["minItems"] == 1
    chunking = doc["components"]["schemas"]["ChunkingOptions"]["properties"]
    assert chunking["max_tokens"]["maximum"] == 256 and chunking["max_tokens"]["minimum"] == 3
    assert chunking["aggregate"]["enum"] == ["mean", "none"]
    query = paths["/embed/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "chunking" in body["properties"] and "chunking" not in query["properties"]
    assert "ErrorResponse" in doc["components"]["schemas"]


# --- the other topology ---------------------------------------------------------------------


def test_split_topology_serves_the_same_vectors(launcher, model_tag, engine) -> None:
    """``topology=split`` (front + Embedder joined by bentoml.depends, BentoML's adaptive
    batching) stays a working option: same vectors on both lanes, the Embedder named."""
    split = launcher.start(model_tag, {"EMBEDKIT_TOPOLOGY": "split"})
    texts = ["the split topology", "two services, one answer", "third"]
    one = httpx.post(split.url + "/v1/embeddings", json={"model": MODEL, "input": texts[0]})
    many = httpx.post(split.url + "/embed", json={"texts": texts}, timeout=60)
    assert one.status_code == many.status_code == 200
    assert_parity(
        np.array([one.json()["data"][0]["embedding"]], np.float32), engine.encode(texts[:1])
    )
    assert_parity(np.array(many.json()["embeddings"], np.float32), engine.encode(texts))
    assert httpx.get(split.url + "/info").json()["ready"] is True
