"""The load tests: timed (they run alone), against the session's server and the checked
text pool (tests/servers.py)."""
