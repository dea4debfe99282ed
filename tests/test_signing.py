"""Ed25519 signing: only artifacts signed by a trusted key load when signing is required."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from embedkit.core.errors import SignatureError
from embedkit.model import signing
from embedkit.model.artifact import Artifact, finalize
from embedkit.model.signing import Trust


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    signing.generate_keypair(private, public)
    assert private.stat().st_mode & 0o777 == 0o600
    return private, public


def test_signed_artifact_loads_with_a_trusted_key(
    artifact_copy: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    kid = signing.sign(artifact_copy, private)
    assert Artifact.load(artifact_copy, trust=Trust(True, (str(public),)))
    # The same key given as raw base64 works too.
    raw = signing.load_public_key(str(public)).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert signing.verify(artifact_copy, [base64.b64encode(raw).decode()]) == kid


def test_unsigned_artifact_is_refused(artifact_copy: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        Artifact.load(artifact_copy, trust=Trust(True, (str(keys[1]),)))
    Artifact.load(artifact_copy, trust=Trust(False, ()))  # signing optional: loads


def test_untrusted_signer_is_refused(
    artifact_copy: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other_private, other_public = tmp_path / "other.key", tmp_path / "other.pub"
    signing.generate_keypair(other_private, other_public)
    signing.sign(artifact_copy, other_private)
    with pytest.raises(SignatureError, match="untrusted key"):
        Artifact.load(artifact_copy, trust=Trust(True, (str(keys[1]),)))


def test_edited_manifest_breaks_the_signature(artifact_copy: Path, keys: tuple[Path, Path]) -> None:
    signing.sign(artifact_copy, keys[0])
    manifest = artifact_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"normalize": true', '"normalize": false', 1))
    with pytest.raises(SignatureError, match="does not match"):
        Artifact.load(artifact_copy, trust=Trust(True, (str(keys[1]),)))


def test_refinalizing_drops_a_stale_signature(artifact_copy: Path, keys: tuple[Path, Path]) -> None:
    signing.sign(artifact_copy, keys[0])
    finalize(artifact_copy, Artifact.read_manifest(artifact_copy).model_dump(exclude={"files"}))
    assert not (artifact_copy / "manifest.sig").exists()


def test_bad_key_material(tmp_path: Path, artifact_copy: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(SignatureError, match="not an unencrypted PEM"):
        signing.sign(artifact_copy, junk)
    with pytest.raises(SignatureError, match="neither a PEM file nor base64"):
        signing.load_public_key("!!not-base64!!")
    with pytest.raises(SignatureError, match="no trusted keys"):
        signing.verify(artifact_copy, [])
