"""Tests for ``trio_runs.ledger``: the record of terminals by run id.

Promises checked (DESIGN.md "Ledger" and ledger.py docstrings): ``accept`` registers a pending
run and refuses a known id (``DuplicateRun``); ``complete`` is sync, first terminal wins and
later ones are counted, never stored; ``wait`` answers late waiters at once, blocks for pending
runs and wakes every waiter with the same terminal, raises ``UnknownRun`` for unknown ids;
retention evicts the oldest terminals only, and a woken waiter still gets an evicted terminal;
every retained terminal reads back equal (and of the same types) however old, and most of them
are invisible to the cyclic garbage collector.
"""

from __future__ import annotations

import gc
import inspect
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from trio_runs import DuplicateRun, RunComplete, RunLedger, RunStore, TrioRunsError, UnknownRun


def done(run_id: str, session_id: str = "s", **kwargs: Any) -> RunComplete:
    return RunComplete(session_id=session_id, run_id=run_id, **kwargs)


# -- accept / complete / get / state / session_of ---------------------------------------


def test_accept_registers_a_pending_run() -> None:
    """After ``accept`` the run is pending: ``state``, ``session_of``, ``in``, no terminal."""
    ledger = RunLedger()
    assert ledger.state("r1") is None
    ledger.accept("r1", "sess")
    assert ledger.state("r1") == "pending"
    assert ledger.get("r1") is None
    assert ledger.session_of("r1") == "sess"
    assert "r1" in ledger
    assert (ledger.pending_count, ledger.terminal_count, ledger.accepted_total) == (1, 0, 1)
    assert ledger.pending_run_ids() == ["r1"]


def test_complete_records_the_terminal() -> None:
    """``complete`` of a pending run returns ``True`` and makes it terminal with that value."""
    ledger = RunLedger()
    ledger.accept("r1", "sess")
    rc = done("r1", "sess", result={"ok": 1})
    assert ledger.complete(rc) is True
    assert ledger.state("r1") == "terminal"
    assert ledger.get("r1") is rc
    assert ledger.session_of("r1") == "sess"
    assert "r1" in ledger
    assert (ledger.pending_count, ledger.terminal_count) == (0, 1)
    assert ledger.pending_run_ids() == []


def test_unknown_ids() -> None:
    """An id never accepted: ``state``/``session_of``/``get`` are ``None``, not in the ledger."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    assert ledger.state("nope") is None
    assert ledger.session_of("nope") is None
    assert ledger.get("nope") is None
    assert "nope" not in ledger


def test_pending_run_ids_oldest_first() -> None:
    """``pending_run_ids`` lists pending runs in acceptance order, without ended ones."""
    ledger = RunLedger()
    for run_id in ("a", "b", "c", "d"):
        ledger.accept(run_id, "s")
    ledger.complete(done("b"))
    assert ledger.pending_run_ids() == ["a", "c", "d"]


def test_accept_twice_raises_duplicate_run() -> None:
    """Run ids are unique: accepting a pending id again raises ``DuplicateRun`` and changes
    nothing."""
    ledger = RunLedger()
    ledger.accept("r1", "s1")
    with pytest.raises(DuplicateRun) as info:
        ledger.accept("r1", "s2")
    assert info.value.run_id == "r1"
    assert isinstance(info.value, TrioRunsError)
    assert isinstance(info.value, ValueError)
    assert ledger.session_of("r1") == "s1"
    assert (ledger.pending_count, ledger.accepted_total) == (1, 1)


def test_accept_of_a_terminal_id_raises_duplicate_run() -> None:
    """Accepting an id that already ended raises ``DuplicateRun``; the terminal stays."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    rc = done("r1")
    ledger.complete(rc)
    with pytest.raises(DuplicateRun):
        ledger.accept("r1", "s")
    assert ledger.state("r1") == "terminal"
    assert ledger.get("r1") is rc
    assert ledger.pending_count == 0


def test_first_complete_wins_and_later_ones_are_counted() -> None:
    """The first terminal wins (``True``); later ones return ``False``, increment
    ``duplicates_suppressed`` each time and never overwrite the stored terminal."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    first = done("r1", cancelled=True)
    assert ledger.complete(first) is True
    assert ledger.duplicates_suppressed == 0
    later = [done("r1", error="fallback"), done("r1", result=1), first]
    for n, rc in enumerate(later, start=1):
        assert ledger.complete(rc) is False
        assert ledger.duplicates_suppressed == n
        assert ledger.get("r1") is first
    assert ledger.outcomes == Counter({"cancelled": 1})
    assert ledger.terminal_count == 1


def test_complete_is_sync() -> None:
    """``accept`` and ``complete`` are plain functions (terminals are recorded from
    ``finally`` blocks and cancelled scopes)."""
    assert not inspect.iscoroutinefunction(RunLedger.accept)
    assert not inspect.iscoroutinefunction(RunLedger.complete)


def test_complete_of_a_never_accepted_id_is_recorded() -> None:
    """A terminal is never refused for being unexpected: it is recorded and wins."""
    ledger = RunLedger()
    rc = done("stray")
    assert ledger.complete(rc) is True
    assert ledger.get("stray") is rc
    assert ledger.state("stray") == "terminal"
    assert ledger.complete(done("stray", error="x")) is False


def test_outcomes_counter() -> None:
    """``outcomes`` counts first terminals by outcome; cancelled wins over an error."""
    ledger = RunLedger()
    terminals = [
        done("a"),
        done("b", result=3),
        done("c", error="boom"),
        done("d", cancelled=True),
        done("e", cancelled=True, error="also boom"),
    ]
    for rc in terminals:
        ledger.accept(rc.run_id, "s")
        ledger.complete(rc)
    ledger.complete(done("a", error="duplicate, not counted"))
    assert ledger.outcomes == Counter({"completed": 2, "failed": 1, "cancelled": 2})


# -- wait ---------------------------------------------------------------------------------


async def test_wait_returns_at_once_for_a_terminal_run(autojump_clock: trio.abc.Clock) -> None:
    """A late waiter is answered from the ledger at once (no virtual time passes)."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    rc = done("r1", result="answer")
    ledger.complete(rc)
    start = trio.current_time()
    with trio.fail_after(10):
        assert await ledger.wait("r1") is rc
        assert await ledger.wait("r1") is rc  # and again: waiting does not consume it
    assert trio.current_time() == start


async def test_wait_blocks_for_a_pending_run_until_complete(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``wait`` on a pending run blocks until ``complete``, then returns that terminal."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    got: list[RunComplete] = []

    async def waiter() -> None:
        got.append(await ledger.wait("r1"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(5)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            rc = done("r1", error="boom")
            ledger.complete(rc)
            ledger.complete(done("r1"))  # a duplicate does not wake anything twice
    assert got == [rc]
    assert got[0] is rc


async def test_many_concurrent_waiters_each_get_the_terminal_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Every waiter on a pending run gets the same terminal, exactly once."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    got: list[tuple[int, RunComplete]] = []

    async def waiter(i: int) -> None:
        got.append((i, await ledger.wait("r1")))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            rc = done("r1", cancelled=True)
            ledger.complete(rc)
            # A waiter arriving after the end is answered too.
            nursery.start_soon(waiter, 25)
    assert sorted(i for i, _ in got) == list(range(26))
    assert all(terminal is rc for _, terminal in got)


async def test_wait_on_an_unknown_id_raises_unknown_run(autojump_clock: trio.abc.Clock) -> None:
    """Waiting on an id never accepted raises ``UnknownRun`` (a ``LookupError``) at once."""
    ledger = RunLedger()
    ledger.accept("known", "s")
    with trio.fail_after(10), pytest.raises(UnknownRun) as info:
        await ledger.wait("never-accepted")
    assert info.value.run_id == "never-accepted"
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, TrioRunsError)


async def test_cancelled_waiter_does_not_disturb_others(autojump_clock: trio.abc.Clock) -> None:
    """A waiter cancelled while waiting leaves the run pending; other waiters still get the
    terminal."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    got: list[RunComplete] = []
    with trio.fail_after(10):
        with trio.move_on_after(1) as scope:
            await ledger.wait("r1")
        assert scope.cancelled_caught
        assert ledger.state("r1") == "pending"
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                got.append(await ledger.wait("r1"))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            ledger.complete(done("r1"))
    assert got == [done("r1")]


# -- retention ------------------------------------------------------------------------------


async def test_oldest_terminals_are_evicted_past_retain(autojump_clock: trio.abc.Clock) -> None:
    """With ``retain=N`` only the N newest terminals are kept: older ones are forgotten
    (``get`` → ``None``, ``state`` → ``None``, ``wait`` → ``UnknownRun``)."""
    ledger = RunLedger(retain=3)
    ids = [f"r{i}" for i in range(5)]
    for run_id in ids:
        ledger.accept(run_id, "s")
        ledger.complete(done(run_id))
    assert ledger.terminal_count == 3
    assert ledger.evicted_total == 2
    with trio.fail_after(10):
        for run_id in ids[:2]:
            assert ledger.get(run_id) is None
            assert ledger.state(run_id) is None
            assert ledger.session_of(run_id) is None
            with pytest.raises(UnknownRun):
                await ledger.wait(run_id)
        for run_id in ids[2:]:
            assert ledger.get(run_id) == done(run_id)
            assert await ledger.wait(run_id) == done(run_id)


async def test_pending_runs_are_never_evicted(autojump_clock: trio.abc.Clock) -> None:
    """However many terminals pass through, a pending run stays pending and waitable."""
    ledger = RunLedger(retain=2)
    ledger.accept("slow", "s")
    got: list[RunComplete] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                got.append(await ledger.wait("slow"))

            nursery.start_soon(waiter)
            for i in range(10):
                ledger.accept(f"fast{i}", "s")
                ledger.complete(done(f"fast{i}"))
            await trio.testing.wait_all_tasks_blocked()
            assert ledger.state("slow") == "pending"
            assert ledger.session_of("slow") == "s"
            assert ledger.pending_run_ids() == ["slow"]
            assert got == []
            ledger.complete(done("slow", result="late"))
    assert got == [done("slow", result="late")]
    assert ledger.get("slow") == done("slow", result="late")


async def test_woken_waiter_gets_its_terminal_even_if_evicted_meanwhile(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A waiter woken for a terminal that is evicted before the waiter runs again still
    returns that terminal (it is read from the pending record, not the table)."""
    ledger = RunLedger(retain=1)
    ledger.accept("a", "s")
    ledger.accept("b", "s")
    got: list[RunComplete] = []

    async def waiter() -> None:
        got.append(await ledger.wait("a"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            rc_a = done("a", result="mine")
            ledger.complete(rc_a)
            ledger.complete(done("b"))  # evicts "a" before the waiter has resumed
            assert ledger.get("a") is None
            assert got == []
    assert got == [rc_a]
    assert got[0] is rc_a


def assorted(i: int) -> RunComplete:
    """Terminal ``r{i}`` of a mix: every outcome, atomic results of every kind, and a result
    that holds other objects."""
    run_id = f"r{i}"
    kinds: list[dict[str, Any]] = [
        {},
        {"result": i},
        {"result": True},
        {"result": i / 2},
        {"result": f"text {i}"},
        {"result": ""},
        {"result": {"n": [i]}},
        {"error": f"boom {i}"},
        {"cancelled": True},
        {"error": "lost", "abandoned": True},
    ]
    return done(run_id, f"s{i % 7}", **kinds[i % len(kinds)])


def assert_reads_back(ledger: RunLedger, rc: RunComplete) -> None:
    got = ledger.get(rc.run_id)
    assert got == rc
    assert got is not None
    assert type(got.result) is type(rc.result)  # True stays True, not 1
    assert ledger.state(rc.run_id) == "terminal"
    assert ledger.session_of(rc.run_id) == rc.session_id
    assert rc.run_id in ledger


@pytest.mark.parametrize("retain", [1, 2, 3, 1_279, 1_280, 1_281, 1_537, 5_000, 9_001])
def test_exactly_the_newest_retain_terminals_are_kept(retain: int) -> None:
    """Whatever ``retain`` is, after each terminal exactly the newest ``min(n, retain)`` are
    held, each reading back equal to what was recorded; every older one is forgotten."""
    ledger = RunLedger(retain=retain)
    terminals = [assorted(i) for i in range(2 * retain + 300)]
    for n, rc in enumerate(terminals, start=1):
        ledger.accept(rc.run_id, rc.session_id)
        assert ledger.complete(rc) is True
        assert ledger.terminal_count == min(n, retain)
        assert ledger.evicted_total == max(0, n - retain)
    kept, forgotten = terminals[-retain:], terminals[:-retain]
    for rc in kept:
        assert_reads_back(ledger, rc)
    for rc in forgotten:
        assert ledger.get(rc.run_id) is None
        assert ledger.state(rc.run_id) is None
        assert rc.run_id not in ledger
    assert ledger.statistics().retained == retain


async def test_old_terminals_are_waited_on_refused_twice_and_never_reused(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A terminal recorded thousands of terminals ago is still answered at once, still
    refuses a second terminal and still makes its id a duplicate."""
    ledger = RunLedger(retain=20_000)
    terminals = [assorted(i) for i in range(12_000)]
    for rc in terminals:
        ledger.accept(rc.run_id, rc.session_id)
        ledger.complete(rc)
    with trio.fail_after(10):
        for rc in terminals[:20]:
            assert await ledger.wait(rc.run_id) == rc
            assert ledger.complete(done(rc.run_id, error="a second terminal")) is False
            with pytest.raises(DuplicateRun):
                ledger.accept(rc.run_id, "s")
            assert_reads_back(ledger, rc)
    assert ledger.duplicates_suppressed == 20
    assert ledger.outcomes == Counter(rc.outcome for rc in terminals)


def test_most_retained_terminals_are_invisible_to_the_garbage_collector() -> None:
    """Holding 40,000 terminals (atomic results) adds fewer than 4,000 objects the cyclic
    garbage collector tracks: every full collection walks every tracked object, so a held
    terminal that stayed tracked would cost every collection, and more the more are held."""
    gc.collect()
    before = len(gc.get_objects())
    ledger = RunLedger(retain=40_000)
    for i in range(40_000):
        ledger.accept(f"r{i}", "s")
        ledger.complete(done(f"r{i}", result=i if i % 3 else None, cancelled=i % 5 == 0))
    gc.collect()
    assert ledger.terminal_count == 40_000
    assert len(gc.get_objects()) - before < 4_000


async def test_a_waiter_on_a_withdrawn_run_gets_unknown_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``withdraw`` wakes a waiter already parked on the run into ``UnknownRun``."""
    ledger = RunLedger()
    ledger.accept("r1", "s")
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await ledger.wait("r1")
        except UnknownRun as exc:
            outcome.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert ledger.session_of("r1") == "s"
            ledger.withdraw("r1")
    assert len(outcome) == 1
    assert ledger.state("r1") is None


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10", None])
def test_retain_validation(bad: object) -> None:
    """``retain`` must be a positive int: anything else raises ``ValueError``."""
    with pytest.raises(ValueError, match="retain"):
        RunLedger(retain=bad)  # type: ignore[arg-type]


def test_retain_default_and_minimum() -> None:
    """``retain`` defaults to 100_000; ``retain=1`` keeps exactly the newest terminal."""
    assert RunLedger().retain == 100_000
    ledger = RunLedger(retain=1)
    ledger.complete(done("a"))
    ledger.complete(done("b"))
    assert (ledger.get("a"), ledger.get("b")) == (None, done("b"))


# -- protocol -------------------------------------------------------------------------------


def test_run_ledger_satisfies_the_run_store_protocol() -> None:
    """``RunLedger`` implements ``RunStore`` (runtime-checkable), with ``wait`` async and
    ``accept``/``complete`` sync as the protocol requires."""
    ledger = RunLedger()
    assert isinstance(ledger, RunStore)
    assert inspect.iscoroutinefunction(RunLedger.wait)
    assert inspect.iscoroutinefunction(RunStore.wait)
    for name in ("accept", "complete", "get", "state"):
        assert not inspect.iscoroutinefunction(getattr(RunStore, name))
        assert not inspect.iscoroutinefunction(getattr(RunLedger, name))
    assert not isinstance(object(), RunStore)
