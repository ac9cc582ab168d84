"""The package's layout rule (docs/design.md#layout), beyond the import-linter layers contract
in setup.cfg: no import cycle at all inside ``relier_celery``, counting imports inside functions
(``if TYPE_CHECKING:`` blocks aside), and only the Celery wiring (and the command line, the
benchmarks and the test helpers above it) imports Celery's worker, its pools, kombu's transports
or billiard. Pure: reads the source, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(__file__).resolve().parent.parent / "relier_celery"
# Below the wiring: these may not touch Celery's or kombu's internals.
LOWER = ("core", "store", "runtime", "recovery", "features", "observe")
INTERNALS = ("celery.worker", "celery.concurrency", "kombu.transport", "billiard")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _imports(module: str, path: Path, is_package: bool) -> list[str]:
    """Every module name ``module`` imports, at any depth, ``TYPE_CHECKING`` blocks aside."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from a import b``: the module a.b if there is one, else a (resolved in _graph)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        for name in _imports(module, path, is_package):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_no_import_cycle_inside_the_package() -> None:
    # Given every import of every module, also those inside functions
    graph = _graph()
    # Then no module reaches itself through them
    assert _cycles(graph) == []


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_wiring_touches_celery_internals() -> None:
    offenders = []
    for module, (path, is_package) in _modules().items():
        layer = module.split(".")[1] if "." in module else ""
        if layer not in LOWER:
            continue
        for name in _imports(module, path, is_package):
            if any(name == bad or name.startswith(bad + ".") for bad in INTERNALS):
                offenders.append(f"{module} imports {name}")
    assert offenders == []


def test_no_module_over_300_lines() -> None:
    # One concern per module (Lua scripts are not Python and are not counted).
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 300
    }
    assert long == {}


def test_every_event_is_a_named_constant_with_a_level() -> None:
    from relier_celery.core import events

    # Given every events.emit(...) call in the package
    names: list[str] = []
    for module, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "emit"
                and module != "relier_celery.core.events"
            ):
                names.append(f"{module}: {ast.unparse(node.args[0])}")
    assert names
    # Then each names its event by a constant of core/events.py (or picks between two)
    loose = [n for n in names if '"' in n or "'" in n]
    assert loose == []
    # And every constant has a log level
    constants = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)}
    assert constants == set(events.LEVELS)
