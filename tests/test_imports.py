"""The package's import graph (issues 20, 36): every module imports on its own, no chain of
imports, function-level and annotation-only ones included, leads back to where it started,
and reading a config imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mtbert"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the mtbert modules it imports anywhere in its body (inside functions and
    under `if TYPE_CHECKING:` too), except its own parent packages."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in known.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtbert"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mtbert")]
            else:
                continue
            edges |= {t for t in map(resolve, targets)
                      if t and t != name and not name.startswith(t + ".")}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "mtbert.config" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_and_model_meet_only_through_the_task_spec():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("mtbert.data"):
            assert not any(t.startswith("mtbert.model") for t in targets), (name, targets)
        if name.startswith("mtbert.model") and name != "mtbert.model.multitask":
            assert not any(t.startswith("mtbert.data") for t in targets), (name, targets)


def test_every_module_imports_on_its_own():
    """Each module imported with no other mtbert module loaded before it (one interpreter,
    mtbert's modules dropped from `sys.modules` between imports; torch stays loaded)."""
    names = sorted(name for name in modules() if name != "mtbert.__main__")  # it runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'mtbert' or m.startswith('mtbert.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_reading_and_validating_a_config_imports_no_torch():
    """`load_config` (parse, presets, types, ranges, cross-field checks) loads neither torch
    nor any technique: technique names are checked when training starts (`techniques.py`)."""
    default = SRC.parent / "configs" / "default.yaml"
    script = (
        "import sys\n"
        "from mtbert.config import load_config\n"
        f"load_config({str(default)!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mtbert')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert loaded == ["mtbert", "mtbert.config", "mtbert.errors", "mtbert.presets",
                      "mtbert.registry"]
