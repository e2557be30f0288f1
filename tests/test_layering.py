"""The package's floors: each floor imports only the ones below it, and no module imports itself back.

Read with `ast` (nothing is imported), so a function-level import counts as much as a top-level one: a
deferred import is still a dependency. The root `itertrain/__init__.py` is the lazy public facade
(`Strategy`, `run`, ...) and is the top floor; `from itertrain import __version__` reads its metadata.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "itertrain"

# Lowest first. A unit is a top-level module or a subpackage of itertrain/.
FLOORS: list[tuple[str, set[str]]] = [
    ("ground: no itertrain imports", {"errors", "console", "faults", "launcher", "tasks"}),
    ("conversational rows", {"chat"}),
    ("names and configuration", {"layout", "args", "data", "fsutil", "tiny_model", "failures", "sources"}),
    ("the configuration file, flag value checks, TrainingArguments subclasses",
     {"config_file", "flag_checks", "training_config"}),
    ("processes, weights on disk, the record", {"distributed", "weights", "experiment", "lock", "plot"}),
    ("writing artifacts, generation, signals", {"artifacts", "generation", "preemption", "shared_dir"}),
    ("adapters, metrics, rewards, the trainer mixin", {"lora", "metrics", "rewards", "trainer", "data_lineage"}),
    ("recovery: reading and deciding", {"recovery"}),
    ("strategies, status, trackers, the hub, held-out evaluation", {"strategies", "status", "trackers", "hub",
                                                                  "heldout"}),
    ("an iteration's train stage", {"train_stage"}),
    ("the recipe and the parser", {"loop", "parser"}),
    ("the demo", {"demo"}),
    ("the command line", {"cli"}),
    ("entry points", {"__main__", "__init__"}),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["itertrain", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _unit(module: str) -> str:
    return module.split(".")[1]


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the itertrain modules it imports (top level or inside a function)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "itertrain":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in modules else node.module
                    if target != "itertrain":  # the package's own metadata (__version__)
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.split(".")[0] == "itertrain")
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: use absolute imports"
    return graph


def test_every_unit_of_the_package_has_a_declared_floor():
    units = {_unit(m) for m in _modules()}
    declared = [u for _, us in FLOORS for u in us]
    assert len(declared) == len(set(declared)), "a unit is on two floors"
    assert units == set(declared), f"undeclared: {sorted(units - set(declared))}; gone: {sorted(set(declared) - units)}"


def test_each_floor_imports_only_the_floors_below_it():
    floor = {u: n for n, (_, us) in enumerate(FLOORS) for u in us}
    upward = []
    for module, targets in _imports(_modules()).items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and floor[b] >= floor[a]:
                upward.append(f"{module} ({FLOORS[floor[a]][0]}) imports {target} ({FLOORS[floor[b]][0]})")
    assert not upward, "imports that do not go down a floor:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back_through_others():
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


LONG_FUNCTION = 80  # lines, decorators excluded
TOO_LONG_FOR_NOW: set[str] = set()  # nothing may grow past the limit


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                name = f"{path.relative_to(PACKAGE)}::{node.name}"
                if lines > LONG_FUNCTION and name not in TOO_LONG_FOR_NOW:
                    long.append(f"{name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)
