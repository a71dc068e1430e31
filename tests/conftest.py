"""Shared test configuration.

Every async test must choose its clock, or collection fails. Most run on a virtual clock so
sleeps and timeouts cost nothing and a regression fails fast instead of hanging: request
``autojump_clock`` (pytest-trio's ``MockClock(autojump_threshold=0)``). A test that waits on
real I/O — a writer thread committing to a real SQLite file, a real Redis — requests
``real_clock`` instead: the autojump clock would jump over every ``fail_after`` while the
test waits for the thread, so those tests bound every wait in real seconds.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import trio
from dict_store import DictStore
from redis_server import namespace, redis_server, redis_url  # noqa: F401 (fixtures)

from trio_runs import Backend, RunLedger, RunStore, open_backend

_CLOCKS = {"autojump_clock", "mock_clock", "real_clock"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is None or not inspect.iscoroutinefunction(function):
            continue
        if not _CLOCKS & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(
                f"{item.nodeid}: async tests must request autojump_clock (virtual time), "
                "or real_clock for tests that wait on real I/O"
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


@pytest.fixture
def real_clock() -> None:
    """Run this async test on Trio's real clock (it waits on real I/O: threads, files,
    sockets); every wait in it must still be bounded, in real seconds."""
