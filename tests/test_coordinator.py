"""Tests for ``SessionCoordinator``, driven directly (no ``Backend``).

Each numbered rule of DESIGN.md's *Coordinator* section has its own tests (``test_ruleN_...``),
then the return contract, the ``prepare()`` hook, ``ctx.emit``, the queries, memory and input
validation. Runs are dispatched the way the backend's dispatcher does it: ``begin_accepted``,
``ledger.accept``, then a task that attaches ``with_run_id`` and a fresh
``with_run_complete_marker`` and awaits ``run_accepted`` (see :class:`Dispatch`).

Every test runs on the autojump clock, sequences itself with ``wait_all_tasks_blocked`` and
``trio.Event`` only, and bounds every wait with ``trio.fail_after``. The :func:`harness`
checks, on the way out of every test, that no run id got two terminals (on the
``run_completions`` broker or in the ledger) and that the coordinator forgot every session.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_runs import (
    AcceptedRun,
    Attachment,
    Broker,
    DuplicateRun,
    EmptyPrompt,
    EventType,
    RetryPolicy,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    RunProgress,
    SessionCoordinator,
    SessionMissing,
    Subscription,
    current_run_id,
    run_complete_published,
    with_run_complete_marker,
    with_run_id,
)

TIMEOUT = 60.0
"""Virtual seconds any single wait may take before the test fails instead of hanging."""


def cancelled(session_id: str, run_id: str) -> RunComplete:
    return RunComplete(session_id, run_id, cancelled=True)


def result_of(run_id: str) -> str:
    return f"result of {run_id}"


async def settle() -> None:
    """Wait (bounded) until every task is blocked: the system did all it can do by itself."""
    with trio.fail_after(TIMEOUT):
        await trio.testing.wait_all_tasks_blocked()


# -- the test rig -------------------------------------------------------------------------


class ScriptedAgent:
    """An instrumented agent: each run blocks until the test finishes or fails it by run id.

    Records every call (one per attempt), its context, which runs were cancelled, whether
    the run-complete marker was already set when the agent started, and every moment a
    session had two runs inside the agent at once (``overlaps``, which must stay empty).
    """

    def __init__(self) -> None:
        self.calls: list[RunCall] = []
        self.contexts: list[RunContext] = []
        self.cancelled: list[str] = []
        self.marker_at_start: dict[str, bool] = {}
        self.running: dict[str, str] = {}
        self.overlaps: list[tuple[str, str]] = []
        self.max_concurrent = 0
        self._gates: dict[str, trio.Event] = {}
        self._errors: dict[str, BaseException] = {}

    @property
    def started(self) -> list[str]:
        return [call.run_id for call in self.calls]

    def _gate(self, run_id: str) -> trio.Event:
        return self._gates.setdefault(run_id, trio.Event())

    def finish(self, run_id: str) -> None:
        """Let ``run_id`` return its result (now, or as soon as it starts)."""
        self._gate(run_id).set()

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Make ``run_id`` raise ``exc`` (now, or as soon as it starts)."""
        self._errors[run_id] = exc
        self._gate(run_id).set()

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        self.calls.append(call)
        self.contexts.append(ctx)
        self.marker_at_start[call.run_id] = run_complete_published()
        other = self.running.get(call.session_id)
        if other is not None:
            self.overlaps.append((other, call.run_id))
        self.running[call.session_id] = call.run_id
        self.max_concurrent = max(self.max_concurrent, len(self.running))
        try:
            await self._gate(call.run_id).wait()
        except trio.Cancelled:
            self.cancelled.append(call.run_id)
            raise
        finally:
            if self.running.get(call.session_id) == call.run_id:
                del self.running[call.session_id]
        error = self._errors.get(call.run_id)
        if error is not None:
            raise error
        return result_of(call.run_id)


class Harness:
    """A coordinator with its ledger and brokers, and a subscriber on ``run_completions``."""

    def __init__(self, agent: Any, **options: Any) -> None:
        events_buffer = options.pop("events_buffer", 4096)
        self.ledger = RunLedger()
        self.completions: Broker[RunComplete] = Broker()
        self.events: Broker[RunProgress] = Broker(buffer_size=events_buffer)
        self.coord = SessionCoordinator(
            agent,
            run_completions=self.completions,
            ledger=self.ledger,
            events=self.events,
            **options,
        )
        self.sub: Subscription[RunComplete] | None = None
        self._seen: list[RunComplete] = []

    def published(self) -> list[RunComplete]:
        """Every terminal fanned out on ``run_completions`` so far, in order."""
        while self.sub is not None:
            try:
                event = self.sub.receive_nowait()
            except trio.WouldBlock:
                break
            assert event.type is EventType.UPDATED
            self._seen.append(event.payload)
        return list(self._seen)

    def published_for(self, run_id: str) -> list[RunComplete]:
        return [rc for rc in self.published() if rc.run_id == run_id]

    def accept(
        self, session_id: str, run_id: str, prompt: str | None = None, *, attach: bool = False
    ) -> Dispatch:
        """Accept a run like ``Backend.send_message``: reserve, then register in the ledger.

        With ``attach`` the call is attached to the reservation at once (as the backend
        does), so the coordinator knows the run before its task enters.
        """
        call = RunCall(session_id, prompt or f"do {run_id}", run_id)
        accept = self.coord.begin_accepted(session_id, call if attach else None)
        self.ledger.accept(run_id, session_id)
        return Dispatch(self, accept, call)

    def check_invariants(self, *, expect_idle: bool) -> None:
        published = self.published()
        run_ids = [rc.run_id for rc in published]
        assert len(run_ids) == len(set(run_ids)), f"a run got two terminals: {published}"
        assert self.ledger.duplicates_suppressed == 0
        for rc in published:
            assert self.ledger.get(rc.run_id) == rc
        assert len(published) == self.ledger.terminal_count
        if expect_idle:
            assert self.coord.session_count == 0, "session state leaked"
            assert not self.coord.is_busy()


@asynccontextmanager
async def harness(
    agent: Any, *, expect_idle: bool = True, **options: Any
) -> AsyncIterator[Harness]:
    h = Harness(agent, **options)
    async with h.completions.subscribe() as sub:
        h.sub = sub
        yield h
        h.check_invariants(expect_idle=expect_idle)
        h.sub = None  # what was received stays readable through h.published()


@attrs.define(eq=False)
class Dispatch:
    """One accepted run, driven like the backend's dispatched task drives it.

    Calling it (as a task) attaches the run id and a fresh marker and awaits ``run_accepted``.
    It records what ``run_accepted`` returned or raised, and, at the very moment it exited,
    what the dispatcher could see: the marker, the ledger and the broker. Exceptions are kept
    (one run's failure must not take the test's nursery down); ``Cancelled`` is re-raised.
    """

    harness: Harness
    accept: AcceptedRun
    call: RunCall
    rc: RunComplete | None = None
    error: BaseException | None = None
    marker_published: bool | None = None
    terminal_at_exit: RunComplete | None = None
    broadcast_at_exit: list[RunComplete] = attrs.field(factory=list)
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def run_id(self) -> str:
        return self.call.run_id

    async def __call__(self, scope: trio.CancelScope | None = None) -> None:
        outer: AbstractContextManager[object] = scope if scope is not None else nullcontext()
        try:
            with outer, with_run_id(self.run_id), with_run_complete_marker():
                try:
                    self.rc = await self.harness.coord.run_accepted(self.accept, self.call)
                except Exception as exc:
                    self.error = exc
                except BaseException as exc:
                    self.error = exc
                    raise
                finally:
                    self.marker_published = run_complete_published()
                    self.terminal_at_exit = self.harness.ledger.get(self.run_id)
                    self.broadcast_at_exit = self.harness.published_for(self.run_id)
        finally:
            self.done.set()

    async def wait(self) -> None:
        with trio.fail_after(TIMEOUT):
            await self.done.wait()

    def assert_ended(self, expected: RunComplete) -> None:
        """``run_accepted`` returned ``expected``, already recorded, broadcast and marked."""
        assert self.done.is_set()
        assert self.error is None, f"run_accepted raised {self.error!r}"
        assert self.rc == expected
        assert self.terminal_at_exit == expected
        assert self.broadcast_at_exit == [expected]
        assert self.marker_published is True


async def wait_all(*dispatches: Dispatch) -> None:
    with trio.fail_after(TIMEOUT):
        for dispatch in dispatches:
            await dispatch.done.wait()


# -- rule 1: sequences and reservations ---------------------------------------------------


def test_rule1_begin_accepted_stamps_increasing_sequences_across_sessions() -> None:
    """Rule 1: every acceptance, in any session, gets a larger sequence than the last."""
    coord = SessionCoordinator(ScriptedAgent(), run_completions=Broker(), ledger=RunLedger())
    accepts = [coord.begin_accepted(s) for s in ["a", "b", "a", "c", "b"]]
    for accept in accepts[:2]:
        accept.close()
    accepts += [coord.begin_accepted(s) for s in ["a", "d"]]
    sequences = [accept.sequence for accept in accepts]
    assert all(x < y for x, y in itertools.pairwise(sequences)), sequences
    assert [a.session_id for a in accepts] == ["a", "b", "a", "c", "b", "a", "d"]
    for accept in accepts:
        accept.close()
    assert coord.session_count == 0


@pytest.mark.parametrize("session_id", ["", "   ", "\t\n"])
def test_rule1_begin_accepted_refuses_a_blank_session(session_id: str) -> None:
    coord = SessionCoordinator(ScriptedAgent(), run_completions=Broker(), ledger=RunLedger())
    with pytest.raises(SessionMissing):
        coord.begin_accepted(session_id)
    assert coord.session_count == 0


async def test_rule1_unentered_reservation_holds_the_lane_until_closed(autojump_clock):
    """Rule 1: a reservation never entered keeps its session's lane until ``close()``."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        held = h.coord.begin_accepted("s")
        assert held.state == "reserved"
        assert not held.closed
        assert h.coord.is_session_busy("s")
        assert h.coord.is_busy()
        later = h.accept("s", "later")
        nursery.start_soon(later)
        await settle()
        assert later.accept.state == "queued"
        assert h.coord.queued_run_ids("s") == ["later"]
        assert h.coord.active_run_id("s") is None
        # Nothing but close() releases it, however long we wait.
        with trio.move_on_after(3600) as waited:
            await later.done.wait()
        assert waited.cancelled_caught
        assert agent.calls == []
        assert h.ledger.state("later") == "pending"

        held.close()
        held.close()  # idempotent
        assert held.closed
        assert held.state == "done"
        await settle()
        assert agent.started == ["later"]
        assert h.coord.active_run_id("s") == "later"
        agent.finish("later")
        await later.wait()
    later.assert_ended(RunComplete("s", "later", result=result_of("later")))


async def test_rule1_is_session_busy_reflects_reservations(autojump_clock):
    """Rule 1: a bare reservation makes its session (only) busy; closing it frees it."""
    async with harness(ScriptedAgent()) as h:
        assert not h.coord.is_session_busy("s")
        assert not h.coord.is_busy()
        with h.coord.begin_accepted("s") as accept:
            assert h.coord.is_session_busy("s")
            assert not h.coord.is_session_busy("other")
            assert h.coord.is_busy()
            assert h.coord.session_count == 1
            assert h.coord.queued_prompts("s") == 0
        # The context manager closed it.
        assert accept.closed
        assert not h.coord.is_session_busy("s")
        assert not h.coord.is_busy()


async def test_rule1_double_close_does_not_release_another_reservation(autojump_clock):
    """Rule 1: ``close()`` twice releases one reservation, not two.

    Two runs are accepted and the session cancelled; the first reservation is then closed
    twice. The second must still be cancelled on entry: the session (and its cancel mark)
    must outlive it.
    """
    agent = ScriptedAgent()
    async with harness(agent) as h:
        abandoned = h.coord.begin_accepted("s")
        entering = h.accept("s", "entering")
        h.coord.cancel("s")
        abandoned.close()
        abandoned.close()
        await entering()
        entering.assert_ended(cancelled("s", "entering"))
    assert agent.calls == []


async def test_rule1_closing_an_entered_run_does_not_release_its_lane(autojump_clock):
    """Rule 1: ``close()`` on a run already entered lets it go on; the lane waits for it."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        first, second = h.accept("s", "first"), h.accept("s", "second")
        nursery.start_soon(first)
        await settle()
        nursery.start_soon(second)
        await settle()
        first.accept.close()
        second.accept.close()
        await settle()
        assert h.coord.active_run_id("s") == "first"
        assert h.coord.queued_run_ids("s") == ["second"]
        assert agent.started == ["first"]
        agent.finish("first")
        await first.wait()
        await settle()
        assert agent.started == ["first", "second"]
        agent.finish("second")
        await second.wait()
    first.assert_ended(RunComplete("s", "first", result=result_of("first")))
    second.assert_ended(RunComplete("s", "second", result=result_of("second")))


# -- rule 2: cancel ---------------------------------------------------------------------


async def test_rule2_cancel_cancels_the_active_run(autojump_clock):
    """Rule 2: ``cancel`` ends the active run cancelled; ``run_accepted`` returns it."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "a")
        nursery.start_soon(run)
        await settle()
        assert h.coord.active_run_id("s") == "a"
        assert h.ledger.state("a") == "pending"
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "a"))
    assert agent.cancelled == ["a"]


async def test_rule2_cancel_drops_the_queue_with_terminals_recorded_at_once(autojump_clock):
    """Rule 2/4: each queued run is cancelled, in the ledger and broker when cancel returns."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs = [h.accept("s", run_id) for run_id in ["a", "b", "c"]]
        for run in runs:
            nursery.start_soon(run)
        await settle()
        assert h.coord.active_run_id("s") == "a"
        assert h.coord.queued_run_ids("s") == ["b", "c"]

        h.coord.cancel("s")
        # Synchronously, before anything else runs:
        for run_id in ["b", "c"]:
            assert h.ledger.get(run_id) == cancelled("s", run_id)
            assert h.published_for(run_id) == [cancelled("s", run_id)]
        assert h.coord.queued_prompts("s") == 0
        assert h.coord.queued_run_ids("s") == []
        await wait_all(*runs)
    for run in runs:
        run.assert_ended(cancelled("s", run.run_id))
    assert agent.started == ["a"]


async def test_rule2_accepted_not_entered_run_is_cancelled_on_entry(autojump_clock):
    """Rule 2: accepted before the cancel, entered after: cancelled on entry, never started.

    A run accepted after the cancel is untouched and runs normally.
    """
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        active = h.accept("s", "active")
        nursery.start_soon(active)
        await settle()
        before = h.accept("s", "before")
        h.coord.cancel("s")
        assert h.ledger.state("before") == "pending"  # it has not entered yet
        after = h.accept("s", "after")
        nursery.start_soon(before)
        nursery.start_soon(after)
        await before.wait()
        await active.wait()
        await settle()
        assert agent.started == ["active", "after"]
        assert h.coord.active_run_id("s") == "after"
        agent.finish("after")
        await after.wait()
    active.assert_ended(cancelled("s", "active"))
    before.assert_ended(cancelled("s", "before"))
    after.assert_ended(RunComplete("s", "after", result=result_of("after")))
    assert "before" not in agent.started


async def test_rule2_cancel_of_an_idle_session_with_only_reservations(autojump_clock):
    """Rule 2: with no active run, a reservation made before the cancel is still cancelled."""
    agent = ScriptedAgent()
    async with harness(agent) as h:
        run = h.accept("s", "r")
        h.coord.cancel("s")
        assert not h.coord.is_session_busy("s")
        await run()
        run.assert_ended(cancelled("s", "r"))
    assert agent.calls == []


async def test_rule2_run_accepted_after_cancel_queues_behind_the_winding_down_run(
    autojump_clock,
):
    """Rule 2: a run accepted after the cancel is not dropped, even while the cancelled run
    is still cleaning up; it waits for it, then runs to completion."""
    cleanup_may_end = trio.Event()
    started: list[str] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        started.append(call.run_id)
        if call.run_id == "slow-to-die":
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await cleanup_may_end.wait()
        return result_of(call.run_id)

    async with harness(agent) as h, trio.open_nursery() as nursery:
        dying = h.accept("s", "slow-to-die")
        nursery.start_soon(dying)
        await settle()
        h.coord.cancel("s")
        newcomer = h.accept("s", "newcomer")
        nursery.start_soon(newcomer)
        await settle()
        assert h.coord.active_run_id("s") == "slow-to-die"
        assert h.coord.queued_run_ids("s") == ["newcomer"]
        assert h.ledger.state("newcomer") == "pending"
        cleanup_may_end.set()
        await wait_all(dying, newcomer)
    dying.assert_ended(cancelled("s", "slow-to-die"))
    newcomer.assert_ended(RunComplete("s", "newcomer", result=result_of("newcomer")))
    assert started == ["slow-to-die", "newcomer"]


async def test_rule2_cancel_between_activation_and_start_ends_cancelled(autojump_clock):
    """Rule 2: a run the lane just activated, cancelled before its task got to run, ends
    cancelled even though its agent would never reach a checkpoint."""
    started: list[str] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        started.append(call.run_id)  # no checkpoint: cancel() could not interrupt it
        return "done anyway"

    async with harness(agent) as h, trio.open_nursery() as nursery:
        head = h.coord.begin_accepted("s")
        run = h.accept("s", "r")
        nursery.start_soon(run)
        await settle()
        assert run.accept.state == "queued"
        head.close()  # the lane activates r, whose task has not run yet
        assert run.accept.state == "active"
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))
    assert started == []


async def test_rule2_cancel_drops_runs_whose_call_was_attached_before_entry(autojump_clock):
    """Rule 2/4: runs accepted with their call attached (as the backend does) but whose task
    has not entered yet are cancelled at once by ``cancel``, and ``run_accepted`` then
    returns that terminal (marker flagged) without running the agent."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        active = h.accept("s", "active")
        nursery.start_soon(active)
        await settle()
        waiting = [h.accept("s", run_id, attach=True) for run_id in ["w1", "w2"]]
        assert h.coord.queued_run_ids("s") == ["w1", "w2"]
        assert h.coord.queued_prompts_list("s") == ["do w1", "do w2"]
        h.coord.cancel("s")
        for run in waiting:
            assert h.ledger.get(run.run_id) == cancelled("s", run.run_id)
        assert h.coord.queued_prompts("s") == 0
        for run in waiting:
            nursery.start_soon(run)
        await wait_all(active, *waiting)
    for run in [active, *waiting]:
        run.assert_ended(cancelled("s", run.run_id))
    assert agent.started == ["active"]


async def test_rule2_cancel_leaves_other_sessions_untouched(autojump_clock):
    """Rule 2: cancelling one session touches no other session's runs."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        doomed = [h.accept("s1", "s1-a"), h.accept("s1", "s1-b")]
        kept = [h.accept("s2", "s2-a"), h.accept("s2", "s2-b")]
        for run in doomed + kept:
            nursery.start_soon(run)
        await settle()
        h.coord.cancel("s1")
        await wait_all(*doomed)
        assert h.coord.active_run_id("s2") == "s2-a"
        assert h.coord.queued_run_ids("s2") == ["s2-b"]
        assert h.ledger.pending_run_ids() == ["s2-a", "s2-b"]
        agent.finish("s2-a")
        agent.finish("s2-b")
        await wait_all(*kept)
    for run in doomed:
        run.assert_ended(cancelled("s1", run.run_id))
    for run in kept:
        run.assert_ended(RunComplete("s2", run.run_id, result=result_of(run.run_id)))


async def test_rule2_cancel_all_cancels_every_session(autojump_clock):
    """Rule 2: ``cancel_all`` = ``cancel`` on every session (active, queued and accepted)."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        entered = [h.accept(s, f"{s}-{i}") for s in ["x", "y", "z"] for i in range(2)]
        for run in entered:
            nursery.start_soon(run)
        await settle()
        not_entered = [h.accept(s, f"{s}-late") for s in ["x", "y"]]
        h.coord.cancel_all()
        after = h.accept("x", "x-after")
        for run in [*not_entered, after]:
            nursery.start_soon(run)
        await wait_all(*entered, *not_entered)
        await settle()
        assert h.coord.active_run_id("x") == "x-after"
        agent.finish("x-after")
        await after.wait()
    for run in entered + not_entered:
        run.assert_ended(cancelled(run.call.session_id, run.run_id))
    after.assert_ended(RunComplete("x", "x-after", result=result_of("x-after")))
    assert sorted(agent.started) == ["x-0", "x-after", "y-0", "z-0"]


async def test_rule2_cancel_and_clear_queue_of_unknown_sessions_are_no_ops(autojump_clock):
    """Rule 2: cancelling or clearing a session the coordinator does not know creates none."""
    async with harness(ScriptedAgent()) as h:
        h.coord.cancel("nobody")
        h.coord.clear_queue("nobody")
        h.coord.cancel_all()
        assert h.coord.session_count == 0


# -- rule 3: FIFO lanes -------------------------------------------------------------------


async def test_rule3_run_arriving_while_busy_is_queued(autojump_clock):
    """Rule 3: a run of a busy session waits; the queries tell it at each step."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        a = h.accept("s", "a", prompt="first prompt")
        # Accepted, not entered: busy, nothing queued, nothing active.
        assert a.accept.state == "reserved"
        assert h.coord.is_session_busy("s")
        assert h.coord.active_run_id("s") is None
        assert h.coord.queued_prompts("s") == 0
        nursery.start_soon(a)
        await settle()
        assert a.accept.state == "active"
        assert h.coord.active_run_id("s") == "a"

        b = h.accept("s", "b", prompt="second prompt")
        c = h.accept("s", "c", prompt="third prompt")
        nursery.start_soon(b)
        nursery.start_soon(c)
        await settle()
        assert agent.started == ["a"]
        assert b.accept.state == c.accept.state == "queued"
        assert h.coord.queued_prompts("s") == 2
        assert h.coord.queued_prompts_list("s") == ["second prompt", "third prompt"]
        assert h.coord.queued_run_ids("s") == ["b", "c"]
        assert h.coord.queued_prompts("other") == 0
        assert h.coord.queued_prompts_list("other") == []
        assert h.coord.queued_run_ids("other") == []
        assert h.coord.active_run_id("other") is None

        agent.finish("a")
        await a.wait()
        await settle()
        assert h.coord.active_run_id("s") == "b"
        assert h.coord.queued_prompts_list("s") == ["third prompt"]
        assert h.coord.queued_run_ids("s") == ["c"]

        agent.finish("b")
        await b.wait()
        await settle()
        assert h.coord.active_run_id("s") == "c"
        assert h.coord.queued_prompts("s") == 0
        assert h.coord.is_session_busy("s")

        agent.finish("c")
        await c.wait()
        assert h.coord.active_run_id("s") is None
        assert not h.coord.is_session_busy("s")
        assert not h.coord.is_busy()
        assert h.coord.session_count == 0
    assert agent.started == ["a", "b", "c"]
    for run in [a, b, c]:
        run.assert_ended(RunComplete("s", run.run_id, result=result_of(run.run_id)))


async def test_rule3_fifo_by_acceptance_even_when_tasks_enter_in_reverse(autojump_clock):
    """Rule 3: lanes follow ``begin_accepted`` order, not the order tasks enter."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs = [h.accept("s", run_id) for run_id in ["r1", "r2", "r3", "r4"]]
        for run in reversed(runs):
            nursery.start_soon(run)
            await settle()
        # r4, r3, r2 entered first and queued behind the reserved r1; r1 entered last.
        assert h.coord.active_run_id("s") == "r1"
        assert h.coord.queued_run_ids("s") == ["r2", "r3", "r4"]
        assert h.coord.queued_prompts_list("s") == ["do r2", "do r3", "do r4"]
        for run in runs:
            await settle()
            assert agent.started[-1] == run.run_id
            agent.finish(run.run_id)
            await run.wait()
    assert agent.started == ["r1", "r2", "r3", "r4"]


async def test_rule3_queued_runs_start_fifo_behind_a_busy_lane(autojump_clock):
    """Rule 3: runs queued behind an active run, entering in reverse, still start FIFO."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        head = h.accept("s", "head")
        nursery.start_soon(head)
        await settle()
        queued = [h.accept("s", run_id) for run_id in ["q1", "q2", "q3"]]
        for run in reversed(queued):
            nursery.start_soon(run)
            await settle()
        assert h.coord.queued_run_ids("s") == ["q1", "q2", "q3"]
        agent.finish("head")
        for run in queued:
            agent.finish(run.run_id)
        await wait_all(head, *queued)
    assert agent.started == ["head", "q1", "q2", "q3"]
    assert agent.overlaps == []


@pytest.mark.parametrize("seed", range(6))
async def test_rule3_a_session_never_has_two_active_runs(autojump_clock, seed):
    """Rule 3: under shuffled entry and release orders, each session runs one run at a time,
    in acceptance order, and every run completes."""
    rng = random.Random(seed)
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs = [h.accept(rng.choice(["s1", "s2", "s3"]), f"r{i}") for i in range(10)]
        entry = runs[:]
        rng.shuffle(entry)
        for run in entry:
            nursery.start_soon(run)
            if rng.random() < 0.5:
                await settle()
        releases = [run.run_id for run in runs]
        rng.shuffle(releases)
        for run_id in releases:
            agent.finish(run_id)
            if rng.random() < 0.5:
                await settle()
        await wait_all(*runs)
    assert agent.overlaps == []
    for session_id in ["s1", "s2", "s3"]:
        accepted = [run.run_id for run in runs if run.call.session_id == session_id]
        started = [call.run_id for call in agent.calls if call.session_id == session_id]
        assert started == accepted
    for run in runs:
        run.assert_ended(RunComplete(run.call.session_id, run.run_id, result=result_of(run.run_id)))


async def test_rule3_different_sessions_run_concurrently(autojump_clock):
    """Rule 3: lanes are per session: two sessions' runs are active at the same time."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs = [h.accept("s1", "a"), h.accept("s2", "b"), h.accept("s3", "c")]
        for run in runs:
            nursery.start_soon(run)
        await settle()
        assert sorted(agent.started) == ["a", "b", "c"]
        assert agent.max_concurrent == 3
        assert [h.coord.active_run_id(s) for s in ["s1", "s2", "s3"]] == ["a", "b", "c"]
        for run in runs:
            agent.finish(run.run_id)
        await wait_all(*runs)


async def test_rule3_lane_moves_on_after_a_failed_or_cancelled_run(autojump_clock):
    """Rule 3: the next queued run starts whichever way the active one ended."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        failing, after_failure = h.accept("s", "failing"), h.accept("s", "after-failure")
        for run in [failing, after_failure]:
            nursery.start_soon(run)
        await settle()
        agent.fail("failing", RuntimeError("kaput"))
        await failing.wait()
        await settle()
        assert h.coord.active_run_id("s") == "after-failure"
        agent.finish("after-failure")
        await after_failure.wait()
    assert agent.started == ["failing", "after-failure"]
    assert failing.terminal_at_exit == RunComplete("s", "failing", error="kaput")


# -- rule 4: runs leaving without running -------------------------------------------------


async def test_rule4_clear_queue_cancels_queued_runs_and_keeps_the_active_one(autojump_clock):
    """Rule 4: ``clear_queue`` drops queued runs (cancelled terminals, at once); the active
    run goes on and completes; a run accepted afterwards runs normally."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs = [h.accept("s", run_id) for run_id in ["active", "q1", "q2"]]
        for run in runs:
            nursery.start_soon(run)
        await settle()
        h.coord.clear_queue("s")
        for run_id in ["q1", "q2"]:
            assert h.ledger.get(run_id) == cancelled("s", run_id)
            assert h.published_for(run_id) == [cancelled("s", run_id)]
        assert h.coord.queued_prompts("s") == 0
        assert h.coord.queued_prompts_list("s") == []
        assert h.coord.active_run_id("s") == "active"
        await wait_all(*runs[1:])
        assert h.ledger.state("active") == "pending"
        later = h.accept("s", "later")
        nursery.start_soon(later)
        await settle()
        assert h.coord.queued_run_ids("s") == ["later"]
        agent.finish("active")
        agent.finish("later")
        await wait_all(runs[0], later)
    runs[0].assert_ended(RunComplete("s", "active", result=result_of("active")))
    for run in runs[1:]:
        run.assert_ended(cancelled("s", run.run_id))
    later.assert_ended(RunComplete("s", "later", result=result_of("later")))
    assert agent.started == ["active", "later"]
    assert agent.cancelled == []


async def test_rule4_clear_queue_drops_runs_whose_task_has_not_entered(autojump_clock):
    """Rule 4: ``clear_queue`` also drops runs whose call is known but whose task has not
    entered yet: cancelled terminal at once; their ``run_accepted`` returns it later."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        active = h.accept("s", "active")
        nursery.start_soon(active)
        await settle()
        waiting = h.accept("s", "waiting", attach=True)
        assert h.coord.queued_run_ids("s") == ["waiting"]
        h.coord.clear_queue("s")
        assert h.ledger.get("waiting") == cancelled("s", "waiting")
        assert h.coord.queued_run_ids("s") == []
        nursery.start_soon(waiting)
        await waiting.wait()
        assert h.coord.active_run_id("s") == "active"
        agent.finish("active")
        await active.wait()
    waiting.assert_ended(cancelled("s", "waiting"))
    active.assert_ended(RunComplete("s", "active", result=result_of("active")))
    assert agent.started == ["active"]


async def test_rule4_queued_run_cancelled_by_an_enclosing_scope(autojump_clock):
    """Rule 4: a queued run whose own task is cancelled (shutdown) publishes its cancelled
    terminal, then re-raises ``Cancelled``; the active run is not affected."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        active, queued = h.accept("s", "active"), h.accept("s", "queued")
        nursery.start_soon(active)
        await settle()
        scope = trio.CancelScope()
        nursery.start_soon(queued, scope)
        await settle()
        assert h.coord.queued_run_ids("s") == ["queued"]
        scope.cancel()
        await queued.wait()
        assert isinstance(queued.error, trio.Cancelled)
        assert queued.rc is None
        assert queued.terminal_at_exit == cancelled("s", "queued")
        assert queued.broadcast_at_exit == [cancelled("s", "queued")]
        assert queued.marker_published is True
        assert h.coord.queued_run_ids("s") == []
        assert h.coord.active_run_id("s") == "active"
        agent.finish("active")
        await active.wait()
    active.assert_ended(RunComplete("s", "active", result=result_of("active")))
    assert agent.started == ["active"]


async def test_rule4_queued_run_cancelled_as_the_lane_reaches_it_still_gets_a_terminal(
    autojump_clock,
):
    """Rule 4: a queued run whose task is cancelled (shutdown) at the same moment as the
    lane moves on to it still ends with a cancelled terminal before ``Cancelled`` leaves.

    Made deterministic: the head of the lane is a reservation that is never entered; in one
    step the queued run's scope is cancelled and the reservation closed, so the lane
    activates the queued run while its ``Cancelled`` is already pending. (Regression test:
    at 009e88d ``_enter`` re-raised that ``Cancelled`` with no terminal published.)
    """
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        head = h.coord.begin_accepted("s")
        queued = h.accept("s", "queued")
        scope = trio.CancelScope()
        nursery.start_soon(queued, scope)
        await settle()
        assert queued.accept.state == "queued"
        scope.cancel()
        head.close()
        await queued.wait()
    assert agent.calls == []
    assert isinstance(queued.error, trio.Cancelled)
    assert queued.terminal_at_exit == cancelled("s", "queued")
    assert queued.marker_published is True


async def test_rule4_shutdown_gives_every_active_and_queued_run_a_terminal(autojump_clock):
    """Rule 4/5: workspace shutdown (the enclosing nursery cancelled) with one active and two
    queued runs: each re-raises ``Cancelled`` after its cancelled terminal was published.

    Trio runs the woken tasks in a random order, so the scenario is repeated to cover both
    (at 009e88d the order "active run ends first" lost the queued runs' terminals).
    """
    for round_ in range(20):
        agent = ScriptedAgent()
        async with harness(agent) as h:
            async with trio.open_nursery() as nursery:
                runs = [h.accept("s", f"{round_}-{i}") for i in range(3)]
                for run in runs:
                    nursery.start_soon(run)
                await settle()
                assert h.coord.active_run_id("s") == runs[0].run_id
                assert h.coord.queued_run_ids("s") == [run.run_id for run in runs[1:]]
                nursery.cancel_scope.cancel()
            for run in runs:
                assert isinstance(run.error, trio.Cancelled)
                assert run.terminal_at_exit == cancelled("s", run.run_id), f"round {round_}"
                assert run.marker_published is True
            assert h.ledger.pending_count == 0


# -- rule 5: outcomes ---------------------------------------------------------------------


async def test_rule5_success_completes_with_the_agents_return_value(autojump_clock):
    """Rule 5: the agent's return value is the terminal's ``result``."""
    payload = {"answer": 42, "items": [1, 2]}

    async def agent(call: RunCall, ctx: RunContext) -> object:
        await trio.sleep(5)
        return payload

    async with harness(agent) as h:
        run = h.accept("s", "r")
        await run()
    run.assert_ended(RunComplete("s", "r", result=payload))
    assert run.rc is not None
    assert run.rc.outcome == "completed"


async def test_rule5_agent_exception_fails_and_the_same_exception_is_reraised(autojump_clock):
    """Rule 5: failed terminal with ``error=str(exc)``, published and marked *before*
    ``run_accepted`` re-raises the very same exception object, not a group."""
    boom = LookupError("the model is gone")

    async def agent(call: RunCall, ctx: RunContext) -> object:
        await trio.sleep(1)
        raise boom

    async with harness(agent) as h:
        run = h.accept("s", "r")
        seen_when_raised: list[object] = []

        async def dispatch() -> None:
            with with_run_id("r"), with_run_complete_marker() as marker:
                try:
                    await h.coord.run_accepted(run.accept, run.call)
                finally:
                    seen_when_raised.extend(
                        [marker.published, h.ledger.get("r"), h.published_for("r")]
                    )

        with trio.fail_after(TIMEOUT), pytest.raises(LookupError) as raised:
            await dispatch()
        assert raised.value is boom
        expected = RunComplete("s", "r", error="the model is gone")
        assert seen_when_raised == [True, expected, [expected]]
        assert expected.outcome == "failed"


async def test_rule5_agent_exception_is_not_retried_without_a_policy(autojump_clock):
    """Rule 5/6: with no retry policy the failing agent runs once and the run fails."""
    calls: list[int] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        calls.append(call.attempt)
        raise ValueError("nope")

    async with harness(agent) as h:
        run = h.accept("s", "r")
        await run()
    assert isinstance(run.error, ValueError)
    assert run.terminal_at_exit == RunComplete("s", "r", error="nope")
    assert calls == [1]


async def test_rule5_agent_raising_while_being_cancelled_ends_cancelled(autojump_clock):
    """Rule 5: cancellation is never an error, even when the agent turns it into one."""

    async def agent(call: RunCall, ctx: RunContext) -> object:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise RuntimeError("connection torn down") from None

    async with harness(agent) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        nursery.start_soon(run)
        await settle()
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))


async def test_rule5_agent_with_its_own_nursery_is_cancelled_not_failed(autojump_clock):
    """Rule 5: a cancel reaching an agent's nursery (Cancelled in a group) is cancelled."""
    children_started: list[int] = []

    async def child(i: int) -> None:
        children_started.append(i)
        await trio.sleep_forever()

    async def agent(call: RunCall, ctx: RunContext) -> object:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child, 1)
            nursery.start_soon(child, 2)
            await trio.sleep_forever()
        return "unreachable"

    async with harness(agent) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        nursery.start_soon(run)
        await settle()
        assert sorted(children_started) == [1, 2]
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))


async def test_rule5_enclosing_cancel_of_an_active_run(autojump_clock):
    """Rule 5 / return contract: shutdown while active publishes the cancelled terminal,
    flags the marker, and re-raises ``Cancelled`` (never swallowed)."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        scope = trio.CancelScope()
        nursery.start_soon(run, scope)
        await settle()
        scope.cancel()
        await run.wait()
    assert isinstance(run.error, trio.Cancelled)
    assert run.rc is None
    assert run.terminal_at_exit == cancelled("s", "r")
    assert run.broadcast_at_exit == [cancelled("s", "r")]
    assert run.marker_published is True
    assert agent.cancelled == ["r"]


async def test_rule5_enclosing_cancel_of_an_agent_with_its_own_nursery(autojump_clock):
    """Rule 5: shutdown reaching an agent's nursery (a group of ``Cancelled``) ends the run
    cancelled, never failed, and the cancellation still propagates."""

    async def agent(call: RunCall, ctx: RunContext) -> object:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()
        return "unreachable"

    async with harness(agent) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        scope = trio.CancelScope()
        nursery.start_soon(run, scope)
        await settle()
        scope.cancel()
        await run.wait()
    assert scope.cancelled_caught
    assert run.rc is None
    assert run.terminal_at_exit == cancelled("s", "r")
    assert run.marker_published is True


async def test_rule5_enclosing_cancel_of_a_run_cancelled_on_entry_reraises(autojump_clock):
    """Return contract: cancelled-on-entry under a cancelled enclosing scope publishes its
    terminal and still lets the ``Cancelled`` out."""
    agent = ScriptedAgent()
    async with harness(agent) as h:
        run = h.accept("s", "r")
        h.coord.cancel("s")
        with trio.CancelScope() as scope:
            scope.cancel()
            await run()
        assert scope.cancelled_caught
    assert isinstance(run.error, trio.Cancelled)
    assert run.terminal_at_exit == cancelled("s", "r")
    assert run.marker_published is True
    assert agent.calls == []


# -- rule 6: retries ----------------------------------------------------------------------


async def test_rule6_retries_coalesce_into_one_completed_terminal(autojump_clock):
    """Rule 6: two failures then a success publish exactly one terminal: completed."""
    seen: list[tuple[int, int, str]] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        seen.append((call.attempt, ctx.attempt, ctx.run_id))
        await trio.sleep(1)
        if call.attempt < 3:
            raise ConnectionError(f"flaky {call.attempt}")
        return f"ok after {call.attempt}"

    async with harness(agent, retry=RetryPolicy(max_attempts=3)) as h:
        run = h.accept("s", "r")
        await run()
        assert h.published() == [RunComplete("s", "r", result="ok after 3")]
    run.assert_ended(RunComplete("s", "r", result="ok after 3"))
    assert seen == [(1, 1, "r"), (2, 2, "r"), (3, 3, "r")]


async def test_rule6_exhausted_retries_publish_one_failed_terminal(autojump_clock):
    """Rule 6: failing every attempt publishes one failed terminal with the last error and
    re-raises that last exception."""
    raised: list[Exception] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        await trio.lowlevel.checkpoint()
        exc = RuntimeError(f"failure {call.attempt}")
        raised.append(exc)
        raise exc

    async with harness(agent, retry=RetryPolicy(max_attempts=3)) as h:
        run = h.accept("s", "r")
        await run()
        assert h.published() == [RunComplete("s", "r", error="failure 3")]
    assert len(raised) == 3
    assert run.error is raised[-1]
    assert run.terminal_at_exit == RunComplete("s", "r", error="failure 3")
    assert run.marker_published is True


@pytest.mark.parametrize(
    ("errors", "expected_attempts", "expected_error"),
    [
        ([ConnectionError("c1"), ValueError("v2")], 2, "v2"),
        ([ValueError("v1")], 1, "v1"),
        ([ConnectionError("c1"), ConnectionError("c2"), ConnectionError("c3")], 3, "c3"),
    ],
)
async def test_rule6_retry_on_filters_which_exceptions_are_retried(
    autojump_clock, errors, expected_attempts, expected_error
):
    """Rule 6: only exceptions in ``retry_on`` are retried; any other ends the run."""
    attempts: list[int] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        attempts.append(call.attempt)
        await trio.lowlevel.checkpoint()
        raise errors[call.attempt - 1]

    policy = RetryPolicy(max_attempts=3, retry_on=(ConnectionError,))
    async with harness(agent, retry=policy) as h:
        run = h.accept("s", "r")
        await run()
    assert attempts == list(range(1, expected_attempts + 1))
    assert run.error is errors[expected_attempts - 1]
    assert run.terminal_at_exit == RunComplete("s", "r", error=expected_error)


async def test_rule6_backoff_doubles_between_attempts_in_virtual_time(autojump_clock):
    """Rule 6: attempt n+1 starts ``backoff * 2 ** (n - 1)`` seconds after attempt n failed."""
    started_at: list[float] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        started_at.append(trio.current_time())
        if call.attempt < 4:
            raise ConnectionError("again")
        return "finally"

    async with harness(agent, retry=RetryPolicy(max_attempts=4, backoff=1.5)) as h:
        run = h.accept("s", "r")
        await run()
    gaps = [later - earlier for earlier, later in itertools.pairwise(started_at)]
    assert gaps == pytest.approx([1.5, 3.0, 6.0])
    run.assert_ended(RunComplete("s", "r", result="finally"))


async def test_rule6_cancel_during_backoff_ends_cancelled(autojump_clock):
    """Rule 6/5: a cancel while waiting to retry ends the run cancelled, with no more
    attempts and without waiting out the backoff."""
    attempts: list[int] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        attempts.append(call.attempt)
        raise ConnectionError("down")

    policy = RetryPolicy(max_attempts=3, backoff=100)
    async with harness(agent, retry=policy) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        start = trio.current_time()
        nursery.start_soon(run)
        await settle()
        assert attempts == [1]
        assert trio.current_time() == start  # now waiting out the backoff
        h.coord.cancel("s")
        await run.wait()
        assert trio.current_time() - start < 100
    run.assert_ended(cancelled("s", "r"))
    assert attempts == [1]


async def test_rule6_cancellation_is_never_retried(autojump_clock):
    """Rule 6: a cancelled attempt ends the run; it is not retried."""
    agent = ScriptedAgent()
    async with harness(agent, retry=RetryPolicy(max_attempts=5)) as h, trio.open_nursery() as n:
        run = h.accept("s", "r")
        n.start_soon(run)
        await settle()
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))
    assert [call.attempt for call in agent.calls] == [1]


def test_rule6_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.backoff == 0.0
    assert policy.retry_on == (Exception,)
    RetryPolicy(max_attempts=1, backoff=0, retry_on=())
    RetryPolicy(max_attempts=10, backoff=2.5, retry_on=(OSError, ValueError))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -2},
        {"backoff": -0.5},
        {"backoff": math.inf},
        {"backoff": math.nan},
        {"retry_on": (BaseException,)},
        {"retry_on": (trio.Cancelled,)},
        {"retry_on": (KeyboardInterrupt,)},
        {"retry_on": ("ValueError",)},
        {"retry_on": (ValueError, 3)},
        {"retry_on": ValueError},
    ],
)
def test_rule6_retry_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


# -- rule 7: the run-complete marker -------------------------------------------------------


async def test_rule7_marker_flagged_for_every_kind_of_terminal(autojump_clock):
    """Rule 7: after ``run_accepted`` returns or raises, the dispatcher's marker is flagged for
    completed, failed, cancelled, cancelled-on-entry and dropped-from-queue runs (the drop
    happens in the task calling ``cancel``), and it was not flagged while the agent ran."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        completed, failed = h.accept("ok", "completed"), h.accept("bad", "failed")
        active, dropped = h.accept("c", "active"), h.accept("c", "dropped")
        for run in [completed, failed, active, dropped]:
            nursery.start_soon(run)
        await settle()
        on_entry = h.accept("c", "on-entry")
        assert dropped.marker_published is None  # still waiting
        h.coord.cancel("c")
        nursery.start_soon(on_entry)
        agent.finish("completed")
        agent.fail("failed", OSError("disk full"))
        await wait_all(completed, failed, active, dropped, on_entry)
    assert agent.marker_at_start == {"completed": False, "failed": False, "active": False}
    completed.assert_ended(RunComplete("ok", "completed", result=result_of("completed")))
    assert isinstance(failed.error, OSError)
    assert failed.terminal_at_exit == RunComplete("bad", "failed", error="disk full")
    assert failed.marker_published is True
    for run in [active, dropped, on_entry]:
        run.assert_ended(cancelled("c", run.run_id))


async def test_rule7_each_dispatch_gets_its_own_marker(autojump_clock):
    """Rule 7: flagging one run's marker never flags another run's (the queued one's marker
    stays unflagged until its own terminal)."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        first, second = h.accept("s", "first"), h.accept("s", "second")
        nursery.start_soon(first)
        await settle()
        nursery.start_soon(second)
        await settle()
        agent.finish("first")
        await first.wait()
        await settle()
        assert first.marker_published is True
        assert agent.marker_at_start["second"] is False
        agent.finish("second")
        await second.wait()
    second.assert_ended(RunComplete("s", "second", result=result_of("second")))


# -- prepare() ----------------------------------------------------------------------------


async def test_prepare_is_awaited_before_every_run(autojump_clock):
    """prepare() runs (and finishes) before each run's agent, in each run's context."""
    log: list[tuple[str, str]] = []

    async def prepare(call: RunCall) -> None:
        log.append(("prepare", current_run_id()))
        await trio.sleep(2)
        log.append(("prepared", current_run_id()))

    async def agent(call: RunCall, ctx: RunContext) -> object:
        log.append(("agent", call.run_id))
        return None

    async with harness(agent, prepare=prepare) as h, trio.open_nursery() as nursery:
        runs = [h.accept("s", "a"), h.accept("s", "b")]
        for run in runs:
            nursery.start_soon(run)
        await wait_all(*runs)
        rc = await h.coord.run("s", "in process", run_id="c")
    assert rc == RunComplete("s", "c")
    assert log == [(step, run_id) for run_id in "abc" for step in ("prepare", "prepared", "agent")]


async def test_prepare_failure_publishes_nothing_and_the_lane_moves_on(autojump_clock):
    """A prepare() exception propagates from run_accepted with nothing published: the ledger
    still pending, nothing on the broker, the marker not flagged; the next run goes on."""
    models_missing = RuntimeError("models not loaded")
    may_fail = trio.Event()

    async def prepare(call: RunCall) -> None:
        if current_run_id() == "a":
            await may_fail.wait()
            raise models_missing

    agent = ScriptedAgent()
    async with harness(agent, prepare=prepare) as h, trio.open_nursery() as nursery:
        a, b = h.accept("s", "a"), h.accept("s", "b")
        nursery.start_soon(a)
        await settle()
        nursery.start_soon(b)
        await settle()
        assert h.coord.queued_run_ids("s") == ["b"]
        may_fail.set()
        await a.wait()
        assert a.error is models_missing
        assert a.rc is None
        assert a.terminal_at_exit is None
        assert a.broadcast_at_exit == []
        assert a.marker_published is False
        assert h.ledger.state("a") == "pending"
        await settle()
        assert h.coord.active_run_id("s") == "b"
        agent.finish("b")
        await b.wait()
    b.assert_ended(RunComplete("s", "b", result=result_of("b")))
    assert agent.started == ["b"]
    assert h.published_for("a") == []


async def test_cancel_during_a_slow_prepare_ends_cancelled(autojump_clock):
    """cancel() while prepare() runs: cancelled terminal, not failed; the agent never runs."""
    agent = ScriptedAgent()

    async def prepare(call: RunCall) -> None:
        await trio.sleep_forever()

    async with harness(agent, prepare=prepare) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        nursery.start_soon(run)
        await settle()
        assert h.coord.active_run_id("s") == "r"
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))
    assert agent.calls == []


async def test_prepare_turning_cancel_into_an_error_still_ends_cancelled(autojump_clock):
    """cancel() while prepare() runs, prepare raising in response: still cancelled."""
    agent = ScriptedAgent()

    async def prepare(call: RunCall) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ConnectionResetError("download aborted") from None

    async with harness(agent, prepare=prepare) as h, trio.open_nursery() as nursery:
        run = h.accept("s", "r")
        nursery.start_soon(run)
        await settle()
        h.coord.cancel("s")
        await run.wait()
    run.assert_ended(cancelled("s", "r"))
    assert agent.calls == []


async def test_run_publishes_a_prepare_failure_as_a_failed_terminal(autojump_clock):
    """Via coord.run() (no dispatcher) a prepare failure is published as the failed terminal
    and then re-raised."""
    failure = RuntimeError("no credentials")

    async def prepare(call: RunCall) -> None:
        await trio.lowlevel.checkpoint()
        raise failure

    agent = ScriptedAgent()
    async with harness(agent, prepare=prepare) as h:
        with trio.fail_after(TIMEOUT), pytest.raises(RuntimeError) as raised:
            await h.coord.run("s", "hello", run_id="r")
        assert raised.value is failure
        expected = RunComplete("s", "r", error="no credentials")
        assert h.ledger.get("r") == expected
        assert h.published() == [expected]
    assert agent.calls == []


# -- ctx.emit -----------------------------------------------------------------------------


async def test_emit_publishes_lossy_progress_and_the_terminal_still_arrives(autojump_clock):
    """ctx.emit publishes RunProgress on the events broker; a full subscriber drops the
    excess, and the terminal is still delivered."""

    async def agent(call: RunCall, ctx: RunContext) -> object:
        for step in range(5):
            ctx.emit({"step": step})
            await trio.lowlevel.checkpoint()
        return "done"

    async with harness(agent, events_buffer=2) as h, h.events.subscribe() as progress:
        with trio.fail_after(TIMEOUT):
            rc = await h.coord.run("s", "go", run_id="r")
        assert rc == RunComplete("s", "r", result="done")
        assert h.published() == [rc]
        received = []
        while True:
            try:
                received.append(progress.receive_nowait())
            except trio.WouldBlock:
                break
    assert [event.type for event in received] == [EventType.CREATED] * 2
    assert [event.payload for event in received] == [
        RunProgress("s", "r", {"step": 0}, 1),
        RunProgress("s", "r", {"step": 1}, 1),
    ]
    assert h.events.drop_count == 3


async def test_emit_reports_the_attempt(autojump_clock):
    """ctx.emit tags progress with the attempt that emitted it."""

    async def agent(call: RunCall, ctx: RunContext) -> object:
        ctx.emit(f"attempt {ctx.attempt}")
        if ctx.attempt == 1:
            raise ConnectionError("retry me")
        return None

    h = Harness(agent, retry=RetryPolicy(max_attempts=2))
    async with h.events.subscribe() as progress:
        with trio.fail_after(TIMEOUT):
            await h.coord.run("s", "go", run_id="r")
        first, second = progress.receive_nowait(), progress.receive_nowait()
    assert first.payload == RunProgress("s", "r", "attempt 1", 1)
    assert second.payload == RunProgress("s", "r", "attempt 2", 2)


async def test_emit_without_an_events_broker_is_a_no_op(autojump_clock):
    async def agent(call: RunCall, ctx: RunContext) -> object:
        ctx.emit("nobody listens")
        return "fine"

    coord = SessionCoordinator(agent, run_completions=Broker(), ledger=RunLedger())
    with trio.fail_after(TIMEOUT):
        rc = await coord.run("s", "go", run_id="r")
    assert rc == RunComplete("s", "r", result="fine")


# -- memory -------------------------------------------------------------------------------


async def test_session_state_is_forgotten_when_idle(autojump_clock):
    """No per-session leak: after runs in many sessions end every possible way (completed,
    failed, cancelled, dropped, cleared, cancelled on entry, abandoned reservation, refused
    call), the coordinator holds state for no session."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        runs: list[Dispatch] = []
        for i in range(30):
            session_id = f"s{i}"
            entered = [h.accept(session_id, f"{session_id}-{k}") for k in range(3)]
            runs += entered
            for run in entered:
                nursery.start_soon(run)
        await settle()
        assert h.coord.session_count == 30
        abandoned = h.coord.begin_accepted("s0")
        late = h.accept("s1", "s1-late")
        refused = h.coord.begin_accepted("s2")
        runs.append(late)
        for i in range(30):
            session_id = f"s{i}"
            if i % 3 == 0:
                h.coord.cancel(session_id)
            elif i % 3 == 1:
                h.coord.clear_queue(session_id)
                agent.fail(f"{session_id}-0", RuntimeError("boom"))
            else:
                for k in range(3):
                    agent.finish(f"{session_id}-{k}")
        h.coord.cancel("s1")
        nursery.start_soon(late)
        abandoned.close()
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="session"):
            await h.coord.run_accepted(refused, RunCall("elsewhere", "x", "refused"))
        await wait_all(*runs)
    assert h.coord.session_count == 0
    assert not h.coord.is_busy()
    assert h.ledger.pending_count == 0


# -- input validation ---------------------------------------------------------------------


async def test_run_accepted_refuses_a_call_for_another_session(autojump_clock):
    """run_accepted: a call whose session differs from the reservation's -> ValueError;
    nothing published, the agent never runs, the reservation released."""
    agent = ScriptedAgent()
    async with harness(agent) as h:
        accept = h.coord.begin_accepted("s")
        h.ledger.accept("r", "other")
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="session"):
            await h.coord.run_accepted(accept, RunCall("other", "hi", "r"))
        assert h.ledger.state("r") == "pending"
        assert h.published() == []
        assert accept.closed
        assert not h.coord.is_session_busy("s")
    assert agent.calls == []


async def test_run_accepted_requires_a_run_id(autojump_clock):
    """run_accepted: no id in the call and none in context -> ValueError."""
    agent = ScriptedAgent()
    async with harness(agent) as h:
        accept = h.coord.begin_accepted("s")
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="run"):
            await h.coord.run_accepted(accept, RunCall("s", "hi"))
        assert h.published() == []
        assert not h.coord.is_session_busy("s")
    assert agent.calls == []


async def test_run_accepted_takes_the_run_id_from_context(autojump_clock):
    """run_accepted: a call without a run id runs under ``current_run_id()``."""
    agent = ScriptedAgent()
    agent.finish("ctx-id")
    async with harness(agent) as h:
        accept = h.coord.begin_accepted("s")
        h.ledger.accept("ctx-id", "s")
        with trio.fail_after(TIMEOUT), with_run_id("ctx-id"):
            rc = await h.coord.run_accepted(accept, RunCall("s", "hi"))
    assert rc == RunComplete("s", "ctx-id", result=result_of("ctx-id"))
    assert agent.started == ["ctx-id"]


async def test_run_accepted_refuses_a_reused_accepted_run(autojump_clock):
    """run_accepted: an AcceptedRun already entered (running or done) or closed ->
    RuntimeError, and the run that owns it is not disturbed."""
    agent = ScriptedAgent()
    async with harness(agent) as h, trio.open_nursery() as nursery:
        first, second = h.accept("s", "first"), h.accept("s", "second")
        nursery.start_soon(first)
        nursery.start_soon(second)
        await settle()
        for accept in (first.accept, second.accept):  # active, then queued
            with pytest.raises(RuntimeError):
                await h.coord.run_accepted(accept, RunCall("s", "again", "again"))
        assert h.coord.active_run_id("s") == "first"
        assert h.coord.queued_run_ids("s") == ["second"]
        agent.finish("first")
        agent.finish("second")
        await wait_all(first, second)
        with pytest.raises(RuntimeError):  # done
            await h.coord.run_accepted(first.accept, RunCall("s", "again", "again"))
        closed = h.coord.begin_accepted("s")
        closed.close()
        with pytest.raises(RuntimeError):
            await h.coord.run_accepted(closed, RunCall("s", "again", "again"))
    assert agent.started == ["first", "second"]
    assert h.ledger.state("again") is None
    first.assert_ended(RunComplete("s", "first", result=result_of("first")))


async def test_run_accepted_refuses_a_run_id_other_than_the_attached_call(autojump_clock):
    """run_accepted: entering under another run id than the call attached at acceptance ->
    ValueError; nothing published, the agent never runs, the lane is freed."""
    agent = ScriptedAgent()
    async with harness(agent) as h:
        run = h.accept("s", "attached", attach=True)
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="attached"):
            await h.coord.run_accepted(run.accept, RunCall("s", "hi", "impostor"))
        assert h.published() == []
        assert h.ledger.state("attached") == "pending"
        assert not h.coord.is_session_busy("s")
    assert agent.calls == []


async def test_run_accepted_refuses_another_coordinators_accepted_run(autojump_clock):
    agent = ScriptedAgent()
    async with harness(agent) as h, harness(agent) as other:
        foreign = other.coord.begin_accepted("s")
        with trio.fail_after(TIMEOUT), pytest.raises(ValueError, match="another coordinator"):
            await h.coord.run_accepted(foreign, RunCall("s", "hi", "r"))
        assert foreign.state == "reserved"
        foreign.close()
    assert agent.calls == []


def _state(h: Harness) -> tuple[object, ...]:
    # The next sequence is probed with a reservation closed at once (it costs one number).
    probe = h.coord.begin_accepted("probe")
    probe.close()
    return (
        h.ledger.accepted_total,
        h.ledger.pending_run_ids(),
        h.ledger.terminal_count,
        h.coord.session_count,
        h.coord.is_busy(),
        probe.sequence,
    )


@pytest.mark.parametrize(
    ("session_id", "prompt", "run_id", "error"),
    [
        ("", "hello", "", SessionMissing),
        ("   ", "hello", "", SessionMissing),
        ("s", "", "", EmptyPrompt),
        ("s", " \n\t", "", EmptyPrompt),
        ("s", "hello", "done-run", DuplicateRun),
        ("s", "hello", "pending-run", DuplicateRun),
    ],
)
async def test_run_refuses_bad_input_and_changes_nothing(
    autojump_clock, session_id, prompt, run_id, error
):
    """coord.run: blank session -> SessionMissing, blank prompt -> EmptyPrompt, a known run id
    -> DuplicateRun; the ledger and the coordinator are left as they were."""
    agent = ScriptedAgent()
    agent.finish("done-run")
    async with harness(agent, expect_idle=False) as h:
        with trio.fail_after(TIMEOUT):
            first = await h.coord.run("s", "first", run_id="done-run")
        h.ledger.accept("pending-run", "s")
        before = _state(h)
        with trio.fail_after(TIMEOUT), pytest.raises(error):
            await h.coord.run(session_id, prompt, run_id=run_id)
        after = _state(h)
        assert after[:-1] == before[:-1]
        assert after[-1] == before[-1] + 1  # no sequence was consumed in between
        assert h.ledger.get("done-run") == first
        assert h.ledger.state("pending-run") == "pending"
        assert h.coord.session_count == 0
    assert agent.started == ["done-run"]


# -- coord.run(): the in-process path ---------------------------------------------------


async def test_run_mints_a_uuid_run_id_and_registers_it(autojump_clock):
    """coord.run without a run id mints a UUID4, registers it and returns the terminal."""
    ids: list[str] = []

    async def agent(call: RunCall, ctx: RunContext) -> object:
        ids.append(call.run_id)
        assert current_run_id() == call.run_id
        return call.prompt.upper()

    async with harness(agent) as h:
        with trio.fail_after(TIMEOUT):
            rc = await h.coord.run("s", "shout")
            again = await h.coord.run("s", "twice")
        assert h.published() == [rc, again]
    assert rc.result == "SHOUT"
    assert rc.outcome == "completed"
    assert ids == [rc.run_id, again.run_id]
    assert rc.run_id != again.run_id
    assert uuid.UUID(rc.run_id).version == 4
    assert h.ledger.get(rc.run_id) == rc
    assert h.ledger.accepted_total == 2


async def test_run_with_a_given_run_id_and_attachments(autojump_clock):
    """coord.run uses the given run id and hands the prompt and attachments to the agent; a
    blank prompt is fine when a text attachment carries the input."""
    agent = ScriptedAgent()
    agent.finish("mine")
    agent.finish("attachment-only")
    notes = Attachment.text("notes.txt", "summarise me")
    async with harness(agent) as h:
        with trio.fail_after(TIMEOUT):
            rc = await h.coord.run("s", "the prompt", run_id="mine", attachments=[notes])
            other = await h.coord.run("s", "  ", run_id="attachment-only", attachments=[notes])
    assert rc == RunComplete("s", "mine", result=result_of("mine"))
    assert other == RunComplete("s", "attachment-only", result=result_of("attachment-only"))
    assert [(c.session_id, c.prompt, c.run_id, c.attachments, c.attempt) for c in agent.calls] == [
        ("s", "the prompt", "mine", (notes,), 1),
        ("s", "  ", "attachment-only", (notes,), 1),
    ]


async def test_run_reraises_the_agent_exception_after_publishing(autojump_clock):
    """coord.run: the agent's exception, unwrapped, after exactly one failed terminal."""
    boom = KeyError("k")

    async def agent(call: RunCall, ctx: RunContext) -> object:
        raise boom

    async with harness(agent) as h:
        with trio.fail_after(TIMEOUT), pytest.raises(KeyError) as raised:
            await h.coord.run("s", "go", run_id="r")
        assert raised.value is boom
        assert h.published() == [RunComplete("s", "r", error=str(boom))]


async def test_run_cancelled_by_the_coordinator_returns_the_cancelled_terminal(autojump_clock):
    """coord.run: a coord.cancel() makes run() return the cancelled terminal, no exception."""
    agent = ScriptedAgent()
    results: list[RunComplete] = []

    async def run_it() -> None:
        results.append(await h.coord.run("s", "go", run_id="r"))

    async with harness(agent) as h, trio.open_nursery() as nursery:
        nursery.start_soon(run_it)
        await settle()
        assert h.coord.active_run_id("s") == "r"
        h.coord.cancel("s")
    assert results == [cancelled("s", "r")]
    assert h.published() == results


async def test_run_queues_behind_a_dispatched_run_of_the_same_session(autojump_clock):
    """coord.run shares the session lanes with dispatched runs (FIFO by acceptance)."""
    agent = ScriptedAgent()
    results: list[RunComplete] = []

    async def run_it() -> None:
        results.append(await h.coord.run("s", "go", run_id="in-process"))

    async with harness(agent) as h, trio.open_nursery() as nursery:
        dispatched = h.accept("s", "dispatched")
        nursery.start_soon(dispatched)
        await settle()
        nursery.start_soon(run_it)
        await settle()
        assert h.coord.queued_run_ids("s") == ["in-process"]
        agent.finish("dispatched")
        agent.finish("in-process")
    assert agent.started == ["dispatched", "in-process"]
    assert results == [RunComplete("s", "in-process", result=result_of("in-process"))]


def test_coordinator_refuses_bad_construction() -> None:
    with pytest.raises(TypeError):
        SessionCoordinator("not callable", run_completions=Broker(), ledger=RunLedger())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SessionCoordinator(
            ScriptedAgent(),
            run_completions=Broker(),
            ledger=RunLedger(),
            retry=3,  # type: ignore[arg-type]
        )
