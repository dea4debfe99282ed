"""Memory per served model: RSS/USS of the serving worker with one model vs two.

    cd <repo> && PYTHONPATH=$PWD/src:$PWD .venv/bin/python docs/benchmarks/model-memory.py

Exports (once, under /tmp/embedkit-model-memory) all-minilm-l6-v2, the same weights under
another name (a MiniLM-sized second model) and tests/tiny_models.py's BERT+Dense, registers
them in a private BENTOML_HOME, then serves each configuration (EMBEDKIT_MODELS), reads the
engine worker's memory after warm-up and again after every model embedded 72 texts (64 STS
sentences, 8 long abstracts truncated at the limit) in requests of 8: ORT arenas grow with
the shapes they meet. Prints markdown rows, MiB: RSS warm, USS warm, RSS loaded, USS loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WORK = Path("/tmp/embedkit-model-memory")
os.environ["BENTOML_HOME"] = str(WORK / "bentoml")
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
import psutil  # noqa: E402

from embedkit_bench.server import serve_model  # noqa: E402
from embedkit.model import evaldata  # noqa: E402
from embedkit.model.artifact import Artifact, register  # noqa: E402
from embedkit.model.export import export  # noqa: E402
from embedkit.model.recipe import Recipe, Source, find_recipe  # noqa: E402


def exported() -> dict[str, Path]:
    recipe = find_recipe(None)
    dirs = {"minilm": WORK / "minilm", "copy": WORK / "minilm-copy", "tiny": WORK / "tiny"}
    if not dirs["minilm"].exists():
        export(recipe, dirs["minilm"])
    if not dirs["copy"].exists():
        export(recipe.model_copy(update={"name": "minilm-copy"}), dirs["copy"])
    if not dirs["tiny"].exists():
        sys.path.insert(0, os.getcwd())
        from tests.tiny_models import TINY_ARCHITECTURES

        src = TINY_ARCHITECTURES["bert-dense"](WORK / "tiny-src", recipe.source.resolve()[0])
        tiny = Recipe(name="tiny-bert-dense", model_id="tiny/bert-dense", source=Source(path=src))
        export(tiny, dirs["tiny"])
    return dirs


def worker(pid: int) -> psutil.Process:
    for proc in psutil.Process(pid).children(recursive=True):
        if "--service-name" in proc.cmdline():
            return proc
    raise SystemExit("no serving worker found")


def mib(proc: psutil.Process) -> tuple[float, float]:
    info = proc.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def main() -> None:
    tags = {name: register(Artifact.load(path)) for name, path in exported().items()}
    texts = evaldata.sts_sentences("test")[:64] + evaldata.long_texts(300, 8)
    for label, names in (
        ("1 model (MiniLM)", ["minilm"]),
        ("2 models (MiniLM + MiniLM-sized copy)", ["minilm", "copy"]),
        ("2 models (MiniLM + tiny BERT+Dense)", ["minilm", "tiny"]),
    ):
        served = [tags[n] for n in names]
        env = {"EMBEDKIT_MODELS": json.dumps(served)}
        srv = serve_model(served[0], WORK / f"serve-{'-'.join(names)}.log", env)
        try:
            srv.wait_ready(300)
            proc = worker(srv.proc.pid)
            warm = mib(proc)
            for tag in served:
                model = tag.partition(":")[0]
                for i in range(0, len(texts), 8):
                    body = {"texts": texts[i : i + 8], "model": model}
                    r = httpx.post(srv.url + "/embed", json=body, timeout=120)
                    r.raise_for_status()
            time.sleep(1)
            loaded = mib(proc)
            cells = " | ".join(f"{v:.0f}" for v in (*warm, *loaded))
            print(f"| {label} | {cells} |", flush=True)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
