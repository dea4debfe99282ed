"""Rerank through one real `bentoml serve` (issue #30, items 4 and 5): the released default
embedding model (all-MiniLM-L6-v2) beside the tiny CrossEncoder (tests/tiny_models.py,
one label, Sigmoid), each picked by the request's `model`.

`/rerank` (TEI's shape) must give PyTorch `CrossEncoder.predict`'s scores, raw and
activated, within the pair contract's 1e-4; `/v1/rerank` and `/v2/rerank` (Cohere's and
Jina's) must order and cut exactly as those scores say; the Cohere SDK's v2 client talks
to it with no cloud account.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import numpy as np
import pytest

from embedkit.model import evaldata
from embedkit.model.artifact import register
from embedkit.model.export import load_cross_encoder
from embedkit.quality import pair_contract

MINILM, RERANKER = "all-minilm-l6-v2", "tiny-cross-encoder"
MAX_DOCUMENTS = 40  # EMBEDKIT_MAX_RERANK_DOCUMENTS of this module's server


@pytest.fixture(scope="module")
def ce_tag(tiny_cross_encoder) -> str:
    return register(tiny_cross_encoder[1])


@pytest.fixture(scope="module")
def served(model_tag: str, ce_tag: str, launcher):
    """The one server of this module: MiniLM (the default) and the tiny cross-encoder."""
    env = {
        "EMBEDKIT_MODELS": json.dumps([model_tag, ce_tag]),
        "EMBEDKIT_MAX_RERANK_DOCUMENTS": str(MAX_DOCUMENTS),
    }
    return launcher.start(model_tag, env)


@pytest.fixture(scope="module")
def cross_encoder(tiny_cross_encoder) -> Any:
    return load_cross_encoder(tiny_cross_encoder[0])


@pytest.fixture(scope="module")
def sts() -> list[tuple[str, str]]:
    """STS Benchmark test pairs, a few per genre."""
    per_genre: dict[str, list[tuple[str, str]]] = {}
    for pair in evaldata.sts("test"):
        bucket = per_genre.setdefault(pair.genre, [])
        if len(bucket) < 8:
            bucket.append((pair.sentence1, pair.sentence2))
    return [p for bucket in per_genre.values() for p in bucket]


def post(server, path: str, body: object, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def tei_scores(server, query: str, texts: list[str], **options: Any) -> np.ndarray:
    """/rerank's scores back in document order (checking it answered every index once)."""
    r = post(server, "/rerank", {"query": query, "texts": texts, **options})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert sorted(h["index"] for h in hits) == list(range(len(texts)))
    out = np.empty(len(texts), np.float32)
    for h in hits:
        out[h["index"]] = h["score"]
    return out


def test_rerank_matches_cross_encoder_predict(served, cross_encoder, sts) -> None:
    """Each STS pair's sentence1 as a query against every pair's sentence2 (its own among
    them), raw and activated, plus edge documents: empty, emoji, CJK, one over the limit."""
    edge = evaldata.edge_cases()
    documents = [d for _, d in sts[:24]] + ["", *edge["emoji"][:1], *edge["cjk"][:1]]
    documents.append(edge["very_long"][0])  # cut to the 64-token window, document side only
    got: dict[bool, list[np.ndarray]] = {True: [], False: []}  # raw → scores
    pairs: list[tuple[str, str]] = []
    for query, _ in sts[::4]:
        pairs += [(query, d) for d in documents]
        for raw in (True, False):
            got[raw].append(tei_scores(served, query, documents, raw_scores=raw))
    for raw in (True, False):
        want = pair_contract.reference_scores(cross_encoder, pairs, raw=raw)
        diff = np.abs(np.concatenate(got[raw]) - want)
        assert diff.max() <= pair_contract.MAX_ABS_DIFF, (raw, float(diff.max()))
    # Not a constant model: the scores tell documents apart.
    assert np.ptp(np.concatenate(got[True])) > 0.1


def test_rerank_sorts_highest_first_and_echoes_texts(served, sts) -> None:
    query = sts[0][0]
    texts = [d for _, d in sts[:12]]
    r = post(served, "/rerank", {"query": query, "texts": texts, "return_text": True})
    assert r.status_code == 200, r.text
    hits = r.json()
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h["text"] == texts[h["index"]] for h in hits)
    assert all(0.0 < s < 1.0 for s in scores)  # Sigmoid
    assert r.headers["x-embedkit-model"].startswith(f"{RERANKER}:")
    assert "text" not in post(served, "/rerank", {"query": query, "texts": texts}).json()[0]
    # TEI's clients send the direction capitalised
    left = {"query": query, "texts": texts, "truncation_direction": "Left"}
    assert post(served, "/rerank", left).status_code == 200


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_cohere_routes_order_and_cut_as_the_scores_say(served, sts, route: str) -> None:
    query = sts[4][0]
    documents = [d for _, d in sts[:15]]
    scores = tei_scores(served, query, documents)
    want = sorted(range(len(documents)), key=lambda i: (-scores[i], i))
    r = post(
        served,
        route,
        {"model": RERANKER, "query": query, "documents": documents, "top_n": 4},
        headers={"X-Request-Id": f"rerank-{route[2]}"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == want[:4]
    assert [x["relevance_score"] for x in body["results"]] == pytest.approx(
        [float(scores[i]) for i in want[:4]], abs=1e-6
    )
    assert all("document" not in x for x in body["results"])
    assert body["id"] == f"rerank-{route[2]}" and body["model"] == RERANKER
    tokens = body["usage"]["total_tokens"]
    assert tokens > len(documents) * 3  # at least [CLS] q [SEP] d [SEP] per pair
    assert body["meta"]["billed_units"] == {"search_units": 1, "input_tokens": tokens}
    assert body["meta"]["api_version"] == {"version": route[2]}
    assert r.headers["x-embedkit-model"].startswith(f"{RERANKER}:")
    # every document, objects as strings, texts returned; no model: the served reranker
    objects = [{"text": d} for d in documents]
    full = post(served, route, {"query": query, "documents": objects, "return_documents": True})
    assert full.status_code == 200, full.text
    results = full.json()["results"]
    assert [x["index"] for x in results] == want
    assert all(x["document"] == {"text": documents[x["index"]]} for x in results)
    over = post(served, route, {"query": query, "documents": documents, "top_n": 99})
    assert len(over.json()["results"]) == len(documents)


def test_the_request_log_and_metrics_count_the_pairs(served, sts) -> None:
    body = {"query": sts[0][0], "documents": [d for _, d in sts[:5]]}
    r = post(served, "/v2/rerank", body, headers={"X-Request-Id": "rerank-log-1"})
    assert r.status_code == 200, r.text
    line = served.wait_for_line('"request_id":"rerank-log-1"', timeout=30)
    logged = json.loads(line[line.index("{") :])
    # charged to the tenant (the default one): the tokens usage reports, on the query lane
    assert logged["tokens"] == r.json()["usage"]["total_tokens"]
    assert logged["lane"] == "query" and logged["served"] == r.headers["x-embedkit-model"]
    assert logged["batches"] and all(b.startswith("query-") for b in logged["batches"])
    text = served.metrics()
    assert re.search(
        rf'embedkit_pairs_reranked_total\{{model="{RERANKER}",route="/v2/rerank"\}} [1-9]', text
    )


def test_models_cards_carry_each_task(served) -> None:
    cards = httpx.get(served.url + "/v1/models", timeout=10).json()["data"]
    shape = [(c["id"], c["task"], c["max_length"]) for c in cards]
    assert shape == [(MINILM, "embed", 256), (RERANKER, "rerank", 64)]
    assert cards[0]["dimensions"] == 384 and cards[1]["activation"] == "sigmoid"
    assert cards[1]["embedkit"]["name"] == RERANKER
    info = httpx.get(served.url + "/info", timeout=10).json()["models"][RERANKER]
    assert info["task"] == "rerank" and info["limits"]["max_rerank_documents"] == MAX_DOCUMENTS


def test_a_route_of_the_other_task_is_a_400_naming_it(served) -> None:
    for path, body, task in (
        ("/v1/rerank", {"model": MINILM, "query": "q", "documents": ["d"]}, "embed"),
        ("/rerank", {"model": MINILM, "query": "q", "texts": ["d"]}, "embed"),
        ("/v1/embeddings", {"model": RERANKER, "input": "a"}, "rerank"),
        ("/embed", {"model": RERANKER, "texts": ["a"]}, "rerank"),
        ("/tokenize", {"model": RERANKER, "texts": ["a"]}, "rerank"),
    ):
        r = post(served, path, body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("wrong_model_task", "model"), err
        assert f"(task: {task})" in err["message"], err["message"]
    # without `model`, each route gets the served model of its task
    assert post(served, "/embed", {"texts": ["a"]}).json()["model"] == MINILM
    assert post(served, "/v2/rerank", {"query": "q", "documents": ["d"]}).json()["model"] == (
        RERANKER
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v2/rerank", {"documents": ["d"]}, 400, "query: Field required"),
        ("/rerank", {"texts": ["d"]}, 400, "query: Field required"),
        ("/v2/rerank", {"query": "", "documents": ["d"]}, 400, "query must not be empty"),
        ("/v2/rerank", {"query": "q", "documents": []}, 400, "documents must not be empty"),
        ("/rerank", {"query": "q", "texts": []}, 400, "texts must not be empty"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n must be at"),
        ("/v2/rerank", {"query": "q", "documents": ["d", 5]}, 400, "documents.1"),
        ("/v1/rerank", {"query": "q", "documents": [{"title": "d"}]}, 400, "documents.0"),
        ("/v2/rerank", {"query": "q", "documents": "d"}, 400, "documents"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "model": "x"}, 404, "'x' is not served"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "texts": ["d"]}, 400, "/rerank"),
        ("/v2/rerank", {"query": "q", "documents": ["d"] * 41}, 413, "limit of 40"),
        ("/rerank", {"query": "q", "texts": ["d"] * 41}, 413, "max_rerank_documents"),
        ("/rerank", {"query": "word " * 80, "texts": ["d"]}, 413, "the query takes"),
        ("/rerank", {"query": "q", "texts": ["word " * 80], "truncate": False}, 413, "pair 0"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(
    served, path: str, body: dict[str, Any], status: int, says: str
) -> None:
    r = post(served, path, body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert says in message and "\n" not in message, message


def test_openapi_documents_the_rerank_routes(served) -> None:
    paths = httpx.get(served.url + "/docs.json", timeout=10).json()["paths"]
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        op = paths[route]["post"]
        assert {"200", "400", "404", "413", "429"} <= set(op["responses"])
        props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert props["model"]["enum"] == [RERANKER]
        field = "texts" if route == "/rerank" else "documents"
        assert props[field]["maxItems"] == MAX_DOCUMENTS
    assert paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]["model"]["enum"] == [MINILM]


def test_the_cohere_sdk_reranks_through_our_base_url(served, sts) -> None:
    """Cohere's own v2 client (what LangChain's and LlamaIndex's Cohere rerankers wrap),
    pointed at this server with a dummy key: no cloud account involved."""
    import cohere

    query = sts[8][0]
    documents = [d for _, d in sts[:10]]
    scores = tei_scores(served, query, documents)
    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    answer = client.rerank(model=RERANKER, query=query, documents=documents, top_n=3)
    want = sorted(range(len(documents)), key=lambda i: (-scores[i], i))[:3]
    assert [r.index for r in answer.results] == want
    assert [r.relevance_score for r in answer.results] == pytest.approx(
        [float(scores[i]) for i in want], abs=1e-6
    )
    assert answer.meta is not None and answer.meta.billed_units is not None
    assert answer.meta.billed_units.search_units == 1
    with pytest.raises(cohere.BadRequestError) as refused:
        client.rerank(model=MINILM, query=query, documents=documents)
    assert "task: embed" in json.dumps(refused.value.body)


def test_a_reranker_served_alone_in_the_split_topology(launcher, ce_tag, sts) -> None:
    """The Embedder service (topology=split) serves a reranker too: same scores."""
    split = launcher.start(ce_tag, {"EMBEDKIT_MODEL": ce_tag, "EMBEDKIT_TOPOLOGY": "split"})
    query, documents = sts[0][0], [d for _, d in sts[:6]]
    r = post(split, "/v1/rerank", {"query": query, "documents": documents})
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [
        int(i) for i in np.argsort(-tei_scores(split, query, documents), kind="stable")
    ]
    paths = httpx.get(split.url + "/docs.json", timeout=10).json()["paths"]
    assert "/rerank" in paths and "/v1/embeddings" not in paths
    refused = post(split, "/embed", {"texts": ["a"]})
    assert refused.status_code == 400 and "no embedding model" in refused.text


def test_a_tenant_over_its_token_budget_gets_429_on_a_rerank_route(
    launcher, ce_tag, sts, tmp_path_factory
) -> None:
    """Rerank calls charge the tokens they read to the caller's tenant (as embeddings do):
    once the bucket is spent, the next call is a 429 quota_exceeded naming the tenant, and
    another tenant is still served."""
    burst = 1000
    tenants = tmp_path_factory.mktemp("rerank-tenants") / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        "  tight:\n    keys: [tight-key]\n    rate_tokens_per_s: 1\n"
        f"    burst_tokens: {burst}\n"
        "  roomy:\n    keys: [roomy-key]\n    rate_tokens_per_s: 1000000\n"
        "    burst_tokens: 1000000\n"
    )
    server = launcher.start(
        ce_tag, {"EMBEDKIT_MODEL": ce_tag, "EMBEDKIT_TENANTS_FILE": str(tenants)}
    )
    body = {"query": sts[0][0], "documents": [d for _, d in sts[:16]]}
    tight = {"authorization": "Bearer tight-key"}
    answers = [post(server, "/v2/rerank", body, headers=tight) for _ in range(8)]
    codes = [r.status_code for r in answers]
    assert codes[0] == 200, answers[0].text
    tokens = answers[0].json()["usage"]["total_tokens"]
    admitted = burst // tokens  # the bucket covers this many calls (refill: 1 token/s)
    assert 1 <= admitted < len(answers) - 1, tokens
    assert codes[:admitted] == [200] * admitted and 429 in codes[admitted : admitted + 2], codes
    err = next(r for r in answers if r.status_code == 429).json()["error"]
    assert err["code"] == "quota_exceeded" and "tenant 'tight'" in err["message"], err
    other = post(
        server,
        "/rerank",
        {"query": body["query"], "texts": body["documents"]},
        headers={"authorization": "Bearer roomy-key"},
    )
    assert other.status_code == 200, other.text
