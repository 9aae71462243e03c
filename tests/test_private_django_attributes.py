"""No production code sets Django's private attributes (a model's `_state`, a queryset's
`_result_cache`, a prefetch cache): what they mean changes between Django releases without
notice. Rows written in hand are given to the caller through public means instead
(`Prefetch(to_attr=…)` lists, `Model.from_db`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_DIRS = ("billing", "config", "inventory", "marketplace", "scripts")
PRIVATE = frozenset(
    {
        "_state",
        "_prefetched_objects_cache",
        "_result_cache",
        "_prefetch_done",
        "_known_related_objects",
        "_prefetch_related_lookups",
        "_hints",
        "_for_write",
        "_fields",
    }
)


def private_writes(source: str) -> list[tuple[int, str]]:
    """(line, attribute) for each private Django attribute the source assigns or setattr()s."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):  # also `a._x, b._y = …`
                if isinstance(leaf, ast.Attribute) and leaf.attr in PRIVATE:
                    found.append((leaf.lineno, leaf.attr))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE
        ):
            found.append((node.lineno, node.args[1].value))
    return sorted(found, key=lambda item: item[0])


def test_the_check_finds_each_way_of_setting_one():
    source = (
        "qs._result_cache, qs._prefetch_done = rows, True\n"
        "obj._prefetched_objects_cache = {}\n"
        "setattr(obj, '_state', state)\n"
        "obj._state.adding = False\n"
        "obj.public = 1\n"
    )
    assert private_writes(source) == [
        (1, "_result_cache"),
        (1, "_prefetch_done"),
        (2, "_prefetched_objects_cache"),
        (3, "_state"),
        (4, "_state"),
    ]


def test_no_production_code_sets_a_private_django_attribute():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {attr}"
        for app in APP_DIRS
        for path in sorted((ROOT / app).rglob("*.py"))
        if "migrations" not in path.parts
        for line, attr in private_writes(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
