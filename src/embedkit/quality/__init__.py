"""Whether an artifact may serve: the fp32 conversion contract and the per-segment gate for
variants (segments, scoring, gate, report)."""
