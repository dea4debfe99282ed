"""Several models in one deployment (issue #19 item 1), through one real `bentoml serve`:
the released default model (all-MiniLM-L6-v2, BERT, mean pooling, 384 dimensions) beside
a tiny BERT with a Dense head (tests/tiny_models.py, 16 dimensions), each picked by the
request's `model`, each matching its PyTorch `SentenceTransformer.encode`, each with its
own admission budget on the runner threads they share (docs/design/serving.md, decision 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedkit.core.errors import ChecksumMismatch, ConfigurationError
from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.model.artifact import register
from embedkit.model.export import load_reference
from embedkit.quality import contract

MINILM, TINY = "all-minilm-l6-v2", "tiny-bert-dense"
BUDGET = 600  # max_queued_tokens per model: one 64-text request fills it


@pytest.fixture(scope="module")
def tiny(tiny_architecture):
    """(source directory, registered tag) of the tiny BERT + Dense model."""
    src, artifact = tiny_architecture("bert-dense")
    return src, register(artifact)


@pytest.fixture(scope="module")
def two_models(model_tag: str, tiny, launcher):
    """The one server of this module: MiniLM (the default, listed first) and the tiny model."""
    env = {
        "EMBEDKIT_MODELS": json.dumps([model_tag, tiny[1]]),
        "EMBEDKIT_MAX_QUEUED_TOKENS": str(BUDGET),
    }
    return launcher.start(model_tag, env)


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    english = evaldata.sts_sentences("test")[:20]
    # an empty string and one over both models' token limits (256 and 64)
    return [*english, "", evaldata.long_texts(300, 1)[0]]


def post(server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def assert_contract_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    stats = contract.compare(want, got)
    assert stats["min_cosine"] >= contract.MIN_COSINE, stats
    assert stats["max_abs_diff"] <= contract.MAX_ABS_DIFF, stats


def test_each_model_matches_its_pytorch_encoder(two_models, tiny, reference, texts) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=two_models.url + "/v1", api_key="unused", max_retries=0)
    for name, encoder, dim in ((MINILM, reference, 384), (TINY, load_reference(tiny[0]), 16)):
        want = encoder.encode(texts, convert_to_numpy=True, show_progress_bar=False)
        assert want.shape == (len(texts), dim)
        raw = client.embeddings.with_raw_response.create(model=name, input=texts)
        got = raw.parse()
        assert got.model == name
        assert_contract_parity(np.array([d.embedding for d in got.data], np.float32), want)
        # the response names the model that answered, not the deployment's default
        assert raw.headers["x-embedkit-model"].startswith(f"{name}:")


def test_models_lists_each_with_its_dimension_limit_and_identity(two_models, tiny) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=two_models.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MINILM, TINY]
    cards = httpx.get(two_models.url + "/v1/models", timeout=10).json()["data"]
    shape = [(c["id"], c["dimensions"], c["max_length"], c["embedkit"]["variant"]) for c in cards]
    assert shape == [(MINILM, 384, 256, "fp32"), (TINY, 16, 64, "fp32")]
    assert cards[1]["embedkit"]["tag"] == tiny[1] and "prompts" in cards[1]


def test_native_routes_take_model_and_default_to_the_first(two_models) -> None:
    tiny_body = post(two_models, "/embed/query", {"texts": ["a"], "model": TINY})
    assert tiny_body.status_code == 200, tiny_body.text
    assert (tiny_body.json()["model"], tiny_body.json()["dimensions"]) == (TINY, 16)
    default = post(two_models, "/embed", {"texts": ["a"]}).json()
    assert (default["model"], default["dimensions"]) == (MINILM, 384)
    ids = post(two_models, "/tokenize", {"texts": ["word " * 100], "model": TINY}).json()
    assert ids["max_length"] == 64 and ids["counts"] == [64] and ids["truncated"] == 1


def test_the_request_log_names_the_model_that_answered(two_models) -> None:
    r = httpx.post(
        two_models.url + "/embed/query",
        json={"texts": ["a"], "model": TINY},
        headers={"X-Request-Id": "several-models-1"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    line = two_models.wait_for_line('"request_id":"several-models-1"', timeout=30)
    assert json.loads(line[line.index("{") :])["served"] == r.headers["x-embedkit-model"]
    assert r.headers["x-embedkit-model"].startswith(f"{TINY}:")


def test_unknown_model_is_404_listing_the_served_names(two_models) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=two_models.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError) as refused:
        client.embeddings.create(model="other", input="a")
    for path, body in (
        ("/v1/embeddings", {"model": "other", "input": "a"}),
        ("/embed", {"texts": ["a"], "model": "other"}),
        ("/tokenize", {"texts": ["a"], "model": "other"}),
    ):
        r = post(two_models, path, body)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"], err["type"]) == (
            "model_not_found",
            "model",
            "invalid_request_error",
        )
        assert f"'{MINILM}', '{TINY}'" in err["message"] and "\n" not in err["message"]
    assert f"'{MINILM}', '{TINY}'" in str(refused.value)


def test_info_and_metrics_carry_each_model(two_models) -> None:
    info = httpx.get(two_models.url + "/info", timeout=10).json()
    assert info["model"] == MINILM and list(info["models"]) == [MINILM, TINY]
    assert info["models"][TINY]["limits"]["dimensions"] == [1, 16]
    assert info["models"][TINY]["served"]["name"] == TINY
    assert post(two_models, "/embed", {"texts": ["counted"], "model": TINY}).status_code == 200
    text = two_models.metrics()
    for name in (MINILM, TINY):
        assert re.search(rf'embedkit_served_model_info\{{.*name="{name}".*\}} 1', text), name
        assert re.search(rf'embedkit_inference_seconds_count\{{api="\w+",model="{name}"\}}', text)
    assert re.search(
        rf'embedkit_texts_embedded_total\{{model="{TINY}",route="/embed"\}} [1-9]', text
    )


def test_a_flood_on_one_model_is_shed_for_that_model_only(two_models, texts) -> None:
    """MiniLM gets waves of concurrent requests, each alone past its token budget (so one
    runs, the rest get 429); the tiny model, asked one text at a time all along, keeps
    answering 200 (its own budget: with one shared budget it would be refused while a
    MiniLM request is queued)."""
    long = texts[-1]  # 256 tokens for MiniLM once truncated
    flood = {"texts": [long] * 8, "model": MINILM}
    other = {"texts": ["still here"], "model": TINY}

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        flooded: list[httpx.Response] = []
        answered: list[httpx.Response] = []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for _ in range(3):
                wave = asyncio.gather(
                    *(client.post(two_models.url + "/embed", json=flood) for _ in range(12))
                )
                task = asyncio.ensure_future(wave)
                while not task.done():
                    answered.append(await client.post(two_models.url + "/embed", json=other))
                flooded.extend(await task)
        return flooded, answered

    flooded, answered = asyncio.run(run())
    statuses = [r.status_code for r in flooded]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in flooded if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["message"].startswith(f"model {MINILM}'s queue is full")
    assert refused.headers["x-embedkit-model"].startswith(f"{MINILM}:")
    assert len(answered) >= 3
    assert [r.status_code for r in answered] == [200] * len(answered), [
        r.text for r in answered if r.status_code != 200
    ]


def test_a_list_naming_an_unreleased_model_stops_startup(model_tag, launcher) -> None:
    env = {"EMBEDKIT_MODELS": json.dumps([model_tag, "tiny-unreleased:nope"])}
    server = launcher.start(model_tag, env, ready=False)
    line = server.wait_for_line("tiny-unreleased:nope")
    assert "could not be found" in line or "is not in the BentoML model store" in line
    server.proc.wait(timeout=60)
    assert server.proc.returncode != 0


def test_a_tampered_model_in_the_list_stops_startup_naming_it(
    model_tag, tiny_architecture, spoilable_version, caplog
) -> None:
    """What each worker does before building any session (service.py's __init__)."""
    from embedkit.serve.engine.startup import load_artifacts, with_models

    tampered, stored = spoilable_version(tiny_architecture("bert-dense")[1].path)
    with open(stored / "tokenizer.json", "a") as fh:
        fh.write(" ")

    @with_models([model_tag, tampered])
    class Service:
        pass

    with caplog.at_level(logging.ERROR), pytest.raises(ChecksumMismatch):
        load_artifacts(Service)
    (line,) = [r.getMessage() for r in caplog.records if "refuses to start" in r.getMessage()]
    assert f"model {tampered}: checksum mismatch for tokenizer.json" in line


def test_lists_that_cannot_serve_are_refused_in_one_line() -> None:
    from embedkit.serve.engine.startup import served_tags

    two = ["a:1", "b:1"]
    assert served_tags(Settings(models=two)) == two
    for settings, words in (
        (Settings(models=two, topology="split"), "topology=single"),
        (Settings(models=two, variant="fused-fp32"), "EMBEDKIT_MODELS"),
        (Settings(models=["a:1", "a:1"]), "a:1 twice"),
    ):
        with pytest.raises(ConfigurationError, match=words) as refused:
            served_tags(settings)
        assert "\n" not in str(refused.value)


def test_two_models_of_one_name_are_refused_in_one_line(fp32_artifact) -> None:
    from embedkit.serve.pipeline.registry import served_names

    with pytest.raises(ConfigurationError, match=f"named {MINILM}") as refused:
        served_names([fp32_artifact, fp32_artifact], Settings())
    assert "\n" not in str(refused.value)
    renamed = Settings(served_model_name="minilm")
    assert served_names([fp32_artifact], renamed) == ["minilm"]


def test_the_service_class_carries_one_bento_model_per_served_tag() -> None:
    """BentoML collects a service's models from its class attributes: what `bentoml build`
    packs into the Bento and `bentoml serve` checks before any worker starts."""
    import os
    import subprocess
    import sys

    tags = ["all-minilm-l6-v2:aaaa", "tiny-bert-dense:bbbb"]
    show = "import service; print([str(m.tag) for m in service.EmbeddingAPI.models])"
    out = subprocess.run(
        [sys.executable, "-c", show],
        env={**os.environ, "EMBEDKIT_MODELS": json.dumps(tags)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == repr(tags)


def test_a_bento_argument_pins_the_list() -> None:
    """`bentoml build --arg models=TAG,TAG` (restored whenever that Bento serves) wins over
    settings, as `--arg model=TAG` does for one model."""
    from types import SimpleNamespace

    from embedkit.serve.engine.startup import served_tags

    env_list = Settings(models=["c:3"])
    pinned = SimpleNamespace(models="a:1, b:2")
    assert served_tags(env_list, pinned) == ["a:1", "b:2"]
    assert served_tags(env_list, SimpleNamespace(model="a:1")) == ["a:1"]
    assert served_tags(env_list, SimpleNamespace()) == ["c:3"]


def test_reembed_picks_a_model_of_several(two_models, tiny, texts, tmp_path: Path) -> None:
    """`embedkit reembed --model` embeds with the named model and records its identity;
    a model the deployment does not serve is refused before any work, naming those served."""
    from tests.http.test_operations import read_output, write_corpus
    from typer.testing import CliRunner

    from embedkit.cli import app

    corpus = tmp_path / "corpus.jsonl"
    ids = write_corpus(corpus, texts[:12])
    args = ["reembed", str(corpus), "--url", two_models.url, "--chunk-size", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--model", TINY])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["served"].startswith(f"{TINY}:")
    got_ids, got = read_output(tmp_path / "out")
    assert got_ids == ids
    want = load_reference(tiny[0]).encode(texts[:12], convert_to_numpy=True)
    assert_contract_parity(got, want)

    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o2"), "--model", "x"])
    assert refused.exit_code == 1
    assert "does not serve model 'x'" in refused.output and repr(TINY) in refused.output
