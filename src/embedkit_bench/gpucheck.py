"""The GPU check (issue #16): one prepared run on the GPU machine, one report back.

``scripts/gpu-check OUT`` runs :func:`main`, in two processes:

1. *prepare* (standard library only): join the transferred parts
   (:mod:`embedkit_bench.transfer`) into the payload folder, install its wheels
   (onnxruntime-gpu and whatever the project needs that the machine lacks) with
   ``pip --no-deps --no-index --target``, then start step 2 with that folder ahead of
   the preinstalled onnxruntime on ``PYTHONPATH`` (the project runs from ``src/``);
2. *run*: build sessions with CUDA (and TensorRT when its libraries load; the report
   says when they do not, and times a cold and a cached engine build), run the contract
   for fp32 (shapes, batch invariance, parity vs ``SentenceTransformer.encode`` on the
   GPU and vs the CPU provider's vectors), put the FP16 variant (and TensorRT FP16)
   through the per-segment quality gate, and time the engine with and without device
   I/O binding at batch 1, 8, 32, 128 and on long documents, beside the CPU provider
   of the same machine. ``OUT/gpu-check.json`` and ``OUT/gpu-check.md`` are rewritten
   after every stage, so a run cut short still brings back what it measured.

Without a GPU (``CUDAExecutionProvider`` absent or no CUDA device) the run says so in
the report's title and ``status: "no-gpu"``, rehearses every stage on the CPU provider
with small sizes (so a mistake in the script costs no GPU time) and exits with
:data:`EXIT_NO_GPU`. Exit codes: 0 every check passed on a GPU; 1 a check failed on a
GPU; 2 preparation failed; 3 no GPU (rehearsal only).

argparse rather than the typer CLI: the GPU machine has neither typer nor rich.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from embedkit_bench import transfer

EXIT_OK, EXIT_FAILED, EXIT_PREPARE, EXIT_NO_GPU = 0, 1, 2, 3
REPORT = "gpu-check"
BATCHES = (1, 8, 32, 128)
TRT_LIBS = ("libnvinfer.so.10", "libnvonnxparser.so.10")
# Sizes: the full run on a GPU; the CPU rehearsal only proves every stage works (FP16 runs
# emulated on the CPU provider: SciFact's whole corpus took minutes there, so it is bounded).
GPU_SIZES: dict[str, int | None] = {
    "limit_per_segment": None,
    "max_pairs": 500,
    "lang_pairs": 200,
    "retrieval_docs": None,
    "retrieval_queries": None,
    "bench_texts": 2048,
}
REHEARSAL_SIZES: dict[str, int | None] = {
    "limit_per_segment": 4,
    "max_pairs": 24,
    "lang_pairs": 8,
    "retrieval_docs": 48,
    "retrieval_queries": 8,
    "bench_texts": 16,
}
REHEARSAL_BATCHES = (1, 8)


# --- prepare (no third-party imports) ------------------------------------------------


def prepare(transfer_dir: Path, payload: Path, target: Path, say: Callable[[str], None]) -> None:
    """Join the parts (if sent) into ``payload`` and install its wheels into ``target``."""
    if any(transfer_dir.glob("*-part-*")):
        missing = transfer.missing_parts(transfer_dir)
        if missing:
            raise transfer.InvalidInput(
                f"{len(missing)} part(s) not sent yet: {', '.join(missing)}"
            )
        marker = payload / ".joined"
        index = transfer.read_index(transfer_dir)
        if not marker.is_file() or marker.read_text() != index.sha256:
            say(f"joining {len(index.parts)} parts into {payload}")
            transfer.join(transfer_dir, payload)
            marker.write_text(index.sha256)
    else:
        say(f"no parts under {transfer_dir}: using {payload} as it is")
    wheels = sorted((payload / "wheels").glob("*.whl"))
    if not wheels:
        say("no wheels to install: the preinstalled packages run")
        return
    stamp = target / ".installed"
    names = "\n".join(w.name for w in wheels)
    if stamp.is_file() and stamp.read_text() == names:
        say(f"wheels already installed in {target}")
        return
    say(f"installing {len(wheels)} wheels into {target}")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    cmd += ["--upgrade", "--target", str(target), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise transfer.InvalidInput(f"pip install into {target} failed: {' | '.join(tail)}")
    stamp.write_text(names)


# --- the report --------------------------------------------------------------------


class Report:
    """One JSON + markdown report, rewritten after every stage."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"status": "running", "stages": {}}

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        print(f"[gpu-check] {name} …", file=sys.stderr, flush=True)
        try:
            result = fn()
            entry = {"ok": True, "result": result}
        except Exception as exc:  # one stage failing must not lose the others' figures
            result = None
            entry = {
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "traceback": traceback.format_exc(limit=6),
            }
            print(f"[gpu-check] {name} failed: {entry['error']}", file=sys.stderr, flush=True)
        entry["seconds"] = round(time.perf_counter() - started, 2)
        self.data["stages"][name] = entry
        self.write()
        return result

    def write(self) -> None:
        (self.out / f"{REPORT}.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / f"{REPORT}.md").write_text(markdown(self.data))


def _fmt(x: Any, nd: int = 6) -> str:
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _figure(check: str, r: dict[str, Any]) -> str:
    if check == "shapes":
        return f"{sum(c['ok'] for c in r.get('cells', []))}/{len(r.get('cells', []))} cells ok"
    if check == "batch_invariance":
        return f"max abs diff {_fmt(max((r.get('max_abs_diff') or {0: None}).values()))}"
    if check == "parity_vs_torch":
        r = {**(r.get("overall") or {}), "device": r.get("reference_device")}
    return f"min cosine {_fmt(r.get('min_cosine'))}, max abs diff {_fmt(r.get('max_abs_diff'))}"


def markdown(data: dict[str, Any]) -> str:
    """The human summary of the JSON report (every figure in it comes from the JSON)."""
    stages = data["stages"]
    title = {
        "no-gpu": "NO GPU: CPU rehearsal only — no GPU figure in this report",
        "passed": "GPU check: every check passed",
        "failed": "GPU check: some checks FAILED",
        "running": "GPU check: incomplete (the run stopped before the end)",
    }[data["status"]]
    lines = [f"# {title}", ""]
    if data.get("why"):
        lines += [f"**{data['why']}**", ""]
    env = stages.get("environment", {}).get("result") or {}
    if env:
        lines += [
            f"- device: {env.get('device') or 'none'}; onnxruntime {env.get('onnxruntime')} "
            f"({env.get('onnxruntime_device')}), providers {', '.join(env.get('providers', []))}",
            f"- TensorRT: {env.get('tensorrt')}",
            f"- configurations run: {', '.join(data.get('configs', []))}",
            "",
        ]
    lines += ["| stage | ok | seconds |", "|---|---|---|"]
    lines += [
        f"| {n} | {'yes' if s['ok'] else 'NO: ' + s['error']} | {s['seconds']} |"
        for n, s in stages.items()
    ]
    for name, stage in stages.items():
        result = stage.get("result")
        if not isinstance(result, dict):
            continue
        if name.startswith("contract "):
            lines += ["", f"## {name}", "", "| check | passed | figure |", "|---|---|---|"]
            for check in ("shapes", "batch_invariance", "parity_vs_torch", "parity_vs_cpu"):
                r = result.get(check) or {}
                lines.append(f"| {check} | {r.get('passed')} | {_figure(check, r)} |")
        elif name.startswith("gate "):
            lines += [
                "",
                f"## {name}: {result.get('verdict')}",
                "",
                "| segment | drop vs torch | p1 cosine vs fp32 | overlap | ok |",
                "|---|---|---|---|---|",
            ]
            for seg in result.get("segments", []):
                lines.append(
                    f"| {seg['name']} | {_fmt(seg['drop_vs_reference'], 3)} | "
                    f"{_fmt(seg['cosine_p1'])} | {_fmt(seg['overlap'], 3)} | {seg['ok']} |"
                )
        elif name == "throughput":
            lines += ["", "## throughput (texts/s, same run, interleaved)", ""]
            systems = sorted({s for b in result.values() for s in b})
            lines += ["| batch | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
            for batch, row in result.items():
                lines.append(
                    f"| {batch} | "
                    + " | ".join(
                        _fmt(row[s]["texts_per_s"], 4) if s in row else "" for s in systems
                    )
                    + " |"
                )
        elif name.startswith("sessions"):
            lines += [
                "",
                "## sessions",
                "",
                "| config | active | precision | build s |",
                "|---|---|---|---|",
            ]
            for cfg, r in result.items():
                lines.append(
                    f"| {cfg} | {r.get('active')} | {r.get('precision')} | {r.get('build_s')} |"
                )
    return "\n".join(lines) + "\n"


# --- the run (imports onnxruntime; after prepare) ------------------------------------


def _tensorrt_libs() -> str | None:
    """None when TensorRT's libraries load, else why not."""
    for lib in TRT_LIBS:
        try:
            ctypes.CDLL(lib)
        except OSError as exc:
            return f"{lib} does not load ({exc}); TensorRT not run"
    return None


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    preload = "not offered by this onnxruntime"
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch brought
        try:
            ort.preload_dlls()
            preload = "ok"
        except Exception as exc:  # reported, not fatal: the session build says the rest
            preload = f"failed: {exc}"
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "onnxruntime_device": ort.get_device(),
        "providers": ort.get_available_providers(),
        "preload_dlls": preload,
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
        info["device"] = torch.cuda.get_device_name(0) if info["torch_cuda"] else None
    except ImportError:
        info["torch"], info["torch_cuda"], info["device"] = None, False, None
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "--query-gpu=name,driver_version,memory.total"
        done = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    trt_problem = (
        _tensorrt_libs()
        if "TensorrtExecutionProvider" in info["providers"]
        else ("TensorrtExecutionProvider is not in this onnxruntime build; TensorRT not run")
    )
    info["tensorrt"] = trt_problem or "libraries load"
    info["gpu"] = "CUDAExecutionProvider" in info["providers"] and info["torch_cuda"]
    return info


def configs(env: dict[str, Any]) -> dict[str, list[str]]:
    """Provider lists to run: CUDA (+ TensorRT when it loads) on a GPU, else the CPU."""
    if not env["gpu"]:
        return {"cpu-rehearsal": ["CPUExecutionProvider"]}
    out = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if env["tensorrt"] == "libraries load":
        out["tensorrt"] = [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
    return out


class Check:
    """The stages of one run over given artifacts; ``gpu`` picks sizes and strictness."""

    def __init__(self, args: argparse.Namespace, env: dict[str, Any], report: Report) -> None:
        from embedkit.core.settings import Settings
        from embedkit.model.artifact import Artifact

        self.report, self.env, self.gpu = report, env, bool(env["gpu"])
        self.sizes = dict(GPU_SIZES if self.gpu else REHEARSAL_SIZES)
        for key in self.sizes:
            if getattr(args, key, None) is not None:
                self.sizes[key] = getattr(args, key)
        self.batches = BATCHES if self.gpu else REHEARSAL_BATCHES
        self.shape_batches = (1, 7, 32, 128) if self.gpu else (1, 7)
        self.fp32 = Artifact.load(args.fp32)
        self.fp16 = Artifact.load(args.fp16) if args.fp16 else None
        # What was measured, by content: `embedkit pools mixed` binds the verdict to it.
        report.data["artifacts"] = {
            role: {"name": a.manifest.name, "model_sha256": a.manifest.files["model.onnx"]}
            for role, a in (("fp32", self.fp32), ("fp16", self.fp16))
            if a is not None
        }
        self.reference_dir = args.reference
        self.out = report.out
        self.configs = configs(env)
        threads = max(1, os.cpu_count() or 1)
        self.base = Settings(
            intra_op_threads=threads,
            trt_engine_cache_dir=self.out / "trt-cache",
            strict_providers=self.gpu,  # a GPU config that lands on the CPU is a failure
            sub_batch_cost_tokens=256 if self.gpu else 32,
        )
        self.cpu = self.base.model_copy(
            update={"providers": ["CPUExecutionProvider"], "strict_providers": False}
        )

    def settings(self, config: str, **update: Any) -> Any:
        return self.base.model_copy(update={"providers": self.configs[config], **update})

    def engine(self, artifact: Any, settings: Any) -> Any:
        from embedkit.runtime.engine import Engine

        # judging: the point is to measure artifacts and precisions not (yet) approved
        return Engine(artifact, settings, judging=True)

    # --- stages

    def sessions(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for config in self.configs:
            for fp16 in (False, True) if config == "tensorrt" else (False,):
                s = self.settings(config, trt_fp16=fp16)
                label = f"{config}{'-fp16' if fp16 else ''}"
                for attempt in ("cold", "cached") if config == "tensorrt" else ("cold",):
                    start = time.perf_counter()
                    engine = self.engine(self.fp32, s)
                    engine.warmup()
                    out[f"{label} ({attempt})" if config == "tensorrt" else label] = {
                        "active": engine.provider_report.active[0],
                        "fallback": engine.provider_report.reason,
                        "precision": engine.precision.compute,
                        "io_binding": engine.runner.io_binding,
                        "build_s": round(time.perf_counter() - start, 2),
                    }
        return out

    def contract(self, config: str) -> dict[str, Any]:
        from embedkit.model.export import load_reference
        from embedkit.quality import contract

        engine = self.engine(self.fp32, self.settings(config))
        segments = contract.parity_segments(limit=self.sizes["limit_per_segment"])
        sample = [t for texts in segments.values() for t in texts[:4]]
        out: dict[str, Any] = {"provider": engine.provider}
        out["shapes"] = contract.check_shapes(engine, batches=self.shape_batches)
        out["batch_invariance"] = contract.check_batch_invariance(engine, sample)
        device = "cuda" if self.gpu else "cpu"
        reference = load_reference(Path(self.reference_dir), device=device)
        torch_parity = contract.check_parity(engine, reference, segments)
        out["parity_vs_torch"] = {
            "passed": torch_parity["passed"],
            "reference_device": device,
            "overall": torch_parity["overall"],
            "failing_segments": [k for k, v in torch_parity["segments"].items() if not v["passed"]],
        }
        cpu_engine = self.engine(self.fp32, self.cpu)
        texts = [t for ts in segments.values() for t in ts]
        vs_cpu = contract.compare(cpu_engine.encode(texts), engine.encode(texts))
        th = contract.Thresholds()
        vs_cpu["passed"] = (
            vs_cpu["min_cosine"] >= th.min_cosine and vs_cpu["max_abs_diff"] <= th.max_abs_diff
        )
        out["parity_vs_cpu"] = vs_cpu
        out["passed"] = all(
            out[k]["passed"]
            for k in ("shapes", "batch_invariance", "parity_vs_torch", "parity_vs_cpu")
        )
        return out

    def gate(self, artifact: Any, settings: Any, what: str) -> dict[str, Any]:
        from embedkit.core.settings import get_settings
        from embedkit.quality.evaluate import evaluate
        from embedkit.quality.gate import gate

        fp32_settings = self.settings(next(iter(self.configs)))  # CUDA FP32 (CPU in rehearsal)
        report = evaluate(
            artifact,
            fp32=self.fp32,
            reference_dir=Path(self.reference_dir),
            settings=settings,
            fp32_settings=fp32_settings,
            max_pairs=self.sizes["max_pairs"],
            lang_pairs=self.sizes["lang_pairs"],
            retrieval_docs=self.sizes["retrieval_docs"],
            retrieval_queries=self.sizes["retrieval_queries"],
            # On a GPU each provider's vectors get the report's own folder (the cache key
            # does not name fp32's provider); the CPU rehearsal shares `embedkit evaluate`'s.
            cache_dir=self.out / "eval-cache" / what if self.gpu else get_settings().eval_cache_dir,
        )
        verdict = gate(report)
        failing = set(verdict.failing_segments)
        return {
            "what": what,
            "verdict": verdict.summary(),
            "approved": verdict.approved,
            "texts": report.texts,
            "segments": [
                {
                    "name": seg.name,
                    "drop_vs_reference": seg.drop_vs_reference,
                    "cosine_p1": seg.cosine_fp32.p1,
                    "cosine_min": seg.cosine_fp32.min,
                    "overlap": seg.overlap_fp32,
                    "ok": seg.name not in failing,
                }
                for seg in report.segments
            ],
        }

    def throughput(self) -> dict[str, Any]:
        from embedkit.release.measure import engine_encoder, long_stream, measure, sts_stream
        from embedkit.runtime.tokens import TextTokenizer

        systems: dict[str, Any] = {}
        counters = []
        for config in self.configs:
            for binding in ("off", "on"):
                engine = self.engine(self.fp32, self.settings(config, io_binding=binding))
                encode, counter = engine_encoder(engine)
                systems[f"{config}/fp32/iobinding-{binding}"] = encode
                counters.append(counter)
            if self.fp16 is not None:
                encode, counter = engine_encoder(self.engine(self.fp16, self.settings(config)))
                systems[f"{config}/fp16-variant"] = encode
                counters.append(counter)
        if self.gpu:  # the same machine's CPU, for a GPU/CPU ratio measured in one run
            encode, counter = engine_encoder(self.engine(self.fp32, self.cpu))
            systems["cpu/fp32"] = encode
            counters.append(counter)
        tokenizer = TextTokenizer.from_artifact(self.fp32)

        def timed(texts: list[str], batch: int) -> dict[str, Any]:
            tokens = sum(len(ids) for ids in tokenizer.encode(texts, truncate=True))
            timings = measure(systems, texts, batch, before_timing=counters)
            return {n: t.summary(len(texts), tokens) for n, t in timings.items()}

        short = sts_stream(self.sizes["bench_texts"])
        out = {f"sts b={batch}": timed(short, batch) for batch in self.batches}
        long_batch = 32 if self.gpu else 8
        out[f"long b={long_batch}"] = timed(
            long_stream(max(8, (self.sizes["bench_texts"] or 64) // 8)), long_batch
        )
        return out


def run(args: argparse.Namespace) -> int:
    report = Report(args.out)
    env = report.stage("environment", environment)
    if env is None:
        report.data["status"] = "failed"
        report.write()
        return EXIT_FAILED
    gpu = bool(env["gpu"])
    report.data["gpu"] = gpu
    if not gpu:
        report.data["status"] = "no-gpu"
        report.data["why"] = (
            "no GPU: CUDAExecutionProvider not offered "
            f"(providers: {', '.join(env['providers'])}) or torch sees no CUDA device"
        )
        print(f"[gpu-check] NO GPU — {report.data['why']}", file=sys.stderr, flush=True)
        if args.no_rehearsal:
            report.write()
            return EXIT_NO_GPU
    check = report.stage("load artifacts", lambda: Check(args, env, report))
    if check is None:
        report.data["status"] = "no-gpu" if not gpu else "failed"
        report.write()
        return EXIT_NO_GPU if not gpu else EXIT_FAILED
    report.data["configs"] = list(check.configs)
    report.data["sizes"] = check.sizes
    report.stage("sessions", check.sessions)
    for config in check.configs:
        report.stage(f"contract {config} fp32", partial(check.contract, config))
        if check.fp16 is not None:
            gated = partial(
                check.gate, check.fp16, check.settings(config), f"{config}-fp16-variant"
            )
            report.stage(f"gate {config} fp16-variant", gated)
    if "tensorrt" in check.configs:
        report.stage(
            "gate tensorrt trt-fp16",
            lambda: check.gate(
                check.fp32, check.settings("tensorrt", trt_fp16=True), "tensorrt-trt-fp16"
            ),
        )
    report.stage("throughput", check.throughput)
    stages = report.data["stages"]
    contracts_ok = all(
        s["ok"] and s["result"]["passed"] for n, s in stages.items() if n.startswith("contract")
    )
    all_ran = all(s["ok"] for s in stages.values())
    if not gpu:
        report.data["status"] = "no-gpu"
    else:
        report.data["status"] = "passed" if contracts_ok and all_ran else "failed"
    report.write()
    if not gpu:
        return EXIT_NO_GPU
    return EXIT_OK if report.data["status"] == "passed" else EXIT_FAILED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/gpu-check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="folder for gpu-check.json/.md (bring it back)")
    p.add_argument("--transfer", type=Path, default=Path("build/gpu-transfer"))
    p.add_argument("--payload", type=Path, default=Path("build/gpu-payload"))
    p.add_argument(
        "--target",
        type=Path,
        default=Path("build/gpu-site"),
        help="where the sent wheels are installed (ahead on PYTHONPATH)",
    )
    p.add_argument("--fp32", type=Path, help="fp32 artifact (default: PAYLOAD/artifacts/fp32)")
    p.add_argument("--fp16", type=Path, help="FP16 variant (default: PAYLOAD/artifacts/fp16)")
    p.add_argument(
        "--reference",
        type=Path,
        help="sentence-transformers model dir (default: PAYLOAD/reference, "
        "else the recipe's source)",
    )
    p.add_argument(
        "--no-rehearsal", action="store_true", help="without a GPU, stop after saying so"
    )
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    for key in GPU_SIZES:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    return p


def _defaults(args: argparse.Namespace) -> None:
    art = args.payload / "artifacts"
    args.fp32 = args.fp32 or art / "fp32"
    if args.fp16 is None and (art / "fp16").is_dir():
        args.fp16 = art / "fp16"
    if args.reference is None:
        if (args.payload / "reference").is_dir():
            args.reference = args.payload / "reference"
        else:
            from embedkit.quality.evaluate import default_reference_dir

            args.reference = default_reference_dir()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.inner:
        _defaults(args)
        return run(args)
    try:
        prepare(
            args.transfer,
            args.payload,
            args.target,
            lambda m: print(f"[gpu-check] {m}", file=sys.stderr),
        )
    except transfer.InvalidInput as exc:
        print(f"[gpu-check] error: {exc}", file=sys.stderr)
        return EXIT_PREPARE
    src = Path(__file__).resolve().parents[2]
    path = [str(args.target.resolve())] if args.target.is_dir() else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        [*path, str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    cmd = [sys.executable, "-m", "embedkit_bench.gpucheck", "--inner", *argv]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
