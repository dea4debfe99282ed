"""The two BentoML services' work (``service.py`` wires them): the front side (schemas,
jobs, errors, middleware, client) never imports onnxruntime; ``embedder`` owns the engine."""
