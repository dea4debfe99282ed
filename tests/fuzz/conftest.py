"""Fuzz tests: hypothesis in-process, schemathesis against the session's server
(tests/servers.py)."""
