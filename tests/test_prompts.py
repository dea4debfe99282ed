"""Prompts: read from the model (a recipe may add or override), stored in the manifest, and
applied by the engine, the Embedder and the front's jobs as ``SentenceTransformer.encode(
prompt_name=...)`` does, including pooling that leaves the prompt out (include_prompt: false)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter
from tests.tiny_models import PROMPTS, build_tiny_st_model

from embedkit.core.errors import ModelSourceError, UnknownPrompt
from embedkit.core.settings import Settings
from embedkit.model.artifact import MANIFEST, Artifact
from embedkit.model.export import export, load_reference
from embedkit.model.recipe import Recipe, Source, read_prompt_config
from embedkit.quality import contract
from embedkit.runtime.engine import Engine
from embedkit.runtime.prompts import Prompts
from embedkit.serve.edge.schemas import EmbeddingsRequest, EmbedRequest, Item
from embedkit.serve.engine.embedder import EmbedderCore
from embedkit.serve.pipeline.jobs import native_job, openai_job
from embedkit.variants.quantize import build_variant

CPU = Settings(providers=["CPUExecutionProvider"], intra_op_threads=1)
TEXTS = [
    "a short text",
    "",
    "a somewhat longer sentence with more word pieces in it",
    " ".join(["word"] * 200),  # over max_seq_length: the prompt counts against the limit
]


@pytest.fixture(scope="module")
def engine(prompt_artifact: Artifact) -> Engine:
    return Engine(prompt_artifact, CPU)


def test_manifest_records_prompts_and_the_pooling_mask(
    prompt_artifact: Artifact, fp32_artifact: Artifact
) -> None:
    m = prompt_artifact.manifest
    assert m.format_version == 4
    assert m.prompts == PROMPTS and m.default_prompt_name is None
    assert m.embedding_config.include_prompt is False
    assert m.inputs == ["input_ids", "attention_mask", "pooling_mask"]
    assert m.pooling_mask_input == "pooling_mask"
    assert m.summary()["prompts"] == "query,passage"
    # A model that pools its prompt keeps the two-input graph: the default path is unchanged.
    default = fp32_artifact.manifest
    assert default.pooling_mask_input is None and default.prompts == {}
    assert default.inputs == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("include_prompt", [False, True])
def test_parity_for_every_prompt_and_the_default(
    include_prompt: bool,
    tmp_path: Path,
    default_model_dir: Path,
    prompt_artifact: Artifact,
    prompt_model_dir: Path,
) -> None:
    if include_prompt:  # CLS pooling, a default prompt, a Dense head
        src = build_tiny_st_model(
            tmp_path / "src",
            default_model_dir,
            pooling="cls",
            dense_out=8,
            prompts=PROMPTS,
            default_prompt_name="passage",
        )
        artifact = export(
            Recipe(name="tiny-cls", model_id="t", source=Source(path=src)), tmp_path / "a"
        )
        assert artifact.manifest.pooling_mask_input is None
    else:
        artifact, src = prompt_artifact, prompt_model_dir
    engine = Engine(artifact, CPU)
    reference = load_reference(src)
    report = contract.check_prompt_parity(engine, reference, TEXTS)
    assert report["passed"], report
    assert set(report["prompts"]) == set(PROMPTS)
    # No prompt_name: both apply the model's default (or none), the contract's main parity.
    assert contract.check_parity(engine, reference, {"default": TEXTS})["passed"]
    if include_prompt:  # the default really applies: it differs from the bare text
        bare = engine.encode(TEXTS[:1], prompt_name="query")
        assert not np.allclose(engine.encode(TEXTS[:1]), bare, atol=1e-4)


def test_the_pooling_mask_leaves_the_prompt_out(engine: Engine) -> None:
    prompt = engine.prompts.resolve("query")
    assert prompt is not None and prompt.pool_from == 3  # [CLS] query :
    ids = engine.tokenizer.encode(prompt.apply(["hello world"]))
    skipped, _ = engine.embed_ids(ids, [prompt.pool_from])
    pooled_all, _ = engine.embed_ids(ids)
    assert not np.allclose(skipped, pooled_all, atol=1e-3)
    np.testing.assert_allclose(
        skipped[0] / np.linalg.norm(skipped[0]),
        engine.encode(["hello world"], prompt_name="query")[0],
        atol=1e-6,
    )


def test_the_embedder_pools_items_with_their_offsets(
    prompt_artifact: Artifact, engine: Engine
) -> None:
    prompt = engine.prompts.resolve("passage")
    assert prompt is not None
    ids = engine.tokenizer.encode(prompt.apply(["one text", "another, longer text"]))
    items: list[Item] = [(time.time(), row, prompt.pool_from) for row in ids]
    items.append((time.time(), engine.tokenizer.encode(["plain"])[0]))  # a pair: no offset
    # The wire format (split topology) keeps pairs and triples apart.
    wire = TypeAdapter(list[Item]).validate_json(json.dumps(items))
    assert [len(item) for item in wire] == [3, 3, 2]
    core = EmbedderCore(prompt_artifact, CPU)
    raw = core.embed(wire, "bulk")
    expected = np.vstack(
        [
            engine.encode(
                ["one text", "another, longer text"], prompt_name="passage", normalize=False
            ),
            engine.encode(["plain"], normalize=False),
        ]
    )
    np.testing.assert_allclose(raw, expected, atol=1e-5)


def test_jobs_take_the_named_prompt_else_the_default_never_the_lane(
    prompt_artifact: Artifact, engine: Engine
) -> None:
    tok, prompts = engine.tokenizer, engine.prompts

    def openai(**body: object):
        req = EmbeddingsRequest(model="tiny-prompts", **body)
        return openai_job(
            req, tok, CPU, served="tiny-prompts", model_dim=32, normalize=True, prompts=prompts
        )

    single = openai(input="what is a prompt")
    assert single.lane == "query"  # the query lane, but no query prompt
    assert single.ids == tok.encode(["what is a prompt"]) and single.pool_from is None
    asked = openai(input="what is a prompt", prompt_name="query")
    assert asked.ids == tok.encode(["query: what is a prompt"]) and asked.pool_from == [3]
    assert asked.tokens == single.tokens + 2  # usage counts the prompt's tokens
    token_input = openai(input=[[2054, 2003]], prompt_name="query")
    assert token_input.ids == [[101, *tok.content_ids("query: "), 2054, 2003, 102]]

    # A model with a default prompt: a request naming none gets it.
    with_default = Prompts(
        prompt_artifact.manifest.model_copy(update={"default_prompt_name": "passage"}), tok
    )
    job = native_job(
        EmbedRequest(texts=["x"]), tok, CPU, lane="bulk", model_dim=32, prompts=with_default
    )
    assert job.ids == tok.encode(["passage: x"])

    with pytest.raises(UnknownPrompt, match=r"'nope'.*known prompts: 'query', 'passage'") as info:
        native_job(
            EmbedRequest(texts=["x"], prompt_name="nope"),
            tok,
            CPU,
            lane="bulk",
            model_dim=32,
            prompts=prompts,
        )
    assert info.value.status == 400 and info.value.code == "unknown_prompt"
    assert info.value.param == "prompt_name"


def test_recipe_adds_and_overrides_prompts(tmp_path: Path, prompt_model_dir: Path) -> None:
    recipe = Recipe(
        name="r",
        model_id="r",
        source=Source(path=prompt_model_dir),
        prompts={"passage": "doc: ", "title": "title: "},
        default_prompt_name="title",
    )
    cfg = read_prompt_config(prompt_model_dir, recipe)
    assert cfg.prompts == {"query": "query: ", "passage": "doc: ", "title": "title: "}
    assert cfg.default_prompt_name == "title"
    bad = recipe.model_copy(update={"default_prompt_name": "nope"})
    with pytest.raises(ModelSourceError, match="'nope' is not one of the prompts"):
        read_prompt_config(prompt_model_dir, bad)
    # sentence-transformers' null placeholders are not prompts.
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": None, "document": ""}})
    )
    assert read_prompt_config(tmp_path).prompts == {"document": ""}


def test_a_format_2_manifest_still_loads_and_serves(
    artifact_copy: Path, fp32_artifact: Artifact
) -> None:
    raw = json.loads((artifact_copy / MANIFEST).read_text())
    for key in ("prompts", "default_prompt_name", "pooling_mask_input"):
        del raw[key]
    del raw["embedding"]["include_prompt"]
    raw["format_version"] = 2
    (artifact_copy / MANIFEST).write_text(json.dumps(raw))
    old = Artifact.load(artifact_copy)
    assert old.manifest.format_version == 2 and old.manifest.prompts == {}
    assert old.manifest.pooling_mask_input is None and old.manifest.embedding_config.include_prompt
    texts = ["an artifact from before prompts"]
    np.testing.assert_allclose(
        Engine(old, CPU).encode(texts), Engine(fp32_artifact, CPU).encode(texts), atol=1e-6
    )
    with pytest.raises(UnknownPrompt, match="defines no prompts"):
        Engine(old, CPU).encode(texts, prompt_name="query")


@pytest.mark.parametrize(
    ("kind", "options"),
    [("fused-fp32", {}), ("dynamic-int8", {}), ("static-int8", {"size": 32})],
)
def test_variants_of_a_prompt_model_build_and_keep_the_prompts(
    kind: str, options: dict[str, Any], prompt_artifact: Artifact, engine: Engine, tmp_path: Path
) -> None:
    variant = build_variant(prompt_artifact, kind, tmp_path / kind, **options)
    m = variant.manifest
    assert m.prompts == PROMPTS and m.pooling_mask_input == "pooling_mask"
    assert m.inputs == prompt_artifact.manifest.inputs
    texts = TEXTS[:3]
    got = Engine(variant, CPU, judging=True).encode(texts, prompt_name="query")
    want = engine.encode(texts, prompt_name="query")
    assert float((got * want).sum(axis=1).min()) > 0.99


def test_left_truncation_cuts_the_text_and_keeps_the_prompt(
    engine: Engine, prompt_model_dir: Path
) -> None:
    """truncation_direction 'left' with a prompt: the text loses its start, the prompt
    stays whole, so the positions an include_prompt=false pooling skips are exactly the
    prompt's; the vector is PyTorch's for the prompt + the text's surviving tail."""
    tok, prompts = engine.tokenizer, engine.prompts
    prompt = prompts.resolve("query")
    assert prompt is not None and prompt.pool_from == 1 + len(prompt.ids)
    words = ["first", *(["word"] * 300), "one", "two", "three"]
    text = " ".join(words)
    content = tok.content_ids(text)
    assert len(content) == len(words)  # one token per word: the tail is a text of its own
    fits = tok.max_length - 2 - len(prompt.ids)  # the text's tokens that fit behind the prompt
    want = [101, *prompt.ids, *content[-fits:], 102]

    job = native_job(
        EmbedRequest(texts=[text], prompt_name="query", truncation_direction="left"),
        tok,
        CPU,
        lane="bulk",
        model_dim=32,
        prompts=prompts,
    )
    assert job.ids == [want] and job.pool_from == [prompt.pool_from] and job.truncated == 1

    def openai(raw: object) -> list[list[int]]:
        req = EmbeddingsRequest(
            model="m", input=raw, prompt_name="query", truncation_direction="left"
        )
        got = openai_job(req, tok, CPU, served="m", model_dim=32, normalize=True, prompts=prompts)
        assert got.pool_from == [prompt.pool_from] and got.truncated == 1
        return got.ids

    assert openai(text) == [want]
    assert openai([content]) == [want]  # token-id input: the prompt's tokens stay too
    # The right side (the manifest's, and the one PyTorch parity is checked on) is unchanged.
    right = native_job(
        EmbedRequest(texts=[text], prompt_name="query"),
        tok,
        CPU,
        lane="bulk",
        model_dim=32,
        prompts=prompts,
    )
    assert right.ids == tok.encode(prompt.apply([text]))
    assert right.ids[0][: prompt.pool_from] == want[: prompt.pool_from]

    # What gets pooled is the text's tail alone, behind the whole prompt: as PyTorch embeds
    # the tail with the prompt (no truncation needed there).
    tail = " ".join(words[-fits:])
    assert tok.content_ids(tail) == content[-fits:]
    raw, _ = engine.embed_ids(job.ids, job.pool_from)
    got = raw[0] / np.linalg.norm(raw[0])
    ref = load_reference(prompt_model_dir).encode(
        [tail], prompt_name="query", convert_to_numpy=True, normalize_embeddings=True
    )[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got, engine.encode([tail], prompt_name="query")[0], atol=1e-6)


def test_an_engine_cutting_from_the_left_keeps_the_prompt(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine.encode (the release's and the benchmarks' path) cuts as the routes do: with a
    manifest whose truncation side is left, the prompt stays and the text's start goes."""
    left = engine.tokenizer.spec.model_copy(update={"truncation_side": "left"})
    monkeypatch.setattr(engine.tokenizer, "spec", left)
    words = ["first", *(["word"] * 300), "one", "two", "three"]
    prompt = engine.prompts.resolve("query")
    assert prompt is not None
    fits = engine.tokenizer.max_length - 2 - len(prompt.ids)
    got = engine.encode([" ".join(words)], prompt_name="query")[0]
    want = engine.encode([" ".join(words[-fits:])], prompt_name="query")[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
