"""Typed YAML configuration files (recipes, gate thresholds, price tables).

One loader so every file answers a missing file, bad YAML or a wrong field with
the same one-line :class:`InvalidInput`-style error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from embedkit.core.errors import EmbedkitError, InvalidInput

M = TypeVar("M", bound=BaseModel)


def load_yaml(
    path: Path, model: type[M], what: str, *, error: type[EmbedkitError] = InvalidInput
) -> M:
    """Parse ``path`` into ``model``; raise ``error`` with one line naming ``what`` and the file."""
    try:
        return model.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise error(f"{what} {path} is invalid: {str(exc).splitlines()[0]}") from exc
