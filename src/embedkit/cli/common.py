"""What every command shares: the app, one-line errors, progress, common options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from embedkit.core.errors import EmbedkitError, InvalidInput

app = typer.Typer(
    name="embedkit",
    help="Export, verify, release and serve sentence-transformers models on ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Map our errors (and OS errors) to a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmbedkitError as exc:
            err.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            err.print(
                f"error:{where}: {exc.strerror or exc}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner whose text follows the pipeline's steps (stderr, so stdout stays clean)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(title)

        def step(message: str) -> None:
            bar.update(task, description=f"{title}: {message}")
            err.print(f"  · {message}", highlight=False)

        yield step


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Recipe name, recipe file, model directory or hub id."),
]


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"{option} must list positive integers, got {text!r}")
    return values


def named_targets(items: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=TAG_OR_DIR`` (or a bare tag/dir, named after itself) → {name: target}."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, target = item.partition("=")
        if not sep:
            name, target = Path(item.rstrip("/")).name or item, item
        if not name or not target:
            raise InvalidInput(f"{option} takes NAME=TAG_OR_DIR, got {item!r}")
        out[name] = target
    return out


@contextmanager
def progress_bar(title: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar with a total (stderr); the callback takes (done, total, description)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(title, total=None)

        def update(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{title}: {description}")

        yield update


# --- benchmarks, soak and Bentos (scripts/bench-engine, bench-http, soak, build-bento) --------


def env_pairs(items: list[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` items → {key: value}."""
    pairs: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def script_main(name: str) -> None:
    """Run command ``name`` as ``scripts/NAME`` (the thin wrappers in scripts/)."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    command.main(sys.argv[1:], prog_name=f"scripts/{name}")


def invocation() -> str:
    """This run's command line for a report: `embedkit CMD …` or `scripts/NAME …`."""
    import shlex

    name = Path(sys.argv[0]).name
    return shlex.join(["embedkit" if name == "embedkit" else f"scripts/{name}", *sys.argv[1:]])


EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        metavar="KEY=VALUE",
        help="Extra environment for the server it starts (repeatable).",
    ),
]
ArtifactOpt = Annotated[
    str | None,
    typer.Option(
        help="Artifact dir or tag (default: artifacts/bench-fp32, exported on first use)."
    ),
]


def check_variants(values: list[str] | None) -> list[str] | None:
    from embedkit.deploy.bento import VARIANTS

    for value in values or []:
        if value not in VARIANTS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(sorted(VARIANTS))}")
    return values
