"""The BentoML service options embedkit derives from its settings."""

from __future__ import annotations

from opentelemetry.util.http import ExcludeList

from embedkit.core.settings import Settings
from embedkit.serve.pipeline.options import embedder_config, front_config


def test_tracing_off_excludes_every_route_from_bentoml_spans() -> None:
    for config in (front_config(Settings()), embedder_config(Settings())):
        excluded = ExcludeList(config["tracing"]["excluded_urls"])
        for url in ("http://h/embed/query", "http://h/v1/embeddings", "http://h/embed_query"):
            assert excluded.url_disabled(url)


def test_tracing_on_leaves_bentoml_tracing_alone() -> None:
    on = Settings(tracing=True)
    assert "tracing" not in front_config(on)
    assert "tracing" not in embedder_config(on)


def test_the_service_that_owns_the_session_asks_for_its_resources() -> None:
    single, split = Settings(), Settings(topology="split")
    assert single.topology == "single"
    assert front_config(single)["resources"] == {"cpu": str(single.intra_op_threads)}
    assert front_config(Settings(gpu=True))["resources"] == {"gpu": 1}
    assert "resources" not in front_config(split)
    assert embedder_config(Settings(topology="split", gpu=True))["resources"] == {"gpu": 1}
