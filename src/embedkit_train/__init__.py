"""Training recipes (tooling, like ``embedkit_bench``: neither the Bento nor the image
carries this package or its ``train`` extra). A checkout registers its commands on
``embedkit`` through the ``embedkit.commands`` entry point (pyproject.toml)."""
