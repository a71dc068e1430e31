"""pytest plugin (auto-registered on install): fixtures for testing code built on trio-runs.

- ``autojump_clock`` — a ``trio.testing.MockClock(autojump_threshold=0)``; request it in a
  pytest-trio test and sleeps and timeouts run on virtual time.
- ``backend`` — an open :class:`~trio_runs.Backend` (needs pytest-trio). At teardown every
  workspace is closed, and the test fails if any accepted run was left without a terminal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio.testing

from .backend import Backend, open_backend
from .testing import autojump_clock as _make_autojump_clock

__all__ = ["autojump_clock", "backend"]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """A virtual clock that jumps ahead whenever every task is blocked."""
    return _make_autojump_clock()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """An open backend, closed at teardown; fails the test if a run was left without a terminal."""
    async with open_backend() as opened:
        yield opened
    pending = opened.ledger.pending_run_ids()
    if pending:
        pytest.fail(
            f"{len(pending)} accepted run(s) were left without a terminal: {pending[:20]}",
            pytrace=False,
        )
