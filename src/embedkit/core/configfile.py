"""Typed YAML configuration files (recipes, gate thresholds, price tables).

One loader so every file answers a missing file, bad YAML or a wrong field with
the same one-line :class:`InvalidInput`-style error naming the file and, for a
wrong field, the field and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from embedkit.core.errors import EmbedkitError, InvalidInput

M = TypeVar("M", bound=BaseModel)


def _reason(exc: yaml.YAMLError | ValidationError) -> str:
    """The first problem on one line: ``field.path: message`` or ``line N: yaml problem``.

    ``str(ValidationError)`` starts with "1 validation error for X", which names neither.
    """
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{loc}: {first['msg']}{more}" if loc else f"{first['msg']}{more}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"line {exc.problem_mark.line + 1}: {exc.problem}"
    return str(exc).splitlines()[0]


def load_yaml(
    path: Path, model: type[M], what: str, *, error: type[EmbedkitError] = InvalidInput
) -> M:
    """Parse ``path`` into ``model``; raise ``error`` with one line naming ``what`` and the file."""
    try:
        return model.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise error(f"{what} {path} is invalid: {_reason(exc)}".replace("\n", " ")) from exc
