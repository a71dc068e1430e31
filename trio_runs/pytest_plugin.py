"""pytest plugin (auto-registered on install): a fixture for testing code built on trio-runs.

- ``trio_runs_backend`` — an open :class:`~trio_runs.Backend`. At teardown every workspace is
  closed, and the test fails if any accepted run was left without a terminal.

It is a pytest-trio *trio fixture* (``pytest_trio.trio_fixture``), so it works in any Trio
test: under ``trio_mode = true``, or in a test marked ``@pytest.mark.trio`` without it. The
virtual clock, ``autojump_clock``, is pytest-trio's own fixture; request it beside this one.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import pytest

from .backend import Backend, open_backend

__all__ = ["trio_runs_backend"]

_NEEDS_PYTEST_TRIO = (
    "the trio_runs_backend fixture needs pytest-trio: python -m pip install pytest-trio"
)


def _trio_fixture(func: Callable[..., Any]) -> Any:
    # A trio fixture runs inside the test's own trio.run whether or not trio_mode is on.
    # pytest-trio is a test dependency, not the package's: without it, say so when asked.
    try:
        trio_fixture = importlib.import_module("pytest_trio").trio_fixture
    except ImportError:

        @pytest.fixture(name=func.__name__)
        def needs_pytest_trio() -> NoReturn:
            pytest.fail(_NEEDS_PYTEST_TRIO, pytrace=False)

        return needs_pytest_trio
    return trio_fixture(func)


@_trio_fixture
async def trio_runs_backend() -> AsyncIterator[Backend]:
    """An open backend, closed at teardown; fails the test if a run was left without a terminal."""
    async with open_backend() as opened:
        yield opened
    pending = opened.ledger.pending_run_ids()
    if pending:
        pytest.fail(
            f"{len(pending)} accepted run(s) were left without a terminal: {pending[:20]}",
            pytrace=False,
        )
