"""The code's layers point one way and no modules import each other in a circle.

Read from the source (every ``import`` in every module, including the ones inside functions and
``if TYPE_CHECKING:`` blocks), so a new upward import or a new cycle fails here, not in review:

    cli/                                   the ``atelier`` CLI and the demo: composes everything
    serve_app/   train_jobs/               system: Ray Serve app | Ray jobs; never each other
    cluster/                               ground floor shared by every node
    llamdex/  compression/  causal_lm/     science: torch/numpy, no Ray, no system package

``bench/`` may use any layer except the jobs and the CLI (a benchmark measures science and the
service, and reruns a job's code through the science it wraps).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "serve_app", "train_jobs", "cluster", "llamdex", "compression", "causal_lm", "bench")
SCIENCE = {"llamdex", "compression", "causal_lm"}
SYSTEM = {"cluster", "serve_app", "train_jobs", "cli"}
MAY_NOT_IMPORT = {
    "cluster": {"serve_app", "train_jobs", "cli", "bench"},
    "serve_app": {"train_jobs", "cli", "bench"},
    "train_jobs": {"serve_app", "cli", "bench"},
    "bench": {"train_jobs", "cli"},
    **{science: SYSTEM | {"bench", "ray"} for science in SCIENCE},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement of ``module`` names (``from a import b`` gives a and a.b)."""
    names = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> project modules it imports, module -> every top-level package it imports)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, tops = defaultdict(set), defaultdict(set)
    for module, path in modules.items():
        for name in _imported_names(module, path):
            tops[module].add(name.split(".")[0])
            target = owner(name)
            if target and target != module:
                edges[module].add(target)
    return edges, tops


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_named_package_is_read():
    modules = _modules()
    for package in PACKAGES:
        assert package in modules, f"{package}/__init__.py is missing"
    assert len(modules) > 100


def test_layers_point_down():
    _, tops = _graph()
    upward = sorted(f"{module} imports {top}" for module, imported in tops.items()
                    for top in imported & MAY_NOT_IMPORT.get(module.split(".")[0], set()))
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_registry_installs_no_validator():
    """Deep validators are installed explicitly where the app and the jobs start, never on import."""
    code = ("import cluster.registry, cluster.validators, serve_app.app; from cluster.artifacts import _DEEP_VALIDATORS; "
            "assert not _DEEP_VALIDATORS, _DEEP_VALIDATORS; cluster.validators.install_validators(); "
            "print(sorted(k.value for k in _DEEP_VALIDATORS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['adapter',", "'connectors',", "'expert',", "'schema']"]
