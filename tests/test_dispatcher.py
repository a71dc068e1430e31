"""The dispatcher (``Backend._dispatch``, the seed's ``runAgent``), ported to Trio.

The seed's three Go tests, in Trio terms, plus what the design adds around them:

* a pre-run error (the coordinator raises before publishing anything) still gives the run
  exactly one failed terminal, so a waiter on the run id never hangs;
* an error after the coordinator published (and marked) its terminal gives no second one;
* a cancellation never gives an error terminal.

Most tests install a :class:`StubCoordinator` through ``create_workspace`` so that exactly one
thing happens inside ``run_accepted``; a few use the real ``SessionCoordinator``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing
from dict_store import nonzero_outcomes

from trio_runs import (
    AgentMessage,
    Backend,
    Event,
    EventType,
    Notification,
    NotificationType,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    Subscription,
    Workspace,
    current_run_id,
    mark_run_complete_published,
    open_backend,
)

SESSION = "S1"
TIMEOUT = 30  # virtual seconds: every wait is bounded so a regression fails, never hangs


# -- helpers -------------------------------------------------------------------------------


class StubAccept:
    """The reservation a :class:`StubCoordinator` hands out (the ``Reservation`` protocol and
    nothing more: no context manager); records its release."""

    def __init__(self, session_id: str, sequence: int, call: RunCall | None) -> None:
        self.session_id = session_id
        self.sequence = sequence
        self.call = call
        self.closed = False

    def close(self) -> None:
        self.closed = True


class StubCoordinator:
    """A minimal ``Coordinator`` whose ``run_accepted`` does one configurable thing.

    In this order, each optional: publish its own terminal (``publish_error`` text) on the
    workspace (ledger + ``run_completions``), possibly from a child task; flag the run-complete
    marker; block forever (publishing nothing, ignoring ``cancel_all``); raise the next error
    from ``errors`` (``None`` entries mean "no error"). Without an error it returns ``returns``
    (built from the call) without publishing it, or a completed terminal by default.
    """

    def __init__(
        self,
        *,
        errors: list[BaseException | None] | None = None,
        mark_published: bool = False,
        publish_error: str | None = None,
        publish_in_child_task: bool = False,
        block: bool = False,
        returns: Callable[[RunCall], Any] | None = None,
    ) -> None:
        self.errors = list(errors or [])
        self.mark_published = mark_published
        self.publish_error = publish_error
        self.publish_in_child_task = publish_in_child_task
        self.block = block
        self.returns = returns
        self.workspace: Workspace | None = None
        self.accepts: list[StubAccept] = []
        self.calls: list[RunCall] = []
        self.run_ids_seen: list[str] = []
        self.published: list[RunComplete] = []
        self.cancel_all_calls = 0
        self.entered = trio.Event()

    def install(self, workspace: Workspace) -> StubCoordinator:
        """The ``coordinator_factory``: remember the workspace, return the stub."""
        self.workspace = workspace
        return self

    # -- the Coordinator protocol --

    async def run(self, session_id: str, prompt: str, *, run_id: str = "", attachments=()):
        raise NotImplementedError("the dispatcher never calls run()")

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> StubAccept:
        accept = StubAccept(session_id, len(self.accepts) + 1, call)
        self.accepts.append(accept)
        return accept

    def _publish_own_terminal(self, call: RunCall) -> None:
        assert self.workspace is not None
        rc = RunComplete(call.session_id, call.run_id, error=self.publish_error)
        self.workspace.ledger.complete(rc)
        self.workspace.run_completions.publish_must_deliver(EventType.UPDATED, rc)
        self.published.append(rc)
        mark_run_complete_published()

    async def run_accepted(self, accept: StubAccept, call: RunCall) -> RunComplete:
        self.run_ids_seen.append(current_run_id())
        self.calls.append(call)
        self.entered.set()
        await trio.lowlevel.checkpoint()
        if self.publish_error is not None:
            if self.publish_in_child_task:
                # The marker is shared by reference with child tasks: a mark made in one
                # must be visible to the dispatcher after the call returns.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._publish_in_child, call)
            else:
                self._publish_own_terminal(call)
        if self.mark_published:
            mark_run_complete_published()
        if self.block:
            await trio.sleep_forever()
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        if self.returns is not None:
            return self.returns(call)
        return RunComplete(call.session_id, call.run_id, result="stub result")

    async def _publish_in_child(self, call: RunCall) -> None:
        await trio.lowlevel.checkpoint()
        self._publish_own_terminal(call)

    def cancel(self, session_id: str) -> None:
        pass

    def cancel_all(self) -> None:
        self.cancel_all_calls += 1  # and otherwise ignored: the stub cannot be cancelled

    def is_session_busy(self, session_id: str) -> bool:
        return False

    def is_busy(self) -> bool:
        return False

    def queued_prompts(self, session_id: str) -> int:
        return 0

    def queued_prompts_list(self, session_id: str) -> list[str]:
        return []

    def clear_queue(self, session_id: str) -> None:
        pass


def drain(sub: Subscription[Any]) -> list[Event[Any]]:
    """Everything queued for ``sub`` right now (stops at an empty or ended queue)."""
    out: list[Event[Any]] = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def msg(run_id: str = "run-1", prompt: str = "hi", session_id: str = SESSION) -> AgentMessage:
    return AgentMessage(session_id=session_id, prompt=prompt, run_id=run_id)


async def settle_and_wait(backend: Backend, run_id: str) -> RunComplete:
    """The run's terminal (bounded), after every task has gone quiet."""
    with trio.fail_after(TIMEOUT):
        rc = await backend.wait_run(run_id)
    await trio.testing.wait_all_tasks_blocked()
    return rc


# ``backend`` (tests/conftest.py) runs every test here on both stores: ``RunLedger`` and the
# independently written ``DictStore``.


# -- (a) a pre-run error gets exactly one failed terminal ----------------------------------


async def test_pre_run_error_publishes_exactly_one_failed_terminal(
    backend, tmp_path, autojump_clock
):
    """The seed's TestRunAgent_PreRunErrorPublishesTerminalRunComplete.

    ``run_accepted`` raises before publishing anything (the seed's readyWg / UpdateModels
    failure): the dispatcher publishes one failed terminal carrying run id, session id and the
    error text, records it in the ledger, and announces an AGENT_ERROR notification.
    """
    stub = StubCoordinator(errors=[RuntimeError("update models failed")])
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        assert backend.send_message(ws.id, msg()) == "run-1"
        rc = await settle_and_wait(backend, "run-1")

        events = drain(terminals)
        assert [e.payload for e in events] == [rc]
        assert events[0].payload.run_id == "run-1"
        assert events[0].payload.session_id == SESSION
        assert events[0].payload.error == "update models failed"
        assert events[0].payload.cancelled is False
        assert events[0].payload.outcome == "failed"

        assert [e.payload for e in drain(notes)] == [
            Notification(NotificationType.AGENT_ERROR, SESSION, "run-1", "update models failed")
        ]
    assert backend.ledger.get("run-1") == rc
    assert backend.ledger.state("run-1") == "terminal"
    assert backend.ledger.statistics().failed_total == 1
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert backend.ledger.statistics().pending == 0
    # The dispatcher owns the reservation and released it; the run left the workspace.
    assert [a.closed for a in stub.accepts] == [True]
    assert ws.run_ids == frozenset()


async def test_pre_run_error_does_not_crash_the_workspace(backend, tmp_path, autojump_clock):
    """One run's pre-run failure leaves the workspace open: the next run completes."""
    stub = StubCoordinator(errors=[RuntimeError("not ready yet"), None])
    ws = await backend.create_workspace(tmp_path, stub.install)

    first = await settle_and_wait(backend, backend.send_message(ws.id, msg("run-1")))
    assert first.outcome == "failed"
    assert not ws.closing
    assert backend.get_workspace(ws.id) is ws

    with trio.fail_after(TIMEOUT):
        second = await backend.run(ws.id, msg("run-2"))
    assert second == RunComplete(SESSION, "run-2", result="stub result")
    assert nonzero_outcomes(backend.ledger) == {"failed": 1, "completed": 1}


async def test_prepare_failure_with_session_coordinator_gets_one_failed_terminal(
    backend, tmp_path, autojump_clock
):
    """With the real coordinator, a failing ``prepare`` is a pre-run error.

    The coordinator publishes nothing for it (by contract), so the dispatcher's fallback is the
    run's one failed terminal; the agent never runs; the workspace keeps working afterwards.
    """
    prepare_calls: list[int] = []
    agent_calls: list[str] = []

    async def prepare(call: RunCall) -> None:
        prepare_calls.append(1)
        await trio.sleep(1)
        if len(prepare_calls) == 1:
            raise ConnectionError("model catalogue unreachable")

    async def agent(call: RunCall, ctx: RunContext) -> str:
        agent_calls.append(call.run_id)
        return "ok"

    ws = await backend.create_workspace(
        tmp_path, SessionCoordinator.factory(agent, prepare=prepare)
    )
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg("run-1"))
        rc = await settle_and_wait(backend, "run-1")
        assert rc == RunComplete(SESSION, "run-1", error="model catalogue unreachable")
        assert [e.payload for e in drain(terminals)] == [rc]
        assert [e.payload for e in drain(notes)] == [
            Notification(
                NotificationType.AGENT_ERROR, SESSION, "run-1", "model catalogue unreachable"
            )
        ]
        assert agent_calls == []
        assert backend.ledger.statistics().duplicates_suppressed == 0
        assert not ws.coordinator.is_session_busy(SESSION)

        # The workspace survived: the next run goes through prepare and the agent.
        rc2 = await settle_and_wait(backend, backend.send_message(ws.id, msg("run-2")))
        assert rc2 == RunComplete(SESSION, "run-2", result="ok")
        assert agent_calls == ["run-2"]
        assert [e.payload for e in drain(terminals)] == [rc2]
        assert drain(notes) == []


# -- (b) no fallback once the coordinator published -----------------------------------------


async def test_no_fallback_when_coordinator_published_before_failing(
    backend, tmp_path, autojump_clock
):
    """The seed's TestRunAgent_NoFallbackWhenCoordinatorPublished.

    The coordinator published (and marked) its terminal, then raised: the only terminal is the
    coordinator's. The dispatcher checks the marker first, so it does not even offer the ledger
    a duplicate (``duplicates_suppressed`` stays 0). The AGENT_ERROR notice still goes out.
    """
    stub = StubCoordinator(
        publish_error="stream failed",
        errors=[RuntimeError("stream failed after publishing terminal event")],
    )
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert [e.payload for e in drain(terminals)] == stub.published == [rc]
        assert rc.error == "stream failed"
        # Nothing more arrives once every task is idle (the dispatch task has returned).
        assert ws.run_ids == frozenset()
        await trio.testing.wait_all_tasks_blocked()
        assert drain(terminals) == []
        assert [e.payload.message for e in drain(notes)] == [
            "stream failed after publishing terminal event"
        ]
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert backend.ledger.get("run-1") == rc


async def test_marker_set_in_a_child_task_suppresses_the_fallback(
    backend, tmp_path, autojump_clock
):
    """A mark made in a child task of ``run_accepted`` is seen by the dispatcher afterwards."""
    stub = StubCoordinator(
        publish_error="published by a child task",
        publish_in_child_task=True,
        errors=[RuntimeError("failed after the child published")],
    )
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert rc.error == "published by a child task"
        assert [e.payload for e in drain(terminals)] == [rc]
    assert backend.ledger.statistics().duplicates_suppressed == 0


async def test_marker_without_a_published_terminal_still_ends_the_run_once(
    backend, tmp_path, autojump_clock
):
    """The seed's stub, literally: it only flags the marker (publishes nothing), then raises.

    The marker is a hint, not the truth: a run must not be left without a terminal because a
    coordinator flagged it without publishing. The run ends with exactly one terminal, the
    failure it actually had, no duplicate, and the AGENT_ERROR notice still goes out.
    """
    stub = StubCoordinator(mark_published=True, errors=[RuntimeError("boom")])
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert ws.run_ids == frozenset()  # the dispatch is over
        assert rc == RunComplete(SESSION, "run-1", error="boom")
        assert [e.payload for e in drain(terminals)] == [rc]
        assert [e.payload.message for e in drain(notes)] == ["boom"]
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert backend.ledger.statistics().pending == 0


async def test_marker_without_a_published_terminal_on_return_records_the_returned_one(
    backend, tmp_path, autojump_clock
):
    """A coordinator that flags the marker and returns its terminal without publishing it:
    the returned terminal is recorded, once; no AGENT_ERROR (nothing failed)."""
    stub = StubCoordinator(
        mark_published=True,
        returns=lambda call: RunComplete(call.session_id, call.run_id, result="returned"),
    )
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert rc == RunComplete(SESSION, "run-1", result="returned")
        assert [e.payload for e in drain(terminals)] == [rc]
        assert drain(notes) == []
    assert backend.ledger.statistics().duplicates_suppressed == 0


async def test_close_leaves_no_run_of_a_misbehaving_coordinator_pending(
    backend, tmp_path, autojump_clock
):
    """No accepted run outlives its workspace, even one a misbehaving coordinator (marks, never
    publishes) left behind: after ``close_workspace`` every run has exactly one terminal."""
    stub = StubCoordinator(mark_published=True, errors=[RuntimeError("boom")])
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg())
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id)
        events = drain(terminals)
    assert backend.ledger.state("run-1") == "terminal"
    assert backend.ledger.statistics().pending == 0
    assert [e.payload.run_id for e in events] == ["run-1"]
    assert events[0].payload.outcome != "completed"
    with trio.fail_after(TIMEOUT):
        assert await backend.wait_run("run-1") == events[0].payload


# -- (c) cancellation is never an error -------------------------------------------------------


async def test_cancellation_publishes_no_error_terminal(backend, tmp_path, autojump_clock):
    """The seed's TestRunAgent_CancellationPublishesNoErrorTerminal.

    The stub blocks forever, publishes nothing and ignores ``cancel_all``. Closing the
    workspace cuts it off after ``grace``: no failed terminal, no AGENT_ERROR notice, and the
    run still ends with exactly one terminal, a cancelled one (the backend's safety net).
    """
    stub = StubCoordinator(block=True)
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg())
        with trio.fail_after(TIMEOUT):
            await stub.entered.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert drain(terminals) == []

        start = trio.current_time()
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id, grace=1.5)
        assert trio.current_time() - start == 1.5  # the stub ignored cancel_all: hard stop
        assert stub.cancel_all_calls == 1

        events = drain(terminals)
        assert [e.payload for e in events] == [RunComplete(SESSION, "run-1", cancelled=True)]
        assert events[0].payload.error is None
        assert drain(notes) == []
    assert backend.ledger.get("run-1") == RunComplete(SESSION, "run-1", cancelled=True)
    assert nonzero_outcomes(backend.ledger) == {"cancelled": 1}
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert [a.closed for a in stub.accepts] == [True]


async def test_session_coordinator_cancel_gives_one_cancelled_terminal(
    backend, tmp_path, autojump_clock
):
    """With the real coordinator, ``coordinator.cancel`` ends the run cancelled, never failed.

    Exactly one terminal, ``cancelled``, no error text, and no AGENT_ERROR notification.
    """
    started = trio.Event()
    saw_cancel: list[str] = []

    async def agent(call: RunCall, ctx: RunContext) -> str:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            saw_cancel.append(call.run_id)
            raise
        return "unreachable"

    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    async with ws.run_completions.subscribe() as terminals, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, msg())
        with trio.fail_after(TIMEOUT):
            await started.wait()
        ws.coordinator.cancel(SESSION)
        rc = await settle_and_wait(backend, "run-1")
        assert rc == RunComplete(SESSION, "run-1", cancelled=True)
        assert rc.error is None
        assert [e.payload for e in drain(terminals)] == [rc]
        assert drain(notes) == []
    assert saw_cancel == ["run-1"]
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert not ws.closing  # cancelling a run is not closing the workspace


# -- the dispatched task's context --------------------------------------------------------------


async def test_coordinator_sees_the_run_id_as_current_run_id(backend, tmp_path, autojump_clock):
    """The dispatched task attaches ``with_run_id``: ``current_run_id()`` is the run's id."""
    stub = StubCoordinator()
    ws = await backend.create_workspace(tmp_path, stub.install)
    given = backend.send_message(ws.id, msg("given-id"))
    minted = backend.send_message(ws.id, msg(""))
    await settle_and_wait(backend, given)
    await settle_and_wait(backend, minted)
    assert sorted(stub.run_ids_seen) == sorted([given, minted])
    assert {c.run_id for c in stub.calls} == {given, minted}
    assert current_run_id() == ""  # nothing leaked into the submitting task


async def test_agent_sees_the_run_id_as_current_run_id(backend, tmp_path, autojump_clock):
    """Inside the real coordinator's agent, ``current_run_id()`` is the dispatched run id."""
    seen: list[tuple[str, str, str]] = []

    async def agent(call: RunCall, ctx: RunContext) -> None:
        seen.append((current_run_id(), call.run_id, ctx.run_id))

    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    run_id = backend.send_message(ws.id, msg(""))
    rc = await settle_and_wait(backend, run_id)
    assert rc.outcome == "completed"
    assert seen == [(run_id, run_id, run_id)]


async def test_coordinator_returning_an_unpublished_terminal_gets_it_recorded(
    backend, tmp_path, autojump_clock
):
    """A coordinator that returns its terminal without publishing it: the dispatcher does."""
    stub = StubCoordinator(
        returns=lambda call: RunComplete(call.session_id, call.run_id, result={"answer": 42})
    )
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert rc == RunComplete(SESSION, "run-1", result={"answer": 42})
        assert [e.payload for e in drain(terminals)] == [rc]
    assert backend.ledger.get("run-1") == rc
    assert nonzero_outcomes(backend.ledger) == {"completed": 1}


async def test_coordinator_returning_a_foreign_terminal_still_ends_the_run(
    backend, tmp_path, autojump_clock
):
    """A coordinator that returns a terminal for some other run id (and publishes nothing):
    the run still gets exactly one terminal of its own, a failed one."""
    stub = StubCoordinator(returns=lambda call: RunComplete(call.session_id, "someone-else"))
    ws = await backend.create_workspace(tmp_path, stub.install)
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
        assert (rc.run_id, rc.session_id, rc.outcome) == ("run-1", SESSION, "failed")
        assert [e.payload for e in drain(terminals)] == [rc]
    assert backend.ledger.state("someone-else") is None


class Interrupt(BaseException):
    """A KeyboardInterrupt look-alike that does not actually interrupt pytest."""


async def test_base_exception_gets_a_failed_terminal_before_propagating(tmp_path, autojump_clock):
    """A ``BaseException`` (not ``Cancelled``) out of ``run_accepted`` is not swallowed.

    The run first gets its failed terminal (so its waiters are answered), then the exception
    propagates and comes out of ``open_backend`` as itself, not in an ``ExceptionGroup``.
    """
    ledger = RunLedger()
    interrupt = Interrupt("operator pressed ^C")
    stub = StubCoordinator(errors=[interrupt])
    seen_terminals: list[RunComplete] = []
    waiter_got: list[RunComplete] = []

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            backend = await stack.enter_async_context(open_backend(ledger=ledger))
            ws = await backend.create_workspace(tmp_path, stub.install)
            terminals = await stack.enter_async_context(ws.run_completions.subscribe())
            stack.callback(lambda: seen_terminals.extend(e.payload for e in drain(terminals)))
            backend.send_message(ws.id, msg())
            with trio.fail_after(TIMEOUT):
                waiter_got.append(await backend.wait_run("run-1"))
                await trio.sleep_forever()  # the interrupt must end this block

    with trio.fail_after(TIMEOUT), pytest.raises(Interrupt) as excinfo:
        await scenario()
    assert excinfo.value is interrupt
    expected = RunComplete(SESSION, "run-1", error="operator pressed ^C")
    assert ledger.get("run-1") == expected
    assert waiter_got == [expected]
    assert seen_terminals == [expected]
    assert ledger.statistics().pending == 0
    assert stub.workspace is not None
    assert stub.workspace.closed


async def test_pre_run_error_is_answered_by_the_fallback_not_the_last_resort(
    backend, tmp_path, autojump_clock, caplog: pytest.LogCaptureFixture
):
    """The marker-guarded fallback publishes the pre-run terminal itself.

    The ledger-checked last resort behind it would also end the run, but it logs an error
    (it means a coordinator misbehaved), so a run that needed it is a broken fallback.
    """
    stub = StubCoordinator(errors=[RuntimeError("update models failed")])
    ws = await backend.create_workspace(tmp_path, stub.install)
    with caplog.at_level(logging.ERROR, logger="trio_runs"):
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
    assert rc.error == "update models failed"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_the_last_resort_logs_the_coordinator_that_needed_it(
    backend, tmp_path, autojump_clock, caplog: pytest.LogCaptureFixture
):
    """A coordinator that marks without publishing is reported in an error log."""
    stub = StubCoordinator(mark_published=True, errors=[RuntimeError("boom")])
    ws = await backend.create_workspace(tmp_path, stub.install)
    with caplog.at_level(logging.ERROR, logger="trio_runs"):
        backend.send_message(ws.id, msg())
        rc = await settle_and_wait(backend, "run-1")
    assert rc.error == "boom"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "run run-1 has no recorded terminal" in errors[0]
