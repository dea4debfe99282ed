"""A content-addressed cache of what the tests build: exports, variants, tiny models.

Building the same bytes in every session is most of what a test run used to cost. An
entry's key is everything that decides its bytes: what it is built from (the source
model's checksum, the recipe, the parent artifact's files, the build options), the
versions of the toolchain that writes it (torch, transformers, optimum, onnx, onnxruntime
and the rest of :func:`embedkit.model.toolchain.versions`), this CPU's instruction set, and
the source of the code that builds it. Change any of them and the key changes.

Entries live under ``$EMBEDKIT_TEST_CACHE`` (default ``~/.cache/embedkit-tests``) and come
out through the normal verified load (:meth:`Artifact.load`: every file's sha256), so a
corrupted entry fails as a tampered artifact does. Such an entry is evicted and rebuilt,
never a failure of every later run; the run says so in its summary (:attr:`evictions`).
A finished entry appears by an atomic rename, under a lock, so two runs never see half
of one. Entries not used for :data:`KEEP_DAYS` days are pruned at the end of a session.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embedkit.core.errors import EmbedkitError
from embedkit.model.artifact import Artifact
from embedkit.model.toolchain import detect_isa, versions

ROOT = Path(__file__).resolve().parents[1]
KEEP_DAYS = 14
USED = ".used"  # touched on every hit: what pruning reads
# The code whose source decides an entry's bytes, by what the entry is.
EXPORT_CODE = ("src/embedkit/model", "src/embedkit/core")
VARIANT_CODE = (*EXPORT_CODE, "src/embedkit/variants", "src/embedkit/runtime", "src/embedkit/data")
TINY_CODE = (*EXPORT_CODE, "tests/tiny_models.py")
CONTRACT_CODE = (*VARIANT_CODE, "src/embedkit/quality", "src/embedkit/release/pipeline.py")


def default_root() -> Path:
    configured = os.environ.get("EMBEDKIT_TEST_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "embedkit-tests"


def code_digest(
    paths: Iterable[str], root: Path = ROOT, suffixes: tuple[str, ...] = (".py", ".json")
) -> str:
    """sha256 over the named files and the files under the named folders whose suffix is
    one of ``suffixes`` (every file when empty)."""
    h = hashlib.sha256()
    for rel in paths:
        base = root / rel
        files = (
            [base]
            if base.is_file()
            else sorted(
                p
                for p in base.rglob("*")
                if p.is_file()
                and "__pycache__" not in p.parts
                and (not suffixes or p.suffix in suffixes)
            )
        )
        for file in files:
            h.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def toolchain_key() -> dict[str, Any]:
    """What every entry depends on beyond its own inputs: the toolchain and the CPU."""
    return {"versions": versions(), "isa": repr(detect_isa())}


class ArtifactCache:
    """Entries under ``root``, one folder each, named ``<name>-<key>``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or default_root())
        self.evictions: list[str] = []  # "<entry>: <why>", reported at the end of a run
        self.built: list[str] = []
        self.hits: list[str] = []

    def key(self, parts: Mapping[str, Any]) -> str:
        blob = json.dumps({**toolchain_key(), **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def entry(
        self,
        name: str,
        parts: Mapping[str, Any],
        build: Callable[[Path], object],
        verify: Callable[[Path], object],
    ) -> Path:
        """The folder of entry ``name`` keyed by ``parts``: verified when it exists, else
        built into a fresh folder by ``build`` and then verified. ``verify`` raises an
        :class:`EmbedkitError` (a checksum mismatch, a missing file) for a bad entry."""
        path = self.root / f"{name}-{self.key(parts)}"
        with self._locked(path):
            if path.exists():
                try:
                    verify(path)
                except EmbedkitError as exc:
                    self.evictions.append(f"{path.name}: {exc.message}")
                    shutil.rmtree(path)
                else:
                    (path / USED).touch()
                    self.hits.append(path.name)
                    return path
            staging = path.with_name(f".{path.name}.{os.getpid()}.building")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                build(staging)
                verify(staging)  # what was just built loads, or nothing is kept
                (staging / USED).touch()
                staging.rename(path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.built.append(path.name)
            return path

    def artifact(
        self, name: str, parts: Mapping[str, Any], build: Callable[[Path], object]
    ) -> Artifact:
        """An artifact entry: ``build(dest)`` writes an artifact at ``dest``."""
        path = self.entry(
            name,
            parts,
            lambda d: build(d / "artifact"),
            lambda d: Artifact.load(d / "artifact"),
        )
        return Artifact.load(path / "artifact")

    def prune(self, keep_days: float = KEEP_DAYS) -> list[str]:
        """Remove entries unused for ``keep_days`` and leftovers of interrupted builds."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        cutoff = time.time() - keep_days * 86400
        for path in self.root.iterdir():
            stale = path.name.endswith(".building") and path.stat().st_mtime < time.time() - 3600
            used = path / USED
            if path.is_dir() and (stale or (used.exists() and used.stat().st_mtime < cutoff)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    def summary(self) -> list[str]:
        lines = [
            f"artifact cache {self.root}: {len(self.hits)} reused, {len(self.built)} built"
            + (f" ({', '.join(self.built)})" if self.built else "")
        ]
        lines += [f"artifact cache: evicted and rebuilt {why}" for why in self.evictions]
        return lines

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_files(artifact: Artifact) -> dict[str, str]:
    """A parent's part of a child's key: the sha256 of each of its files and its manifest."""
    manifest = hashlib.sha256((artifact.path / "manifest.json").read_bytes()).hexdigest()
    return {**artifact.manifest.files, "manifest.json": manifest}
