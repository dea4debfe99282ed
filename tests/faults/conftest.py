"""Fault-injection tests start their own servers (tests/servers.py)."""
