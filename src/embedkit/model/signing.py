"""Ed25519 signatures over artifact manifests.

The manifest lists the sha256 of every artifact file, so signing its exact
bytes signs the whole artifact. ``manifest.sig`` holds the signer's key id and
the signature; a verifier accepts it only if the key is in its trusted list.
Private keys are PEM (PKCS#8) files held by the release owner; public keys are
PEM files or raw base64 strings (see docs/signing.md for custody and rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from embedkit.core.errors import SignatureError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new PEM key pair (private file mode 0600); return the key id."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path = Path(private_path)
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(pem)
    public_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(private.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(spec: str) -> Ed25519PublicKey:
    """A trusted key: a PEM file path, or the raw 32-byte key in base64."""
    path = Path(spec)
    try:
        if path.is_file():
            key = serialization.load_pem_public_key(path.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"trusted key {spec} is not an Ed25519 public key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(spec, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise SignatureError(
            f"trusted key {spec[:40]!r} is neither a PEM file nor base64 Ed25519"
        ) from exc


def sign(artifact_dir: Path, private_key_path: Path) -> str:
    """Sign ``manifest.json`` of an artifact directory; return the key id."""
    private = load_private_key(private_key_path)
    manifest = Path(artifact_dir) / MANIFEST
    signature = private.sign(manifest.read_bytes())
    kid = key_id(private.public_key())
    record = {
        "algorithm": ALGORITHM,
        "key_id": kid,
        "signature": base64.b64encode(signature).decode(),
    }
    (Path(artifact_dir) / SIGNATURE).write_text(json.dumps(record) + "\n")
    return kid


@dataclass(frozen=True)
class Trust:
    """Whether signatures are required, and by whom."""

    require_signature: bool = False
    trusted_keys: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls) -> Trust:
        from embedkit.core.settings import get_settings

        s = get_settings()
        return cls(s.require_signature, tuple(s.trusted_keys))


def verify(artifact_dir: Path, trusted_keys: Sequence[str]) -> str:
    """Check ``manifest.sig`` against the trusted keys; return the signer's key id."""
    sig_file = Path(artifact_dir) / SIGNATURE
    if not trusted_keys:
        raise SignatureError("signature required but no trusted keys are configured")
    if not sig_file.is_file():
        raise SignatureError(f"artifact {artifact_dir} is not signed (no {SIGNATURE})")
    try:
        record = json.loads(sig_file.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        kid = str(record["key_id"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{sig_file} is malformed") from exc
    if record.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{sig_file}: unsupported algorithm {record.get('algorithm')!r}")
    keys = {key_id(k): k for k in (load_public_key(spec) for spec in trusted_keys)}
    if kid not in keys:
        raise SignatureError(f"artifact {artifact_dir} is signed by untrusted key {kid}")
    try:
        keys[kid].verify(signature, (Path(artifact_dir) / MANIFEST).read_bytes())
    except InvalidSignature as exc:
        raise SignatureError(f"signature of {artifact_dir} does not match its manifest") from exc
    return kid
