"""``python -m embedkit.cli``: what the image's Kubernetes Jobs call (no console script there)."""

from embedkit.cli import app

app()
