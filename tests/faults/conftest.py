"""Fault-injection tests start their own servers (tests/servers.py)."""

from tests.load.conftest import corpus
from tests.servers import launcher, model_tag

__all__ = ["corpus", "launcher", "model_tag"]
