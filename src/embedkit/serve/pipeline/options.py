"""The two services' ``@bentoml.service`` options and batching policy, from settings."""

from __future__ import annotations

import logging
from typing import Any

from embedkit.core.settings import Settings

log = logging.getLogger(__name__)


def tracing_config(settings: Settings) -> dict[str, Any]:
    """BentoML ``tracing`` options: with tracing off, every URL is excluded from its
    OpenTelemetry middleware, which otherwise makes (and drops) a span per request."""
    if settings.tracing:
        return {}
    from bentoml._internal.configuration.containers import BentoMLContainer

    if BentoMLContainer.config.tracing.exporter_type.get():
        log.warning(
            "a BentoML tracing exporter is configured but EMBEDKIT_TRACING is off: "
            "embedkit's services are excluded from tracing (set EMBEDKIT_TRACING=true)"
        )
    return {"tracing": {"excluded_urls": [".*"]}}


def embedder_config(settings: Settings) -> dict[str, Any]:
    """Options of the inner service (resources, workers, threads).

    ``threads=1``: one ORT run at a time per worker, each using ``intra_op_threads``
    cores; more would oversubscribe. ``runner_connection`` works around BentoML
    1.4.40's inter-service client refresh bug (failures with >100 requests in
    flight or after 300 s).
    """
    return {
        "name": "embedder",
        "workers": settings.workers,
        "threads": 1,
        "resources": engine_resources(settings),
        "traffic": {"timeout": settings.request_timeout_s},
        "runner_connection": {"max_requests": 1_000_000_000, "max_age": 1e9},
        # Internal hop: the front's access log already records the request; a line per
        # batch here costs CPU the model needs.
        "logging": {"access": {"enabled": False}},
        **tracing_config(settings),
    }


def ort_runs(settings: Settings) -> int:
    """ORT runs at once in one engine process: ``intra_op_threads`` single-core runs with
    ``parallel_runs`` (topology=single, CPU), else one run using every thread."""
    single_cpu = settings.topology == "single" and not settings.gpu
    return settings.intra_op_threads if single_cpu and settings.parallel_runs else 1


def engine_settings(settings: Settings) -> Settings:
    """The settings the engine's session is built with: one intra-op thread per run when
    several runs share the cores (:func:`ort_runs`)."""
    if ort_runs(settings) > 1:
        return settings.model_copy(update={"intra_op_threads": 1})
    return settings


def engine_resources(settings: Settings) -> dict[str, Any]:
    """What the service that owns the ORT session asks the scheduler for."""
    return {"gpu": 1} if settings.gpu else {"cpu": str(settings.intra_op_threads)}


def front_config(settings: Settings) -> dict[str, Any]:
    """Options of the front service (with ``topology=single``, the only one: it owns the
    ORT session too, so it carries the engine's resources).

    Split: one worker; on 2 cores a second front process only competes with ORT (measured:
    docs/benchmarks/http.md). Single: ``workers`` processes, each with its own session.
    BentoML's timeout sits above ours so our 504 (OpenAI body) answers first; admission
    control is ours too (:class:`~embedkit.serve.edge.middleware.EdgeMiddleware`).
    """
    single = settings.topology == "single"
    return {
        "name": "embedkit",
        "workers": settings.workers if single else 1,
        **({"resources": engine_resources(settings)} if single else {}),
        "traffic": {"timeout": settings.request_timeout_s + 5},
        "logging": {"access": {"enabled": settings.access_log}},
        **tracing_config(settings),
    }


def batching_policy(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each lane's policy as ``/info`` shows it: BentoML's knobs and the front's part."""
    front = "coalescing" if settings.front_coalescing else "none"
    query_front = (
        "continuous" if front == "coalescing" and settings.query_continuous_batching else front
    )
    return {
        "bulk": {
            "max_batch_size": settings.bulk_max_batch_size,
            "max_latency_ms": settings.bulk_max_latency_ms,
            "front": front,
        },
        "query": {
            "max_batch_size": settings.query_max_batch_size,
            "max_latency_ms": settings.query_max_latency_ms,
            "front": query_front,
        },
    }
