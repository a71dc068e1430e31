"""DESIGN.md's layout rules: one module per concept, imports only from modules above, the
public names re-exported from the package, each with a docstring, and ``py.typed`` shipped."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

import trio_runs

PACKAGE = Path(trio_runs.__file__).parent

# DESIGN.md's table, top to bottom: a module may import only modules listed before it.
ORDER = [
    "_histogram",
    "events",
    "errors",
    "_encoding",
    "_validation",
    "context",
    "broker",
    "ledger",
    "_terminals",
    "coordinator",
    "backend",
    "testing",
    "pytest_plugin",
]

# DESIGN.md's public API block: these names are a contract.
CONTRACT = [
    "RunComplete",
    "Notification",
    "NotificationType",
    "Event",
    "EventType",
    "AgentMessage",
    "RunCall",
    "Broker",
    "RunLedger",
    "AcceptedRun",
    "Coordinator",
    "SessionCoordinator",
    "RunContext",
    "Backend",
    "Workspace",
    "open_backend",
    "with_run_id",
    "current_run_id",
    "with_run_complete_marker",
    "mark_run_complete_published",
    "run_complete_published",
    "RetryPolicy",
    "SubscriberOverflow",
    "TrioRunsError",
    "WorkspaceNotFound",
    "AgentNotInitialized",
    "EmptyPrompt",
    "SessionMissing",
    "WorkspaceClosing",
    "UnknownRun",
]


def internal_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trio_runs."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return found


@pytest.mark.parametrize("module", ORDER)
def test_modules_import_only_modules_above_them(module: str):
    allowed = set(ORDER[: ORDER.index(module)])
    assert internal_imports(module) <= allowed, f"{module} imports below itself"


def test_every_module_in_the_package_is_placed_in_the_order():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    core = modules & set(ORDER)
    assert core == set(ORDER)


def test_the_contract_names_are_exported():
    missing = [name for name in CONTRACT if name not in trio_runs.__all__]
    assert not missing
    for name in trio_runs.__all__:
        assert hasattr(trio_runs, name), name


# Type aliases cannot carry a runtime docstring; theirs is the string under them in source.
ALIASES = {"__version__", "Agent", "Prepare", "CoordinatorFactory", "AfterCrash", "EndReason"}


@pytest.mark.parametrize("name", sorted(set(trio_runs.__all__) - ALIASES))
def test_every_public_name_has_a_docstring(name: str):
    obj = getattr(trio_runs, name)
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


# -- no module reaches into another's private names ------------------------------------

SOURCES = sorted(PACKAGE.rglob("*.py"))


def dotted_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {dotted_name(path): path for path in SOURCES}
SOURCE_IDS = [str(path.relative_to(PACKAGE.parent)) for path in SOURCES]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def resolve_from(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement in ``path`` imports from."""
    if node.level == 0:
        return node.module or ""
    package = dotted_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]  # a module's relative imports start from its package
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def private_reaches(
    path: Path, source: str | None = None, modules_of_package: dict[str, Path] = MODULES
) -> list[str]:
    """``from m import _x`` and ``m._x`` (``m`` a module of trio_runs) in ``path``, by line."""
    if source is None:
        source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    found: list[tuple[int, str]] = []
    modules: dict[str, str] = {}  # a local name bound to a module of the package -> its name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = top
        elif isinstance(node, ast.ImportFrom):
            origin = resolve_from(path, node)
            if not (origin == "trio_runs" or origin.startswith("trio_runs.")):
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                if submodule in modules_of_package:
                    # A module, private or not, imported by name: its file is its own.
                    modules[alias.asname or alias.name] = submodule
                elif is_private(alias.name):
                    found.append((node.lineno, f"from {origin} import {alias.name}"))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        chain: list[str] = []
        base: ast.expr = node.value
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id in modules):
            continue
        module = ".".join([modules[base.id], *chain])
        if module in modules_of_package:
            found.append((node.lineno, f"{module}.{node.attr}"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("path", SOURCES, ids=SOURCE_IDS)
def test_no_module_uses_another_modules_private_names(path: Path):
    # Layering: what one module needs from another is part of that module's API, not a
    # reach into its `_`-prefixed internals. Private *modules* (`_outcomes.py`) are fine to
    # import from; their own `_`-prefixed names are not.
    assert private_reaches(path) == []


def test_the_private_name_check_catches_each_form():
    # The check above is only as good as this: each way of reaching in is found, and only
    # those (a private module's public names, dunders and other packages are left alone).
    code = textwrap.dedent(
        """
        import trio_runs.coordinator
        import trio_runs.context as context_module
        from .. import coordinator
        from ..coordinator import _fallback_terminal, SessionCoordinator
        from ..context import _current_marker as marker
        from .._outcomes import outcome_of, _hidden
        from . import client
        from .. import __version__, _outcomes
        import trio

        trio_runs.coordinator._private_a
        context_module._private_b
        coordinator._private_c
        client._private_d
        _outcomes.public
        _outcomes._private_e
        trio._core
        coordinator.__name__
        """
    )
    as_if = PACKAGE / "http" / "checked.py"  # relative imports resolve as from trio_runs/http
    modules = {**MODULES, "trio_runs._outcomes": PACKAGE / "_outcomes.py"}
    found = [line.split(": ", 1)[1] for line in private_reaches(as_if, code, modules)]
    assert found == [
        "from trio_runs.coordinator import _fallback_terminal",
        "from trio_runs.context import _current_marker",
        "from trio_runs._outcomes import _hidden",
        "trio_runs.coordinator._private_a",
        "trio_runs.context._private_b",
        "trio_runs.coordinator._private_c",
        "trio_runs.http.client._private_d",
        "trio_runs._outcomes._private_e",
    ]


def test_the_package_is_typed():
    assert (PACKAGE / "py.typed").exists()
