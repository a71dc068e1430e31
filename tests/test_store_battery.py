"""The store battery: every ``RunStore`` promise, checked on every store.

``RunLedger`` (in memory), ``DictStore`` (written in the tests from the protocol alone) and
``SqliteLedger`` (a real SQLite file, a real writer thread) all pass the same tests. They run
on the real clock because the durable store waits on its writer thread; every wait is bounded
in real seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from dict_store import DictStore

from trio_runs import DuplicateRun, RunComplete, RunLedger, RunStore, UnknownRun
from trio_runs.sqlite import open_sqlite_ledger

BOUND = 10.0  # real seconds for any one wait


@pytest.fixture(params=["RunLedger", "DictStore", "SqliteLedger"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunStore]:
    if request.param == "SqliteLedger":
        async with open_sqlite_ledger(tmp_path / "runs.db") as durable:
            yield durable
    else:
        yield RunLedger() if request.param == "RunLedger" else DictStore()


async def visible(store: RunStore, run_id: str) -> RunComplete:
    with trio.fail_after(BOUND):
        return await store.wait(run_id)


async def test_ids_are_unique_while_known(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    with pytest.raises(DuplicateRun):
        any_store.accept("r", "other")
    assert any_store.session_of("r") == "s"
    any_store.complete(RunComplete("s", "r"))
    await visible(any_store, "r")
    with pytest.raises(DuplicateRun):
        any_store.accept("r", "s")
    assert any_store.statistics().accepted_total == 1


async def test_the_first_terminal_wins_at_once(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    announced: list[RunComplete] = []
    assert any_store.complete(RunComplete("s", "r", result=1), announced.append) is True
    # Refused at once, before the first one is necessarily durable.
    assert any_store.complete(RunComplete("s", "r", error="late"), announced.append) is False
    rc = await visible(any_store, "r")
    assert rc.result == 1
    assert any_store.get("r") == rc
    assert any_store.state("r") == "terminal"
    assert announced == [rc]  # on_visible once, for the winner only
    stats = any_store.statistics()
    assert (stats.completed_total, stats.failed_total, stats.duplicates_suppressed) == (1, 0, 1)


async def test_on_visible_comes_with_visibility(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    seen: list[tuple[object, object]] = []

    def on_visible(rc: RunComplete) -> None:
        seen.append((any_store.state(rc.run_id), any_store.get(rc.run_id)))

    rc = RunComplete("s", "r", result="x")
    any_store.complete(rc, on_visible)
    await visible(any_store, "r")
    with trio.fail_after(BOUND):
        while not seen:
            await trio.sleep(0.001)
    assert seen == [("terminal", rc)]


async def test_every_waiter_gets_the_one_terminal(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    got: list[RunComplete] = []

    async def waiter() -> None:
        got.append(await any_store.wait("r"))

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert any_store.state("r") == "pending"
            any_store.complete(RunComplete("s", "r", cancelled=True))
    assert len(got) == 5
    assert all(rc == got[0] and rc.cancelled for rc in got)
    assert await visible(any_store, "r") == got[0]  # a late waiter, at once


async def test_unknown_ids(any_store: RunStore, real_clock):
    assert any_store.state("nope") is None
    assert any_store.get("nope") is None
    assert any_store.session_of("nope") is None
    with trio.fail_after(BOUND), pytest.raises(UnknownRun):
        await any_store.wait("nope")


async def test_a_withdrawn_acceptance_leaves_no_trace(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    any_store.withdraw("r")
    assert any_store.state("r") is None
    assert any_store.pending_run_ids() == []
    assert any_store.statistics().accepted_total == 0
    any_store.accept("r", "s")  # the id is free again
    any_store.complete(RunComplete("s", "r"))
    await visible(any_store, "r")
    any_store.withdraw("r")  # a no-op for an ended run
    assert any_store.state("r") == "terminal"


async def test_pending_runs_are_listed_until_their_terminal_is_visible(
    any_store: RunStore, real_clock
):
    for run_id in ("a", "b", "c"):
        any_store.accept(run_id, "s")
    any_store.complete(RunComplete("s", "b"))
    assert set(any_store.pending_run_ids()) >= {"a", "c"}
    await visible(any_store, "b")
    assert any_store.pending_run_ids() == ["a", "c"]
    assert any_store.statistics().pending == 2


async def test_a_terminal_for_an_unknown_id_is_recorded(any_store: RunStore, real_clock):
    assert any_store.complete(RunComplete("s", "stray", error="x")) is True
    assert (await visible(any_store, "stray")).error == "x"


async def test_flush_returns_and_can_be_cancelled(any_store: RunStore, real_clock):
    any_store.accept("r", "s")
    with trio.fail_after(BOUND):
        await any_store.flush()
    with trio.CancelScope() as scope:
        scope.cancel()
        await any_store.flush()
    assert any_store.state("r") == "pending"
