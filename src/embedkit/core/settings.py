"""One typed settings object for the whole project.

Every field can be set by an ``EMBEDKIT_<FIELD>`` environment variable (lists
as JSON, e.g. ``EMBEDKIT_PROVIDERS='["CPUExecutionProvider"]'``) and most by a
CLI flag. Each description states the trade-off; ``docs/configuration.md`` is
generated from these descriptions (``embedkit config --markdown``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# STS Benchmark and stsb-multi-mt, vendored with their licences (data/evaldata/README.md).
PACKAGED_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "evaldata"

DEFAULT_PROVIDERS = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
]


def _default_threads() -> int:
    # The cores this process may use (cgroup/affinity aware), not the host's:
    # ORT's own default oversubscribes a CPU-limited container.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDKIT_", extra="ignore", frozen=True)

    # --- which model ------------------------------------------------------
    model: str = Field(
        "all-minilm-l6-v2:latest",
        description="BentoML model tag to serve (a path is refused: served models come only "
        "from the model store).",
    )
    variant: str | None = Field(
        None,
        description="Serve the newest registered version of `model`'s name with this variant "
        "name (e.g. `dynamic-int8-s8-pc`) instead of `model` itself. Naming a variant here is "
        "the only way a `reindex`-class variant serves: its vectors are correct only for an "
        "index built entirely with it (docs/service.md § Compatibility classes). Unset: the "
        "release's default (fp32 or an index-compatible variant).",
    )
    models: list[str] = Field(
        default_factory=list,
        description="Several released models in one deployment (topology=single): BentoML "
        "model tags, the first the default a request without `model` gets; each is picked by "
        "its name (the request's `model`), has its own admission budget (max_queued_tokens "
        "each) and adds its session's memory, not a process; the ORT runner threads are "
        "shared (docs/service.md § Several models). Empty: serve `model` alone. A tag that is "
        "missing or tampered with stops startup, naming it.",
    )
    served_model_name: str | None = Field(
        None,
        description="Name clients pass as `model` in /v1/embeddings; defaults to the "
        "artifact's name. With `models`, it names the first (default) model.",
    )

    # --- ONNX Runtime session ----------------------------------------------
    providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="Execution-provider priority; filtered by what the installed onnxruntime "
        "offers.",
    )
    strict_providers: bool = Field(
        False,
        description="Never serve a GPU request from the CPU: refuse to start when the first "
        "requested provider is a GPU one and the session would run on the CPU. A fallback "
        "that stays on the GPU (TensorRT → CUDA) still starts; every fallback is logged once "
        "and counted (embedkit_provider_fallback_total, /info).",
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ORT graph optimisation; 'all' adds layout transforms (CPU)."
    )
    intra_op_threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        description="Threads inside one operator. Set to the worker's CPU share; ORT's default "
        "uses every host core and oversubscribes containers.",
    )
    inter_op_threads: int = Field(
        1, ge=1, description="Threads across independent operators (only used in parallel mode)."
    )
    execution_mode: Literal["sequential", "parallel"] = Field(
        "sequential", description="Transformer graphs are a chain; parallel mode rarely helps."
    )
    enable_cpu_mem_arena: bool = Field(
        True, description="CPU memory arena: faster allocation, but grows with new shapes."
    )
    enable_mem_pattern: bool = Field(
        False,
        description="Memory pattern planning; only pays off for fixed shapes, which embeddings "
        "lack.",
    )
    arena_shrinkage: bool = Field(
        True,
        description="Shrink the CPU arena after each run so varied sequence lengths do not grow "
        "the process without bound.",
    )
    allow_spinning: bool = Field(
        True,
        description="Let ORT worker threads spin between ops instead of sleeping, for at most "
        "spin_duration_us: they catch the next op of a run without a wake-up, at the cost of CPU "
        "burnt while spinning. Pays on cores the model has to itself; turn off where other busy "
        "processes share the cores (docs/benchmarks/defaults.md).",
    )
    spin_duration_us: int = Field(
        200,
        ge=0,
        description="With allow_spinning: how long an idle ORT worker spins before it sleeps "
        "(ORT's session.intra_op/inter_op.spin_duration_us); bounds the CPU spinning can waste "
        "after each run.",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Bind inputs/outputs to device memory. 'auto': on for CUDA/TensorRT, off on "
        "CPU (no gain there: inputs already live in host memory).",
    )
    profiling_dir: Path | None = Field(
        None, description="If set, ORT writes a profiling trace here (costly; for diagnosis only)."
    )
    optimized_model_path: Path | None = Field(
        None, description="If set, ORT saves the optimised graph here on session creation."
    )
    cuda_device_id: int = Field(0, ge=0, description="CUDA device to run on.")
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested",
        description="CUDA arena growth; kSameAsRequested wastes less memory on varied shapes.",
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN algorithm search (transformers have few convolutions)."
    )
    trt_fp16: bool = Field(
        True,
        description="Let TensorRT build FP16 engines, for artifacts whose manifest records the "
        "quality gate's approval of trt-fp16 (a GPU gate run); others get FP32 engines, with "
        "one warning. FP16 roughly doubles TensorRT throughput but changes the vectors.",
    )
    trt_engine_cache_dir: Path = Field(
        Path("/tmp/embedkit-trt-cache"),
        description="Where TensorRT caches built engines and timing data, one subfolder per "
        "model, precision and onnxruntime release. Building takes minutes: put it on a "
        "volume that outlives the pod (docs/deployment.md).",
    )

    openvino_cache_dir: Path | None = Field(
        Path("/tmp/embedkit-openvino-cache"),
        description="OpenVINO's model cache for an openvino-* variant: a restart loads the "
        "compiled model instead of compiling it again. Must be writable: /tmp is an emptyDir "
        "in the Kubernetes manifests; unset (empty) to compile every time.",
    )

    @field_validator("openvino_cache_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    # --- engine -----------------------------------------------------------
    token_aware_batching: bool = Field(
        True,
        description="Sort a batch by token length and split it into sub-batches under "
        "max_batch_tokens; off pads the whole batch to its longest text.",
    )
    max_batch_tokens: int = Field(
        512,
        ge=1,
        description="Padded-token budget of one sub-batch: larger runs amortise per-run cost, "
        "smaller ones keep activations in cache (docs/benchmarks/defaults.md).",
    )
    max_sub_batch_size: int = Field(64, ge=1, description="Most texts in one ORT run.")
    sub_batch_cost_tokens: int = Field(
        32,
        ge=0,
        description="Fixed cost of one ORT run in padded-token equivalents: the batch planner "
        "cuts a sorted batch only where the padding saved exceeds it. Higher: fewer, fuller runs "
        "(GPU); lower: less padding (CPU).",
    )

    # --- service ------------------------------------------------------------
    topology: Literal["single", "split"] = Field(
        "single",
        description="single: one process owns the HTTP front and the ORT session (the front's "
        "scheduler forms every batch; no hop between services). split: a front service and an "
        "Embedder service joined by bentoml.depends, BentoML's adaptive batching inside the "
        "Embedder, `workers` Embedder processes. Chosen by measurement: docs/design/serving.md.",
    )
    parallel_runs: bool = Field(
        True,
        description="topology=single on CPU: the worker's intra_op_threads cores each run their "
        "own batch (that many ORT threads, one core each; a call of 16+ rows is split across "
        "them) instead of one run at a time synchronising all cores inside every operator. "
        "Measured: docs/design/serving.md. Off, or on a GPU: one run at a time.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Worker processes that own an ORT session each (single: the service's; "
        "split: the Embedder's).",
    )
    gpu: bool = Field(
        False, description="Request a GPU for the service that owns the session (GPU Bento)."
    )
    bulk_max_batch_size: int = Field(
        128, ge=2, description="Adaptive batching: most texts merged into one bulk inference call."
    )
    bulk_max_latency_ms: int = Field(
        60_000,
        ge=1,
        description="BentoML 1.4's batching deadline for the bulk lane: queued work whose "
        "estimated finish passes it is shed (429). Not a wait window (BentoML learns that); "
        "a low value sheds big requests, whose split chunks keep their enqueue time. "
        "Default: the request timeout (docs/service.md).",
    )
    query_max_batch_size: int = Field(
        16, ge=2, description="Adaptive batching for the interactive route (latency first)."
    )
    query_max_latency_ms: int = Field(
        1_000,
        ge=1,
        description="Batching deadline of the interactive lane: sheds (429) rather than "
        "queue past it. Too low sheds most requests under ordinary load, because BentoML "
        "estimates a batch's finish pessimistically (docs/benchmarks/defaults.md).",
    )
    front_coalescing: bool = Field(
        True,
        description="The front merges the rows of requests that reach it in the same event-loop "
        "turn into one Embedder call (no waiting). Cuts the per-call HTTP/serialisation cost "
        "BentoML pays on both sides; measured in docs/benchmarks/serving-tuning.md.",
    )
    query_continuous_batching: bool = Field(
        True,
        description="Interactive lane: the front keeps one Embedder call in flight per Embedder "
        "worker and sends the requests that arrived meanwhile together when one returns (sized "
        "so two calls overlap), instead of handing each over at once for BentoML's dispatcher, "
        "whose learned hold-back time grows with queueing. Needs front_coalescing.",
    )
    max_client_batch: int = Field(
        2048, ge=1, description="Most items one request may carry (413 above)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_concurrency: int = Field(
        256, ge=1, description="Requests in flight per front worker before 429 with Retry-After."
    )
    request_timeout_s: int = Field(60, ge=1, description="Upstream timeout (504 above).")
    max_queued_tokens: int = Field(
        16_384,
        ge=1,
        description="Admission by work, not by request count: real tokens handed to the Embedder "
        "and not yet answered, per front worker; a request that would push past it gets 429 + "
        "Retry-After (a request alone is always admitted). This bounds queueing delay to about "
        "max_queued_tokens / token throughput (docs/reliability.md). Raise it with faster "
        "hardware; lower it for a tighter latency budget (more 429s).",
    )
    gc_tuning: bool = Field(
        True,
        description="After warm-up, freeze startup objects out of Python's garbage collector "
        "and collect less often: full collections over the startup objects were the p99 tail "
        "(docs/benchmarks/defaults.md).",
    )
    access_log: bool = Field(
        True,
        description="One log line per HTTP request on the front service. Off saves CPU at "
        "hundreds of requests/s; the inner service never logs per batch.",
    )
    tracing: bool = Field(
        False,
        description="Let BentoML's OpenTelemetry middleware open a span per request on both "
        "services. It runs even with no exporter configured (spans are made and dropped), which "
        "costs front CPU on every request (docs/benchmarks/defaults.md). Turn on together with "
        "BentoML's `tracing:` exporter configuration.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer tokens accepted on inference routes; empty disables auth. They "
        "belong to the `default` tenant: no quota, interactive class (docs/service.md § Tenants).",
    )
    tenants_file: Path | None = Field(
        None,
        description="YAML file of tenants: per tenant its API keys, a token-rate quota "
        "(`rate_tokens_per_s`, required, > 0; `burst_tokens`) and a priority class "
        "(`interactive`, or `bulk`: every request of the tenant runs on the bulk lane). "
        "Over quota answers 429 with Retry-After. A malformed file (a missing or negative "
        "rate, a key given twice) stops startup with one line. Setting it turns auth on. "
        "Mount it from a Secret: it holds keys (docs/service.md § Tenants).",
    )
    revoked_keys: list[str] = Field(
        default_factory=list,
        description="API keys refused with 401 even while `api_keys` or the tenants file still "
        "list them: revoke first, then remove the key at the next rollout.",
    )
    quota_store: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="Where tenants' token buckets live: `redis://` or `rediss://` (TLS) URL, "
        "password in the URL (mount it from a Secret). One bucket per tenant across every pod "
        "and worker, charged atomically in Redis. Unset: each process keeps its own buckets, "
        "so a tenant's total rate is its rate × processes (docs/service.md § Tenants).",
    )
    quota_key_prefix: str = Field(
        "embedkit",
        min_length=1,
        description="Prefix of the quota store's keys: one per deployment sharing a Redis.",
    )
    quota_store_timeout_ms: int = Field(
        50,
        ge=1,
        le=5_000,
        description="Bound on one quota store call (connect and answer): a slow Redis answers "
        "as an absent one — the process charges a local bucket of rate ÷ live processes — "
        "rather than holding requests.",
    )
    quota_heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="How often each process renews its presence in the quota store; entries "
        "older than three beats are not counted among the live processes.",
    )
    max_rerank_documents: int = Field(
        1_000,
        ge=1,
        description="Most documents one rerank request may carry (/rerank, /v1/rerank, "
        "/v2/rerank; 413 above). A rerank call runs on the interactive lane as one request, "
        "so this bounds how long it holds that lane: each document is one cross-encoder run "
        "of query + document tokens.",
    )
    max_query_texts: int = Field(
        32,
        ge=1,
        description="Most texts a request may carry on the query lane when the lane header "
        "asks for it; larger requests are served on the bulk lane, and the response says so.",
    )
    request_log: bool = Field(
        True,
        description="One JSON log line per request on our routes (request id, status, tenant, "
        "lane, the batches it rode in, the served identity). Off saves a little front CPU per "
        "request; the X-Request-Id header is sent either way.",
    )

    # --- project files ------------------------------------------------------
    # Relative paths resolve against the working directory: the project root, where the
    # README's commands, the scripts and the tests run.
    models_dir: Path = Field(
        Path("models"), description="Model recipes (`<name>.yaml`) that `--model NAME` finds."
    )
    config_dir: Path = Field(
        Path("config"),
        description="Thresholds and prices: quality-gate.yaml, perf-gate.yaml, prices.yaml.",
    )
    data_dir: Path = Field(
        default_factory=lambda: PACKAGED_DATA_DIR,
        description="Evaluation data (STS Benchmark splits, stsb-multi-mt dev sets) for the "
        "parity contract, calibration, the quality gate and the benchmarks. The default is "
        "the attributed copy inside the package, so a fresh clone needs nothing beside it.",
    )
    extended_data_dir: Path = Field(
        Path("../shared/data"),
        description="Optional, larger evaluation data (SciFact retrieval in BEIR layout); "
        "evaluations that need it say so and skip it when it is absent.",
    )
    artifacts_dir: Path = Field(
        Path("artifacts"),
        description="Working folder of releases and benchmarks (exported and derived artifacts).",
    )
    eval_cache_dir: Path = Field(
        Path("/tmp/embedkit-eval-cache"),
        description="Where the quality evaluation (`embedkit evaluate`, release candidates) caches "
        "PyTorch-reference, FP32 ONNX and variant vectors, keyed by model checksum and texts (a "
        "variant's also by the CPU's ISA level, ONNX Runtime version and numeric session "
        "settings: an INT8 graph judged with VNNI is not reused without): repeated gate runs "
        "skip re-encoding them, and a set another process is encoding is waited for, not "
        "encoded beside it.",
    )

    # --- artifact trust -----------------------------------------------------
    require_signature: bool = Field(
        False, description="Serve only artifacts signed by a key in trusted_keys."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64 raw or PEM file paths) trusted to sign artifacts.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
