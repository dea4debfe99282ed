"""The image supply chain: what a built image is, signed, and checked before it deploys.

After ``scripts/build-image`` built an image, ``embedkit image record`` writes its *image
record*, a directory shaped like a signed model artifact (``model/signing.py``):

* ``sbom.cdx.json``: a CycloneDX SBOM of the image: its Python environment as
  ``cyclonedx-py environment`` lists it, run INSIDE the image (the tool, hash-pinned by
  ``locks/sbom-tool.txt``, mounted read-only), plus the Debian packages of its dpkg status;
* ``manifest.json``: the image's manifest digest (what Kubernetes pulls by), its config id,
  the Bento, the model, the sha256 of the lock it installed from and of the SBOM;
* ``manifest.sig``: the project's Ed25519 signature over the manifest's exact bytes, so it
  covers the digest and the SBOM (cosign would sign the digest in a registry; Fulcio and
  Rekor cannot be reached from here, docs/deployment.md).

``embedkit image pin`` writes the digest into overlays (kustomize ``images:`` ``digest:``);
``embedkit image verify`` is the deploy gate: signature valid under a trusted key, SBOM
unchanged, every image the overlay renders == the signed digest. Any failure is one line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedkit.core.errors import BuildError, SignatureError
from embedkit.deploy import container
from embedkit.deploy.bento import LOCK_DIR, compile_lock
from embedkit.model import signing
from embedkit.model.artifact import sha256_file

RECORDS = Path("build") / "image" / "records"
SBOM = "sbom.cdx.json"
SCHEMA = "embedkit-image-record/1"
SBOM_TOOL = "cyclonedx-bom==7.5.0"
SBOM_TOOL_LOCK = LOCK_DIR / "sbom-tool.txt"
SBOM_TOOL_DIR = Path("build") / "image" / "sbom-tool"
# pip in hash-checking mode, wheels only, the lock's own dependency list (no resolution).
PIP_HASH_CHECKED = (
    "install --quiet --isolated --require-hashes --no-deps --only-binary :all: --upgrade --target"
)
IMAGE_PYTHON = "/app/.venv/bin/python"  # the venv BentoML's Dockerfile installs into
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Kinds whose pod template runs the image (what `kubectl apply` of an overlay would start).
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def lock_sbom_tool() -> Path:
    """``locks/sbom-tool.txt``: the SBOM generator and its dependencies, hash-pinned."""
    SBOM_TOOL_LOCK.parent.mkdir(parents=True, exist_ok=True)
    return compile_lock([SBOM_TOOL], SBOM_TOOL_LOCK)


# --- the SBOM --------------------------------------------------------------------------


def install_sbom_tool(dest: Path = SBOM_TOOL_DIR) -> Path:
    """pip-install the locked SBOM tool into ``dest`` (hash-checking mode), once."""
    stamp = dest / ".lock-sha256"
    want = sha256_file(SBOM_TOOL_LOCK)
    if stamp.is_file() and stamp.read_text() == want:
        return dest
    # The image's Python is Debian's CPython 3.11, like this venv's: the same wheels load.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *PIP_HASH_CHECKED.split(),
            str(dest),
            "-r",
            str(SBOM_TOOL_LOCK),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"installing the SBOM tool failed: {last}")
    stamp.write_text(want)
    return dest


# Run by the image's system Python with the tool on sys.path only (not PYTHONPATH, which the
# venv interpreter it inspects would inherit and list the tool's own packages).
_SBOM_SCRIPT = (
    "import sys; sys.path.insert(0, '/opt/sbom-tool'); "
    "from cyclonedx_py._internal.cli import run; "
    "run(prog='cyclonedx-py', argv=['environment', '--of', 'JSON', '--sv', '1.6', "
    f"'--output-reproducible', '-o', '-', '{IMAGE_PYTHON}'])"
)


def python_sbom(image: str, tool: Path) -> dict[str, Any]:
    """CycloneDX JSON of the image's Python environment, made inside the image (no network)."""
    done = container.podman(
        "run", "--rm", "--network", "none", "--read-only", "--entrypoint", "/usr/bin/python3",
        "-v", f"{Path(tool).resolve()}:/opt/sbom-tool:ro", image, "-c", _SBOM_SCRIPT,
        timeout=300,
    )  # fmt: skip
    try:
        return dict(json.loads(done.stdout))
    except json.JSONDecodeError as exc:
        raise BuildError(f"cyclonedx-py in {image} printed no JSON SBOM") from exc


def debian_components(status: str) -> list[dict[str, Any]]:
    """CycloneDX components of the installed packages in a dpkg status file."""
    out = []
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, flags=re.MULTILINE))
        if not fields.get("Package") or "installed" not in fields.get("Status", "").split():
            continue
        name, version, arch = fields["Package"], fields.get("Version", ""), fields["Architecture"]
        purl = f"pkg:deb/debian/{name}@{version}?arch={arch}&distro=debian-12"
        out.append(
            {"type": "library", "bom-ref": purl, "name": name, "version": version, "purl": purl}
        )
    return out


def image_sbom(image: str, tool: Path) -> dict[str, Any]:
    """The image's SBOM: its Python environment plus its Debian packages."""
    bom = python_sbom(image, tool)
    status = container.podman(
        "run", "--rm", "--network", "none", "--entrypoint", "cat", image, "/var/lib/dpkg/status"
    ).stdout  # fmt: skip
    bom.setdefault("components", []).extend(debian_components(status))
    bom.setdefault("metadata", {})["component"] = {
        "type": "container",
        "bom-ref": image,
        "name": image.rsplit(":", 1)[0],
        "version": image.rsplit(":", 1)[-1],
    }
    return bom


# --- the record ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    image: str  # the local reference it was built as
    digest: str  # manifest digest: what an overlay pins and a kubelet pulls
    image_id: str
    sbom_sha256: str
    sbom_components: int
    lock_sha256: str | None
    bento: str | None
    model: str | None
    created: str

    @classmethod
    def load(cls, path: Path) -> ImageRecord:
        manifest = Path(path) / signing.MANIFEST
        try:
            data = json.loads(manifest.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(data.get("schema"))
            return cls(
                path=Path(path),
                image=str(data["image"]),
                digest=str(data["digest"]),
                image_id=str(data["image_id"]),
                sbom_sha256=str(data["sbom"]["sha256"]),
                sbom_components=int(data["sbom"]["components"]),
                lock_sha256=data.get("lock_sha256"),
                bento=data.get("bento"),
                model=data.get("model"),
                created=str(data["created"]),
            )
        except OSError as exc:
            raise SignatureError(f"no image record at {path} ({exc.strerror})") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"{manifest} is not an embedkit image record") from exc


def inspect_image(image: str) -> tuple[str, str]:
    """(manifest digest, image id) of a local image."""
    done = container.podman("image", "inspect", "--format", "{{.Digest}} {{.Id}}", image)
    digest, image_id = done.stdout.split()
    if not DIGEST.fullmatch(digest):
        raise BuildError(f"podman reports no manifest digest for {image}: {digest!r}")
    return digest, f"sha256:{image_id}"


def write_record(
    image: str,
    ids: tuple[str, str],
    sbom: dict[str, Any],
    out: Path,
    *,
    lock: Path | None = None,
    bento: str | None = None,
    model: str | None = None,
) -> ImageRecord:
    """Write ``out/{sbom.cdx.json,manifest.json}`` for a built image (unsigned); ``ids`` is
    its (manifest digest, image id), as :func:`inspect_image` reads them."""
    digest, image_id = ids
    if not DIGEST.fullmatch(digest):
        raise BuildError(f"{digest!r} is not a sha256 digest")
    out.mkdir(parents=True, exist_ok=True)
    (out / signing.SIGNATURE).unlink(missing_ok=True)  # a new manifest voids an old one
    (out / SBOM).write_text(json.dumps(sbom, indent=1, sort_keys=True) + "\n")
    manifest = {
        "schema": SCHEMA,
        "image": image,
        "digest": digest,
        "image_id": image_id,
        "sbom": {
            "file": SBOM,
            "sha256": sha256_file(out / SBOM),
            "components": len(sbom.get("components", [])),
        },
        "lock_sha256": sha256_file(lock) if lock else None,
        "bento": bento,
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / signing.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ImageRecord.load(out)


def sign_record(record: Path, private_key: Path) -> str:
    return signing.sign(record, private_key)


def verify_record(record: Path, trusted_keys: Sequence[str]) -> ImageRecord:
    """The record's signature under a trusted key, then its SBOM against the signed hash."""
    loaded = ImageRecord.load(record)  # one line when it is not a record at all
    signing.verify(record, trusted_keys)
    sbom = Path(record) / SBOM
    if not sbom.is_file() or sha256_file(sbom) != loaded.sbom_sha256:
        raise SignatureError(f"the SBOM of {record} is not the one its signature covers")
    return loaded


# --- overlays --------------------------------------------------------------------------


def rendered_images(kustomization: Path) -> list[str]:
    """Every container image (init containers too) the kustomization renders to a workload."""
    images = []
    for doc in container.render(kustomization):
        if doc.get("kind") not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            images.append(str(c.get("image", "")))
    return images


def overlay_problems(record: ImageRecord, kustomization: Path) -> list[str]:
    """Images the kustomization would run that are not the signed digest."""
    images = rendered_images(kustomization)
    if not images:
        return [f"{kustomization} renders no workload"]
    problems = []
    for image in images:
        _, at, digest = image.partition("@")
        if not at:
            problems.append(f"{kustomization}: {image!r} is a mutable tag, not a digest")
        elif digest != record.digest:
            problems.append(f"{kustomization}: {image} is not the signed image {record.digest}")
    return problems


def verify_deploy(
    record: Path, kustomizations: Sequence[Path], trusted_keys: Sequence[str]
) -> ImageRecord:
    """The deploy gate (``embedkit image verify``): raise on the first reason to refuse."""
    loaded = verify_record(record, trusted_keys)
    for kustomization in kustomizations:
        problems = overlay_problems(loaded, kustomization)
        if problems:
            raise SignatureError(problems[0])
    return loaded


_IMAGES_BLOCK = re.compile(r"^images:\n(?:(?:[ \t].*|\s*#.*|)\n)*", flags=re.MULTILINE)


def pin(kustomization: Path, digest: str, name: str | None = None) -> Path:
    """Set the one ``images:`` entry of ``kustomization/kustomization.yaml`` to ``digest``
    (its ``newTag`` dropped; ``newName`` replaced when given), keeping the file's comments."""
    if not DIGEST.fullmatch(digest):
        raise BuildError(f"{digest!r} is not a sha256 digest")
    path = Path(kustomization) / "kustomization.yaml"
    text = path.read_text()
    block = _IMAGES_BLOCK.search(text)
    entries = re.findall(r"^  - name:", block.group(0), flags=re.MULTILINE) if block else []
    if block is None or len(entries) != 1:
        raise BuildError(f"{path}: expected one entry under images:, found {len(entries)}")
    lines = [ln for ln in block.group(0).splitlines() if not re.match(r"\s+(newTag|digest):", ln)]
    if name is not None:
        lines = [re.sub(r"^(\s+newName:).*", rf"\1 {name}", ln) for ln in lines]
    entry = next(ln for ln in lines if re.match(r"\s+- name:", ln))
    last = max(i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#"))
    lines.insert(last + 1, " " * entry.index("name:") + f"digest: {digest}")
    path.write_text(text[: block.start()] + "\n".join(lines) + "\n" + text[block.end() :])
    return path
