"""Ship big files to the GPU machine in parts: split here, join and verify there.

One device run carries at most 64 MiB (the working tree included), and the
onnxruntime-gpu wheel alone is 256 MB. :func:`split` packs its sources into one
uncompressed tar (wheels are zip files and ONNX weights barely compress) and
cuts it into parts below ``part_bytes``, each in its own folder
``<out>/<name>-part-NN/`` beside a copy of the index (every part's sha256 and
the whole bundle's). Folders under ``build/`` are git-ignored, so each device
run carries exactly one of them (``carry=["build/gpu-transfer/gpu-part-03"]``)
and the parts already sent stay on the warm machine. :func:`join` checks every
part, concatenates them, checks the whole and unpacks it.

Standard library only: ``join`` runs on the GPU machine before anything else
is installed there. Run as ``python -m embedkit_bench.transfer split|join``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from embedkit.core.errors import InvalidInput

MiB = 1 << 20
# Below the 60 MiB, leaving room in the 64 MiB of one run for the working tree.
DEFAULT_PART_BYTES = 56 * MiB
INDEX = "index.json"
_CHUNK = 4 * MiB


@dataclass(frozen=True)
class Part:
    file: str  # path relative to the transfer folder
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Bundle:
    name: str
    bytes: int
    sha256: str
    members: list[str]  # top-level names inside the tar
    parts: list[Part]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Bundle:
        raw = json.loads(text)
        return cls(**{**raw, "parts": [Part(**p) for p in raw["parts"]]})


def _sha256(path: Path) -> str:
    # Not model.artifact.sha256_file: importing it needs pydantic, not yet installed there.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sources(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` or ``PATH`` (named by its basename) → (name in the bundle, path)."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        src = Path(path)
        if not src.exists():
            raise InvalidInput(f"transfer source {src} does not exist")
        out.append((name or src.name, src))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise InvalidInput(f"two transfer sources share a name: {sorted(names)}")
    return out


def split(
    sources: list[str], out: Path, *, name: str = "gpu", part_bytes: int = DEFAULT_PART_BYTES
) -> Bundle:
    """Pack ``sources`` (files or folders, ``NAME=PATH`` to rename) into parts under ``out``."""
    if part_bytes < 1:
        raise InvalidInput("part size must be positive")
    members = _sources(sources)
    out = Path(out)
    if any(out.glob(f"{name}-part-*")):
        raise InvalidInput(f"{out} already holds parts of {name!r}; remove them first")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for arcname, path in members:
                tar.add(path, arcname=arcname)
        size = tar_path.stat().st_size
        count = max(1, math.ceil(size / part_bytes))
        width = max(2, len(str(count)))
        parts: list[Part] = []
        with open(tar_path, "rb") as fh:
            for i in range(1, count + 1):
                folder = out / f"{name}-part-{i:0{width}d}"
                folder.mkdir()
                file = folder / f"{name}.tar.{i:0{width}d}"
                digest = hashlib.sha256()
                left = part_bytes
                with open(file, "wb") as dst:
                    while left and (chunk := fh.read(min(_CHUNK, left))):
                        dst.write(chunk)
                        digest.update(chunk)
                        left -= len(chunk)
                rel = file.relative_to(out).as_posix()
                parts.append(Part(rel, file.stat().st_size, digest.hexdigest()))
        bundle = Bundle(name, size, _sha256(tar_path), [n for n, _ in members], parts)
    for part in parts:  # each folder travels alone: each carries the whole index
        (out / part.file).parent.joinpath(INDEX).write_text(bundle.to_json())
    return bundle


def read_index(folder: Path, name: str = "gpu") -> Bundle:
    indexes = sorted(Path(folder).glob(f"{name}-part-*/{INDEX}"))
    if not indexes:
        raise InvalidInput(f"no parts of {name!r} under {folder} (nothing was sent?)")
    return Bundle.from_json(indexes[0].read_text())


def missing_parts(folder: Path, name: str = "gpu") -> list[str]:
    """Parts of the bundle not (yet) under ``folder``."""
    bundle = read_index(folder, name)
    return [p.file for p in bundle.parts if not (Path(folder) / p.file).is_file()]


def join(folder: Path, dest: Path, *, name: str = "gpu") -> Bundle:
    """Check every part's and the whole bundle's sha256, then unpack into ``dest``."""
    folder, dest = Path(folder), Path(dest)
    bundle = read_index(folder, name)
    missing = missing_parts(folder, name)
    if missing:
        raise InvalidInput(
            f"{len(missing)} of {len(bundle.parts)} parts missing under {folder}: "
            + ", ".join(missing)
        )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        whole = hashlib.sha256()
        with open(tar_path, "wb") as dst:
            for part in bundle.parts:
                src = folder / part.file
                got = _sha256(src)
                if got != part.sha256:
                    raise InvalidInput(
                        f"part {part.file} is corrupt: sha256 {got[:12]}…, "
                        f"expected {part.sha256[:12]}…"
                    )
                with open(src, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        dst.write(chunk)
                        whole.update(chunk)
        if whole.hexdigest() != bundle.sha256:
            raise InvalidInput(
                f"joined {name}.tar has sha256 {whole.hexdigest()[:12]}…, "
                f"expected {bundle.sha256[:12]}…"
            )
        for member in bundle.members:  # a re-join replaces what an earlier one unpacked
            target = dest / member
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")  # no absolute paths, links out or devices
    return bundle


def runs_plan(bundle: Bundle, folder: Path) -> list[str]:
    """One line per device run: which folder it carries."""
    return [
        f"run {i}: carry {(Path(folder) / Path(p.file).parent).as_posix()} "
        f"({p.bytes / MiB:.1f} MiB)"
        for i, p in enumerate(bundle.parts, 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedkit_bench.transfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="pack sources into parts, one folder each")
    sp.add_argument("sources", nargs="+", help="files or folders; NAME=PATH renames")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--name", default="gpu")
    sp.add_argument("--part-mib", type=float, default=DEFAULT_PART_BYTES / MiB)
    jp = sub.add_parser("join", help="verify and unpack the parts")
    jp.add_argument("--from", dest="source", type=Path, required=True)
    jp.add_argument("--to", dest="dest", type=Path, required=True)
    jp.add_argument("--name", default="gpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            bundle = split(
                args.sources, args.out, name=args.name, part_bytes=int(args.part_mib * MiB)
            )
            print(f"{bundle.name}: {bundle.bytes / MiB:.1f} MiB in {len(bundle.parts)} parts")
            print("\n".join(runs_plan(bundle, args.out)))
        else:
            bundle = join(args.source, args.dest, name=args.name)
            print(f"{bundle.name}: {len(bundle.parts)} parts verified, unpacked into {args.dest}")
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
