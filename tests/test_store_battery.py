"""The store battery: every ``RunStore`` promise, checked on every store.

``RunLedger`` (in memory), ``DictStore`` (written in the tests from the protocol alone) and
``SqliteLedger`` (a real SQLite file, a real writer thread) all pass the same tests; the two
with the listing capability (``SupportsRunListing``) pass its tests too. They run
on the real clock because the durable store waits on its writer thread; every wait is bounded
in real seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from dict_store import DictStore

from trio_runs import (
    DuplicateRun,
    RunCall,
    RunComplete,
    RunLedger,
    RunQuery,
    RunStore,
    SupportsRunListing,
    UnknownRun,
)
from trio_runs.ledger import SupportsRunMetadata
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


# -- run metadata and the listing capability -------------------------------------------------


def _with_metadata(run_id: str, **more: object) -> RunComplete:
    return RunComplete(
        "s",
        run_id,
        cancelled=True,
        reason="user",
        accepted_at=100.5,
        started_at=101.25,
        ended_at=102.0,
        attempt=2,
        labels={"team": "build", "k": ""},
        **more,  # type: ignore[arg-type]
    )


async def test_a_terminal_keeps_its_metadata_new_and_old(any_store: RunStore, real_clock):
    rc = _with_metadata("r")
    any_store.accept("r", "s")
    any_store.complete(rc)
    assert (await visible(any_store, "r")).to_dict() == rc.to_dict()
    # Old enough to be kept compactly by the in-memory ledger (past its newest ~1,280).
    for i in range(1400):
        any_store.complete(RunComplete("s", f"filler-{i}"))
    await visible(any_store, "filler-1399")
    got = any_store.get("r")
    assert got is not None
    assert got.to_dict() == rc.to_dict()
    assert (await visible(any_store, "r")).to_dict() == rc.to_dict()


@pytest.fixture(params=["RunLedger", "SqliteLedger"])
async def listing_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Every store with the listing capability (and the metadata it lists)."""
    if request.param == "SqliteLedger":
        async with open_sqlite_ledger(tmp_path / "runs.db") as durable:
            yield durable
    else:
        yield RunLedger()


def _call(run_id: str, at: float, session: str = "s", **labels: str) -> RunCall:
    return RunCall(session, "p", run_id, labels=labels, accepted_at=at)


async def test_run_info_follows_a_run_from_accepted_to_ended(listing_store: Any, real_clock):
    assert isinstance(listing_store, SupportsRunListing)
    assert isinstance(listing_store, SupportsRunMetadata)
    assert await listing_store.run_info("r") is None
    listing_store.accept_call(_call("r", 100.5, team="build", k=""), "/w")
    info = await listing_store.run_info("r")
    assert info is not None
    assert (info.state, info.session_id, info.workspace_path) == ("pending", "s", "/w")
    assert (info.accepted_at, info.started_at, info.attempt) == (100.5, None, 1)
    assert dict(info.labels) == {"team": "build", "k": ""}
    listing_store.mark_started("r", 101.25)
    listing_store.mark_started("unknown", 1.0)  # a no-op
    assert (await listing_store.run_info("r")).started_at == 101.25
    rc = _with_metadata("r")
    listing_store.complete(rc)
    await visible(listing_store, "r")
    info = await listing_store.run_info("r")
    assert info.state == "terminal"
    assert info.terminal.to_dict() == rc.to_dict()
    assert (info.accepted_at, info.started_at, info.attempt, info.workspace_path) == (
        100.5,
        101.25,
        2,
        "/w",
    )


async def test_listing_pages_newest_first_while_runs_are_added(listing_store: Any, real_clock):
    # 25 runs, some ended; equal acceptance times are ordered by run id.
    for i in range(25):
        listing_store.accept_call(_call(f"r{i:02d}", 1000.0 + i // 2), "/w")
    for i in range(0, 25, 3):
        listing_store.complete(RunComplete("s", f"r{i:02d}", accepted_at=1000.0 + i // 2))
    await visible(listing_store, "r24")
    with trio.fail_after(BOUND):
        await listing_store.flush()
    expected = sorted((f"r{i:02d}" for i in range(25)), key=lambda r: (int(r[1:]) // 2, r))[::-1]
    seen: list[str] = []
    cursor = None
    added = 0
    while True:
        page = await listing_store.list_runs(RunQuery(limit=4, cursor=cursor))
        assert 0 < len(page.runs) <= 4
        seen += [info.run_id for info in page.runs]
        # Newer and older runs arrive between pages: neither shifts the next page.
        listing_store.accept_call(_call(f"new{added}", 5000.0 + added), "/w")
        added += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == expected


async def test_listing_filters(listing_store: Any, real_clock):
    listing_store.accept_call(_call("a1", 1.0, "s1", team="x"), "/a")
    listing_store.accept_call(_call("a2", 2.0, "s2", team="y"), "/a")
    listing_store.accept_call(_call("b1", 3.0, "s1", team="x"), "/b")
    listing_store.complete(RunComplete("s1", "a1", accepted_at=1.0, labels={"team": "x"}))
    await visible(listing_store, "a1")

    async def ids(**query: Any) -> list[str]:
        return [info.run_id for info in (await listing_store.list_runs(RunQuery(**query))).runs]

    assert await ids() == ["b1", "a2", "a1"]
    assert await ids(workspace_path="/a") == ["a2", "a1"]
    assert await ids(session_id="s1") == ["b1", "a1"]
    assert await ids(state="pending") == ["b1", "a2"]
    assert await ids(state="terminal") == ["a1"]
    assert await ids(label=("team", "x")) == ["b1", "a1"]
    assert await ids(label=("team", "x"), workspace_path="/a", state="terminal") == ["a1"]
    assert await ids(label=("team", "z")) == []
    page = await listing_store.list_runs(RunQuery(limit=2))
    assert [i.run_id for i in page.runs] == ["b1", "a2"]
    rest = await listing_store.list_runs(RunQuery(limit=2, cursor=page.next_cursor))
    assert ([i.run_id for i in rest.runs], rest.next_cursor) == (["a1"], None)
    with pytest.raises(ValueError, match="cursor"):
        await listing_store.list_runs(RunQuery(cursor="garbage"))
