"""Fixtures of the load tests: a shared server and the checked text pool."""

from __future__ import annotations

import pytest
from tests.servers import launcher, model_tag, server

__all__ = ["launcher", "model_tag", "server"]


@pytest.fixture(scope="session")
def corpus(fp32_artifact):
    """400 short + 20 long distinct texts with their expected raw vectors (in-process engine)."""
    from embedkit.bench import loadtest
    from embedkit.runtime.engine import Engine

    texts = loadtest.sts_texts(n_short=400, n_long=20)
    return loadtest.build_corpus(Engine(fp32_artifact), texts, n_long=20)
