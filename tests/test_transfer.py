"""Splitting big files into parts for the GPU machine, and joining them there."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from embedkit.core.errors import InvalidInput
from embedkit_bench import transfer

KiB = 1024


@pytest.fixture()
def sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    (src / "wheels" / "big-1.0-cp312-none-any.whl").write_bytes(os.urandom(700 * KiB))
    (src / "fp32").mkdir()
    (src / "fp32" / "model.onnx").write_bytes(os.urandom(300 * KiB))
    (src / "fp32" / "manifest.json").write_text('{"name": "x"}\n')
    return src


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_split_makes_small_parts_in_separate_folders_and_join_restores_them(
    sources: Path, tmp_path: Path
) -> None:
    out = tmp_path / "build" / "gpu-transfer"
    bundle = transfer.split(
        [str(sources / "wheels"), f"artifacts/fp32={sources / 'fp32'}"],
        out,
        part_bytes=256 * KiB,
    )
    assert len(bundle.parts) == 4 and bundle.members == ["wheels", "artifacts/fp32"]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [f.name for f in folders] == [f"gpu-part-0{i}" for i in range(1, 5)]
    for folder, part in zip(folders, bundle.parts, strict=True):
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted([Path(part.file).name, transfer.INDEX])  # one part per folder
        assert (out / part.file).stat().st_size <= 256 * KiB
    assert transfer.runs_plan(bundle, out)[0].startswith(f"run 1: carry {out}/gpu-part-01")

    dest = tmp_path / "payload"
    transfer.join(out, dest)
    for name in ("wheels/big-1.0-cp312-none-any.whl",):
        assert _digest(dest / name) == _digest(sources / name)
    assert _digest(dest / "artifacts/fp32/model.onnx") == _digest(sources / "fp32/model.onnx")
    transfer.join(out, dest)  # joining again replaces, never mixes


def test_join_names_missing_and_corrupt_parts(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    bundle = transfer.split([str(sources / "wheels")], out, part_bytes=200 * KiB)
    third = out / bundle.parts[2].file
    saved = third.read_bytes()
    third.unlink()
    assert transfer.missing_parts(out) == [bundle.parts[2].file]
    with pytest.raises(InvalidInput, match=r"1 of 4 parts missing .*gpu\.tar\.03"):
        transfer.join(out, tmp_path / "dest")
    third.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(InvalidInput, match=r"part gpu-part-03/gpu\.tar\.03 is corrupt"):
        transfer.join(out, tmp_path / "dest")
    with pytest.raises(InvalidInput, match="no parts of 'gpu'"):
        transfer.join(tmp_path / "empty", tmp_path / "dest")


def test_split_refuses_overwriting_and_unknown_sources(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    transfer.split([str(sources / "fp32")], out)
    with pytest.raises(InvalidInput, match="already holds parts"):
        transfer.split([str(sources / "fp32")], out)
    with pytest.raises(InvalidInput, match="does not exist"):
        transfer.split([str(tmp_path / "nope")], tmp_path / "u")
    with pytest.raises(InvalidInput, match="share a name"):
        transfer.split([f"a={sources / 'fp32'}", f"a={sources / 'wheels'}"], tmp_path / "v")


def test_command_line(sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    assert (
        transfer.main(["split", str(sources / "wheels"), "--out", str(out), "--part-mib", "0.5"])
        == 0
    )
    assert "in 2 parts" in capsys.readouterr().out
    assert transfer.main(["join", "--from", str(out), "--to", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "wheels" / "big-1.0-cp312-none-any.whl").is_file()
    assert transfer.main(["join", "--from", str(tmp_path / "x"), "--to", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.startswith("error: no parts")
