"""Tenants, lanes and request ids through a real server (one, shared by the module).

Tenants (EMBEDKIT_TENANTS_FILE): ``search`` (interactive, ample quota), ``backfill``
(bulk class, a burst of a few big requests then 20 tokens/s), ``archive`` (bulk class,
ample) and the plain ``api_keys`` key (the unlimited ``default`` tenant). The bound a
tenant's queries keep under another's bulk flood is asserted as behaviour: the bulk
runs each query waited behind (X-Embedkit-Bulk-Runs-Ahead) never exceed the ORT runs
at once, however much bulk work is queued.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

SEARCH = {"authorization": "Bearer search-key"}
BACKFILL = {"authorization": "Bearer backfill-key"}
ARCHIVE = {"authorization": "Bearer archive-key"}
PLAIN = {"authorization": "Bearer plain-key"}
BACKFILL_RATE, BACKFILL_BURST = 20, 12_000
TENANTS = f"""
tenants:
  search:
    keys: [search-key, search-old]
    rate_tokens_per_s: 1000000
    burst_tokens: 1000000
  backfill:
    keys: [backfill-key]
    priority: bulk
    rate_tokens_per_s: {BACKFILL_RATE}
    burst_tokens: {BACKFILL_BURST}
  archive:
    keys: [archive-key]
    priority: bulk
    rate_tokens_per_s: 1000000
    burst_tokens: 1000000
"""
MODEL = "all-minilm-l6-v2"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def tenant_server(model_tag, launcher, tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(TENANTS)
    env = {
        "EMBEDKIT_TENANTS_FILE": str(path),
        "EMBEDKIT_API_KEYS": '["plain-key"]',
        "EMBEDKIT_REVOKED_KEYS": '["search-old"]',
        "EMBEDKIT_MAX_BODY_BYTES": "65536",
        # The flood below is admitted by backfill's quota, not cut by the queue budget.
        "EMBEDKIT_MAX_QUEUED_TOKENS": "200000",
    }
    return launcher.start(model_tag, env)


def _samples(server, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(server.metrics()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _request_log(server, rid: str) -> dict[str, Any]:
    line = server.wait_for_line(f'"request_id":"{rid}"', timeout=30)
    return json.loads(line[line.index("{") :])


def test_keys_name_tenants_unknown_and_revoked_are_401(tenant_server) -> None:
    url = tenant_server.url + "/embed/query"
    for headers, code in (
        ({"authorization": "Bearer nope"}, "invalid_api_key"),
        ({"authorization": "Bearer search-old"}, "revoked_api_key"),  # listed, but revoked
        ({}, "invalid_api_key"),
    ):
        r = httpx.post(url, json={"texts": ["a"]}, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == code
        assert HEX32.fullmatch(r.headers["x-request-id"])  # errors carry one too
    for headers in (SEARCH, PLAIN):
        assert httpx.post(url, json={"texts": ["a"]}, headers=headers, timeout=30).is_success
    assert httpx.get(tenant_server.url + "/info", headers=PLAIN, timeout=30).json()["auth"]


def test_request_ids_round_trip_and_are_logged(tenant_server) -> None:
    url = tenant_server.url
    given = {**SEARCH, "x-request-id": "trace-0001.a:b"}
    r = httpx.post(url + "/embed/query", json={"texts": ["hello"]}, headers=given, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-0001.a:b"
    entry = _request_log(tenant_server, "trace-0001.a:b")
    assert entry["tenant"] == "search" and entry["lane"] == "query" and entry["status"] == 200
    assert entry["route"] == "/embed/query" and entry["tokens"] == 3
    assert entry["other_tenant_runs_ahead"] == 0  # alone on the query lane
    assert entry["served"] == r.headers["x-embedkit-model"]
    (batch,) = entry["batches"]
    assert re.fullmatch(r"query-\d+", str(batch))

    generated = httpx.post(url + "/embed/query", json={"texts": ["x"]}, headers=SEARCH, timeout=30)
    rid = generated.headers["x-request-id"]
    assert HEX32.fullmatch(rid)
    assert _request_log(tenant_server, rid)["tenant"] == "search"

    bad = {**SEARCH, "x-request-id": "not valid; " + "x" * 200}
    replaced = httpx.post(url + "/embed/query", json={"texts": ["x"]}, headers=bad, timeout=30)
    assert HEX32.fullmatch(replaced.headers["x-request-id"])

    # The middleware's own answers: 413 (body limit) and 401, each echoing the id.
    big = {"texts": ["word " * 20_000]}
    for headers, status in (
        ({**SEARCH, "x-request-id": "big-1"}, 413),
        ({"x-request-id": "no-key-1"}, 401),
    ):
        r = httpx.post(url + "/embed", json=big, headers=headers, timeout=30)
        assert r.status_code == status and r.headers["x-request-id"] == headers["x-request-id"]
        assert _request_log(tenant_server, headers["x-request-id"])["status"] == status


def test_lane_header_chooses_the_openai_lane(tenant_server) -> None:
    url = tenant_server.url + "/v1/embeddings"

    def lane(inputs: object, headers: dict[str, str]) -> httpx.Response:
        body = {"model": MODEL, "input": inputs}
        return httpx.post(url, json=body, headers={**SEARCH, **headers}, timeout=30)

    assert lane("one", {}).headers["x-embedkit-lane"] == "query"  # inferred, as before
    assert lane(["a", "b"], {}).headers["x-embedkit-lane"] == "bulk"
    assert lane("one", {"x-embedkit-lane": "bulk"}).headers["x-embedkit-lane"] == "bulk"
    assert lane(["a", "b"], {"x-embedkit-lane": "Query"}).headers["x-embedkit-lane"] == "query"
    # Over max_query_texts (32): served, on the bulk lane, and the header says so.
    many = lane([f"t{i}" for i in range(33)], {"x-embedkit-lane": "query"})
    assert many.status_code == 200 and many.headers["x-embedkit-lane"] == "bulk"
    bad = lane("one", {"x-embedkit-lane": "fast", "x-request-id": "bad-lane"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-lane"
    err = bad.json()["error"]
    assert err["param"] == "X-Embedkit-Lane" and "'fast'" in err["message"]
    # A native route is its lane: a header naming the other one is refused, not ignored.
    r = httpx.post(
        tenant_server.url + "/embed",
        json={"texts": ["a"]},
        headers={**SEARCH, "x-embedkit-lane": "query"},
        timeout=30,
    )
    assert r.status_code == 400 and "/embed/query" in r.json()["error"]["message"]


def test_bulk_class_tenant_runs_on_the_bulk_lane(tenant_server) -> None:
    for path, body in (
        ("/embed/query", {"texts": ["a"]}),
        ("/v1/embeddings", {"model": MODEL, "input": "a"}),
    ):
        headers = {**ARCHIVE, "x-embedkit-lane": "query"}
        r = httpx.post(tenant_server.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.headers["x-embedkit-lane"] == "bulk"


def test_tenant_tokens_are_counted_per_lane(tenant_server) -> None:
    key = (("lane", "query"), ("tenant", "search"))
    before = _samples(tenant_server, "embedkit_tenant_tokens_total").get(key, 0.0)
    body = {"model": MODEL, "input": "count these tokens please"}
    r = httpx.post(tenant_server.url + "/v1/embeddings", json=body, headers=SEARCH, timeout=30)
    after = _samples(tenant_server, "embedkit_tenant_tokens_total")[key]
    assert after - before == r.json()["usage"]["total_tokens"]


FLOOD = {"texts": [f"{i} " + " ".join(["word"] * 56) for i in range(64)]}  # ~3.7k tokens


async def _flood_and_query(url: str, n: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """backfill sends ``n`` big bulk requests at once; meanwhile search sends queries one
    after another until the flood is answered."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        flood = [
            asyncio.ensure_future(client.post("/embed", json=FLOOD, headers=BACKFILL))
            for _ in range(n)
        ]
        queries: list[httpx.Response] = []
        i = 0
        while not all(f.done() for f in flood) or not queries:
            path, payload = (
                ("/embed/query", {"texts": [f"query {i}"]})
                if i % 2
                else ("/v1/embeddings", {"model": MODEL, "input": f"query {i}"})
            )
            queries.append(await client.post(path, json=payload, headers=SEARCH))
            i += 1
        return list(await asyncio.gather(*flood)), queries


def test_over_quota_is_429_while_another_tenants_queries_keep_their_bound(tenant_server) -> None:
    url = tenant_server.url
    runs = httpx.get(url + "/info", headers=SEARCH, timeout=30).json()["engine"]["ort_runs"]
    counted = httpx.post(url + "/tokenize", json=FLOOD, headers=SEARCH, timeout=30).json()
    tokens = sum(counted["counts"])
    admitted = BACKFILL_BURST // tokens  # the burst covers this many; the rest are over
    assert admitted >= 3
    flood, queries = asyncio.run(_flood_and_query(url, admitted + 4))

    ok = [r for r in flood if r.status_code == 200]
    over = [r for r in flood if r.status_code == 429]
    assert (len(ok), len(over)) == (admitted, 4), [r.status_code for r in flood]
    assert ok[0].json()["usage"]["tokens"] == tokens
    # Retry-After: until the bucket holds a request's tokens again, from what the admitted
    # requests left, refilled at 20 tokens/s (less by the time the flood took).
    wait = math.ceil((tokens - (BACKFILL_BURST - admitted * tokens)) / BACKFILL_RATE)
    for r in over:
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and "tenant 'backfill'" in err["message"]
        assert wait - 30 <= int(r.headers["retry-after"]) <= wait
        assert r.headers["x-embedkit-lane"] == "bulk" and r.headers["x-request-id"]
    rejected = _samples(tenant_server, "embedkit_quota_rejections_total")
    assert rejected[(("tenant", "backfill"),)] == len(over)
    assert (("tenant", "search"),) not in rejected

    # The other tenant's queries: all answered, on the query lane, and none waited behind
    # more bulk runs than there are runs at once, though several bulk calls were queued.
    assert all(q.status_code == 200 for q in queries), [q.text for q in queries if q.is_error]
    assert {q.headers["x-embedkit-lane"] for q in queries} == {"query"}
    ahead = [int(q.headers["x-embedkit-bulk-runs-ahead"]) for q in queries]
    assert max(ahead) <= runs, ahead
    assert max(ahead) >= 1, f"no query met the flood: {ahead}"  # the scenario happened


# One tenant's flood of the query lane: many concurrent 32-text queries (the most the lane
# takes, max_query_texts), long enough that calls queue in the front.
QUERY_FLOOD = {"texts": [f"{i} " + " ".join(["word"] * 30) for i in range(32)]}


async def _query_flood(url: str, n: int) -> tuple[list[str], list[str]]:
    """The default tenant floods /embed/query with ``n`` requests; meanwhile ``search``
    sends single queries, one at a time. (flood request ids, lone query ids)."""
    answered: list[str] = []
    sent: list[str] = []

    async def flood_one(client: httpx.AsyncClient, j: int) -> None:
        headers = {**PLAIN, "x-request-id": f"flood-{j}"}
        r = await client.post("/embed/query", json=QUERY_FLOOD, headers=headers)
        assert r.status_code == 200, r.text
        answered.append(f"flood-{j}")

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        flood = [asyncio.ensure_future(flood_one(client, j)) for j in range(n)]
        await asyncio.sleep(0.3)  # the flood queued in the front first
        for i in range(5):
            rid = f"lone-{i}"
            sent.append(rid)
            headers = {**SEARCH, "x-request-id": rid}
            r = await client.post("/embed/query", json={"texts": [f"lone {i}"]}, headers=headers)
            assert r.status_code == 200, r.text
        await asyncio.gather(*flood)
    return answered, sent


def test_a_lone_query_waits_behind_at_most_one_run_of_another_tenants_query_flood(
    tenant_server,
) -> None:
    """Issue 32's fairness, counted from the request log while the default tenant floods
    the query lane: each of search's single queries left with at most one of the flood's
    queued calls ahead of it (other_tenant_runs_ahead), and the flood's requests counted
    the lone queries' calls that left ahead of them — the two tenants were told apart, and
    the flood was still queued when the queries came (the coalescer's own tests show a
    first-in, first-out queue failing the bound: tests/test_coalesce.py)."""
    answered, sent = asyncio.run(_query_flood(tenant_server.url, 24))
    lone = [_request_log(tenant_server, rid)["other_tenant_runs_ahead"] for rid in sent]
    assert all(w is not None and w <= 1 for w in lone), lone
    flood = [_request_log(tenant_server, rid)["other_tenant_runs_ahead"] for rid in answered]
    assert max(flood) >= 1, f"no flood request saw a lone query pass it: {flood}"
