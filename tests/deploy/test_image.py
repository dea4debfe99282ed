"""The CPU image, built from nothing by scripts/build-image and run with podman.

The image is built when one of its inputs changed (the package and service source, the
lock, scripts/build-image, the signed test model, the base image) and kept for the next
run (tests/artifact_cache.py's folder holds its record); with nothing to reuse it is built
from nothing, base included.

What a stranger's deployment does: the image runs read-only as its non-root user,
serves vectors that match the PyTorch encoder through the `openai` client, carries
no export packages, refuses a tampered model, and the rendered CPU overlay runs under
`podman kube play` with its probes passing, serving the signed model and refusing a
model its trusted key did not sign. Skips only where podman cannot run a container.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedkit.deploy import bento, container, supply
from embedkit.model.artifact import Artifact
from embedkit.quality.contract import MAX_ABS_DIFF, MIN_COSINE, compare

READY_BUDGET_S = 60  # model load + warm-up on 2 cores; measured ~8-15 s (docs/bento.md)
EXPORT_SIDE = ("torch", "transformers", "optimum", "sentence-transformers", "onnxscript")
BASE = "localhost/embedkit-base:bookworm-py3.11-r2"  # scripts/build-image's
# What `podman image inspect --format '{{.Size}}'` may report, in MB (10**6 bytes): 1,302 with
# BentoML's own Debian template (build-essential, git, uv), 598 with the slim one
# (src/embedkit/deploy/slim.Dockerfile.j2), 656 with stripped OpenVINO added on the
# trimmed base (153). docs/bento.md.
MAX_IMAGE_MB = 700
REEMBED_JOB = Path("deploy") / "k8s" / "jobs" / "reembed" / "job.yaml"
# Nothing in the image compiles, fetches sources or installs: BentoML's template left these in.
BUILD_TOOLS = ("gcc", "cc", "make", "git", "uv")


# What decides the image's bytes besides the model and the base (code_digest: every file).
IMAGE_INPUTS = ("src/embedkit", "service.py", "locks/serving-cpu.txt", "scripts/build-image")


@pytest.fixture(scope="module")
def keys(test_keys: dict[str, Path]) -> dict[str, Path]:
    return test_keys


@pytest.fixture(scope="module")
def signed(
    fp32_artifact, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """(tag, directory) of the session's fp32 artifact signed with the release key. Key and
    artifact are the same every session, so are the signature and the version (named after
    the signed manifest): an image built in an earlier run serves this very tag."""
    import hashlib

    from embedkit.model.artifact import Artifact, register
    from embedkit.model.signing import sign

    copy = tmp_path_factory.mktemp("signed") / "fp32"
    shutil.copytree(fp32_artifact.path, copy)
    sign(copy, keys["private"])
    signed_manifest = (copy / "manifest.json").read_bytes() + (copy / "manifest.sig").read_bytes()
    version = "t" + hashlib.sha256(signed_manifest).hexdigest()[:15]
    return register(Artifact.load(copy), version=version), copy


def _image_id(ref: str) -> str | None:
    done = container.podman("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _podman_cannot_run() -> str | None:
    """Why podman cannot run a container here, or None when it can."""
    try:
        done = container.podman("run", "--rm", BASE, "true", check=False, timeout=120)
    except (container.BuildError, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip()[-300:]


@pytest.fixture(scope="module")
def built_image(
    signed: tuple[str, Path],
    keys: dict[str, Path],
    session_dir: Path,
    pytestconfig: pytest.Config,
    artifact_cache,
) -> tuple[str, Path]:
    """(image reference, its signed record folder): the image of an earlier run when its
    inputs are the same and podman still holds it, else scripts/build-image on the signed
    model's CPU Bento (installs podman when missing, makes the base when absent)."""
    from tests.artifact_cache import artifact_files, code_digest

    key = artifact_cache.key(
        {
            "image": code_digest(IMAGE_INPUTS, suffixes=()),
            "model": artifact_files(Artifact.load(signed[1])),
            "signature": (signed[1] / "manifest.sig").read_text(),
        }
    )
    entry = artifact_cache.root / f"image-{key}"
    if (entry / "image.json").is_file() and shutil.which("podman"):
        known = json.loads((entry / "image.json").read_text())
        if _image_id(known["ref"]) == known["id"] and _image_id(BASE) == known["base"]:
            print(f"\nimage {known['ref']}: reused (inputs unchanged, key {key})")
            return known["ref"], entry / "record"
    ref, record = _build_image(signed, keys, session_dir, pytestconfig)
    # Keep this one for the next run; earlier keys' images and records are of no more use.
    for old in artifact_cache.root.glob("image-*/image.json"):
        stale = json.loads(old.read_text())["ref"]
        if stale != ref:
            container.podman("rmi", "-f", stale, check=False)
        shutil.rmtree(old.parent, ignore_errors=True)
    entry.mkdir(parents=True)
    shutil.copytree(record, entry / "record")
    known = {"ref": ref, "id": _image_id(ref), "base": _image_id(BASE)}
    (entry / "image.json").write_text(json.dumps(known) + "\n")
    return ref, entry / "record"


@pytest.fixture(scope="module")
def image(built_image: tuple[str, Path]) -> str:
    return built_image[0]


def _build_image(
    signed: tuple[str, Path], keys: dict[str, Path], session_dir: Path, config: pytest.Config
) -> tuple[str, Path]:
    built = bento.build("cpu", signed[0], session_dir / "image-bento")
    assert built.warnings == ()  # signed: nothing for the overlays to refuse
    started = time.monotonic()
    done = subprocess.run(
        [
            str(config.rootpath / "scripts" / "build-image"),
            *("--bento-tag", built.tag),
            *("--signing-key", str(keys["private"])),  # signs the image record too
        ],
        cwd=config.rootpath,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        why = _podman_cannot_run()
        if why is not None:
            pytest.skip(f"podman cannot run a container here: {why}")
        pytest.fail(f"scripts/build-image failed: {done.stderr[-1500:]}")
    ref = done.stdout.strip().splitlines()[-1]
    size = int(container.podman("image", "inspect", "--format", "{{.Size}}", ref).stdout)
    print(f"\nimage {ref}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")
    return ref, config.rootpath / supply.RECORDS / ref.rsplit("/", 1)[-1].replace(":", "-")


@pytest.fixture(scope="module")
def running(image: str, keys: dict[str, Path]) -> Iterator[container.Running]:
    with container.run_image(
        image, f"embedkit-test-{uuid.uuid4().hex[:8]}", trusted_key=keys["public"]
    ) as run:
        yield run


def _texts() -> list[str]:
    from embedkit.model import evaldata

    return [
        *evaldata.sts_sentences("test")[:48],
        "",
        "日本語のテキスト 🎸",
        *evaldata.long_texts(300, 2),
    ]


def _served_vectors(url: str, texts: list[str]) -> np.ndarray:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])


def test_image_serves_vectors_matching_pytorch(
    running: container.Running, reference_vectors
) -> None:
    assert running.ready_s is not None, running.logs()[-2000:]
    assert running.ready_s <= READY_BUDGET_S
    texts = _texts()
    want = reference_vectors(texts)
    stats = compare(want, _served_vectors(running.url, texts))
    assert stats["min_cosine"] >= MIN_COSINE and stats["max_abs_diff"] <= MAX_ABS_DIFF, stats


def test_image_is_non_root_read_only_and_torch_free(running: container.Running) -> None:
    assert container.podman("exec", running.name, "id", "-u").stdout.strip() == "1034"
    wrote = container.podman("exec", running.name, "touch", "/home/bentoml/bento/x", check=False)
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr
    # What `pip list` reads (the venv has no pip): every installed distribution's name.
    listed = container.podman(
        "exec",
        running.name,
        "/app/.venv/bin/python",
        "-c",
        "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))",
    ).stdout.lower()
    names = {n.replace("_", "-") for n in listed.split()}
    assert {"onnxruntime", "bentoml", "tokenizers"} <= names
    assert not names & set(EXPORT_SIDE), names & set(EXPORT_SIDE)


def test_image_is_slim(image: str) -> None:
    """The image it built is within MAX_IMAGE_MB and carries no build tooling."""
    size = int(container.podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= MAX_IMAGE_MB * 1_000_000, f"{image}: {size / 1e6:.0f} MB > {MAX_IMAGE_MB} MB"
    found = container.podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image,
        "-c",
        f"for t in {' '.join(BUILD_TOOLS)}; do command -v $t; done; true",
    )
    assert found.stdout.split() == [], f"build tooling in the image: {found.stdout.split()}"


# Run in the image: its OpenVINO, stripped to the CPU plugin and the ONNX/IR readers
# (slim.Dockerfile.j2), compiles the Bento's model at an explicit f32 hint and answers as
# its ONNX Runtime does. Prints the devices, the compiled precision and the largest gap.
OPENVINO_IN_IMAGE = """
import glob, numpy as np, onnxruntime as ort, openvino as ov
(path,) = glob.glob("/home/bentoml/bento/models/*/*/model.onnx")
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {i.name: np.zeros((2, 16), np.int64) for i in session.get_inputs()}
feeds["input_ids"] = rng.integers(1000, 2000, (2, 16), dtype=np.int64)
feeds["attention_mask"] = (np.arange(16) < np.array([[16], [9]])).astype(np.int64)
core = ov.Core()
compiled = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
got = compiled(feeds)[0]
want = session.run(None, feeds)[0]
print(core.available_devices, compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
print(float(np.abs(got - want).max()))
"""


def test_the_images_openvino_runs_the_model_as_onnx_runtime_does(
    running: container.Running,
) -> None:
    """The image carries OpenVINO for the BF16/INT8 defaults a release picks on AVX512_BF16
    and AMX nodes, without its GPU/NPU plugins, other frameworks' readers or headers."""
    done = container.podman(
        "exec", running.name, "/app/.venv/bin/python", "-c", OPENVINO_IN_IMAGE, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    devices, gap = done.stdout.strip().splitlines()
    assert devices == "['CPU'] f32", devices
    assert float(gap) < MAX_ABS_DIFF, gap
    site = "/app/.venv/lib/python3.11/site-packages/openvino"
    left = container.podman(
        "exec",
        running.name,
        "sh",
        "-c",
        f"ls {site}/libs {site}/frontend; ls -d {site}/include",
        check=False,
    ).stdout.split()
    assert "libopenvino_intel_cpu_plugin.so" in left and "onnx" in left, left
    stripped = [n for n in left if "gpu" in n or "npu" in n or "pytorch" in n or "include" in n]
    assert stripped == [], stripped


def _refusal(logs: str) -> str:
    lines = [ln for ln in logs.splitlines() if container.REFUSAL_LOG in ln]
    assert lines, logs[-2000:]
    return lines[0]


def test_the_jobs_commands_run_in_the_image_and_the_tooling_is_not_there(
    running: container.Running, pytestconfig: pytest.Config
) -> None:
    """The re-embed Job's command, as its manifest runs it (working directory, PYTHONPATH),
    answers in the image, and so does `canary`; the measurement commands and their package
    (embedkit_bench) are not in it."""
    import yaml

    job = yaml.safe_load((pytestconfig.rootpath / REEMBED_JOB).read_text())
    (spec,) = job["spec"]["template"]["spec"]["containers"]
    env = [
        a for e in spec.get("env", []) if "value" in e for a in ("-e", f"{e['name']}={e['value']}")
    ]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return container.podman(
            "exec", "-w", spec["workingDir"], *env, running.name, *args, check=False
        )

    for command in (spec["command"], [*spec["command"][:-1], "canary"]):
        done = run(*command, "--help")
        assert done.returncode == 0, done.stdout[-800:] + done.stderr[-800:]
    done = run(*spec["command"][:-1], "bench", "--help")
    assert done.returncode != 0 and "No such command 'bench'" in done.stdout + done.stderr
    done = run(spec["command"][0], "-c", "import embedkit_bench")
    assert done.returncode != 0 and "No module named 'embedkit_bench'" in done.stderr


def test_image_refuses_a_tampered_model(
    image: str, signed: tuple[str, Path], keys: dict[str, Path], tmp_path: Path
) -> None:
    """One byte of the ONNX file changed under the signed manifest: the pod never serves."""
    tag, path = signed
    bad = tmp_path / "model.onnx"
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    inside = f"/home/bentoml/bento/models/{tag.replace(':', '/')}/model.onnx"
    with container.run_image(
        image,
        f"embedkit-tampered-{uuid.uuid4().hex[:8]}",
        trusted_key=keys["public"],
        mounts={bad: inside},
        timeout_s=READY_BUDGET_S,
    ) as run:
        assert run.ready_s is None
        assert "checksum mismatch for model.onnx" in _refusal(run.logs())


# --- the rendered CPU overlay under `podman kube play` ----------------------------------


def test_cpu_overlay_runs_under_kube_play(
    image: str, signed: tuple[str, Path], keys: dict[str, Path], tmp_path: Path, reference_vectors
) -> None:
    manifest = container.kube_manifest(image, keys["public"])
    with container.kube_play(manifest, tmp_path, timeout_s=READY_BUDGET_S * 2) as pod:
        logs = container.podman("logs", pod.container, check=False)
        assert pod.ready_s is not None, (logs.stdout + logs.stderr)[-2000:]
        assert pod.probes == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 200}
        texts = _texts()[:16]
        want = reference_vectors(texts)
        stats = compare(want, _served_vectors(pod.url, texts))
        assert stats["min_cosine"] >= MIN_COSINE, stats
        assert httpx.get(pod.url + "/info", timeout=30).json()["tag"] == signed[0]
        # What the Deployment asked for, as podman ran it.
        inspected = container.podman(
            "inspect", pod.container, "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}"
        ).stdout.split()
        assert inspected == ["1034:1034", "true"]


def test_cpu_overlay_refuses_a_model_its_key_did_not_sign(
    image: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    manifest = container.kube_manifest(image, keys["other"])
    # kube_play stops waiting for readiness once the pod logs its refusal (or after 60 s).
    with container.kube_play(manifest, tmp_path, timeout_s=60) as pod:
        assert pod.ready_s is None
        line = container.wait_for_log(pod.container, container.REFUSAL_LOG, 60)
        assert line is not None and "signed by untrusted key" in line
        # Refused, it stays that way: the probes kube play sent and five more seconds of them.
        assert pod.probes.get("readinessProbe") != 200, pod.probes
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                status = httpx.get(pod.url + "/readyz", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            assert status != 200, "a pod with an untrusted signature became ready"
            time.sleep(0.5)


# --- the supply chain: hash-pinned install, signed record, deploy by digest -----------------


def _installed(name: str) -> dict[str, str]:
    """name -> version of every distribution in the image's venv (normalised names)."""
    listed = container.podman(
        "exec",
        name,
        "/app/.venv/bin/python",
        "-c",
        "import importlib.metadata as m\n"
        "for d in m.distributions(): print(d.metadata['Name'], d.version)",
    ).stdout.split("\n")
    return {bento._req_name(n): v for n, v in (ln.split() for ln in listed if ln.strip())}


def test_image_installed_exactly_the_hash_pinned_lock(
    running: container.Running, pytestconfig: pytest.Config
) -> None:
    lock = (pytestconfig.rootpath / "locks" / "serving-cpu.txt").read_text()
    want = dict(bento._pin(ln).split("==") for ln in bento._logical_lines(lock))
    assert _installed(running.name) == want
    env = container.podman("exec", running.name, "env").stdout.splitlines()
    assert {f"{k}={v}" for k, v in bento.HASH_CHECKING_ENVS.items()} <= set(env)


def test_signed_record_verifies_and_the_overlay_runs_by_digest(
    built_image: tuple[str, Path],
    signed: tuple[str, Path],
    keys: dict[str, Path],
    tmp_path: Path,
    pytestconfig: pytest.Config,
) -> None:
    """The documented flow: the build's record, `embedkit image pin`, `embedkit image
    verify`, then `podman kube play` of the overlay as rendered (the image by digest)."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    image, kept = built_image
    record = tmp_path / "record"  # a copy: this test edits the SBOM
    shutil.copytree(kept, record)
    loaded = supply.verify_record(record, [str(keys["public"])])
    assert loaded.digest == supply.inspect_image(image)[0]
    assert loaded.bento == image.rsplit("/", 1)[-1] and loaded.model == signed[0]
    sbom = json.loads((record / supply.SBOM).read_text())
    purls = [c.get("purl", "") for c in sbom["components"]]
    pypi = {p.split("/")[1].split("@")[0].lower() for p in purls if p.startswith("pkg:pypi/")}
    assert {"onnxruntime", "bentoml", "tokenizers", "numpy"} <= pypi
    assert not pypi & set(EXPORT_SIDE)
    assert any(p.startswith("pkg:deb/debian/python3.11@") for p in purls)
    print(f"\nrecord {record}: {loaded.digest}, SBOM {loaded.sbom_components} components")

    tree = tmp_path / "k8s"
    shutil.copytree(pytestconfig.rootpath / "deploy" / "k8s", tree)
    overlay = tree / "overlays" / "cpu"
    # What a registry would hold: the image under the overlay's repository.
    repo = "registry.example.com/embedkit/embedkit-cpu"
    container.podman("tag", image, f"{repo}:{image.rsplit(':', 1)[-1]}")
    runner = CliRunner()
    verify = ["image", "verify", str(record), "--overlay", str(overlay)]
    verify += ["--trusted-key", str(keys["public"])]
    try:
        assert (
            runner.invoke(app, ["image", "pin", str(record), "--overlay", str(overlay)]).exit_code
            == 0
        )
        ok = runner.invoke(app, verify)
        assert ok.exit_code == 0, ok.output
        # Another key's trust, or a changed SBOM: refused in one line, before any deploy.
        other = runner.invoke(app, [*verify[:-1], str(keys["other"])])
        assert other.exit_code == 1 and "untrusted key" in other.output
        sbom_file = record / supply.SBOM
        original = sbom_file.read_text()
        sbom_file.write_text(original.replace('"onnxruntime"', '"onnxruntime-evil"', 1))
        try:
            tampered = runner.invoke(app, verify)
        finally:
            sbom_file.write_text(original)
        assert tampered.exit_code == 1 and "SBOM" in tampered.output
        manifest = container.kube_manifest(None, keys["public"], overlay)
        assert f"image: {repo}@{loaded.digest}" in manifest
        with container.kube_play(manifest, tmp_path, timeout_s=READY_BUDGET_S * 2) as pod:
            assert pod.ready_s is not None, container.podman("logs", pod.container).stderr[-2000:]
            assert httpx.get(pod.url + "/info", timeout=30).json()["tag"] == signed[0]
    finally:
        container.podman("rmi", f"{repo}:{image.rsplit(':', 1)[-1]}", check=False)
