"""Import cycles between our modules, counting imports inside functions too.

A function-level import hides a cycle from Python (it only fails when the order of loading
changes), not from this check. Known cycles, if any, are listed below as debt to pay down
(docs/architecture.md); a new cycle, or a module joining a known one, fails the test. Pure
rules shared by reads and writes belong in marketplace/rules.py (or another leaf), the output
serializers an event and the API share in a serializers module below the services that record
events, and tasks are enqueued by name (config.celery.task_send), which keeps most cycles from
forming.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "inventory", "marketplace", "billing")

# Known cycles (each a strongly connected component of the module graph), to shrink; none
# today. The last three were paid down by moving what both sides read into a module that
# imports neither: the output serializers events share with the API (marketplace/serializers.py,
# billing/serializers.py), the state machine's table (marketplace/rules.py), the role sets
# (marketplace.models), the Celery queues (config/queues.py). A cycle listed here again is debt.
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of ours it imports, anywhere in its body."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                found = owner(target)
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_check_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_function_level_import_counts(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from pkg import two\n")
    (package / "two.py").write_text("def f():\n    from pkg.one import x\n")
    modules = {
        "pkg": package / "__init__.py",
        "pkg.one": package / "one.py",
        "pkg.two": package / "two.py",
    }
    assert cycles(import_graph(modules)) == [{"pkg.one", "pkg.two"}]


def test_no_new_import_cycle_between_our_modules():
    new = [
        sorted(component)
        for component in cycles(import_graph(_modules()))
        if not any(component <= known for known in KNOWN_CYCLES)
    ]
    assert new == []


def test_the_known_cycles_list_only_modules_still_in_one():
    """Paying down a cycle shows here: a module that left its cycle leaves the list."""
    found = cycles(import_graph(_modules()))
    stale = sorted(
        module
        for known in KNOWN_CYCLES
        for module in known
        if not any(module in component and component <= known for component in found)
    )
    assert stale == []


def unexplained_function_imports(source: str) -> list[int]:
    """Lines of imports inside functions with no comment saying why: on the line itself, or on
    the line just above the import or the run of imports it belongs to."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            above = node.lineno - 2  # index of the line above
            while above >= 0 and lines[above].lstrip().startswith(("import ", "from ")):
                above -= 1  # a run of imports shares one comment
            said = "#" in lines[node.lineno - 1] or (
                above >= 0 and lines[above].lstrip().startswith("#")
            )
            if not said:
                found.append(node.lineno)
    return found


def test_the_reason_check_finds_an_import_without_one():
    source = (
        "def a():\n    import os\n"
        "def b():\n    # why\n    import os\n    import sys\n"
        "def c():\n    import os  # why\n"
    )
    assert unexplained_function_imports(source) == [2]


def test_every_import_inside_a_function_says_why():
    """Only what Django's app loading requires stays inside a function (or a known cycle,
    above, until it is paid down), and it says so where it stands."""
    unexplained = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _modules().values()
        for line in unexplained_function_imports(path.read_text(encoding="utf-8"))
    ]
    assert unexplained == []
