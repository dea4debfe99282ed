"""Fuzz tests: hypothesis in-process, schemathesis against a real server."""

from tests.servers import launcher, model_tag, server

__all__ = ["launcher", "model_tag", "server"]
