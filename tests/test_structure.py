"""The shape docs/architecture.md promises, checked on the source: sizes, one-way imports,
a core that knows no web framework, and a small public face."""

from __future__ import annotations

import ast
from pathlib import Path

import credit_guard

PACKAGE = Path(credit_guard.__file__).resolve().parent
CORE = ("_guard", "_ledger", "_pricing", "_holds", "_hooks", "_notify", "_ticket", "_units", "_clock", "_config")
CORE += ("_storage", "models", "events", "errors", "schema", "_idempotency", "_decisions", "_metrics")
WEB = ("starlette", "fastapi", "litestar")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports_of(name: str, tree: ast.Module, *, runtime_only: bool = False) -> set[str]:
    """The modules ``name`` imports (absolute dotted names), optionally leaving out
    ``if TYPE_CHECKING:`` blocks."""
    package = name if name in _packages() else name.rpartition(".")[0]
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(inner) for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if node.module:  # `from . import problems` imports credit_guard.problems, not the package
                found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def _packages() -> set[str]:
    return {".".join(path.relative_to(PACKAGE.parent).parent.parts) for path in PACKAGE.rglob("__init__.py")}


def test_no_module_over_600_lines_and_no_class_over_400() -> None:
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{path.relative_to(PACKAGE)} has {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size < 400, f"{path.relative_to(PACKAGE)}: class {node.name} has {size} lines"


def test_imports_run_one_way_with_no_cycle() -> None:
    trees = modules()
    graph = {
        name: {other for other in imports_of(name, tree) if other in trees and other != name}
        for name, tree in trees.items()
    }
    graph["credit_guard"] = set()  # the package's face imports everything; nothing may import it back
    for name, edges in graph.items():
        assert "credit_guard" not in edges or name.startswith("credit_guard.client"), f"{name} imports the package root"

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reach(name))
    assert cycles == [], f"import cycles through {cycles}"


def test_the_core_imports_no_web_framework() -> None:
    for name, tree in modules().items():
        short = name.removeprefix("credit_guard.")
        if not short.startswith(CORE):
            continue
        web = sorted(m for m in imports_of(name, tree, runtime_only=True) if m.split(".")[0] in WEB)
        assert web == [], f"{name} imports {web}"


def test_the_public_face_is_small_and_every_name_in_it_imports() -> None:
    assert len(credit_guard.__all__) <= 20
    for name in credit_guard.__all__:
        assert getattr(credit_guard, name) is not None
    private = [p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "cli", "client")]
    public = {"errors.py", "models.py", "problems.py", "schema.py", "events.py", "middleware.py", "testing.py"}
    assert {name for name in private if not name.startswith("_")} == public
