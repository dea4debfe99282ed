"""The tests' artifact cache (tests/artifact_cache.py): keyed by content, verified at load,
a corrupted entry evicted and rebuilt (and reported), a failed build leaving nothing."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from tests.artifact_cache import USED, ArtifactCache, code_digest

from embedkit.model.artifact import Artifact


@pytest.fixture()
def cache(tmp_path: Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache")


@pytest.fixture()
def builder(fp32_artifact: Artifact):
    """A build that writes a real artifact (a copy of the session's), counting its calls."""
    calls: list[Path] = []

    def build(dest: Path) -> None:
        calls.append(dest)
        shutil.copytree(fp32_artifact.path, dest)

    build.calls = calls  # type: ignore[attr-defined]
    return build


def test_a_second_get_reuses_the_verified_entry(cache: ArtifactCache, builder) -> None:
    first = cache.artifact("m", {"x": 1}, builder)
    again = cache.artifact("m", {"x": 1}, builder)
    assert len(builder.calls) == 1
    assert again.path == first.path and again.manifest.files == first.manifest.files
    assert cache.built == [first.path.parent.name] and cache.hits == [first.path.parent.name]


def test_every_part_of_the_key_counts(cache: ArtifactCache, builder) -> None:
    a = cache.artifact("m", {"x": 1}, builder)
    b = cache.artifact("m", {"x": 2}, builder)
    assert a.path != b.path and len(builder.calls) == 2


def test_a_corrupted_entry_is_evicted_rebuilt_and_reported(cache: ArtifactCache, builder) -> None:
    first = cache.artifact("m", {"x": 1}, builder)
    data = bytearray(first.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.model_path.write_bytes(bytes(data))

    rebuilt = cache.artifact("m", {"x": 1}, builder)
    assert len(builder.calls) == 2
    Artifact.load(rebuilt.path)  # verifies again
    assert len(cache.evictions) == 1
    assert "checksum mismatch for model.onnx" in cache.evictions[0]
    assert any("evicted and rebuilt" in line for line in cache.summary())


def test_a_failed_build_leaves_nothing(cache: ArtifactCache, fp32_artifact: Artifact) -> None:
    def half_built(dest: Path) -> None:
        shutil.copytree(fp32_artifact.path, dest)
        (dest / "tokenizer.json").unlink()  # what a crash midway would leave

    from embedkit.core.errors import ChecksumMismatch

    with pytest.raises(ChecksumMismatch, match=r"tokenizer\.json"):
        cache.artifact("m", {"x": 1}, half_built)
    assert [p for p in cache.root.iterdir() if not p.name.endswith(".lock")] == []


def test_prune_removes_entries_unused_for_long(cache: ArtifactCache, builder) -> None:
    old = cache.artifact("old", {}, builder).path.parent
    recent = cache.artifact("recent", {}, builder).path.parent
    long_ago = time.time() - 30 * 86400
    os.utime(old / USED, (long_ago, long_ago))
    assert cache.prune(keep_days=14) == [old.name]
    assert not old.exists() and recent.exists()


def test_code_digest_follows_the_source(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = code_digest(["pkg"], root=tmp_path)
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert code_digest(["pkg"], root=tmp_path) != before
