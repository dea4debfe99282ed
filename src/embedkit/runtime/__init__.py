"""The serving path without HTTP: ORT sessions (``session``), tokenisation (``tokens``),
the batching engine (``engine``) and numpy-only post-processing (``vectors``)."""
