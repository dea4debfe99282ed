"""The per-stage CPU attribution of `embedkit bench-stages` (py-spy's raw stacks → stages)."""

from __future__ import annotations

from collections import Counter

from embedkit_bench.stages import IDLE, StageRun, parse_raw, stage_of

WORKER = "python -m _bentoml_impl.worker.service service:EmbeddingAPI"
FRONT = f'process 9:"{WORKER} --service-name embedkit"'
ENGINE = f'process 8:"{WORKER} --service-name embedder"'
ROOT = 'process 7:"bentoml serve service:EmbeddingAPI"'


def test_the_innermost_frame_that_names_a_stage_decides() -> None:
    body = [
        "Task.__step (asyncio/tasks.py:1)",
        "Front._guard (embedkit/serve/pipeline/front.py:79)",
    ]
    assert (
        stage_of(
            [*body, "openai_body (embedkit/serve/edge/bodies.py:30)", "dumps (json/__init__.py:2)"]
        )
        == "response body"
    )
    assert stage_of([*body, "encode (embedkit/runtime/tokens.py:9)"]) == "tokenise"
    assert (
        stage_of([*body, "run (onnxruntime/capi/onnxruntime_inference_collection.py:2)"])
        == "ORT run"
    )
    assert stage_of(["Runner.run (asyncio/runners.py:118)"]) == IDLE
    assert stage_of(["f (somewhere/else.py:1)"]) == "other"


def test_samples_are_split_by_process_and_cpu_per_request_adds_up() -> None:
    raw = [
        f"{ROOT};{FRONT};Front.openai (embedkit/serve/pipeline/front.py:1);"
        "load (pydantic/main.py:3) 30",
        f"{ROOT};{FRONT};Runner.run (asyncio/runners.py:118) 500",
        f"{ROOT};{ENGINE};embed (embedkit/serve/engine/embedder.py:1);run (onnxruntime/x.py:1) 80",
        "not a stack line",
    ]
    samples = parse_raw(raw)
    assert samples["front"] == Counter({"validation": 30, IDLE: 500})
    assert samples["embedder"] == Counter({"ORT run": 80})
    run = StageRun(
        "x", {"requests": 100, "req_per_s": 10.0, "p50_ms": 1.0, "p95_ms": 2.0},
        loader_cpu_s=0.05, cpu_s={"front": 0.4, "embedder": 1.0}, samples=samples, rate=100,
    )  # fmt: skip
    ms = run.core_ms()
    assert ms["front"]["validation"] == 3.0  # 30 samples / 100 Hz / 100 requests
    assert IDLE not in ms["front"] and ms["front"]["total"] == 4.0
    assert (
        ms["embedder"]["ORT run (incl. native threads)"] == 10.0
    )  # /proc CPU, nothing else sampled
    assert ms["load generator"]["total"] == 0.5
