"""The one YAML loader: every failure is one line naming the file and, for a bad field,
the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import InvalidInput, ModelSourceError


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(ge=0, le=1)
    by_group: dict[str, float] = Field(default_factory=dict)


def _load(tmp_path: Path, text: str) -> str:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as info:
        load_yaml(path, Limits, "limits file")
    message = info.value.message
    assert "\n" not in message and message.startswith(f"limits file {path} is invalid: ")
    return message.removeprefix(f"limits file {path} is invalid: ")


def test_a_bad_field_is_named_with_its_reason(tmp_path: Path) -> None:
    assert _load(tmp_path, "threshold: 2\n") == "threshold: Input should be less than or equal to 1"
    assert _load(tmp_path, "threshold: 0.5\nby_group: {stsb: high}\n").startswith(
        "by_group.stsb: Input should be a valid number"
    )
    assert _load(tmp_path, "threshold: 0.5\nthreshhold: 0.4\n") == (
        "threshhold: Extra inputs are not permitted"
    )
    assert _load(tmp_path, "by_group: {a: x}\n") == "threshold: Field required (and 1 more)"


def test_not_a_mapping_and_bad_yaml_are_one_line(tmp_path: Path) -> None:
    assert "valid dictionary" in _load(tmp_path, "- just\n- a list\n")
    assert _load(tmp_path, "threshold: [0.5\n").startswith("line 2: ")


def test_missing_file_and_the_error_class(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"cannot read recipe .*nope\.yaml: No such file"):
        load_yaml(tmp_path / "nope.yaml", Limits, "recipe", error=ModelSourceError)
