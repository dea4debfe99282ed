"""Runtime restrictions: non-root, read-only model store, models only from the store.

The container runs as UID 1034 with a read-only root filesystem and emptyDirs for
/tmp and BENTOML_HOME (deploy/k8s, checked offline by tests/deploy). Here the same
shape runs for real, without a container engine: `bentoml serve` as `nobody`, the
model store root-owned and read-only, the repo and the venv unwritable, only
TMPDIR and BENTOML_HOME's own scratch writable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from embedkit_bench import loadtest as lt

NOBODY = 65534
DROP_ROOT = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DROP_ROOT, *cmd], capture_output=True, text=True)


@pytest.fixture()
def sandbox() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="embedkit-nonroot-"))
    root.chmod(0o755)  # traversable by nobody; pytest's tmp dirs are 0700
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _nobody_can_run_workers() -> str | None:
    """Why this machine cannot host the test, or None. BentoML's process manager execs
    the venv's interpreter as the service user; here that interpreter may live under a
    0700 /root (a pyenv install), which a real image never does."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return "needs root and setpriv to drop to nobody"
    probe = as_nobody(
        sys.executable,
        "-c",
        "import subprocess, sys; subprocess.run([sys.executable, '-c', '0'], check=True)",
    )
    if probe.returncode != 0:
        interpreter = os.path.realpath(sys.executable)
        why = probe.stderr.strip().splitlines()[-1:]
        return f"nobody cannot exec this venv's interpreter ({interpreter}): {why}"
    return None


@pytest.mark.skipif(_nobody_can_run_workers() is not None, reason=str(_nobody_can_run_workers()))
def test_serves_as_non_root_from_a_read_only_store(model_tag, launcher, sandbox, corpus) -> None:
    import bentoml

    stored = Path(bentoml.models.get(model_tag).path)
    home, tmp = sandbox / "bentoml-home", sandbox / "tmp"
    shutil.copytree(stored.parent, home / "models" / stored.parent.name)
    for path in (home, *home.rglob("*")):  # readable by all, writable by root only
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp.mkdir()
    for writable in (home, tmp):
        os.chown(writable, NOBODY, NOBODY)
    model_dir = home / "models" / stored.parent.name / stored.name
    before = sorted(p.name for p in model_dir.rglob("*"))
    # The sandbox really is what it claims: nobody cannot write the store, the repo or the venv.
    for target in (
        model_dir / "probe",
        Path(lt.__file__).parent / "probe",
        Path(shutil.which("bentoml") or "/").parent / "probe",
    ):
        assert as_nobody("touch", str(target)).returncode != 0, target

    env = {
        "PATH": os.environ["PATH"],
        "BENTOML_HOME": str(home),
        "TMPDIR": str(tmp),
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "HOME": "/nonexistent",
        "HF_HUB_OFFLINE": "1",
        "EMBEDKIT_MODEL": model_tag,
    }
    server = launcher.spawn("service:EmbeddingAPI", env, tag=model_tag, prefix=DROP_ROOT)
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    assert workers and all(p.uids().effective == NOBODY for p in workers)

    r = httpx.post(server.url + "/embed/query", json={"texts": [corpus.texts[0]]}, timeout=60)
    assert r.status_code == 200, r.text
    want = corpus.expected([0], dimensions=None, normalize=True)[0]
    assert np.abs(np.asarray(r.json()["embeddings"][0]) - want).max() <= lt.TOLERANCE
    # A request cannot point the server at a path: `model` is a served name, nothing else.
    r = httpx.post(
        server.url + "/v1/embeddings", json={"model": str(model_dir), "input": "x"}, timeout=30
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert sorted(p.name for p in model_dir.rglob("*")) == before  # the store is untouched


def test_model_setting_must_be_a_store_tag_not_a_path(launcher) -> None:
    """EMBEDKIT_MODEL names a model-store tag; a filesystem path is refused at startup."""
    server = launcher.start("/tmp/embedkit-art/minilm-fp32", ready=False)
    assert server.proc.wait(timeout=120) != 0
    text = server.log_text()
    assert "/tmp/embedkit-art/minilm-fp32 is not a valid BentoML tag" in text, text[-2000:]
