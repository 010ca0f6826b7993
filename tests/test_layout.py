"""The layout's rules, checked on the source: imports run one way with no cycle (function-local
imports included), no module over 500 lines, and one module that renames files."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("ocrkernels", "ocrnet", "bench")
MAX_LINES = 500

# Where a module sits in the import order: it may import modules of a lower rank, and its own
# package's modules, never a higher rank (nor another package of the same rank).
RANKS = {
    "ocrkernels": 0, "ocrnet.utils": 1, "ocrnet.configs": 2, "ocrnet.models": 3,
    "ocrnet.data": 3, "ocrnet.inference": 4, "ocrnet.evaluation": 5, "ocrnet.engine": 6,
    "ocrnet.api": 4, "ocrnet.commands": 7, "ocrnet.cli": 8, "ocrnet": 9, "ocrnet.__main__": 9,
    "bench": 10,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (imports, definitions, assignments)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


PACKAGE_NAMES = {name: _bound_names(path) for name, path in MODULES.items()
                 if path.name == "__init__.py"}


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports anywhere in its source (function bodies too):
    ``from X import y`` counts as X.y where that is a module, else as X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    targets.append(f"{base}.{alias.name}")
                elif base in PACKAGE_NAMES and alias.name not in PACKAGE_NAMES[base]:
                    continue  # a compiled extension module (ocrkernels._C), not Python source
                else:
                    targets.append(base)
        else:
            continue
        for target in targets:
            # `import a.b.c` loads a.b.c; a name from a module counts as that module.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _rank_key(module: str) -> str:
    while module not in RANKS:
        module = module.rpartition(".")[0]
    return module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_imports():
    # The checks below are only as good as the graph: known edges must be in it.
    assert "ocrnet.engine.trainer" in GRAPH["ocrnet.commands.train"] or \
        "ocrnet.engine" in GRAPH["ocrnet.commands.train"]
    assert "ocrnet.configs.schema" in GRAPH["ocrnet.configs.io"]
    assert "ocrkernels.ops" in GRAPH["ocrkernels.modules"]
    assert len(MODULES) > 60
    # `from . import _C` loads the compiled library, not the package's __init__.
    assert "ocrkernels" not in GRAPH["ocrkernels._extension"]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_run_one_way():
    wrong = []
    for module, targets in GRAPH.items():
        mine = _rank_key(module)
        for target in targets:
            theirs = _rank_key(target)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_length(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(REPO)}: {lines} lines"


# Renaming a file into place is what an atomic write does; ocrnet/utils/fileio.py is the one
# module allowed to, so that every write fsyncs and keeps the umask's mode.
_RENAMES = re.compile(r"\bos\.(replace|rename|renames)\b|\.rename\(|\bshutil\.move\b|"
                      r"\bmkstemp\b|NamedTemporaryFile")


def test_only_fileio_renames_files():
    offenders = []
    for path in MODULES.values():
        if path == REPO / "ocrnet" / "utils" / "fileio.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _RENAMES.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_model_api_and_light_commands_need_no_opencv():
    # OpenCV comes with the data extra; the model API, `ocrnet configs` and `ocrnet convert`
    # work without it (the CLI imports only the module of the command that runs).
    code = ("import sys; sys.modules['cv2'] = None\n"
            "import ocrnet\n"
            "from ocrnet.cli import main\n"
            "assert main(['configs']) == 0\n"
            "try:\n"
            "    main(['convert', '--help'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0\n"
            "assert 'ocrnet.data.io' not in sys.modules and 'ocrnet.engine' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024" in done.stdout


def test_importing_ocrnet_imports_no_triton():
    # Triton must be imported after TRITON_INTERPRET is set, so no ocrnet module may import it
    # (nor torch.utils.flop_counter, which does) at import time.
    names = sorted(n for n in MODULES if n.startswith("ocrnet") and n != "ocrnet.__main__")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton')[:3])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
