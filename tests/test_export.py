"""Optimum export: the pooled graph, configuration from the model, other architectures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from tests.tiny_models import build_tiny_st_model

from embedkit.core.errors import ArtifactError, ModelSourceError
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.model.export import export, load_reference
from embedkit.model.recipe import Recipe, Source
from embedkit.quality.contract import check_parity
from embedkit.runtime.engine import Engine

CPU = Settings(providers=["CPUExecutionProvider"], intra_op_threads=1)
TEXTS = [
    "a short text",
    "",
    "a somewhat longer sentence with more word pieces in it",
    "CJK 自然言語",
]


def test_graph_returns_only_the_pooled_embedding(fp32_artifact: Artifact) -> None:
    model = onnx.load(str(fp32_artifact.model_path), load_external_data=False)
    outputs = [
        (o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
        for o in model.graph.output
    ]
    assert outputs == [("sentence_embedding", ["batch_size", 384])]
    inputs = {
        i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert inputs == {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "sequence_length"],
    }


def test_existing_artifact_is_never_overwritten(fp32_artifact: Artifact) -> None:
    from embedkit.model.recipe import find_recipe

    with pytest.raises(ArtifactError, match="immutable"):
        export(find_recipe(None), fp32_artifact.path)


def test_not_a_sentence_transformers_directory(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    recipe = Recipe.for_directory(tmp_path / "src")
    with pytest.raises(ModelSourceError, match="not a sentence-transformers model"):
        export(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("pooling", "normalize", "dense"),
    [
        ("cls", False, None),
        ("max", True, None),
        ("mean_sqrt_len_tokens", False, 16),
        ("mean", True, 8),
    ],
)
def test_tiny_models_match_pytorch(
    tmp_path: Path, default_model_dir: Path, pooling: str, normalize: bool, dense: int | None
) -> None:
    src = build_tiny_st_model(
        tmp_path / "src", default_model_dir, pooling=pooling, normalize=normalize, dense_out=dense
    )
    recipe = Recipe(name="tiny", model_id="tiny", source=Source(path=src))
    artifact = export(recipe, tmp_path / "art")
    m = artifact.manifest
    assert m.embedding_config.pooling.value == pooling
    assert m.embedding_config.normalize is normalize
    assert m.embedding_config.dimension == (dense or 32)
    assert m.tokenizer.max_length == 64
    engine = Engine(artifact, CPU)
    texts = [*TEXTS, " ".join(["word"] * 200)]  # beyond max_seq_length: truncated on both sides
    report = check_parity(engine, load_reference(src), {"tiny": texts})
    assert report["passed"], report
    vectors = engine.encode(texts)
    assert vectors.shape == (len(texts), m.embedding_config.dimension)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_export_of_copied_model_records_local_version(
    tmp_path: Path, default_model_dir: Path
) -> None:
    src = tmp_path / "copy"
    shutil.copytree(default_model_dir, src)
    recipe = Recipe.for_directory(src)
    assert recipe.name == "copy"
    assert recipe.source.resolve()[1] == "local"
