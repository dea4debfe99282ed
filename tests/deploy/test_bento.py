"""The CPU and GPU Bentos: built offline, audited, and the CPU one served for real.

The session's fp32 artifact is registered twice; the Bentos are built against the
OLDER version, so every check below that finds the pinned tag (bento.yaml,
`bentoml get`, the served /info) also shows that `:latest` was not what got packed.

`bentoml serve <bento tag>` runs the built Bento from the local store with THIS
venv's packages (no container engine here): it proves the Bento's code, model pin,
envs and service config, not the image's requirements — those are checked by
reading the built requirements.txt and the emitted Dockerfile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from tests.servers import Launcher

from embedkit.core.errors import BuildError
from embedkit.deploy import bento
from embedkit_bench.server import BENTOML

EXPORT_SIDE = ("torch", "transformers", "optimum", "sentence-transformers", "sentence_transformers")


@pytest.fixture(scope="module")
def tags(fp32_artifact) -> tuple[str, str]:
    """(pinned, newer): two versions of the same model; the Bentos pin the first."""
    from embedkit.model.artifact import register

    return register(fp32_artifact), register(fp32_artifact)


@pytest.fixture(scope="module")
def out_dir(session_dir: Path) -> Path:
    return session_dir / "bento-build"


@pytest.fixture(scope="module")
def built(tags: tuple[str, str], out_dir: Path) -> dict[str, bento.Built]:
    return {v: bento.build(v, tags[0], out_dir) for v in bento.VARIANTS}


@pytest.fixture(scope="module")
def root_built(tags: tuple[str, str], pytestconfig: pytest.Config) -> str:
    """What a BentoML user types at the repo root: `bentoml build` (the committed
    bentofile.yaml), pinned with the Bento argument service.py reads."""
    done = subprocess.run(
        [BENTOML, "build", "--arg", f"model={tags[0]}", "--output", "tag"],
        cwd=pytestconfig.rootpath,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def _info(b: bento.Built) -> dict[str, Any]:
    return yaml.safe_load((b.path / "bento.yaml").read_text())


def _requirements(b: bento.Built) -> list[str]:
    """Requirement lines without their ``--hash`` options (the CPU Bento's are hashed)."""
    return [ln.split(" --hash=")[0] for ln in bento.requirement_lines(b.path)]


# --- what the Bentos contain ----------------------------------------------------------


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_requirements_are_pinned_torch_free_and_from_the_index(
    built: dict[str, bento.Built], variant: str
) -> None:
    reqs = _requirements(built[variant])
    for line in reqs:
        name = line.split("==")[0].split("[")[0].strip().lower()
        assert name not in EXPORT_SIDE, f"export dependency in the {variant} image: {line}"
        assert "file://" not in line and "://" not in line, f"URL requirement: {line}"
        assert "==" in line, f"unpinned requirement: {line}"
    assert f"bentoml=={version('bentoml')}" in reqs
    runtime = {"cpu": "onnxruntime==", "gpu": "onnxruntime-gpu=="}[variant]
    other = {"cpu": "onnxruntime-gpu==", "gpu": "onnxruntime=="}[variant]
    assert any(r.startswith(runtime) for r in reqs)
    assert not any(r.startswith(other) for r in reqs), "both onnxruntime builds in one image"
    # The CPU image carries exactly the pyproject pins (one source of truth).
    if variant == "cpu":
        assert f"onnxruntime=={version('onnxruntime')}" in reqs


def test_root_bentofile_is_the_generated_cpu_one(pytestconfig: pytest.Config) -> None:
    committed = (pytestconfig.rootpath / "bentofile.yaml").read_text()
    assert committed == bento.render_bentofile(bento.bentofile(bento.VARIANTS["cpu"])), (
        "bentofile.yaml is stale: embedkit bentofile > bentofile.yaml"
    )


def test_root_build_carries_the_package_but_not_the_evaluation_data(
    root_built: str, tags: tuple[str, str]
) -> None:
    path = bento._bento_path(root_built)
    assert (path / "src" / "service.py").is_file()
    assert (path / "src" / "src" / "embedkit" / "serve" / "pipeline" / "front.py").is_file()
    assert not (path / "src" / "src" / "embedkit" / "data" / "evaldata").exists()
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert bento.pinned_models(info) == {tags[0]}


def test_the_bento_carries_no_tooling(root_built: str, pytestconfig: pytest.Config) -> None:
    """Measurement code (src/embedkit_bench: benchmarks, peers, soak, GPU check) stays in
    the checkout: the built Bento's file list shares no file with it."""
    src = pytestconfig.rootpath / "src"
    tooling = {p.relative_to(src).as_posix() for p in (src / "embedkit_bench").rglob("*.py")}
    assert len(tooling) > 10, "the tooling package moved: update this test"
    carried = bento._bento_path(root_built) / "src" / "src"
    files = {p.relative_to(carried).as_posix() for p in carried.rglob("*") if p.is_file()}
    assert files & tooling == set()
    assert not [f for f in files if f.startswith("embedkit_bench/")]
    names = {Path(f).stem for f in tooling} - {"__init__", "cli", "report"}
    assert not [f for f in files if Path(f).stem in names], "a tooling module came back"


def test_unsigned_model_is_warned_about_at_build_time(built: dict[str, bento.Built]) -> None:
    # The session's registrations are unsigned; every deploy/k8s overlay requires signatures.
    for b in built.values():
        assert any("unsigned" in w and "REQUIRE_SIGNATURE" in w for w in b.warnings), b.warnings


def test_signed_model_builds_without_warning(fp32_artifact, tmp_path: Path) -> None:
    from embedkit.model.artifact import Artifact, register
    from embedkit.model.signing import generate_keypair, sign

    copy = tmp_path / "signed"
    shutil.copytree(fp32_artifact.path, copy)
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    sign(copy, tmp_path / "k.pem")
    assert bento.trust_warnings(register(Artifact.load(copy))) == []


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_bento_pins_the_exact_model_version(
    built: dict[str, bento.Built], tags: tuple[str, str], variant: str
) -> None:
    pinned, newer = tags
    info = _info(built[variant])
    assert bento.pinned_models(info) == {pinned}
    assert info["args"]["model"] == pinned  # what service.py reads when the Bento is served
    assert {e["name"]: e["value"] for e in info["envs"]}["EMBEDKIT_MODEL"] == pinned
    shown = subprocess.run(
        [BENTOML, "get", built[variant].tag], capture_output=True, text=True, check=True
    ).stdout
    assert pinned in shown and newer not in shown


def test_service_resources_follow_the_variant(built: dict[str, bento.Built]) -> None:
    def embedder(b: bento.Built) -> dict[str, Any]:  # topology=single: one service owns ORT
        return next(s for s in _info(b)["services"] if s["name"] == "embedkit")

    assert embedder(built["gpu"])["config"]["resources"] == {"gpu": 1}
    assert "gpu" not in embedder(built["cpu"])["config"]["resources"]
    gpu_envs = {e["name"]: e["value"] for e in _info(built["gpu"])["envs"]}
    assert gpu_envs["EMBEDKIT_GPU"] == "true"
    assert gpu_envs["EMBEDKIT_PROVIDERS"].startswith('["TensorrtExecutionProvider"')
    assert gpu_envs["EMBEDKIT_QUERY_CONTINUOUS_BATCHING"] == "false"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_is_emitted_and_runs_as_non_root(
    built: dict[str, bento.Built], out_dir: Path, variant: str
) -> None:
    dockerfile = out_dir / variant / "Dockerfile"
    assert built[variant].dockerfile == dockerfile and dockerfile.is_file()
    text = dockerfile.read_text()
    assert bento.container_user(text) == "bentoml"
    assert "ARG BENTO_USER_UID=1034" in text  # the UID deploy/k8s runs as
    base = {"cpu": "FROM python:3.11-slim", "gpu": f"FROM {bento.CUDA_BASE_IMAGE}"}[variant]
    assert base in text
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in text


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_audit_passes_on_the_built_bentos(
    built: dict[str, bento.Built], tags: tuple[str, str], variant: str
) -> None:
    b = built[variant]
    assert bento.audit(b.path, variant, tags[0], dockerfile=b.dockerfile) == []


# --- the audit fails on each defect it exists for ---------------------------------------


def _append(rel: str, text: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        with open(root / rel, "a") as fh:
            fh.write(text)

    return mutate


def _replace(rel: str, old: str, new: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        assert old in path.read_text(), f"mutation target {old!r} missing from {rel}"
        path.write_text(path.read_text().replace(old, new))

    return mutate


def _drop_model_argument(root: Path) -> None:
    info = yaml.safe_load((root / "bento.yaml").read_text())
    info["args"] = {}
    (root / "bento.yaml").write_text(yaml.safe_dump(info))


REQS = "env/python/requirements.txt"
MUTATIONS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "torch": ("cpu", _append(REQS, "torch==2.13.0\n"), "export dependency"),
    "sentence-transformers": ("gpu", _append(REQS, "sentence-transformers==5.7.0\n"), "export"),
    "file-url": ("cpu", _append(REQS, "bentoml @ file:///tmp/bentoml.whl\n"), "URL or local"),
    "unpinned": ("cpu", _append(REQS, "requests>=2\n"), "not pinned"),
    "unhashed": ("cpu", _append(REQS, "requests==2.32.0\n"), "without a hash"),
    "both-runtimes": ("gpu", _append(REQS, "onnxruntime==1.32.0\n"), "both provide"),
    "root-user": ("cpu", _replace("env/docker/Dockerfile", "USER bentoml", "USER root"), "root"),
    "no-model-argument": ("cpu", _drop_model_argument, "Bento argument model"),
    "other-model-version": ("cpu", lambda root: None, "pins models"),  # audited vs the newer tag
}


@pytest.mark.parametrize("defect", sorted(MUTATIONS))
def test_audit_reports_each_defect(
    built: dict[str, bento.Built], tags: tuple[str, str], tmp_path: Path, defect: str
) -> None:
    variant, mutate, expected = MUTATIONS[defect]
    copy = tmp_path / "bento"
    shutil.copytree(built[variant].path, copy)
    mutate(copy)
    expect_tag = tags[1] if defect == "other-model-version" else tags[0]
    problems = bento.audit(copy, variant, expect_tag)
    assert any(expected in p for p in problems), problems


def test_audit_refuses_an_openvino_model_in_an_image_without_openvino(
    built: dict[str, bento.Built], fp32_artifact, tmp_path: Path
) -> None:
    """The GPU image carries ONNX Runtime only: an OpenVINO variant pinned into it would be
    refused at startup with no fp32 parent in the Bento to fall back to. The CPU image
    carries OpenVINO, so there it is fit."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import bentoml

    from embedkit.model.artifact import amend, register, seal
    from embedkit.variants.quantize import build_variant

    # A name of its own: the session's store is shared, and NAME:latest is a release's baseline.
    ov = build_variant(fp32_artifact, "openvino-fp32", tmp_path / "ov", write=False)
    ov_tag = register(seal(amend(ov, {"name": "audit-openvino"})))
    try:
        gpu = bento.audit(built["gpu"].path, "gpu", ov_tag)
        cpu = bento.audit(built["cpu"].path, "cpu", ov_tag)
    finally:
        bentoml.models.delete(ov_tag)
    assert any(f"model {ov_tag} runs on openvino" in p for p in gpu), gpu
    assert not any("runs on openvino" in p for p in cpu), cpu


def test_serving_requirements_refuse_export_and_unpinned_deps(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    optional = '[project.optional-dependencies]\nopenvino = ["openvino==2026.4.1", "nncf==3.4.0"]\n'
    pyproject.write_text('[project]\ndependencies = ["numpy==2.4.6", "torch==2.13.0"]\n' + optional)
    with pytest.raises(BuildError, match="export dependency"):
        bento.serving_requirements(bento.VARIANTS["cpu"], pyproject)
    pyproject.write_text('[project]\ndependencies = ["numpy>=2"]\n' + optional)
    with pytest.raises(BuildError, match="not pinned"):
        bento.serving_requirements(bento.VARIANTS["cpu"], pyproject)
    pyproject.write_text('[project]\ndependencies = ["onnxruntime==1.32.0"]\n' + optional)
    gpu = bento.serving_requirements(bento.VARIANTS["gpu"], pyproject)
    assert gpu == [bento.ORT_GPU, bento.TENSORRT_LIBS]
    # The CPU image takes OpenVINO (not NNCF, a build-side quantizer) from the extra, pinned.
    cpu = bento.serving_requirements(bento.VARIANTS["cpu"], pyproject)
    assert cpu == ["onnxruntime==1.32.0", "openvino==2026.4.1"]
    pyproject.write_text('[project]\ndependencies = ["onnxruntime==1.32.0"]\n')
    with pytest.raises(BuildError, match="openvino not among pyproject's optional"):
        bento.serving_requirements(bento.VARIANTS["cpu"], pyproject)


@pytest.mark.parametrize("tag", ["all-minilm-l6-v2:latest", "all-minilm-l6-v2"])
def test_build_refuses_a_floating_model_tag(tmp_path: Path, tag: str) -> None:
    with pytest.raises(BuildError, match="exact version"):
        bento.build("cpu", tag, tmp_path)


def test_unknown_variant_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown Bento variant"):
        bento.build("tpu", "m:v1", tmp_path)


# --- the built CPU Bento, served --------------------------------------------------------


@pytest.fixture(scope="module")
def served(root_built: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bentoml serve <bento tag>` of the repo-root build, from a folder outside the repo, on
    a free loopback port, torn down by process group."""
    workdir = tmp_path_factory.mktemp("serve-bento")
    # Nothing from the caller may choose the model: the Bento's own envs and pin must.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDKIT_")}
    env["HF_HUB_OFFLINE"] = "1"
    launch = Launcher(workdir)
    try:
        srv = launch.spawn(root_built, env, cwd=workdir, ready=False)
        launch.ready(srv, timeout=120)
        yield srv.url
    finally:
        launch.stop_all()


def test_served_root_bento_matches_the_in_process_engine(
    served: str,
    fp32_artifact,
    tags: tuple[str, str],
) -> None:
    from openai import OpenAI

    from embedkit.runtime.engine import Engine

    texts = ["A man is playing a guitar.", "Ein Mann spielt Gitarre.", "", "日本語のテキスト 🎸"]
    client = OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=60)
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    got = np.array(
        [d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32
    )
    want = Engine(fp32_artifact).encode(texts)
    assert got.shape == want.shape == (len(texts), 384)
    assert float(np.max(np.abs(got - want))) <= 1e-4
    one = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0])
    assert float(np.max(np.abs(np.array(one.data[0].embedding) - want[0]))) <= 1e-4
    # The server runs the pinned version, not the newer one registered after it.
    assert httpx.get(served + "/info", timeout=30).json()["tag"] == tags[0]
