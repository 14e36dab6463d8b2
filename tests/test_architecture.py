"""How the packages may depend on each other: ``api_client -> config <- worker``.

``config`` is the core both sides build on (settings, the job contract, errors, the status
store, storage, the URL guard, the queue gauges) and imports neither; the producer never
imports the worker (so it installs and runs without onnxruntime), and the worker never
imports the producer. Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "worker", "api_client")
FORBIDDEN = {"config": {"worker", "api_client"}, "api_client": {"worker"}, "worker": {"api_client"}}


def imported_packages(path: Path) -> dict[str, int]:
    """The project packages ``path`` imports, each with the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                found.setdefault(top, node.lineno)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {other}"
        for path in sorted((REPO / package).rglob("*.py"))
        for other, line in imported_packages(path).items()
        if other in FORBIDDEN[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_producer_side_loads_neither_the_worker_nor_onnxruntime() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "api_client").rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from api_client.cli import build_parser; build_parser()\n"  # with the worker's commands
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'onnxruntime')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    # the worker's CLI module joins through an entry point and imports nothing else of it
    assert done.stdout.strip() == "['worker', 'worker.cli']", done.stdout


def test_nothing_reads_settings_when_imported() -> None:
    """Only the entry points call get_settings(); a module that called it at import time
    would fix its settings before a test, a benchmark or `segq dev` could choose them."""
    offenders = []
    for path in sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; functions run when called
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and getattr(call.func, "id", getattr(call.func, "attr", None)) == "get_settings"
                    and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                ):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == ["worker/celery.py"], offenders  # the app Celery's -A loads


def test_no_module_level_model_or_session_caches() -> None:
    """Models and sessions belong to a Runtime's ModelRegistry, never to a module: no empty
    container at module level waiting to be filled, and no ``global`` rebinding one. Two
    things are per process by nature: the metrics server (Prometheus counters are) and the
    compute threads of ``imaging.accel`` (one per core, like numba's own)."""
    empty_calls = {"dict", "set", "list", "OrderedDict", "WeakValueDictionary", "defaultdict"}
    found = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            empty_literal = isinstance(value, (ast.Dict, ast.Set, ast.List)) and not (
                getattr(value, "keys", None) or getattr(value, "elts", None)
            )
            empty_call = (
                isinstance(value, ast.Call)
                and getattr(value.func, "id", getattr(value.func, "attr", "")) in empty_calls
                and not value.args
            )
            if empty_literal or empty_call:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global) and path.name not in ("metrics.py", "accel.py"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} global {node.names}")
    assert not found, found
