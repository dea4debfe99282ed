"""Prometheus metrics of our own, beside BentoML's.

Metrics are created lazily on first use: BentoML workers set
``PROMETHEUS_MULTIPROC_DIR`` after importing the service module, and a
``prometheus_client`` metric created before that is invisible to ``/metrics``.
So nothing here touches prometheus_client at import time; call :func:`get`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Metrics:
    provider_fallback: Any  # Counter{requested, active}
    model_load_failures: Any  # Counter{reason}
    variant_refusals: Any  # Counter{variant, reason}: variant refused at startup, fp32 serves
    served_model: Any  # Gauge{name, version, variant, compatibility, precision, provider, isa}
    # --- serving (the BentoML services) ---
    texts_embedded: Any  # Counter{route, model}
    tokens_embedded: Any  # Counter{route, model}: rerank routes count their pairs' tokens
    pairs_reranked: Any  # Counter{route, model}: (query, document) pairs scored
    rejected_requests: Any  # Counter{reason}: client mistakes and overload, by error code
    dropped_requests: Any  # Counter: requests cancelled because their client disconnected
    padding_ratio: Any  # Histogram: padded tokens / real tokens of one inference call
    sub_batch_size: Any  # Histogram: texts per ORT run
    sub_batch_tokens: Any  # Histogram: padded tokens per ORT run
    queue_wait: (
        Any  # Histogram{api, model}: front hand-off → inner batch start (transport + batching)
    )
    inference_time: Any  # Histogram{api, model}: one batched inference call in the Embedder
    # --- tenants (serve/tenants.py) ---
    quota_rejections: Any  # Counter{tenant}: requests refused 429 over the tenant's quota
    tenant_tokens: Any  # Counter{tenant, lane}: real tokens embedded per tenant and lane
    bulk_runs_ahead: Any  # Histogram: bulk ORT runs an interactive call waited behind
    quota_store_up: Any  # Gauge{store}: 1 while the shared quota store answers (edge/quota_store)


@lru_cache(maxsize=1)
def get() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    seconds = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5, 10)

    return Metrics(
        provider_fallback=Counter(
            "embedkit_provider_fallback_total",
            "Sessions whose first requested available provider did not attach.",
            ["requested", "active"],
        ),
        model_load_failures=Counter(
            "embedkit_model_load_failures_total",
            "Artifacts refused at load (checksum, signature, missing files).",
            ["reason"],
        ),
        variant_refusals=Counter(
            "embedkit_variant_refusals_total",
            "Variants refused at startup (other ISA level or runtime than measured on, "
            "reference vectors not reproduced, reindex class not named); the fp32 parent serves.",
            ["variant", "reason"],
        ),
        served_model=Gauge(
            "embedkit_served_model_info",
            "1, labelled with the served identity (serve/identity.py).",
            ["name", "version", "variant", "compatibility", "precision", "provider", "isa"],
            multiprocess_mode="max",
        ),
        texts_embedded=Counter(
            "embedkit_texts_embedded_total",
            "Texts (or token-id inputs) embedded.",
            ["route", "model"],
        ),
        tokens_embedded=Counter(
            "embedkit_tokens_embedded_total",
            "Real tokens embedded (special tokens included, padding excluded); on the rerank "
            "routes, the tokens of the (query, document) pairs scored.",
            ["route", "model"],
        ),
        pairs_reranked=Counter(
            "embedkit_pairs_reranked_total",
            "(query, document) pairs scored by a reranker.",
            ["route", "model"],
        ),
        rejected_requests=Counter(
            "embedkit_rejected_requests_total",
            "Requests answered with an error, by error code (invalid_input, overloaded, ...).",
            ["reason"],
        ),
        dropped_requests=Counter(
            "embedkit_dropped_requests_total",
            "Requests cancelled because the client disconnected before the answer.",
        ),
        padding_ratio=Histogram(
            "embedkit_padding_ratio",
            "Padded tokens / real tokens of one batched inference call (1.0 = no padding).",
            buckets=(1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
        ),
        sub_batch_size=Histogram(
            "embedkit_sub_batch_size",
            "Texts per ONNX Runtime run (after token-aware splitting).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        ),
        sub_batch_tokens=Histogram(
            "embedkit_sub_batch_tokens",
            "Padded tokens per ONNX Runtime run.",
            buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        ),
        queue_wait=Histogram(
            "embedkit_queue_wait_seconds",
            "From the front service handing a request over to the Embedder batch starting.",
            ["api", "model"],
            buckets=seconds,
        ),
        inference_time=Histogram(
            "embedkit_inference_seconds",
            "One batched inference call in the Embedder (all its sub-batches).",
            ["api", "model"],
            buckets=seconds,
        ),
        quota_rejections=Counter(
            "embedkit_quota_rejections_total",
            "Requests refused (429) because their tenant's token-rate quota was spent.",
            ["tenant"],
        ),
        tenant_tokens=Counter(
            "embedkit_tenant_tokens_total",
            "Real tokens embedded, per tenant and the lane that served them.",
            ["tenant", "lane"],
        ),
        bulk_runs_ahead=Histogram(
            "embedkit_bulk_runs_ahead_of_query",
            "Bulk ONNX Runtime runs that held a runner while an interactive call waited for one "
            "(bounded by the runs at once: docs/service.md § Tenants).",
            buckets=(0, 1, 2, 4, 8, 16),
        ),
        quota_store_up=Gauge(
            "embedkit_quota_store_up",
            "1 while the shared quota store (Redis) answers; 0 while this process charges its "
            "local fallback bucket (rate / live processes). Absent without a quota store (a "
            "labelled gauge exports nothing until set: an unset one would read 0, down).",
            ["store"],
            multiprocess_mode="livemin",
        ),
    )
