"""The image supply chain without building an image (fast; the real build, SBOM, signature,
verify and `podman kube play` run in tests/deploy/test_image.py).

The committed lock covers the serving requirements with a hash on every package; an image
record signs the digest and the SBOM, and the deploy gate refuses a tampered digest, a
tampered SBOM, an unsigned record, another key, and any overlay image that is a tag or
another digest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.errors import BuildError, SignatureError
from embedkit.deploy import bento, container, supply
from embedkit.model import signing

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
STATUS = """\
Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u9

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


# --- the lock ------------------------------------------------------------------------------


def test_committed_lock_covers_the_serving_requirements_with_hashes(
    pytestconfig: pytest.Config,
) -> None:
    cpu = bento.VARIANTS["cpu"]
    assert cpu.lock is not None
    text = (pytestconfig.rootpath / cpu.lock).read_text()
    assert bento.lock_problems(text, bento.serving_requirements(cpu)) == []
    lines = bento._logical_lines(text)
    assert len(lines) > len(bento.serving_requirements(cpu))  # transitive ones pinned too
    assert all("--hash=sha256:" in ln for ln in lines)
    tool = (pytestconfig.rootpath / supply.SBOM_TOOL_LOCK).read_text()
    assert bento.lock_problems(tool, [supply.SBOM_TOOL]) == []


def test_lock_problems_name_each_defect() -> None:
    good = "numpy==2.4.6 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via -r -\n"
    assert bento.lock_problems(good, ["numpy==2.4.6"]) == []
    assert bento.lock_problems("numpy==2.4.6\n", ["numpy==2.4.6"]) == [
        "no sha256 hash: numpy==2.4.6"
    ]
    (stale,) = bento.lock_problems(good, ["numpy==2.5.0"])
    assert "numpy==2.5.0 is not in the lock" in stale
    assert any("not pinned" in p for p in bento.lock_problems("numpy>=2\n", []))


def test_cpu_bento_installs_from_the_lock_in_hash_checking_mode() -> None:
    spec = bento.bentofile(bento.VARIANTS["cpu"])
    assert spec["python"] == {"requirements_txt": "locks/serving-cpu.txt", "lock_packages": False}
    envs = {e["name"]: e["value"] for e in spec["envs"]}
    assert {k: envs.get(k) for k in bento.HASH_CHECKING_ENVS} == bento.HASH_CHECKING_ENVS
    # The audit refuses a hash-pinned Bento whose requirements lost a hash.
    hashed = " --hash=sha256:" + "0" * 64
    # BentoML appends an unhashed `bentoml==` line: the lock's hashed one covers it.
    lines = [
        "numpy==2.4.6" + hashed,
        "bentoml==1.4.40" + hashed,
        "bentoml==1.4.40",
        "requests==2.32.0",
    ]
    docker = "".join(f"ENV {k}=${k}\n" for k in bento.HASH_CHECKING_ENVS)
    (problem,) = bento._hash_problems(lines, bento.HASH_CHECKING_ENVS, docker)
    assert "without a hash" in problem and "requests" in problem
    assert bento._hash_problems(lines[:3], bento.HASH_CHECKING_ENVS, docker) == []
    (no_env,) = bento._hash_problems(lines[:3], {"UV_CONSTRAINT": bento.IMAGE_REQUIREMENTS}, docker)
    assert "UV_REQUIRE_HASHES" in no_env


# --- the record: signed digest + SBOM ------------------------------------------------------


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "keys"
    d.mkdir()
    signing.generate_keypair(d / "release.pem", d / "release.pub")
    signing.generate_keypair(d / "other.pem", d / "other.pub")
    return {"private": d / "release.pem", "public": d / "release.pub", "other": d / "other.pem"}


def _sbom() -> dict[str, object]:
    return {
        "bomFormat": "CycloneDX",
        "components": [{"name": "numpy", "version": "2.4.6"}, *supply.debian_components(STATUS)],
    }


@pytest.fixture()
def record(tmp_path: Path, keys: dict[str, Path]) -> Path:
    out = tmp_path / "record"
    rec = supply.write_record(
        "localhost/embedkit-cpu:v1", (DIGEST, "sha256:" + "1" * 64), _sbom(), out, bento="b:v1"
    )
    assert (rec.digest, rec.sbom_components) == (DIGEST, 2)
    supply.sign_record(out, keys["private"])
    return out


def test_debian_components_are_the_installed_packages() -> None:
    (libc,) = supply.debian_components(STATUS)
    assert libc["purl"] == "pkg:deb/debian/libc6@2.36-9+deb12u9?arch=amd64&distro=debian-12"


def test_signed_record_verifies(record: Path, keys: dict[str, Path]) -> None:
    loaded = supply.verify_record(record, [str(keys["public"])])
    assert loaded.digest == DIGEST and loaded.bento == "b:v1"


def _edit_manifest(record: Path, **changes: object) -> None:
    path = record / signing.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2) + "\n")


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda r: _edit_manifest(r, digest=OTHER), "does not match its manifest"),
        (lambda r: (r / supply.SBOM).write_text("{}\n"), "SBOM of"),
        (lambda r: (r / signing.SIGNATURE).unlink(), "is not signed"),
        (lambda r: supply.sign_record(r, r.parent / "keys" / "other.pem"), "untrusted key"),
        (lambda r: (r / signing.MANIFEST).write_text("{}"), "not an embedkit image record"),
    ],
    ids=["digest", "sbom", "unsigned", "other-key", "not-a-record"],
)
def test_tampered_or_untrusted_record_is_refused(
    record: Path, keys: dict[str, Path], tamper, expected: str
) -> None:
    tamper(record)
    with pytest.raises(SignatureError, match=expected):
        supply.verify_record(record, [str(keys["public"])])


# --- overlays by digest --------------------------------------------------------------------


@pytest.fixture()
def k8s(tmp_path: Path, pytestconfig: pytest.Config) -> Path:
    tree = tmp_path / "k8s"
    shutil.copytree(pytestconfig.rootpath / "deploy" / "k8s", tree)
    return tree


def test_pin_writes_the_digest_and_keeps_comments(k8s: Path) -> None:
    overlay = k8s / "overlays" / "cpu"
    before = (overlay / "kustomization.yaml").read_text()
    supply.pin(overlay, OTHER, "registry.example.com/team/embedkit-cpu")
    after = (overlay / "kustomization.yaml").read_text()
    comments = [ln for ln in before.splitlines() if ln.lstrip().startswith("#")]
    assert comments == [ln for ln in after.splitlines() if ln.lstrip().startswith("#")]
    assert supply.rendered_images(overlay) == [f"registry.example.com/team/embedkit-cpu@{OTHER}"]
    with pytest.raises(BuildError, match="not a sha256 digest"):
        supply.pin(overlay, "v1.2")


def test_verify_deploy_accepts_only_the_signed_digest(
    record: Path, keys: dict[str, Path], k8s: Path
) -> None:
    overlays = [k8s / "overlays" / "cpu", k8s / "jobs" / "reembed"]
    trusted = [str(keys["public"])]
    with pytest.raises(SignatureError, match="is not the signed image"):
        supply.verify_deploy(record, overlays, trusted)
    for overlay in overlays:
        supply.pin(overlay, DIGEST)
    assert supply.verify_deploy(record, overlays, trusted).digest == DIGEST
    kfile = overlays[0] / "kustomization.yaml"
    kfile.write_text(kfile.read_text().replace(f"digest: {DIGEST}", 'newTag: "0.1.0"'))
    with pytest.raises(SignatureError, match="mutable tag"):
        supply.verify_deploy(record, overlays, trusted)


def test_verify_command_refuses_in_one_line(record: Path, keys: dict[str, Path], k8s: Path) -> None:
    runner = CliRunner()
    overlay = k8s / "overlays" / "cpu"
    args = ["image", "verify", str(record), "--overlay", str(overlay)]
    args += ["--trusted-key", str(keys["public"])]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert "is not the signed image" in refused.output
    pinned = runner.invoke(app, ["image", "pin", str(record), "--overlay", str(overlay)])
    assert pinned.exit_code == 0, pinned.output
    assert runner.invoke(app, args).exit_code == 0


def test_repo_overlays_pin_images_by_digest(pytestconfig: pytest.Config) -> None:
    """Every overlay and job renders its images as name@sha256 (a tag can be moved)."""
    k8s = pytestconfig.rootpath / "deploy" / "k8s"
    for kustomization in [
        *(k8s / "overlays" / o for o in ("cpu", "gpu", "canary")),
        k8s / "jobs" / "reembed",
    ]:
        for image in supply.rendered_images(kustomization):
            _, at, digest = image.partition("@")
            assert at and supply.DIGEST.fullmatch(digest), f"{kustomization}: {image}"
    assert container.render(k8s / "overlays" / "cpu")
