"""The package layout holds itself: imports point one way and the HTTP front stays light.

docs/architecture.md draws the layers; this test reads every module's imports (lazy ones
inside functions included, since they run too) and checks the drawing is still true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

# Lower layers never import higher ones; packages on one layer never import each other.
LAYERS: dict[str, int] = {
    "core": 0,
    "model": 1,
    "runtime": 2,
    "variants": 3,
    "quality": 3,
    "serve": 4,
    "release": 5,  # export → contract → variants → gate → perf gate → records → register
    "client": 5,  # clients of the HTTP service (reembed; canary and benchmarks use its api)
    "deploy": 6,  # Bentos, image, supply chain, pools, canary, rollback drill
    "batch": 6,  # corpora embedded in-process (reembed's input parsing, the served identity)
    "cli": 7,
}
# The one serve module that owns the ONNX Runtime engine (the inner BentoML service).
# The engine cores (and what picks one) own the runtimes; the rest of serve/ must not.
EMBEDDER_SIDE = {
    "embedkit.serve.engine.embedder",
    "embedkit.serve.engine.reranker",
    "embedkit.serve.engine.cores",
}
ORT_MODULES = {"embedkit.runtime.session", "embedkit.runtime.engine"}


def _modules() -> dict[str, Path]:
    root = Path(str(resources.files("embedkit")))
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """embedkit modules (and onnxruntime) that ``path`` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from embedkit.x import y`: y may be a module (embedkit.x.y) or a name in x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in MODULES and name != "embedkit":
                out.add(name)
            elif name.split(".")[0] == "onnxruntime":
                out.add("onnxruntime")
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_package_has_a_layer() -> None:
    packages = {_package(m) for m in MODULES} - {"", "__main__"}
    assert packages <= set(LAYERS), f"new package(s) without a layer: {packages - set(LAYERS)}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, deps in GRAPH.items():
        pkg = _package(module)
        if pkg not in LAYERS:
            continue
        for dep in deps:
            other = _package(dep)
            if other not in LAYERS or other == pkg:
                continue
            if LAYERS[other] >= LAYERS[pkg]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _reach(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_http_front_never_reaches_onnxruntime() -> None:
    front = [m for m in MODULES if _package(m) == "serve" and m not in EMBEDDER_SIDE]
    assert front, "no serve modules found"
    leaks = {m: sorted(_reach(m) & (ORT_MODULES | {"onnxruntime"})) for m in front}
    assert not {m: v for m, v in leaks.items() if v}, leaks


def test_importing_the_front_loads_no_onnxruntime() -> None:
    """The static check above, confirmed by a real import in a fresh interpreter."""
    front = [m for m in MODULES if _package(m) == "serve" and m not in EMBEDDER_SIDE]
    code = (
        "import importlib, sys\n"
        f"for m in {front!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'onnxruntime'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_product_never_imports_the_tooling() -> None:
    """embedkit_bench (benchmarks, profiles of peers, soak) is not in the Bento or the image:
    a product module importing it would fail there. The CLI finds it by entry point only."""
    wrong = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{name} -> {n}" for n in names if n.split(".")[0] == "embedkit_bench"]
    assert not wrong, wrong


def test_the_top_of_the_package_is_subpackages() -> None:
    root = Path(str(resources.files("embedkit")))
    loose = sorted(p.name for p in root.glob("*.py"))
    assert len(loose) <= 3, f"loose modules at the top of embedkit/: {loose}"
    assert (root / "cli" / "__init__.py").is_file(), "the command line is a package"
