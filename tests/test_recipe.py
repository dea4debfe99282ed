"""Recipes and the sentence-transformers config they read (no torch needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedkit.core.errors import ModelSourceError, UnsupportedModel
from embedkit.model.recipe import Pooling, Recipe, find_recipe, read_embedding_config


def test_default_recipe_reads_model_config(default_model_dir: Path) -> None:
    recipe = find_recipe(None)
    assert recipe.name == "all-minilm-l6-v2"
    config = read_embedding_config(default_model_dir)
    assert config.pooling is Pooling.MEAN
    assert config.max_seq_length == 256  # from sentence_bert_config.json, not tokenizer.json's 128
    assert config.normalize is True
    assert config.dimension == 384
    assert config.do_lower_case is False


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        read_embedding_config(tmp_path / "nope")


def test_non_sentence_transformers_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="not a sentence-transformers model"):
        read_embedding_config(tmp_path)


def _copy_with_pooling(src: Path, dest: Path, **flags: bool) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "1_Pooling" / "config.json").read_text())
    for key in list(cfg):
        if key.startswith("pooling_mode"):
            cfg[key] = False
    cfg.update(flags)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return dest


def test_unsupported_pooling_mode(default_model_dir: Path, tmp_path: Path) -> None:
    model = _copy_with_pooling(
        default_model_dir, tmp_path / "m", pooling_mode_weightedmean_tokens=True
    )
    with pytest.raises(UnsupportedModel, match="weightedmean"):
        read_embedding_config(model)


def test_two_pooling_modes_refused(default_model_dir: Path, tmp_path: Path) -> None:
    model = _copy_with_pooling(
        default_model_dir,
        tmp_path / "m",
        pooling_mode_cls_token=True,
        pooling_mode_mean_tokens=True,
    )
    with pytest.raises(UnsupportedModel, match="exactly one mode"):
        read_embedding_config(model)


def test_bad_recipe_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: UPPER CASE\nmodel_id: x\nsource: {path: /tmp}\n")
    with pytest.raises(ModelSourceError, match="invalid"):
        Recipe.load(bad)


def test_unknown_recipe_name() -> None:
    with pytest.raises(ModelSourceError, match="neither"):
        find_recipe("no-such-model")


def test_undeclared_max_length_is_the_tokenizer_limit_capped_at_the_positions(
    tmp_path: Path,
) -> None:
    # sentence-transformers' rule; XLM-R declares 514 positions for 512 tokens.
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True})
    )
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"path": "", "type": "sentence_transformers.models.Transformer"},
                {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 514}))
    tokenizer_config = tmp_path / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({"model_max_length": 512}))
    assert read_embedding_config(tmp_path).max_seq_length == 512
    tokenizer_config.write_text(json.dumps({"model_max_length": 1_000_000_000_000}))
    assert read_embedding_config(tmp_path).max_seq_length == 514
    tokenizer_config.unlink()
    assert read_embedding_config(tmp_path).max_seq_length == 514
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="cannot determine max_seq_length"):
        read_embedding_config(tmp_path)
