"""Shared test configuration.

Every async test must run on a virtual clock so sleeps and timeouts cost nothing and a
regression fails fast instead of hanging: request ``autojump_clock`` (pytest-trio's
``MockClock(autojump_threshold=0)``). Collection fails for an async test that forgets.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import trio
from dict_store import DictStore

from trio_runs import Backend, RunLedger, RunStore, open_backend

_CLOCKS = {"autojump_clock", "mock_clock"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is None or not inspect.iscoroutinefunction(function):
            continue
        if not _CLOCKS & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(
                f"{item.nodeid}: async tests must request autojump_clock (virtual time)"
            )


@pytest.fixture(params=["RunLedger", "DictStore"])
def store(request: pytest.FixtureRequest) -> RunStore:
    """A fresh run store: the package's ``RunLedger``, and a second one written in the tests
    from the protocol alone. Every backend test runs against both."""
    return RunLedger() if request.param == "RunLedger" else DictStore()


@pytest.fixture
async def backend(store: RunStore, autojump_clock: object) -> AsyncIterator[Backend]:
    """An open backend on ``store``; its closing at teardown is bounded, so a regression fails."""
    async with open_backend(store) as opened:
        yield opened
        with trio.fail_after(60):
            await opened.aclose()
