"""A real `bentoml serve service:EmbeddingAPI` subprocess for the HTTP tests.

The fp32 artifact (root conftest, a real export) is registered in the session's
temporary BENTOML_HOME; each test module that needs a server starts one from
the repo root on a free loopback port, waits for /readyz and tears the whole
process group down afterwards (helpers and fixtures: tests/servers.py).
"""

from tests.servers import Launcher, Server, launcher, model_tag, server

__all__ = ["Launcher", "Server", "launcher", "model_tag", "server"]
