"""The `embedkit` command line: a thin face over the library, one module per command group.

``model`` (export, validate, optimize, quantize, evaluate, encode, info, config, keys),
``release`` (the release pipeline, the performance gate), ``deploy`` (Bentos, the image,
canary, rollback drill, pools) and ``jobs`` (reembed, embed-corpus). Measurement commands
(``bench``, ``profile``, ``soak``, ``bench-*``, ``chunk-retrieval``) live with the tooling in
``embedkit_bench``, which the Bento and the image do not carry; an installed checkout
registers them through the ``embedkit.commands`` entry point (pyproject.toml).

Every command turns an :class:`EmbedkitError` (and file-system errors) into one line on
stderr and a non-zero exit; long steps show rich progress.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from embedkit.cli import deploy, jobs, model, release  # noqa: F401  (they register commands)
from embedkit.cli.common import app, script_main

for _plugin in entry_points(group="embedkit.commands"):
    try:
        _plugin.load()  # importing the module registers its commands on `app`
    except ModuleNotFoundError as exc:
        # Registered but not installed (a wheel without the tooling): its commands are absent.
        if exc.name != _plugin.module.partition(".")[0]:
            raise

__all__ = ["app", "script_main"]
