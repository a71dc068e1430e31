"""Cancelling one run: it ends cancelled, and the other runs of its session go on."""

from __future__ import annotations

import trio
import trio.testing

from trio_runs import AgentMessage, SessionCoordinator, open_backend
from trio_runs.testing import ScriptedAgent, TerminalRecorder, return_, sleep

TIMEOUT = 600


async def test_cancel_run_cancels_only_the_active_run(autojump_clock):
    agent = ScriptedAgent(sleep(100), return_("done"))
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        async with TerminalRecorder(ws) as terminals:
            first = backend.send_message(ws.id, AgentMessage("s", "one"))
            second = backend.send_message(ws.id, AgentMessage("s", "two"))
            await trio.testing.wait_all_tasks_blocked()
            assert backend.cancel_run(first) is True
            with trio.fail_after(TIMEOUT):
                assert (await terminals.wait_for(first)).outcome == "cancelled"
                assert (await terminals.wait_for(second)).result == "done"
            terminals.assert_exactly_once([first, second])
    assert agent.cancelled == [first]
    assert agent.finished == [second]


async def test_cancel_run_drops_a_queued_run_at_once_and_keeps_the_queue_order(autojump_clock):
    agent = ScriptedAgent(sleep(10), return_("done"))
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        coordinator = ws.coordinator
        assert isinstance(coordinator, SessionCoordinator)
        ids = [backend.send_message(ws.id, AgentMessage("s", f"p{n}")) for n in range(4)]
        # Before any dispatch task ran: the call is known, so the run can be found.
        assert backend.cancel_run(ids[2]) is True
        assert backend.ledger.get(ids[2]).cancelled  # type: ignore[union-attr]
        assert coordinator.queued_prompts_list("s") == ["p1", "p3"]
        with trio.fail_after(TIMEOUT):
            results = [await backend.wait_run(run_id) for run_id in ids]
    assert [r.outcome for r in results] == ["completed", "completed", "cancelled", "completed"]
    assert agent.started == [ids[0], ids[1], ids[3]]


async def test_cancel_run_of_an_ended_or_unknown_run_is_false(autojump_clock):
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
        with trio.fail_after(TIMEOUT):
            done = await backend.run(ws.id, AgentMessage("s", "x"))
        assert backend.cancel_run(done.run_id) is False
        assert backend.cancel_run("nobody") is False
        assert backend.ledger.get(done.run_id) == done  # unchanged
        coordinator = ws.coordinator
        assert isinstance(coordinator, SessionCoordinator)
        assert coordinator.cancel_run("s", "nobody") is False
        assert coordinator.cancel_run("no-session", "nobody") is False
