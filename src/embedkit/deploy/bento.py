"""Bentos for CPU and GPU, built offline from one source of truth.

``bentofile(variant)`` is the one description of a Bento: the top-level
``bentofile.yaml`` (what ``bentoml build`` at the repo root builds) is its CPU
rendering, and ``build(variant, model_tag)`` writes the pinned one per variant,
runs ``bentoml build`` from the repo root (``service.py`` plus the package's
sources, so the image never installs the package and its export extra) and emits
the Dockerfile ``bentoml containerize`` would use.
`embedkit build-bento` (and ``scripts/build-bento``, which releases the model first)
builds the variants and prints their tags.

Where each fact comes from:

* serving requirements: ``[project] dependencies`` of ``pyproject.toml``, each
  pinned with ``==``; the GPU variant swaps ``onnxruntime`` for the
  ``onnxruntime-gpu`` pin below (both provide the module ``onnxruntime``, so an
  image must never carry both) and adds TensorRT's libraries; the CPU variant adds
  ``openvino`` from the extra of that name (the BF16/INT8 defaults' runtime); the batch
  variant is the CPU one plus the whole ``batch`` extra (``locks/batch-cpu.txt``);
* the model: the exact tag ``embedkit release`` printed, passed as the Bento
  argument ``model`` (``bentoml build --arg model=TAG``). ``service.py`` reads it
  into a ``BentoModel`` class attribute, which is what makes ``bentoml build``
  record that one version; BentoML restores the argument whenever the Bento is
  served (``bentoml serve TAG`` or the image), so ``:latest`` never leaks in. The
  image also carries it as ``EMBEDKIT_MODEL`` for anything reading settings;
* offline: ``lock_packages: false`` (locking resolves against the index) and
  ``BENTOML_NO_LOCAL_URL=1`` (a locally installed bentoml would otherwise become
  a ``file://`` requirement);
* hash-pinned: the CPU Bento's requirements are ``locks/serving-cpu.txt``, every package
  the image installs (transitive ones too) with ``--hash`` (``embedkit lock``, uv's
  resolver). The image's ``uv pip install`` runs with ``UV_REQUIRE_HASHES=1`` and the
  same file as its constraints (BentoML appends an unhashed ``bentoml==`` line; the
  constraint supplies its hash), so a package without a hash or with another one is
  refused.
* the CPU image's Dockerfile: ``slim.Dockerfile.j2`` beside this file (``SLIM_TEMPLATE``,
  the bentofile's ``docker.dockerfile_template``): BentoML's Debian template without its
  apt layer (build-essential, git) and with no uv or package cache left in the image.

``audit(bento_dir, variant, model_tag)`` re-reads what was built and lists every
problem (torch & co. in the requirements, URLs, unpinned packages, the wrong
runtime — an OpenVINO variant in the GPU image, which has no OpenVINO, included —, an unpinned
model, a root container user). ``build`` refuses a Bento
whose audit is not empty.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedkit.core.errors import BuildError

# Project files, relative to the working directory (the project root, like every command).
PYPROJECT = Path("pyproject.toml")
BUILD_ROOT = Path("build") / "bento"  # build contexts, logs and Dockerfiles, per variant
SERVICE = "service:EmbeddingAPI"
PYTHON_VERSION = "3.11"
# The export side of the contract: never in a serving image.
FORBIDDEN = frozenset(
    {"torch", "transformers", "optimum", "optimum-onnx", "sentence-transformers", "onnxscript"}
)


@dataclass(frozen=True)
class Variant:
    """One image flavour: its runtime package, base image and service environment."""

    name: str
    runtime: str  # the one onnxruntime distribution the image carries
    replace: dict[str, str] = field(default_factory=dict)  # pyproject name -> pinned requirement
    extra: tuple[str, ...] = ()
    # Packages taken, pinned as they are there, from pyproject's optional dependencies.
    optional: tuple[str, ...] = ()
    # Whole groups of pyproject's optional dependencies (extras), every pin in them.
    groups: tuple[str, ...] = ()
    docker: dict[str, Any] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    lock: Path | None = None  # hash-pinned requirements (`embedkit lock`); None: unlocked
    # Locks whose pins this one keeps (uv's constraints): what it shares with them, it
    # installs at their versions.
    lock_within: tuple[Path, ...] = ()

    @property
    def bento_name(self) -> str:
        # Matches the image names deploy/k8s/overlays/{cpu,gpu} pull.
        return f"embedkit-{self.name}"


# onnxruntime-gpu 1.31.1 is the newest on PyPI (no 1.32.0 GPU wheel). Its wheel links
# libcudart.so.13 / libcublas.so.13 (CUDA 13.x), libcudnn.so.9 (cuDNN 9.x) and
# libnvinfer.so.10 (TensorRT 10.x) — read with `readelf -d` from the wheel's
# libonnxruntime_providers_{cuda,tensorrt}.so; its metadata's `cuda`/`cudnn` extras
# say the same (nvidia-cuda-runtime~=13.0, nvidia-cudnn-cu13~=9.0). BentoML 1.4.40's
# `cuda_version` stops at 12.8, so the CUDA base is named directly; uv installs a
# managed CPython 3.11 into it (Ubuntu 24.04 ships 3.12).
ORT_GPU = "onnxruntime-gpu==1.31.1"
TENSORRT_LIBS = "tensorrt-cu13-libs==10.16.1.11"  # TensorRT 10 (11.x has libnvinfer.so.11)
CUDA_BASE_IMAGE = "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"
_SITE_PACKAGES = f"/app/.venv/lib/python{PYTHON_VERSION}/site-packages"
LOCK_DIR = Path("locks")
# The lock resolves for the image, not this host: CPython 3.11 on Debian bookworm (glibc 2.36).
LOCK_PLATFORM = "x86_64-manylinux_2_28"
# Where BentoML's Dockerfile puts the Bento (ENV BENTO_PATH) and installs its requirements from.
IMAGE_BENTO = "/home/bentoml/bento"
IMAGE_REQUIREMENTS = f"{IMAGE_BENTO}/env/python/requirements.txt"
# The batch image's Ray: the pyproject `batch` extra's version (a test keeps them equal) with
# the dashboard, whose job API `ray job submit` (a RayJob's submitter) talks to.
RAY_DASHBOARD = "ray[default]==2.58.0"
# uv refuses any requirement without a matching hash; the lock, read again as constraints,
# supplies the hash of the unhashed `bentoml==` line BentoML appends. Plain ENVs (BentoML turns
# build-stage envs into build secrets); they stay in the image, where nothing runs uv.
HASH_CHECKING_ENVS = {"UV_REQUIRE_HASHES": "1", "UV_CONSTRAINT": IMAGE_REQUIREMENTS}

# The CPU image's Dockerfile template: BentoML's Debian one without its apt layer
# (build-essential, git, gnupg2, curl: ~640 MB no wheel needs) and with uv and every package
# cache out of the layers (docs/bento.md, "Image size"). Relative to the build context, the
# repo root; BentoML copies it into the Bento (env/docker/Dockerfile.template).
SLIM_TEMPLATE = "src/embedkit/deploy/slim.Dockerfile.j2"

VARIANTS: dict[str, Variant] = {
    "cpu": Variant(
        name="cpu",
        runtime="onnxruntime",
        # OpenVINO serves the BF16 default a release picks on AVX512_BF16/AMX nodes
        # (docs/quantization.md); NNCF, its quantizer, is build-side only. The template
        # strips its GPU/NPU plugins, other frontends and headers (docs/bento.md).
        optional=("openvino",),
        docker={
            "distro": "debian",
            "python_version": PYTHON_VERSION,
            "dockerfile_template": SLIM_TEMPLATE,
        },
        envs={"EMBEDKIT_GPU": "false", "EMBEDKIT_PROVIDERS": '["CPUExecutionProvider"]'},
        lock=LOCK_DIR / "serving-cpu.txt",
    ),
    # The batch image: the CPU serving image plus the `batch` extra (pyarrow, ray[data]) for
    # `embedkit embed-corpus` on Ray (a KubeRay RayJob's head and workers,
    # deploy/k8s/jobs/embed-corpus). Its own lock, so the serving image stays as it is.
    "batch": Variant(
        name="batch",
        runtime="onnxruntime",
        optional=("openvino",),
        groups=("batch",),
        # A RayJob submits through the head's dashboard (its job API): ray[default].
        extra=(RAY_DASHBOARD,),
        docker={
            "distro": "debian",
            "python_version": PYTHON_VERSION,
            "dockerfile_template": SLIM_TEMPLATE,
        },
        envs={
            "EMBEDKIT_GPU": "false",
            "EMBEDKIT_PROVIDERS": '["CPUExecutionProvider"]',
            # `python -m embedkit.cli` from any directory (the Ray driver's, an actor's).
            "PYTHONPATH": f"{IMAGE_BENTO}/src/src",
            # The Bento's own folder is the model store the CLI reads (its models/): the
            # image's model resolves by tag, on a read-only root (the template makes the
            # store's other folders, which BentoML insists on).
            "BENTOML_HOME": IMAGE_BENTO,
        },
        lock=LOCK_DIR / "batch-cpu.txt",
        # Every package of the serving image at the serving image's version.
        lock_within=(LOCK_DIR / "serving-cpu.txt",),
    ),
    "gpu": Variant(
        name="gpu",
        runtime="onnxruntime-gpu",
        replace={"onnxruntime": ORT_GPU},
        extra=(TENSORRT_LIBS,),
        # Unlocked: tensorrt-cu13-libs on PyPI is a stub sdist that downloads the real wheel
        # from pypi.nvidia.com while it builds; PyPI carries no hash of what gets installed.
        # The CUDA base has no Python and no pip; BentoML's Dockerfile bootstraps uv with
        # pip, which Ubuntu 24.04 only allows system-wide with PIP_BREAK_SYSTEM_PACKAGES.
        docker={
            "base_image": CUDA_BASE_IMAGE,
            "python_version": PYTHON_VERSION,
            "system_packages": ["python3-pip"],
        },
        envs={
            "EMBEDKIT_GPU": "true",
            "EMBEDKIT_PROVIDERS": '["TensorrtExecutionProvider","CUDAExecutionProvider",'
            '"CPUExecutionProvider"]',
            # A GPU batch takes a few ms, about the host-side work between two calls:
            # holding the next query call until the previous returns (continuous
            # batching) would idle the device for it; queued calls keep it fed instead
            # (the runner's queue with topology=single, BentoML's in the Embedder with
            # split). Not measured on a GPU (docs/service.md).
            "EMBEDKIT_QUERY_CONTINUOUS_BATCHING": "false",
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
            # The TensorRT EP dlopens libnvinfer.so.10 from the pip wheel's directory; the
            # base image's own entries (driver libraries) are kept.
            "LD_LIBRARY_PATH": f"{_SITE_PACKAGES}/tensorrt_libs:"
            "/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
        },
    ),
}


# What `embedkit build-bento` builds when no --variant is named: the serving images (the
# batch image is asked for by name: `scripts/build-image --batch`).
SERVING_VARIANTS = ("cpu", "gpu")


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise BuildError(f"unknown Bento variant {name!r} (one of {', '.join(VARIANTS)})") from None


# --- requirements ------------------------------------------------------------------


def _req_name(line: str) -> str:
    """Normalised distribution name of a requirement line (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def serving_requirements(variant: Variant, pyproject: Path = PYPROJECT) -> list[str]:
    """The image's pinned requirements: pyproject's serving dependencies, per variant, and
    the optional ones the variant names (single packages, or whole extras: ``groups``)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = {
        _req_name(dep): dep
        for group in (project.get("optional-dependencies") or {}).values()
        for dep in group
    }
    unknown = [name for name in variant.optional if name not in optional]
    if unknown:
        raise BuildError(f"{', '.join(unknown)} not among pyproject's optional dependencies")
    groups = project.get("optional-dependencies") or {}
    missing = [group for group in variant.groups if group not in groups]
    if missing:
        raise BuildError(f"{', '.join(missing)} not among pyproject's optional-dependency groups")
    chosen = [optional[name] for name in variant.optional]
    chosen += [dep for group in variant.groups for dep in groups[group] if dep not in chosen]
    out: list[str] = []
    for dep in [*project["dependencies"], *chosen]:
        name = _req_name(dep)
        if name in FORBIDDEN:
            raise BuildError(f"{dep!r} is an export dependency; it must not be a serving one")
        if not re.fullmatch(
            r"[A-Za-z0-9._-]+(\[[A-Za-z0-9_,-]+\])?==[A-Za-z0-9.+!-]+", dep.strip()
        ):
            raise BuildError(f"serving dependency {dep!r} is not pinned with == (offline builds)")
        out.append(variant.replace.get(name, dep.strip()))
    return [*out, *variant.extra]


# --- the lock: every package the image installs, hash-pinned -------------------------------


def _logical_lines(text: str) -> list[str]:
    """Requirement lines with ``\\`` continuations joined; comments and blanks dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (re.sub(r"(^|\s)#.*", "", ln).strip() for ln in joined.splitlines())
    return [" ".join(ln.split()) for ln in lines if ln]


def _pin(line: str) -> str:
    """``name==version`` of a requirement line (name normalised), or '' when not ``==``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;,]+)", line)
    return f"{_req_name(line)}=={match.group(3)}" if match else ""


def lock_problems(text: str, wanted: list[str]) -> list[str]:
    """Why a lock file is not fit for a hash-checking install of ``wanted``: a line not
    pinned with ``==`` or without a sha256 hash, or a wanted pin it lacks or pins otherwise."""
    problems: list[str] = []
    pins: set[str] = set()
    for line in _logical_lines(text):
        if line.startswith("-"):
            problems.append(f"option line in the lock: {line[:60]}")
            continue
        pin = _pin(line)
        if not pin:
            problems.append(f"not pinned with ==: {line[:60]}")
        if not re.search(r"--hash=sha256:[0-9a-f]{64}", line):
            problems.append(f"no sha256 hash: {line.split()[0]}")
        pins.add(pin)
    for req in wanted:
        if _pin(req) not in pins:
            problems.append(f"{req} is not in the lock (stale: run `embedkit lock`)")
    return problems


def _uv() -> str:
    """uv from this venv (PATH may not hold it when the venv is not activated)."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.is_file() else shutil.which("uv")
    if found is None:
        raise BuildError("uv not found (pip install uv; it resolves and hashes the lock)")
    return found


def compile_lock(
    requirements: list[str],
    dest: Path,
    command: str = "embedkit lock",
    constraints: tuple[Path, ...] = (),
) -> Path:
    """Resolve ``requirements`` for the image's platform with uv and write them to ``dest``
    with every file's sha256 (needs the package index), keeping the pins of the
    ``constraints`` lock files; a failure is one line."""
    constrain = [arg for path in constraints for arg in ("--constraint", str(path))]
    proc = subprocess.run(
        [
            _uv(),
            "pip",
            "compile",
            "--quiet",
            "--generate-hashes",
            "--python-version",
            PYTHON_VERSION,
            "--python-platform",
            LOCK_PLATFORM,
            "--custom-compile-command",
            command,
            "--output-file",
            str(dest),
            *constrain,
            "-",
        ],
        input="\n".join(requirements) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"uv pip compile for {dest} failed: {last.strip()}")
    problems = lock_problems(dest.read_text(), requirements)
    if problems:
        raise BuildError(f"{dest} is unfit: {'; '.join(problems[:3])}")
    return dest


def lock(variant: Variant, pyproject: Path = PYPROJECT) -> Path:
    """Write the variant's lock from pyproject's serving pins (``embedkit lock``)."""
    if variant.lock is None:
        raise BuildError(f"the {variant.name} image is not hash-pinned (no lock; see bento.py)")
    variant.lock.parent.mkdir(parents=True, exist_ok=True)
    return compile_lock(
        serving_requirements(variant, pyproject), variant.lock, constraints=variant.lock_within
    )


# What a Bento carries from the repo root: the wiring and the package's serving code. The
# evaluation data (release-time only) stays out of images.
INCLUDE = ["service.py", "src/embedkit/**"]
EXCLUDE = ["**/__pycache__", "**/*.pyc", "src/embedkit/data/evaldata/**"]
ROOT_BENTOFILE = Path("bentofile.yaml")
ROOT_HEADER = """\
# The CPU Bento, as `bentoml build` at the repo root builds it (the model is whatever
# EMBEDKIT_MODEL names, default all-minilm-l6-v2:latest, resolved to its version at build
# time). Generated from src/embedkit/deploy/bento.py, the one source of both Bentos:
#   embedkit bentofile > bentofile.yaml      (a test keeps this file equal to it)
# scripts/build-bento builds the CPU and GPU Bentos pinned to an exact, audited release.
"""


def bentofile(
    variant: Variant, model_tag: str | None = None, pyproject: Path = PYPROJECT
) -> dict[str, Any]:
    """The bentofile.yaml content for ``variant``; pinned to ``model_tag`` when given.

    Built from the repo root: ``service.py`` puts the bundled ``src/`` on ``sys.path``, so
    the image runs the package from these sources and never installs its export extra.
    """
    what = f" serving {model_tag}" if model_tag else ""
    envs = {"EMBEDKIT_MODEL": model_tag} if model_tag else {}
    return {
        "service": SERVICE,
        "name": variant.bento_name,
        "description": f"embedkit embeddings ({variant.name}, {variant.runtime}){what}",
        "labels": {
            "variant": variant.name,
            "runtime": variant.runtime,
            **({"model": model_tag} if model_tag else {}),
        },
        "include": INCLUDE,
        "exclude": EXCLUDE,
        "python": (
            {"requirements_txt": str(variant.lock), "lock_packages": False}
            if variant.lock
            else {"packages": serving_requirements(variant, pyproject), "lock_packages": False}
        ),
        "docker": variant.docker,
        "envs": [
            {"name": k, "value": v}
            for k, v in {**envs, "HF_HUB_OFFLINE": "1", **variant.envs}.items()
        ]
        + [
            {"name": k, "value": v} for k, v in (HASH_CHECKING_ENVS if variant.lock else {}).items()
        ],
    }


def render_bentofile(content: dict[str, Any], header: str = ROOT_HEADER) -> str:
    return header + yaml.safe_dump(content, sort_keys=False)


# --- build -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    variant: str
    tag: str
    path: Path  # the Bento in the store
    dockerfile: Path  # the full containerfile `bentoml containerize` would build
    warnings: tuple[str, ...] = ()  # shippable, but a deployment would refuse it (printed)


def _bento_env(variant: Variant, model_tag: str) -> dict[str, str]:
    # The service reads these at import; bentoml build imports it to pin the model
    # and record the service config (GPU resources). Never let a build lock or phone home.
    # Image-only envs (LD_LIBRARY_PATH, PIP_*) stay out of the build process.
    service_envs = {k: v for k, v in variant.envs.items() if k.startswith("EMBEDKIT_")}
    return {
        **os.environ,
        **service_envs,
        "EMBEDKIT_MODEL": model_tag,
        "BENTOML_NO_LOCAL_URL": "1",
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": "1",
    }


def build(variant_name: str, model_tag: str, out_root: Path) -> Built:
    """Build one Bento offline; write its Dockerfile to ``out_root/<variant>/Dockerfile``."""
    variant = get_variant(variant_name)
    if model_tag.endswith(":latest") or ":" not in model_tag:
        raise BuildError(f"model tag {model_tag!r} must name an exact version (name:version)")
    if not Path(SERVICE.split(":")[0] + ".py").is_file():
        raise BuildError("bentos are built from the project root (service.py not found here)")
    out_dir = Path(out_root) / variant.name
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "bentofile.yaml"
    spec.write_text(render_bentofile(bentofile(variant, model_tag), header=""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "build",
            "-f",
            str(spec),
            "--arg",
            f"model={model_tag}",
            "--output",
            "tag",
            ".",
        ],
        env=_bento_env(variant, model_tag),
        capture_output=True,
        text=True,
        check=False,
    )
    (out_dir / "build.log").write_text(proc.stdout + proc.stderr)
    found = re.search(r"__tag__:(\S+)", proc.stdout)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BuildError(
            f"bentoml build ({variant.name}) failed: {tail[0]} (log: {out_dir / 'build.log'})"
        )
    tag = found.group(1)
    bento_path = _bento_path(tag)
    dockerfile = out_dir / "Dockerfile"
    _emit_containerfile(tag, dockerfile)
    problems = audit(bento_path, variant.name, model_tag, dockerfile=dockerfile)
    if problems:
        raise BuildError(f"Bento {tag} is unfit to ship: {'; '.join(problems)}")
    return Built(variant.name, tag, bento_path, dockerfile, tuple(trust_warnings(model_tag)))


def trust_warnings(model_tag: str) -> list[str]:
    """Why a deployment that requires signatures (every deploy/k8s overlay) would refuse
    the model: said at build time, not when the pod starts."""
    import bentoml

    from embedkit.model.signing import SIGNATURE

    if not (Path(bentoml.models.get(model_tag).path) / SIGNATURE).is_file():
        return [
            f"model {model_tag} is unsigned: pods with EMBEDKIT_REQUIRE_SIGNATURE=true (every "
            "deploy/k8s overlay) will refuse it; release with --sign KEY "
            "(scripts/build-bento --signing-key KEY)"
        ]
    return []


def _bento_path(tag: str) -> Path:
    import bentoml

    return Path(bentoml.bentos.get(tag).path)


# BentoML 1.4.40 renders a Bento's dockerfile_template from a temporary copy of the Bento and
# refuses it unless that copy lies under the working directory ("Accessing file outside of
# current working directory is not allowed": BentoML issue 5566, fix PRs 5596/5673 unmerged).
# Its temporary directories go here, under the project root, instead (scripts/build-image sets
# TMPDIR to the same kind of folder for `bentoml containerize`).
CONTAINERFILE_TMP = BUILD_ROOT / "tmp"


@contextmanager
def bentoml_tempdir() -> Iterator[Path]:
    """Python's temporary directories under ``CONTAINERFILE_TMP`` (absolute), for the span."""
    scratch = CONTAINERFILE_TMP.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = before


def _emit_containerfile(tag: str, dest: Path) -> None:
    """The Dockerfile `bentoml containerize` builds, written without a container engine."""
    import bentoml

    dest.parent.mkdir(parents=True, exist_ok=True)
    with bentoml_tempdir():
        bentoml.container.get_containerfile(tag, output_path=str(dest))
    if not dest.is_file():
        raise BuildError(f"bentoml wrote no containerfile for {tag}")


# --- audit -----------------------------------------------------------------------------


def requirement_lines(bento_dir: Path) -> list[str]:
    """Requirement lines of a built Bento (continuations joined, comments and blanks dropped)."""
    return _logical_lines((Path(bento_dir) / "env" / "python" / "requirements.txt").read_text())


def container_user(dockerfile_text: str) -> str | None:
    """The user the image runs as: the last ``USER`` instruction, if any."""
    users = re.findall(r"^\s*USER\s+(\S+)", dockerfile_text, flags=re.MULTILINE)
    return users[-1] if users else None


def pinned_models(bento_info: dict[str, Any]) -> set[str]:
    """Every model tag a Bento references (top level and per service, as BentoML 1.4 records
    them); ``bentoml containerize`` copies exactly these from the store into the image."""
    entries = list(bento_info.get("models") or [])
    for svc in bento_info.get("services") or []:
        entries.extend(svc.get("models") or [])
    return {str(m["tag"] if isinstance(m, dict) else m) for m in entries}


def audit(
    bento_dir: Path, variant_name: str, model_tag: str, *, dockerfile: Path | None = None
) -> list[str]:
    """Every reason the built Bento at ``bento_dir`` must not ship; empty when fit."""
    variant = get_variant(variant_name)
    problems: list[str] = []
    lines = requirement_lines(bento_dir)
    names = {_req_name(ln) for ln in lines}
    for ln in lines:
        name = _req_name(ln)
        if name in FORBIDDEN:
            problems.append(f"export dependency in requirements: {ln}")
        if "://" in ln or " @ " in ln or ln.startswith((".", "/", "-e")):
            problems.append(f"requirement is a URL or local path, not a package index pin: {ln}")
        elif not re.search(r"==[^,;\s]+", ln):
            problems.append(f"requirement not pinned: {ln}")
    if "bentoml" not in names:
        problems.append("bentoml is not pinned in the requirements")
    other = "onnxruntime-gpu" if variant.runtime == "onnxruntime" else "onnxruntime"
    if variant.runtime not in names:
        problems.append(f"{variant.runtime} missing from the requirements")
    if other in names:
        problems.append(f"{other} in a {variant.name} image (both provide the module onnxruntime)")
    runtime = _model_runtime(model_tag)
    if runtime != "onnxruntime" and runtime not in names:
        problems.append(
            f"model {model_tag} runs on {runtime}, which the {variant.name} image does not "
            "install: it would be refused at startup, and its fp32 parent is not in the Bento"
        )

    info = yaml.safe_load((Path(bento_dir) / "bento.yaml").read_text())
    models = pinned_models(info)
    if models != {model_tag}:
        problems.append(f"bento.yaml pins models {sorted(models)}, expected exactly {model_tag!r}")
    if (info.get("args") or {}).get("model") != model_tag:
        problems.append(
            f"Bento argument model is {(info.get('args') or {}).get('model')!r}, "
            f"not {model_tag!r} (service.py reads it when the Bento is served)"
        )
    envs = {e["name"]: str(e.get("value")) for e in info.get("envs") or []}
    if envs.get("EMBEDKIT_MODEL") != model_tag:
        problems.append(f"EMBEDKIT_MODEL env is {envs.get('EMBEDKIT_MODEL')!r}, not {model_tag!r}")

    docker_text = (dockerfile or Path(bento_dir) / "env" / "docker" / "Dockerfile").read_text()
    user = container_user(docker_text)
    if user is None or user in {"root", "0"} or user.startswith(("root:", "0:")):
        problems.append(f"container runs as root (USER {user})")
    if variant.lock is not None:
        problems.extend(_hash_problems(lines, envs, docker_text))
    return problems


def _model_runtime(model_tag: str) -> str:
    """The runtime a stored model's manifest names (older manifests: ONNX Runtime)."""
    import bentoml

    return str(bentoml.models.get(model_tag).info.metadata.get("runtime", "onnxruntime"))


def _hash_problems(lines: list[str], envs: dict[str, str], docker_text: str) -> list[str]:
    """A locked variant's install must check hashes: every requirement hashed, or (BentoML's
    own appended line) pinned to a version a hashed line pins; the build envs that make uv
    require them present in the Bento and the Dockerfile."""
    hashed = {_pin(ln) for ln in lines if "--hash=sha256:" in ln}
    problems = [
        f"requirement without a hash in a hash-pinned image: {ln}"
        for ln in lines
        if "--hash=sha256:" not in ln and _pin(ln) not in hashed
    ]
    for name, value in HASH_CHECKING_ENVS.items():
        if envs.get(name) != value:
            problems.append(f"{name} is not {value!r}: the image would install without hashes")
        elif not re.search(rf"^ENV {name}=", docker_text, flags=re.MULTILINE):
            problems.append(f"the Dockerfile does not set {name}")
    return problems
