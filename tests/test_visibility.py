"""Visibility follows the store's commit (DESIGN D1, D2), checked on a store whose commits are
held back until the test says so: nobody — a waiter, a subscriber, the service's run view —
sees a terminal the store has decided but not made durable, and a durable submit returns
only once the store says the acceptance is durable."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trio_runs import AgentMessage, RunComplete, RunLedger, SessionCoordinator, open_backend
from trio_runs.http.schema import CreateWorkspace, SubmitMessage
from trio_runs.http.service import RunService
from trio_runs.ledger import OnVisible, RunState
from trio_runs.testing import ScriptedAgent, return_, sleep

TIMEOUT = 60


class CommitLaterStore(RunLedger):
    """A ``RunLedger`` whose terminals and flushes wait for :meth:`commit` (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.uncommitted: dict[str, tuple[RunComplete, OnVisible | None]] = {}
        self.refused = 0
        self.flushes_waiting = 0
        self._committed = trio.Event()

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        if rc.run_id in self.uncommitted or super().state(rc.run_id) == "terminal":
            self.refused += 1
            return False
        self.uncommitted[rc.run_id] = (rc, on_visible)
        return True

    def state(self, run_id: str) -> RunState | None:
        return "ending" if run_id in self.uncommitted else super().state(run_id)

    async def flush(self) -> None:
        self.flushes_waiting += 1
        try:
            await self._committed.wait()
        finally:
            self.flushes_waiting -= 1

    def commit(self) -> None:
        for rc, on_visible in self.uncommitted.values():
            super().complete(rc, on_visible)
        self.uncommitted.clear()
        self._committed.set()
        self._committed = trio.Event()


async def test_no_waiter_or_subscriber_sees_a_terminal_before_its_commit(autojump_clock):
    store = CommitLaterStore()
    agent = ScriptedAgent(sleep(1), return_("done"))
    async with open_backend(store) as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        seen: list[RunComplete] = []
        async with ws.run_completions.subscribe() as sub:
            run_id = backend.send_message(ws.id, AgentMessage("s", "x"))

            async def waiter() -> None:
                seen.append(await backend.wait_run(run_id))

            async with trio.open_nursery() as waiters:
                waiters.start_soon(waiter)
                with trio.fail_after(TIMEOUT):
                    await agent.wait_started(run_id)
                await trio.sleep(5)  # the run ended long ago: decided, not durable
                assert store.state(run_id) == "ending"
                assert store.get(run_id) is None
                assert seen == []
                with pytest.raises(trio.WouldBlock):
                    sub.receive_nowait()
                # The dispatcher's last resort did not take "ending" for "never ended".
                assert store.refused == 0
                store.commit()
            [event] = [sub.receive_nowait()]
        assert event.payload.result == "done"
        assert seen == [event.payload]
        assert store.statistics().duplicates_suppressed == 0


async def test_a_durable_submit_returns_only_after_the_store_flushed(autojump_clock):
    store = CommitLaterStore()
    agent = ScriptedAgent(return_("ok"))
    async with open_backend(store) as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        submitted: list[str] = []

        async def submit() -> None:
            submitted.append(await backend.submit(ws.id, AgentMessage("s", "x", run_id="r1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            await trio.testing.wait_all_tasks_blocked()
            assert store.flushes_waiting == 1
            assert submitted == []  # not acknowledged before the store says durable
            assert store.state("r1") in ("pending", "ending")  # but accepted: it runs
            store.commit()
        assert submitted == ["r1"]
        with trio.fail_after(TIMEOUT):
            assert (await backend.wait_run("r1")).result == "ok"


async def test_a_durable_submit_cancelled_while_flushing_leaves_the_run_accepted(autojump_clock):
    store = CommitLaterStore()
    agent = ScriptedAgent(return_("ok"))
    async with open_backend(store) as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        with trio.move_on_after(1):
            await backend.submit(ws.id, AgentMessage("s", "x", run_id="r1"))
        store.commit()
        with trio.fail_after(TIMEOUT):
            assert (await backend.wait_run("r1")).result == "ok"


async def test_the_service_answers_202_only_after_the_flush_and_hides_ending_runs(
    autojump_clock, tmp_path: Path
):
    store = CommitLaterStore()
    agent = ScriptedAgent(return_("ok"))
    async with open_backend(store) as backend:
        service = RunService(backend, SessionCoordinator.factory(agent), workspace_root=tmp_path)
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        ids: list[str] = []

        async def submit() -> None:
            ids.append(await service.submit(ws.id, SubmitMessage("s", "x", "r1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            await trio.testing.wait_all_tasks_blocked()
            assert ids == []
            view = service.run("r1")  # ended, not durable: shown as not ended
            assert view.terminal is None
            assert view.state not in ("completed", "failed", "cancelled")
            store.commit()
        assert ids == ["r1"]
        assert service.run("r1").state == "completed"


async def test_closing_a_workspace_keeps_its_brokers_until_its_terminals_are_visible(
    autojump_clock,
):
    store = CommitLaterStore()
    agent = ScriptedAgent(return_("done"))
    async with open_backend(store) as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        async with ws.run_completions.subscribe() as sub:
            run_id = backend.send_message(ws.id, AgentMessage("s", "x"))
            await trio.testing.wait_all_tasks_blocked()
            assert store.state(run_id) == "ending"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.close_workspace, ws.id)
                await trio.testing.wait_all_tasks_blocked()
                assert not ws.closed  # waiting for the store, brokers still up
                store.commit()
            with trio.fail_after(TIMEOUT):
                payloads = [event.payload async for event in sub]
        assert [rc.run_id for rc in payloads] == [run_id]
