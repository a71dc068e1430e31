"""DESIGN.md's layout rules: one module per concept, imports only from modules above, the
public names re-exported from the package, each with a docstring, and ``py.typed`` shipped."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import trio_runs

PACKAGE = Path(trio_runs.__file__).parent

# DESIGN.md's table, top to bottom: a module may import only modules listed before it.
ORDER = [
    "events",
    "errors",
    "context",
    "broker",
    "ledger",
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
ALIASES = {"__version__", "Agent", "Prepare", "CoordinatorFactory"}


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


def test_the_package_is_typed():
    assert (PACKAGE / "py.typed").exists()
