"""pytest plugin (auto-registered on install): a fixture for testing code built on trio-runs.

- ``trio_runs_backend`` — an open :class:`~trio_runs.Backend`. At teardown the test fails,
  naming the runs, if any accepted run has not ended yet (running or queued): a test that
  forgot to wait for a run would otherwise pass on the cancelled terminal the closing gives
  it. Mark a test ``@pytest.mark.trio_runs_allow_running`` to leave runs running on purpose:
  then closing cancels them and the test passes. Either way every workspace is then closed,
  and the test fails if the closing left any accepted run without a terminal.

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

__all__ = ["pytest_configure", "trio_runs_backend"]

ALLOW_RUNNING = "trio_runs_allow_running"

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


def pytest_configure(config: pytest.Config) -> None:
    """Register the opt-out marker, so ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers",
        f"{ALLOW_RUNNING}: the trio_runs_backend fixture lets this test leave runs running "
        "(closing the backend cancels them) instead of failing it",
    )


@_trio_fixture
async def trio_runs_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """An open backend; fails the test if a run has not ended at teardown (see the module)."""
    allow_running = request.node.get_closest_marker(ALLOW_RUNNING) is not None
    async with open_backend() as opened:
        yield opened
        running = opened.ledger.pending_run_ids()
        if running and not allow_running:
            # Raised inside the block: the backend still closes, cancelling those runs.
            pytest.fail(
                f"{len(running)} run(s) had not ended at teardown (running or queued; the "
                f"backend cancels them now): {running[:20]}. Wait for them in the test "
                "(backend.wait_run, backend.as_completed), or mark the test "
                f"@pytest.mark.{ALLOW_RUNNING} to leave them running on purpose.",
                pytrace=False,
            )
    pending = opened.ledger.pending_run_ids()
    if pending:
        pytest.fail(
            f"{len(pending)} accepted run(s) were left without a terminal: {pending[:20]}",
            pytrace=False,
        )
