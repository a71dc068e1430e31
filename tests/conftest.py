"""Shared test configuration.

Every async test must run on a virtual clock so sleeps and timeouts cost nothing and a
regression fails fast instead of hanging: request ``autojump_clock`` (pytest-trio's
``MockClock(autojump_threshold=0)``). Collection fails for an async test that forgets.
"""

from __future__ import annotations

import inspect

import pytest

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
