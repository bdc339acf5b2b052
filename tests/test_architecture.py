"""The package's layers (README, "Layout"): every import points down, jobs do not use each other, and
there is no import cycle. Read from the source (function-level imports included), so a new module or
import that breaks the shape fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recsys_mamba"

# Lower layers never import higher ones; modules of one layer may import each other unless the layer
# is listed in SEPARATE.
LAYERS: dict[str, int] = {
    "errors": 0, "checks": 0, "files": 0, "metrics": 0, "figures": 0, "config": 0, "schema": 0,
    "version": 0, "logs": 0, "helptext": 0, "openmp": 0, "allocator": 0,
    "ops": 1, "data": 1,
    "sequences": 2,
    "models": 3,
    "tasks": 4,
    "runs": 5,
    "api": 6,
    "training": 7, "evaluation": 7, "scoring": 7, "serving": 7,
    "train": 8, "prepare": 8, "evaluate": 8, "score": 8, "export": 8, "serve": 8, "bench": 8,
    "__init__": 8, "__main__": 8,
}
SEPARATE = {7}  # jobs: none imports another's internals


def part(module: str) -> str:
    """recsys_mamba.x.y -> x (the layer's name)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports (at any depth of the file)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("recsys_mamba.")}
    modules = set(graph)
    # "from package import module" names a module; "from module import name" a name in it
    return {src: {m for m in dst if m in modules} | {m.rsplit(".", 1)[0] for m in dst if m not in modules}
            for src, dst in graph.items()}


def test_every_module_has_a_layer() -> None:
    unknown = sorted({part(m) for m in imports()} - set(LAYERS))
    assert not unknown, f"give these a layer in tests/test_architecture.py: {unknown}"


def test_imports_point_down_and_jobs_stay_apart() -> None:
    wrong = []
    for src, targets in imports().items():
        for dst in targets:
            a, b = LAYERS[part(src)], LAYERS.get(part(dst), 0)
            if part(src) == part(dst):
                continue
            if b > a or (a == b and a in SEPARATE):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports that break the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules() -> None:
    graph = {src: {d for d in dst if d in imports_cache()} for src, dst in imports_cache().items()}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.startswith(node + "."):  # a package importing its own modules
                continue
            if seen.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


_CACHE: dict[str, set[str]] = {}


def imports_cache() -> dict[str, set[str]]:
    if not _CACHE:
        _CACHE.update(imports())
    return _CACHE


@pytest.mark.parametrize(
    "module",
    [
        "recsys_mamba.runs",
        "recsys_mamba.scoring.job",
        "recsys_mamba.evaluation.report",
        "recsys_mamba.serving.app",
    ],
)
def test_serving_a_model_never_imports_lightning(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
