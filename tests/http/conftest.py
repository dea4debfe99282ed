"""Real `bentoml serve service:EmbeddingAPI` subprocesses for the HTTP tests.

The fp32 artifact (root conftest) is registered in the session's temporary BENTOML_HOME;
the default server is started once per session and shared; a module whose settings differ
starts its own from the repo root on a free loopback port, waits for /readyz and tears the
whole process group down afterwards (helpers and fixtures: tests/servers.py).
"""
