"""The evaluation data the README's commands need ships inside the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import PACKAGED_DATA_DIR, Settings, get_settings
from embedkit.model import evaldata


def test_default_data_dir_is_the_packaged_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDKIT_DATA_DIR", raising=False)
    assert Settings().data_dir == PACKAGED_DATA_DIR
    assert PACKAGED_DATA_DIR.is_relative_to(Path(evaldata.__file__).resolve().parents[1])


def test_packaged_data_is_complete_and_attributed() -> None:
    root = PACKAGED_DATA_DIR
    # Licences and provenance travel with the copies.
    for name in ("README.md", "stsbenchmark/LICENSE.txt", "stsb-multi-mt/LICENSE"):
        assert (root / name).is_file(), name
    sizes = {
        s: len(evaldata.read_sts(root / f"stsbenchmark/sts-{s}.csv"))
        for s in ("train", "dev", "test")
    }
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
    for lang in evaldata.LANGUAGES:
        path = root / f"stsb-multi-mt/stsb-{lang}-dev.csv"
        assert path.is_file(), path


def test_a_data_dir_without_the_file_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EMBEDKIT_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidInput, match=r"sts-test.csv not found .*EMBEDKIT_DATA_DIR"):
            evaldata.data_file("stsbenchmark/sts-test.csv")
    finally:
        get_settings.cache_clear()
