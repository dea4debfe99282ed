"""prompt_name through a real server (one, module-scoped) serving the tiny prompt model
(E5-style prompts, no default prompt, pooling that leaves the prompt out): every route
applies the named prompt as ``SentenceTransformer.encode(prompt_name=...)`` does, a single
input on /v1/embeddings gets no prompt unless asked, unknown names are a 400 naming the
known ones, usage counts the prompt's tokens, and the metadata routes list the prompts.
(A model's default prompt is applied by the same job code: tests/test_prompts.py.)"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from tests.tiny_models import PROMPTS

from embedkit_bench.server import Server

MODEL = "tiny-prompts"
TEXTS = ["what is a prompt", "", "a somewhat longer passage about prompts and pooling"]


@pytest.fixture(scope="module")
def prompt_server(prompt_artifact, launcher) -> Server:
    from embedkit.model.artifact import register

    return launcher.start(register(prompt_artifact))


@pytest.fixture(scope="module")
def reference(prompt_model_dir):
    from embedkit.model.export import load_reference

    return load_reference(prompt_model_dir)


def ref(reference, texts: list[str], prompt_name: str | None = None) -> np.ndarray:
    return np.asarray(reference.encode(texts, prompt_name=prompt_name, normalize_embeddings=True))


def post(server: Server, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def assert_close(got: object, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_every_route_applies_the_named_prompt(prompt_server: Server, reference) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=prompt_server.url + "/v1", api_key="unused", max_retries=0)
    bare_tokens = post(prompt_server, "/tokenize", {"texts": TEXTS}).json()["usage"]["tokens"]
    for name, text in PROMPTS.items():
        want = ref(reference, TEXTS, name)
        for route in ("/embed", "/embed/query"):
            body = post(prompt_server, route, {"texts": TEXTS, "prompt_name": name}).json()
            assert_close(body["embeddings"], want)
            # usage counts the prompt's tokens: 2 per text for "query: " / "passage: "
            assert body["usage"]["tokens"] == bare_tokens + 2 * len(TEXTS)
        got = client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"prompt_name": name})
        assert_close([d.embedding for d in got.data], want)
        assert got.usage.prompt_tokens == bare_tokens + 2 * len(TEXTS)
        tokens = post(prompt_server, "/tokenize", {"texts": TEXTS, "prompt_name": name}).json()
        expected = reference.tokenizer([text + t for t in TEXTS])["input_ids"]
        assert tokens["ids"] == expected


def test_a_single_input_gets_no_prompt_unless_asked(prompt_server: Server, reference) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=prompt_server.url + "/v1", api_key="unused", max_retries=0)
    text = TEXTS[0]
    plain = client.embeddings.create(model=MODEL, input=text)  # one input: the query lane
    assert_close(plain.data[0].embedding, ref(reference, [text])[0])
    assert not np.allclose(plain.data[0].embedding, ref(reference, [text], "query")[0], atol=1e-3)
    asked = client.embeddings.create(model=MODEL, input=text, extra_body={"prompt_name": "query"})
    assert_close(asked.data[0].embedding, ref(reference, [text], "query")[0])
    assert asked.usage.prompt_tokens == plain.usage.prompt_tokens + 2
    # The native query lane does not pick the query prompt either.
    body = post(prompt_server, "/embed/query", {"texts": [text]}).json()
    assert_close(body["embeddings"][0], ref(reference, [text])[0])


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/embed", {"texts": ["x"]}),
        ("/embed/query", {"texts": ["x"]}),
        ("/tokenize", {"texts": ["x"]}),
        ("/v1/embeddings", {"model": MODEL, "input": "x"}),
    ],
)
def test_an_unknown_prompt_is_a_400_naming_the_known_ones(
    prompt_server: Server, route: str, body: dict[str, object]
) -> None:
    r = post(prompt_server, route, {**body, "prompt_name": "qeury"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_prompt" and error["param"] == "prompt_name"
    assert error["message"] == (
        "prompt_name 'qeury' is not a prompt of this model; known prompts: 'query', 'passage'"
    )


def test_chunking_with_a_prompt_is_refused_by_name(prompt_server: Server, reference) -> None:
    """Not built yet (each window would need the prompt), so a 400, never a silent drop;
    without a prompt the same model chunks."""
    body: dict[str, object] = {"texts": ["x " * 200], "chunking": {"max_tokens": 32}}
    r = post(prompt_server, "/embed", {**body, "prompt_name": "query"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chunking" and "prompt" in r.json()["error"]["message"]
    assert post(prompt_server, "/embed", body).status_code == 200


def test_models_info_and_docs_list_the_prompts(prompt_server: Server) -> None:
    card = httpx.get(prompt_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == MODEL and card["prompts"] == PROMPTS
    assert card["default_prompt_name"] is None
    info = httpx.get(prompt_server.url + "/info", timeout=30).json()
    assert info["prompts"] == PROMPTS and info["default_prompt_name"] is None
    doc = httpx.get(prompt_server.url + "/docs.json", timeout=10).json()
    for route in ("/v1/embeddings", "/embed", "/embed/query", "/tokenize"):
        schema = doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]
        prop = schema["schema"]["properties"]["prompt_name"]
        assert prop["enum"] == list(PROMPTS) and "default_prompt_name" in prop["description"]
