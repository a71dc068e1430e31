"""Fault injection at every boundary of the dispatch path.

A failure is injected at each step a run goes through, in order, and each test shows the
guarantee still holds -- every accepted run ends in exactly one terminal, every waiter sees
it in bounded time, cancellation is never an error -- or, where the failure must propagate,
that it propagates as itself with nothing half-done:

1. between reservation and ledger registration (``begin_accepted``, ``ledger.accept``,
   starting the task): ``send_message`` raises, nothing is reserved or registered;
2. before the run starts (``prepare``, a coordinator failing before/without publishing);
3. at agent start, 4. mid-stream: one failed terminal, the session goes on;
5. while publishing the terminal (a store whose ``complete`` raises);
6. after publishing, before returning: no second terminal;
7. during workspace close (agents and ``prepare`` misbehaving while cancelled);
8. in a subscriber (stalled, cancelled mid-iteration, overflowing);
9. a ``BaseException`` that is not ``Cancelled``: finished runs keep their terminals.

Faults come from ``trio_runs.testing`` (``ScriptedAgent``, ``FaultyCoordinator``,
``failing_prepare``, ``TerminalRecorder``) and small ledger subclasses defined here. Every
test runs on the autojump clock; every wait is bounded by ``trio.fail_after``; "let it
settle" is ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    CoordinatorFactory,
    EventType,
    Notification,
    NotificationType,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    SubscriberOverflow,
    Subscription,
    Workspace,
    current_run_id,
    open_backend,
)
from trio_runs.ledger import OnVisible
from trio_runs.testing import (
    FaultPoint,
    FaultyCoordinator,
    ScriptedAgent,
    TerminalRecorder,
    emit,
    failing_prepare,
    raise_,
    return_,
    sleep,
    wait_for,
)

TIMEOUT = 30  # virtual seconds: every wait is bounded, so a regression fails, never hangs
GRACE = 5  # close grace used where a test measures how long a close takes


# -- helpers -------------------------------------------------------------------------------


class Interrupt(BaseException):
    """A ``KeyboardInterrupt`` look-alike: a ``BaseException`` that is not ``Cancelled``."""


class BodyError(Exception):
    """Raised by the body of ``open_backend`` to leave it with an exception."""


def msg(run_id: str, prompt: str = "hi", session_id: str = "s1") -> AgentMessage:
    return AgentMessage(session_id=session_id, prompt=prompt, run_id=run_id)


def drain(sub: Subscription[Any]) -> list[Any]:
    """The payloads queued for ``sub`` right now, without waiting."""
    out: list[Any] = []
    while True:
        try:
            out.append(sub.receive_nowait().payload)
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def agent_error(run_id: str, message: str, session_id: str = "s1") -> Notification:
    return Notification(NotificationType.AGENT_ERROR, session_id, run_id, message)


def faulty(
    agent: ScriptedAgent,
    point: FaultPoint,
    exc: BaseException | type[BaseException] = RuntimeError,
    *,
    when: Callable[[RunCall], bool] | None = None,
) -> CoordinatorFactory:
    """A factory for a ``SessionCoordinator`` wrapped in a ``FaultyCoordinator``."""

    def make(workspace: Workspace) -> FaultyCoordinator:
        inner = SessionCoordinator.factory(agent)(workspace)
        return FaultyCoordinator(inner, point, exc, when=when)

    return make


def coordinator_of(ws: Workspace) -> SessionCoordinator:
    """The real coordinator of ``ws`` (unwrapping a ``FaultyCoordinator``)."""
    coordinator = ws.coordinator
    if isinstance(coordinator, FaultyCoordinator):
        coordinator = coordinator.inner
    assert isinstance(coordinator, SessionCoordinator)
    return coordinator


async def wait_all(ledger: RunLedger, run_ids: Iterable[str]) -> dict[str, RunComplete]:
    """Every run's terminal from the ledger, bounded."""
    with trio.fail_after(TIMEOUT):
        return {run_id: await ledger.wait(run_id) for run_id in run_ids}


class RefusingLedger(RunLedger):
    """A ledger whose ``accept`` raises for the chosen run ids (a store refusing to register)."""

    def __init__(self, refuse: Iterable[str]) -> None:
        super().__init__()
        self.refuse = set(refuse)
        self.refused = 0

    def accept(self, run_id: str, session_id: str) -> None:
        if run_id in self.refuse:
            self.refused += 1
            raise OSError(f"cannot register {run_id}")
        super().accept(run_id, session_id)


class FlakyLedger(RunLedger):
    """A ledger whose ``complete`` raises for the chosen run ids, ``times`` times each (a store
    failing while a terminal is recorded), before it records anything."""

    def __init__(self, fail: Iterable[str], times: float = 1) -> None:
        super().__init__()
        self.fail = set(fail)
        self.times = times
        self.raised: dict[str, int] = {}

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        raised = self.raised.get(rc.run_id, 0)
        if rc.run_id in self.fail and raised < self.times:
            self.raised[rc.run_id] = raised + 1
            raise OSError(f"store down for {rc.run_id}")
        return super().complete(rc, on_visible)


# -- 1. between reservation and ledger registration -----------------------------------------


@pytest.mark.parametrize("fault_type", [RuntimeError, Interrupt])
async def test_begin_accepted_fault_is_raised_by_send_message_with_nothing_half_done(
    backend: Backend, tmp_path: pathlib.Path, fault_type: type[BaseException], autojump_clock
) -> None:
    """``begin_accepted`` raising: ``send_message`` raises that very error, synchronously; the
    run is not registered, no reservation is left, no task started; later sends work (the same
    run id included, which proves it was never registered)."""
    gate = trio.Event()
    agent = ScriptedAgent(wait_for(gate), return_("done"))
    fault = fault_type("coordinator refused")
    refuse = {"s1"}
    ws = await backend.create_workspace(
        tmp_path,
        faulty(agent, FaultPoint.BEGIN_ACCEPTED, fault, when=lambda c: c.session_id in refuse),
    )
    coordinator = coordinator_of(ws)
    ledger = backend.ledger
    backend.send_message(ws.id, msg("other", session_id="s2"))
    await trio.testing.wait_all_tasks_blocked()

    with pytest.raises(fault_type) as excinfo:
        backend.send_message(ws.id, msg("refused"))
    assert excinfo.value is fault
    assert isinstance(ws.coordinator, FaultyCoordinator)
    assert ws.coordinator.injected == 1
    assert ledger.state("refused") is None
    assert (ledger.statistics().accepted_total, ledger.statistics().pending) == (1, 1)
    assert not coordinator.is_session_busy("s1")
    assert coordinator.session_count == 1  # only s2's
    assert ws.run_ids == frozenset({"other"})
    await trio.testing.wait_all_tasks_blocked()
    assert agent.started == ["other"]

    refuse.clear()
    async with TerminalRecorder(ws) as recorder:
        assert backend.send_message(ws.id, msg("refused")) == "refused"
        gate.set()
        with trio.fail_after(TIMEOUT):
            rc = await recorder.wait_for("refused")
            await recorder.wait_for("other")
        recorder.assert_exactly_once(["refused", "other"])
    assert rc == RunComplete("s1", "refused", result="done")
    assert ledger.statistics().pending == 0


async def test_ledger_accept_fault_releases_the_reservation(
    tmp_path: pathlib.Path, autojump_clock
) -> None:
    """``ledger.accept`` raising after the reservation was made: ``send_message`` raises the
    store's error, and the reservation is released -- the run neither holds its lane (a later
    run of the same session is queued alone and runs) nor shows as queued; an idle session is
    forgotten altogether."""
    ledger = RefusingLedger({"b", "x"})
    gate = trio.Event()
    agent = ScriptedAgent(wait_for(gate), return_("done"))
    with trio.fail_after(TIMEOUT):
        async with open_backend(ledger=ledger) as backend:
            ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
            coordinator = coordinator_of(ws)
            backend.send_message(ws.id, msg("a"))
            await trio.testing.wait_all_tasks_blocked()

            # Behind an active run: the refused run must not keep a place in the lane.
            with pytest.raises(OSError, match="cannot register b"):
                backend.send_message(ws.id, msg("b", prompt="refused"))
            assert ledger.state("b") is None
            assert coordinator.queued_prompts_list("s1") == []
            backend.send_message(ws.id, msg("c", prompt="after"))
            assert coordinator.queued_prompts_list("s1") == ["after"]

            # In an idle session: nothing is left of it.
            with pytest.raises(OSError, match="cannot register x"):
                backend.send_message(ws.id, msg("x", session_id="s2"))
            assert not coordinator.is_session_busy("s2")
            assert coordinator.session_count == 1
            assert ledger.statistics().accepted_total == 2  # a and c
            assert ws.run_ids == frozenset({"a", "c"})

            gate.set()
            backend.send_message(ws.id, msg("y", session_id="s2"))
            done = await wait_all(ledger, ["a", "c", "y"])
            await trio.testing.wait_all_tasks_blocked()
            assert [agent.started.count(r) for r in ["a", "b", "c", "x", "y"]] == [1, 0, 1, 0, 1]
            # Nothing ran for the refused runs, so nothing ended for them either.
            assert (ledger.state("b"), ledger.state("x")) == (None, None)
            assert ledger.statistics().retained == 3
    assert ledger.refused == 2
    assert {rc.outcome for rc in done.values()} == {"completed"}
    assert ledger.statistics().pending == 0


class RefusingNursery:
    """Stands in for a workspace's nursery whose ``start_soon`` fails."""

    def start_soon(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Nursery is closed to new arrivals")


async def test_start_soon_fault_unregisters_the_run_and_releases_the_reservation(
    backend: Backend, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock
) -> None:
    """The task cannot be started (the last step of ``send_message``): the run registered a
    moment before is unregistered, the reservation released. There is no public way to make a
    live workspace nursery refuse a task, so this one swaps the private ``Workspace._nursery``."""
    agent = ScriptedAgent(return_("done"))
    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    coordinator = coordinator_of(ws)
    monkeypatch.setattr(ws, "_nursery", RefusingNursery())
    with pytest.raises(RuntimeError, match="closed to new arrivals"):
        backend.send_message(ws.id, msg("r"))
    assert backend.ledger.state("r") is None
    assert backend.ledger.statistics().accepted_total == 0
    assert not coordinator.is_session_busy("s1")
    assert coordinator.session_count == 0
    assert ws.run_ids == frozenset()

    monkeypatch.undo()
    backend.send_message(ws.id, msg("r"))
    done = await wait_all(backend.ledger, ["r"])
    assert done["r"] == RunComplete("s1", "r", result="done")


# -- 2. before the run starts ---------------------------------------------------------------


def pre_run_fault(where: str, agent: ScriptedAgent) -> tuple[CoordinatorFactory, str]:
    """A factory failing run ``bad`` before it starts, and the error text it fails with."""
    if where == "prepare":
        prepare = failing_prepare(RuntimeError, when=lambda run_id: run_id == "bad")
        return SessionCoordinator.factory(agent, prepare=prepare), "prepare failed for bad"
    point = FaultPoint(where)
    factory = faulty(agent, point, when=lambda call: call.run_id == "bad")
    return factory, f"injected fault at {point.value}"


@pytest.mark.parametrize("where", ["prepare", "before_run", "mark_without_publish"])
async def test_pre_run_fault_gives_one_failed_terminal_and_the_lane_moves_on(
    backend: Backend, tmp_path: pathlib.Path, where: str, autojump_clock
) -> None:
    """A failure before the agent starts -- ``prepare`` raising, the coordinator raising before
    it ran the run, or flagging the marker without publishing -- ends the run with exactly one
    failed terminal carrying that error, announces an AGENT_ERROR; the agent never runs for it,
    the run queued behind it in the session runs, other sessions are untouched."""
    agent = ScriptedAgent(sleep(1), return_("ok"))
    factory, error = pre_run_fault(where, agent)
    ws = await backend.create_workspace(tmp_path, factory)
    ledger = backend.ledger
    async with TerminalRecorder(ws) as recorder, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg("bad"))
        backend.send_message(ws.id, msg("next"))
        backend.send_message(ws.id, msg("other", session_id="s2"))
        with trio.fail_after(TIMEOUT):
            bad = await recorder.wait_for("bad")
            nxt = await recorder.wait_for("next")
            other = await recorder.wait_for("other")
        await trio.testing.wait_all_tasks_blocked()
        recorder.assert_exactly_once(["bad", "next", "other"])
        assert drain(notes) == [agent_error("bad", error)]
    assert bad == RunComplete("s1", "bad", error=error)
    assert nxt == RunComplete("s1", "next", result="ok")
    assert other == RunComplete("s2", "other", result="ok")
    assert ledger.get("bad") == bad
    assert "bad" not in agent.started
    assert ledger.statistics().duplicates_suppressed == 0
    assert ledger.statistics().pending == 0
    assert not coordinator_of(ws).is_session_busy("s1")
    assert ws.run_ids == frozenset()


# -- 3./4. at agent start and mid-stream ----------------------------------------------------


class InChildTask:
    """Runs a ``ScriptedAgent`` in a child task of the agent's own nursery, so its failure
    reaches the coordinator inside an ``ExceptionGroup``."""

    def __init__(self, inner: ScriptedAgent) -> None:
        self.inner = inner

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.inner, call, ctx)
        return "ok"


AGENT_FAULTS = {  # script of run "bad", and the progress it emits before failing
    "at_start": ([raise_(RuntimeError)], []),
    "mid_stream": (
        [emit(1), sleep(1), emit(2), sleep(0.5), emit(3), raise_(RuntimeError)],
        [1, 2, 3],
    ),
    "mid_stream_in_child_task": ([emit(1), sleep(1), emit(2), raise_(RuntimeError)], [1, 2]),
}


@pytest.mark.parametrize("where", list(AGENT_FAULTS))
async def test_agent_fault_fails_only_its_run(
    backend: Backend, tmp_path: pathlib.Path, where: str, autojump_clock
) -> None:
    """The agent raises at its first step or after streaming progress (also from a child task
    of its own): one failed terminal with ``str(exc)``, one AGENT_ERROR, the progress emitted
    before the failure was delivered; the next run of the session and a concurrent run of
    another session complete; the session never ran two runs at once."""
    script, expected_progress = AGENT_FAULTS[where]
    scripted = ScriptedAgent(emit("x"), sleep(1), return_("ok"), scripts={"bad": script})
    in_child = where.endswith("in_child_task")
    agent = InChildTask(scripted) if in_child else scripted
    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    ledger = backend.ledger
    async with (
        TerminalRecorder(ws) as recorder,
        ws.notifications.subscribe() as notes,
        ws.events.subscribe() as progress,
    ):
        backend.send_message(ws.id, msg("bad", prompt="bad"))
        backend.send_message(ws.id, msg("next"))
        backend.send_message(ws.id, msg("other", session_id="s2"))
        with trio.fail_after(TIMEOUT):
            bad = await recorder.wait_for("bad")
            nxt = await recorder.wait_for("next")
            other = await recorder.wait_for("other")
        await trio.testing.wait_all_tasks_blocked()
        recorder.assert_exactly_once(["bad", "next", "other"])
        notes_seen = drain(notes)
        progress_of_bad = [p.payload for p in drain(progress) if p.run_id == "bad"]
    assert bad.outcome == "failed"
    if in_child:
        assert bad.error  # the agent's ExceptionGroup, as str()
    else:
        assert bad == RunComplete("s1", "bad", error="bad")  # raise_ puts the run id in it
    assert notes_seen == [agent_error("bad", bad.error or "")]
    assert progress_of_bad == expected_progress
    assert nxt == RunComplete("s1", "next", result="ok")
    assert other == RunComplete("s2", "other", result="ok")
    assert scripted.started.index("next") > scripted.started.index("bad")
    assert scripted.max_concurrent_per_session == 1
    assert ledger.statistics().duplicates_suppressed == 0
    assert ledger.statistics().pending == 0


# -- 5. while publishing the terminal -------------------------------------------------------


async def test_store_failing_once_while_recording_a_terminal_still_records_it(
    tmp_path: pathlib.Path, autojump_clock
) -> None:
    """The ledger raises the first time run ``x``'s terminal is recorded (the coordinator's
    publish): the coordinator logs it and leaves the marker down, and the dispatcher records
    the terminal the coordinator returned (completed: the agent did complete) as the one
    terminal ``x`` gets. Nothing failed, so there is no AGENT_ERROR, and nobody else notices."""
    ledger = FlakyLedger({"x"}, times=1)
    agent = ScriptedAgent(sleep(1), return_("ok"), scripts={"long": [sleep(10), return_("long")]})
    with trio.fail_after(TIMEOUT):
        async with open_backend(ledger=ledger) as backend:
            ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
            async with TerminalRecorder(ws) as recorder, ws.notifications.subscribe() as notes:
                backend.send_message(ws.id, msg("before"))
                await recorder.wait_for("before")
                backend.send_message(ws.id, msg("other", prompt="long", session_id="s2"))
                backend.send_message(ws.id, msg("x"))
                backend.send_message(ws.id, msg("after"))
                done = await wait_all(ledger, ["x", "after", "other"])
                await trio.testing.wait_all_tasks_blocked()
                recorder.assert_exactly_once(["before", "x", "after", "other"])
                assert recorder.terminal_for("x") == done["x"]
                assert drain(notes) == []
            assert not ws.closing
    assert ledger.raised == {"x": 1}
    assert done["x"] == RunComplete("s1", "x", result="ok")
    assert done["after"] == RunComplete("s1", "after", result="ok")
    assert done["other"] == RunComplete("s2", "other", result="long")
    assert ledger.statistics().duplicates_suppressed == 0
    assert ledger.statistics().pending == 0


async def persistent_store_failure(
    tmp_path: pathlib.Path, ledger: FlakyLedger, agent: ScriptedAgent
) -> None:
    """Runs ``before`` (done first), then ``x`` (whose terminal can never be recorded),
    ``after`` (queued behind ``x``) and ``other`` (another session, still running when ``x``
    ends), then closes the workspace."""
    async with open_backend(ledger=ledger) as backend:
        ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
        backend.send_message(ws.id, msg("before"))
        await wait_all(ledger, ["before"])
        backend.send_message(ws.id, msg("other", prompt="long", session_id="s2"))
        backend.send_message(ws.id, msg("x"))
        backend.send_message(ws.id, msg("after"))
        await wait_all(ledger, ["after", "other"])
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id)


async def test_store_failing_for_one_run_leaves_the_other_runs_alone(
    tmp_path: pathlib.Path, autojump_clock
) -> None:
    """A store that cannot record run ``x``'s terminal at all: ``x`` cannot get one, but the
    other runs -- in its session and in others -- must end as they would have, and the
    workspace must still close."""
    ledger = FlakyLedger({"x"}, times=math.inf)
    agent = ScriptedAgent(sleep(1), return_("ok"), scripts={"long": [sleep(10), return_("long")]})
    with trio.fail_after(TIMEOUT):
        await persistent_store_failure(tmp_path, ledger, agent)
    assert ledger.get("before") == RunComplete("s1", "before", result="ok")
    assert ledger.get("after") == RunComplete("s1", "after", result="ok")
    assert ledger.get("other") == RunComplete("s2", "other", result="long")
    assert ledger.pending_run_ids() == ["x"]


async def test_store_failing_for_one_run_still_ends_every_other_run_once(
    tmp_path: pathlib.Path, autojump_clock
) -> None:
    """The minimum that holds today when the store can never record ``x``'s terminal: whether
    or not the store's error comes out of ``open_backend``, no other run is left without its
    one terminal, the run finished before keeps its own, and nothing waits forever."""
    ledger = FlakyLedger({"x"}, times=math.inf)
    agent = ScriptedAgent(sleep(1), return_("ok"), scripts={"long": [sleep(10), return_("long")]})
    with trio.fail_after(TIMEOUT):
        try:
            await persistent_store_failure(tmp_path, ledger, agent)
        except OSError as exc:
            assert str(exc) == "store down for x"  # noqa: PT017 -- it may or may not raise
    assert ledger.get("before") == RunComplete("s1", "before", result="ok")
    for run_id in ["after", "other"]:
        assert ledger.state(run_id) == "terminal", run_id
    assert ledger.pending_run_ids() == ["x"]
    assert ledger.statistics().duplicates_suppressed == 0


async def drop_queued(op: str, backend: Backend, ws: Workspace) -> None:
    coordinator = coordinator_of(ws)
    if op == "clear_queue":
        coordinator.clear_queue("s1")
    elif op == "cancel":
        coordinator.cancel("s1")
    else:
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id)


@pytest.mark.parametrize(
    ("op", "dropped"),
    [
        ("clear_queue", ["q", "q2"]),
        ("cancel", ["a", "q", "q2"]),
        ("close_workspace", ["a", "q", "q2", "o"]),
    ],
)
async def test_store_failing_once_while_dropping_a_queued_run(
    tmp_path: pathlib.Path, op: str, dropped: list[str], autojump_clock
) -> None:
    """The store raises once while the cancelled terminal of queued run ``q`` is recorded
    (``clear_queue``, ``cancel`` or closing the workspace drops it). The error may surface,
    but the operation must still be carried through: every run it drops ends cancelled in
    bounded time, without a further close, and none of them ever starts."""
    ledger = FlakyLedger({"q"}, times=1)
    agent = ScriptedAgent(wait_for(trio.Event()))
    with trio.fail_after(2 * TIMEOUT):
        async with open_backend(ledger=ledger) as backend:
            ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
            for run_id in ["a", "q", "q2"]:
                backend.send_message(ws.id, msg(run_id))
            backend.send_message(ws.id, msg("o", session_id="s2"))
            await trio.testing.wait_all_tasks_blocked()
            with contextlib.suppress(OSError):  # surfacing the store's error is fine
                await drop_queued(op, backend, ws)
            await trio.testing.wait_all_tasks_blocked()
            done = await wait_all(ledger, dropped)
            assert {run_id: rc.outcome for run_id, rc in done.items()} == dict.fromkeys(
                dropped, "cancelled"
            )
            assert "q" not in agent.started
            assert "q2" not in agent.started
            if op == "close_workspace":
                assert ws.closed


# -- 6. after publishing, before returning --------------------------------------------------


@pytest.mark.parametrize("outcome", ["completed", "cancelled"])
async def test_fault_after_the_terminal_gives_no_second_terminal(
    backend: Backend, tmp_path: pathlib.Path, outcome: str, autojump_clock
) -> None:
    """The coordinator published (and marked) the real terminal, then raised before returning:
    the real terminal is the only one -- no fallback is even offered to the ledger -- and the
    error is announced as AGENT_ERROR. The session goes on."""
    gate = trio.Event()
    agent = ScriptedAgent(sleep(1), return_("ok"), scripts={"hold": [wait_for(gate)]})
    factory = faulty(agent, FaultPoint.AFTER_TERMINAL, when=lambda call: call.run_id == "r")
    ws = await backend.create_workspace(tmp_path, factory)
    assert isinstance(ws.coordinator, FaultyCoordinator)
    ledger = backend.ledger
    async with TerminalRecorder(ws) as recorder, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg("r", prompt="hi" if outcome == "completed" else "hold"))
        if outcome == "cancelled":
            with trio.fail_after(TIMEOUT):
                await agent.wait_started("r")
            ws.coordinator.cancel("s1")
        with trio.fail_after(TIMEOUT):
            rc = await recorder.wait_for("r")
        await trio.testing.wait_all_tasks_blocked()
        assert ws.run_ids == frozenset()  # the dispatch is over: nothing more can come
        backend.send_message(ws.id, msg("next"))
        with trio.fail_after(TIMEOUT):
            nxt = await recorder.wait_for("next")
        recorder.assert_exactly_once(["r", "next"])
        assert drain(notes) == [agent_error("r", "injected fault at after_terminal")]
    expected = {
        "completed": RunComplete("s1", "r", result="ok"),
        "cancelled": RunComplete("s1", "r", cancelled=True),
    }[outcome]
    assert rc == expected
    assert ledger.get("r") == expected
    assert nxt == RunComplete("s1", "next", result="ok")
    assert ws.coordinator.injected == 1
    assert ledger.statistics().duplicates_suppressed == 0


# -- 7. during workspace close --------------------------------------------------------------

EXITS = [
    "close_workspace",
    "leave_open_backend",
    "body_raises",
    "cancelled_from_outside",
    "interrupted_elsewhere",  # a run of another workspace raises a BaseException
]


async def interrupting_agent(call: RunCall, ctx: RunContext) -> object:
    raise Interrupt("^C in another workspace")


async def run_then_close(
    tmp_path: pathlib.Path,
    factory: CoordinatorFactory,
    sends: list[AgentMessage],
    exit_mode: str,
    *,
    grace: float = GRACE,
) -> tuple[RunLedger, float]:
    """Open a backend and a workspace, send ``sends``, let them all block, then end them all
    the ``exit_mode`` way. Returns the ledger and how long (virtual seconds) the ending took."""
    ledger = RunLedger()
    started: list[float] = []
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as outer:
            try:
                async with open_backend(ledger=ledger, close_grace=grace) as backend:
                    ws = await backend.create_workspace(tmp_path, factory)
                    for m in sends:
                        backend.send_message(ws.id, m)
                    await trio.testing.wait_all_tasks_blocked()
                    started.append(trio.current_time())
                    if exit_mode == "close_workspace":
                        await backend.close_workspace(ws.id, grace=grace)
                        assert ws.closed
                    elif exit_mode == "body_raises":
                        raise BodyError("the request handler blew up")
                    elif exit_mode == "cancelled_from_outside":
                        outer.cancel()
                        await trio.sleep_forever()
                    elif exit_mode == "interrupted_elsewhere":
                        elsewhere = await backend.create_workspace(
                            tmp_path / "elsewhere", SessionCoordinator.factory(interrupting_agent)
                        )
                        backend.send_message(elsewhere.id, msg("interrupter"))
                        await trio.sleep_forever()
            except BodyError:
                assert exit_mode == "body_raises"
            except Interrupt:
                assert exit_mode == "interrupted_elsewhere"
        assert outer.cancelled_caught == (exit_mode == "cancelled_from_outside")
    assert ws.closed
    return ledger, trio.current_time() - started[0]


def assert_all_cancelled_once(ledger: RunLedger, sends: list[AgentMessage]) -> None:
    for m in sends:
        assert ledger.get(m.run_id) == RunComplete(m.session_id, m.run_id, cancelled=True), m
    assert ledger.statistics().pending == 0
    assert ledger.statistics().duplicates_suppressed == 0


@pytest.mark.parametrize("exit_mode", EXITS)
async def test_close_cancels_a_hanging_prepare_and_the_runs_behind_it(
    tmp_path: pathlib.Path, exit_mode: str, autojump_clock
) -> None:
    """``prepare`` hangs for one run: however the workspace ends, that run, the run queued
    behind it and a run busy in another session each get exactly one cancelled terminal, the
    agent never starts for the first two, and the close does not wait out its grace."""

    async def prepare(call: RunCall) -> None:
        if current_run_id().startswith("hang"):
            await trio.sleep_forever()

    agent = ScriptedAgent(wait_for(trio.Event()))
    sends = [msg("hang"), msg("queued"), msg("busy", session_id="s2")]
    ledger, took = await run_then_close(
        tmp_path, SessionCoordinator.factory(agent, prepare=prepare), sends, exit_mode
    )
    assert_all_cancelled_once(ledger, sends)
    assert agent.started == ["busy"]
    assert took < GRACE


class RaisesWhileCancelled:
    """An agent that blocks until cancelled, then fails while unwinding: ``raise`` in its
    ``except Cancelled`` for prompt ``except``, in its ``finally`` after a one-second shielded
    cleanup for prompt ``finally``."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        self.started.append(call.run_id)
        if call.prompt == "except":
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                raise RuntimeError(f"cleanup of {call.run_id} failed") from None
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1)
            raise ValueError(f"finally of {call.run_id} failed")


async def prepare_raising_while_cancelled(call: RunCall) -> None:
    if current_run_id() == "in-prepare":
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ConnectionError("prepare cleanup failed") from None


@pytest.mark.parametrize(
    "exit_mode",
    [
        "close_workspace",
        "leave_open_backend",
        "body_raises",
        "cancelled_from_outside",
        "interrupted_elsewhere",
    ],
)
async def test_close_never_reports_a_run_that_raises_while_cancelled_as_failed(
    tmp_path: pathlib.Path, exit_mode: str, autojump_clock
) -> None:
    """Runs that fail while being cancelled by the workspace ending (in ``except Cancelled``,
    in ``finally`` after a shielded cleanup, in ``prepare``) still end cancelled -- never
    failed -- once each; the run queued behind one of them too; the close takes as long as
    the shielded cleanup, not the grace."""
    agent = RaisesWhileCancelled()
    factory = SessionCoordinator.factory(agent, prepare=prepare_raising_while_cancelled)
    sends = [
        msg("in-except", prompt="except"),
        msg("queued", prompt="except"),
        msg("in-finally", prompt="finally", session_id="s2"),
        msg("in-prepare", session_id="s3"),
    ]
    ledger, took = await run_then_close(tmp_path, factory, sends, exit_mode)
    assert_all_cancelled_once(ledger, sends)
    assert sorted(agent.started) == ["in-except", "in-finally"]
    assert took == 1


class ShieldedCleanup:
    """An agent that, once cancelled, spends ``cleanup`` seconds in a shielded cleanup."""

    def __init__(self, cleanup: float) -> None:
        self.cleanup = cleanup

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.cleanup)


@pytest.mark.parametrize("exit_mode", EXITS)
async def test_close_outlasted_by_a_shielded_cleanup_still_ends_every_run_cancelled(
    tmp_path: pathlib.Path, exit_mode: str, autojump_clock
) -> None:
    """An agent whose shielded cleanup (5 s) outlasts the close grace (2 s): the close ends
    when the shield does -- bounded, and no sooner, since a shield cannot be cut short -- and
    every run, the queued one included, ends cancelled exactly once."""
    factory = SessionCoordinator.factory(ShieldedCleanup(5))
    sends = [msg("stubborn"), msg("queued"), msg("also-stubborn", session_id="s2")]
    ledger, took = await run_then_close(tmp_path, factory, sends, exit_mode, grace=2)
    assert_all_cancelled_once(ledger, sends)
    assert took == 5


# -- 8. in a subscriber ---------------------------------------------------------------------


async def test_stalled_subscribers_cost_nobody_a_terminal(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock
) -> None:
    """Subscribers that never read, on the terminals and on a flood of progress (past the
    progress broker's buffer): publishers never block (the runs take exactly their own time),
    lossy progress is dropped for the stalled one only, no terminal is dropped for anyone, and
    a reading subscriber and the ledger get every terminal once. Nothing leaks."""
    per_run, runs = 600, 8
    agent = ScriptedAgent(*[emit(i) for i in range(per_run)], sleep(1), return_("ok"))
    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    run_ids = [f"r{i}" for i in range(runs)]
    async with (
        TerminalRecorder(ws) as recorder,
        ws.run_completions.subscribe() as stalled_terminals,
        ws.events.subscribe() as stalled_progress,
    ):
        start = trio.current_time()
        for i, run_id in enumerate(run_ids):
            backend.send_message(ws.id, msg(run_id, session_id=f"s{i}"))
        done = await wait_all(backend.ledger, run_ids)
        assert trio.current_time() - start == 1
        await trio.testing.wait_all_tasks_blocked()
        recorder.assert_exactly_once(run_ids)
        assert stalled_terminals.backlog == runs
        assert stalled_terminals.dropped == 0
        assert stalled_progress.backlog == ws.events.buffer_size
        assert stalled_progress.dropped == per_run * runs - ws.events.buffer_size
        assert ws.events.drop_count == stalled_progress.dropped
        assert {rc.run_id for rc in drain(stalled_terminals)} == set(run_ids)
    assert {rc.outcome for rc in done.values()} == {"completed"}
    assert ws.run_completions.subscriber_count == 0
    assert ws.events.subscriber_count == 0


class HookedBroker(Broker[RunComplete]):
    """A must-deliver broker that calls ``after(rc)`` right after a terminal was queued for
    (and has woken) every subscriber, in the same step: no subscriber has run in between."""

    def __init__(self, after: Callable[[RunComplete], None]) -> None:
        super().__init__()
        self.after = after

    def publish_must_deliver(self, type: EventType, payload: RunComplete) -> None:
        super().publish_must_deliver(type, payload)
        self.after(payload)


async def test_subscribers_cancelled_or_leaving_mid_delivery_lose_nothing(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock
) -> None:
    """Right after terminal ``r2`` was handed to the subscribers, before any of them ran, one
    subscriber's receive is cancelled (it goes on receiving) and another subscriber's task is
    cancelled (it leaves); a third leaves with terminals still queued for it. The first gets
    every terminal once, in order (the cancel may not swallow ``r2``); the others get nothing
    twice and nothing after leaving; the recorder and the ledger get every terminal once;
    every subscription is gone at the end."""
    agent = ScriptedAgent(sleep(1), return_("ok"))
    run_ids = [f"r{i}" for i in range(6)]
    receive_scope = [trio.CancelScope()]  # the current receive of the resilient subscriber
    quitter_scope = trio.CancelScope()

    def after(rc: RunComplete) -> None:
        if rc.run_id == "r2":
            receive_scope[0].cancel()
            quitter_scope.cancel()

    hooked = HookedBroker(after)

    def factory(workspace: Workspace) -> SessionCoordinator:
        workspace.run_completions = hooked
        return SessionCoordinator.factory(agent)(workspace)

    ws = await backend.create_workspace(tmp_path, factory)
    resilient_got: list[str] = []
    quitter_got: list[str] = []

    async def resilient(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with hooked.subscribe() as sub:
            task_status.started()
            while run_ids[-1] not in resilient_got:
                receive_scope[0] = trio.CancelScope()
                with receive_scope[0]:
                    resilient_got.append((await sub.receive()).payload.run_id)

    async def quitter(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with quitter_scope:
            async with hooked.subscribe() as sub:
                task_status.started()
                async for event in sub:
                    quitter_got.append(event.payload.run_id)

    with trio.fail_after(TIMEOUT):  # bounds the subscriber tasks too
        async with TerminalRecorder(ws) as recorder, trio.open_nursery() as nursery:
            await nursery.start(resilient)
            await nursery.start(quitter)
            async with hooked.subscribe() as leaver:
                assert hooked.subscriber_count == 4
                for run_id in run_ids:  # one session: they end one second apart
                    backend.send_message(ws.id, msg(run_id))
                await recorder.wait_for("r3")
                await trio.testing.wait_all_tasks_blocked()
                assert quitter_scope.cancelled_caught
                assert hooked.subscriber_count == 3  # the quitter left
                assert leaver.receive_nowait().payload.run_id == "r0"
                assert leaver.backlog == 3
            assert hooked.subscriber_count == 2
            with pytest.raises(trio.ClosedResourceError):
                leaver.receive_nowait()
            await recorder.wait_for(run_ids[-1])
            await trio.testing.wait_all_tasks_blocked()
            recorder.assert_exactly_once(run_ids)
    assert resilient_got == run_ids
    assert quitter_got in (run_ids[:2], run_ids[:3])
    assert all(backend.ledger.get(r) == RunComplete("s1", r, result="ok") for r in run_ids)
    assert hooked.subscriber_count == 0


async def test_an_overflowing_subscriber_is_cut_off_loudly_and_others_get_every_terminal(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock
) -> None:
    """A subscriber that falls ``max_backlog`` terminals behind is disconnected with
    ``SubscriberOverflow`` (never a silent gap); the reading subscriber and the ledger get
    every terminal once. ``Workspace`` makes its brokers with the defaults (65,536), so the
    factory swaps in a small must-deliver broker before the coordinator is built on it."""
    agent = ScriptedAgent(sleep(1), return_("ok"))
    small: Broker[RunComplete] = Broker(buffer_size=2, max_backlog=4)

    def factory(workspace: Workspace) -> SessionCoordinator:
        workspace.run_completions = small
        return SessionCoordinator.factory(agent)(workspace)

    ws = await backend.create_workspace(tmp_path, factory)
    run_ids = [f"r{i}" for i in range(10)]
    async with TerminalRecorder(ws) as recorder, ws.run_completions.subscribe() as stalled:
        for run_id in run_ids:
            backend.send_message(ws.id, msg(run_id))
        with trio.fail_after(TIMEOUT):
            for run_id in run_ids[:4]:  # read as they come: the recorder keeps up
                await recorder.wait_for(run_id)
            await trio.testing.wait_all_tasks_blocked()
            # At max_backlog, not past it: still connected, nothing dropped.
            assert (stalled.backlog, small.subscriber_count, small.overflow_count) == (4, 2, 0)
            for run_id in run_ids[4:]:
                await recorder.wait_for(run_id)
        await trio.testing.wait_all_tasks_blocked()
        recorder.assert_exactly_once(run_ids)
        assert recorder.overflow is None
        assert small.overflow_count == 1
        assert small.subscriber_count == 1  # the stalled one was disconnected
        with pytest.raises(SubscriberOverflow) as excinfo:
            stalled.receive_nowait()
        assert (excinfo.value.backlog, excinfo.value.max_backlog) == (5, 4)
    assert all(backend.ledger.get(r) == RunComplete("s1", r, result="ok") for r in run_ids)
    assert small.subscriber_count == 0


# -- 9. a BaseException that is not Cancelled -----------------------------------------------


def interrupt_in_agent(exc: BaseException) -> tuple[ScriptedAgent, CoordinatorFactory]:
    agent = ScriptedAgent(
        wait_for(trio.Event()),
        scripts={
            "quick": [sleep(1), return_("quick")],
            "fail": [raise_(ValueError)],
            "boom": [raise_(exc)],
        },
    )
    return agent, SessionCoordinator.factory(agent)


def interrupt_in_prepare(exc: BaseException) -> tuple[ScriptedAgent, CoordinatorFactory]:
    agent, _ = interrupt_in_agent(exc)
    prepare = failing_prepare(exc, when=lambda run_id: run_id == "x")
    return agent, SessionCoordinator.factory(agent, prepare=prepare)


@pytest.mark.parametrize(
    ("source", "exc_type"),
    [("agent", Interrupt), ("agent", KeyboardInterrupt), ("prepare", Interrupt)],
)
async def test_base_exception_in_one_run_keeps_every_other_terminal(
    tmp_path: pathlib.Path, source: str, exc_type: type[BaseException], autojump_clock
) -> None:
    """Run ``x`` raises a ``BaseException`` that is not ``Cancelled`` (from its agent or its
    ``prepare``) a moment after other runs ended: it comes out of ``open_backend`` as itself;
    every run that had ended keeps its terminal; ``x`` ends failed; every other accepted run
    -- active, queued, in another workspace -- ends cancelled; nothing is left pending."""
    exc = exc_type("operator pressed ^C")
    agent, factory = (interrupt_in_agent if source == "agent" else interrupt_in_prepare)(exc)
    ledger = RunLedger()
    workspaces: list[Workspace] = []
    recorders: list[TerminalRecorder] = []

    async def scenario() -> None:
        async with open_backend(ledger=ledger) as backend:
            ws = await backend.create_workspace(tmp_path, factory)
            ws2 = await backend.create_workspace(tmp_path / "two", factory)
            workspaces.extend([ws, ws2])
            async with TerminalRecorder(ws) as recorder:
                recorders.append(recorder)
                backend.send_message(ws.id, msg("d1", prompt="quick", session_id="done"))
                backend.send_message(ws.id, msg("d2", prompt="fail", session_id="done"))
                await wait_all(ledger, ["d1", "d2"])
                backend.send_message(ws.id, msg("a1", prompt="hang", session_id="busy"))
                backend.send_message(ws.id, msg("q1", prompt="hang", session_id="busy"))
                backend.send_message(ws2.id, msg("w2", prompt="hang", session_id="busy"))
                # t1 and b0 end at t=1; x, queued behind b0, starts and raises right after.
                backend.send_message(ws.id, msg("t1", prompt="quick", session_id="tick"))
                backend.send_message(ws.id, msg("b0", prompt="quick", session_id="boom"))
                backend.send_message(ws.id, msg("x", prompt="boom", session_id="boom"))
                await trio.sleep_forever()  # the BaseException must end this block

    with trio.fail_after(TIMEOUT), pytest.raises(exc_type) as excinfo:
        await scenario()
    assert excinfo.value is exc
    finished = {
        "d1": RunComplete("done", "d1", result="quick"),
        "d2": RunComplete("done", "d2", error="d2"),
        "t1": RunComplete("tick", "t1", result="quick"),
        "b0": RunComplete("boom", "b0", result="quick"),
    }
    for run_id, rc in finished.items():
        assert ledger.get(run_id) == rc, run_id
    assert ledger.get("x") == RunComplete("boom", "x", error="operator pressed ^C")
    assert ledger.get("a1") == RunComplete("busy", "a1", cancelled=True)
    assert ledger.get("q1") == RunComplete("busy", "q1", cancelled=True)
    assert ledger.get("w2") == RunComplete("busy", "w2", cancelled=True)
    assert ledger.statistics().pending == 0
    assert ledger.statistics().duplicates_suppressed == 0
    assert "x" not in agent.finished
    assert "q1" not in agent.started
    assert all(ws.closed for ws in workspaces)
    recorders[0].assert_exactly_once([*finished, "x", "a1", "q1"])
