"""The seams: a coordinator and a store written outside the package, to the protocols alone.

The seed's three dispatcher tests, written against a fake coordinator (one with its own
reservation, no ``SessionCoordinator`` inside), then a whole coordinator and a
whole store from ``tests/`` running under ``Backend`` with every promise intact.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_e2e as e2e
import trio
import trio.testing
from dict_store import DictStore
from outside_coordinator import LockLaneCoordinator, Ticket, plugin, sleepy_agent

from trio_runs import (
    AgentMessage,
    Backend,
    Coordinator,
    EventType,
    NotificationType,
    NotSupported,
    Reservation,
    RunCall,
    RunComplete,
    RunStore,
    SupportsCancelRun,
    SupportsLaneQueries,
    Workspace,
    mark_run_complete_published,
    open_backend,
)
from trio_runs.testing import TerminalRecorder

TIMEOUT = 60  # virtual seconds
HERE = Path(__file__).parent
spawn = e2e.spawn  # the process fixture: everything started is killed in teardown


class ErrorCoordinator:
    """The seed's ``errorCoordinator``: ``run_accepted`` returns ``err``; with ``publish``, it
    first publishes its own failed terminal (store, ``run_completions``, marker), as a
    coordinator whose stream fails after its terminal went out."""

    def __init__(self, workspace: Workspace, err: BaseException | None, publish: bool) -> None:
        self.workspace = workspace
        self.err = err
        self.publish = publish
        self.tickets: list[Ticket] = []

    async def run(self, session_id: str, prompt: str, *, run_id: str = "", attachments=()):
        raise NotImplementedError

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> Ticket:
        ticket = Ticket(session_id, len(self.tickets) + 1)
        self.tickets.append(ticket)
        return ticket

    async def run_accepted(self, accept: Ticket, call: RunCall) -> RunComplete:
        if self.publish:
            rc = RunComplete(call.session_id, call.run_id, error="published by the coordinator")
            self.workspace.ledger.complete(rc)
            self.workspace.run_completions.publish_must_deliver(EventType.UPDATED, rc)
            mark_run_complete_published()
        if self.err is None:
            await trio.sleep_forever()  # until the workspace is torn down
        await trio.lowlevel.checkpoint()
        raise self.err

    def cancel(self, session_id: str) -> None:
        pass

    def cancel_all(self) -> None:
        pass

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


async def with_error_coordinator(
    backend: Backend, err: BaseException | None, *, publish: bool = False
) -> tuple[Workspace, list[ErrorCoordinator]]:
    made: list[ErrorCoordinator] = []

    def factory(workspace: Workspace) -> ErrorCoordinator:
        made.append(ErrorCoordinator(workspace, err, publish))
        return made[-1]

    return await backend.create_workspace("/seed", factory), made


def terminals_of(events: list[Any]) -> list[RunComplete]:
    return [event.payload for event in events]


async def receive_all(sub: Any) -> list[Any]:
    out = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def test_the_fakes_implement_the_protocols_and_nothing_optional(tmp_path):
    coordinator = LockLaneCoordinator(sleepy_agent, DictStore(), None)  # type: ignore[arg-type]
    assert isinstance(coordinator, Coordinator)
    assert not isinstance(coordinator, SupportsCancelRun)
    assert not isinstance(coordinator, SupportsLaneQueries)
    assert isinstance(Ticket("s", 1), Reservation)
    assert isinstance(DictStore(), RunStore)


async def test_seed_pre_run_error_publishes_a_terminal_run_complete(backend, autojump_clock):
    """TestRunAgent_PreRunErrorPublishesTerminalRunComplete: an error from ``run_accepted``
    before the coordinator published still gives the run id its one failed terminal."""
    ws, made = await with_error_coordinator(backend, RuntimeError("update models failed"))
    async with ws.run_completions.subscribe() as sub, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, AgentMessage("S1", "hi", run_id="run-1"))
        with trio.fail_after(TIMEOUT):
            event = await sub.receive()
        rc = event.payload
        assert (rc.run_id, rc.session_id, rc.error, rc.cancelled) == (
            "run-1",
            "S1",
            "update models failed",
            False,
        )
        await trio.testing.wait_all_tasks_blocked()
        assert await receive_all(sub) == []
        [note] = [event.payload for event in await receive_all(notes)]
        assert note.type is NotificationType.AGENT_ERROR
    assert made[0].tickets[0].closed
    assert backend.ledger.get("run-1") == rc


async def test_seed_no_fallback_when_the_coordinator_published(backend, autojump_clock):
    """TestRunAgent_NoFallbackWhenCoordinatorPublished: the coordinator published and marked
    its terminal, then failed; nobody observes a second terminal for the run."""
    ws, made = await with_error_coordinator(
        backend, RuntimeError("stream failed after publishing"), publish=True
    )
    async with ws.run_completions.subscribe() as sub:
        backend.send_message(ws.id, AgentMessage("S1", "hi", run_id="run-1"))
        await trio.testing.wait_all_tasks_blocked()
        [only] = terminals_of(await receive_all(sub))
    assert only.error == "published by the coordinator"
    assert backend.ledger.get("run-1") == only
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert made[0].tickets[0].closed


async def test_seed_cancellation_publishes_no_error_terminal(backend, autojump_clock):
    """TestRunAgent_CancellationPublishesNoErrorTerminal: a run whose ``run_accepted`` ends in
    ``trio.Cancelled`` gets no error terminal and no AGENT_ERROR; it ends cancelled."""
    ws, _ = await with_error_coordinator(backend, None)
    async with ws.run_completions.subscribe() as sub, ws.notifications.subscribe() as notes:
        backend.send_message(ws.id, AgentMessage("S1", "hi", run_id="run-1"))
        await trio.testing.wait_all_tasks_blocked()
        # The fake ignores cancel_all(): with no grace its dispatch task is cancelled outright.
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id, grace=0)
        [only] = terminals_of(await receive_all(sub))
        assert await receive_all(notes) == []
    assert only.outcome == "cancelled"
    assert only.error is None


async def test_an_outside_coordinator_on_an_outside_store_keeps_every_promise(autojump_clock):
    """A coordinator and a store from tests/, to the protocols alone, under ``Backend``:
    completions, failures, session cancels and a close mid-run; every accepted run ends in
    exactly one terminal, seen once by the subscriber and answered to every waiter."""
    store = DictStore()
    rng = random.Random(7)
    async with open_backend(store) as backend:
        ws = await backend.create_workspace("/outside", plugin.coordinator_factory)
        coordinator = ws.coordinator
        assert isinstance(coordinator, LockLaneCoordinator)
        run_ids: list[str] = []
        results: dict[str, RunComplete] = {}

        async def waiter(run_id: str) -> None:
            results[run_id] = await backend.wait_run(run_id)

        async with TerminalRecorder(ws) as recorder, trio.open_nursery() as waiters:
            for step in range(120):
                prompt = rng.choice(["hello", "fail", "sleep 3", "sleep 30"])
                run_id = backend.send_message(ws.id, AgentMessage(f"s{step % 5}", prompt))
                run_ids.append(run_id)
                waiters.start_soon(waiter, run_id)
                if step % 17 == 16:
                    coordinator.cancel(f"s{rng.randrange(5)}")
                await trio.sleep(rng.choice([0, 0.5, 2]))
            with trio.fail_after(TIMEOUT):
                await backend.close_workspace(ws.id, grace=1)
        recorder.assert_exactly_once(run_ids)
        assert {run_id: results[run_id] for run_id in run_ids} == {
            run_id: recorder.terminal_for(run_id) for run_id in run_ids
        }
    outcomes = {rc.outcome for rc in results.values()}
    assert outcomes == {"completed", "failed", "cancelled"}
    stats = store.statistics()
    assert (stats.pending, stats.duplicates_suppressed, stats.accepted_total) == (0, 0, 120)


async def test_a_coordinator_without_cancel_run_gets_a_typed_refusal(autojump_clock):
    """``Backend.cancel_run`` on a coordinator lacking ``SupportsCancelRun``: ``NotSupported``,
    and the run goes on untouched."""
    async with open_backend(DictStore()) as backend:
        ws = await backend.create_workspace("/outside", plugin.coordinator_factory)
        run_id = backend.send_message(ws.id, AgentMessage("s", "sleep 5"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(NotSupported, match="SupportsCancelRun"):
            backend.cancel_run(run_id)
        with trio.fail_after(TIMEOUT):
            assert (await backend.wait_run(run_id)).result == "sleep 5"


async def test_a_factory_returning_a_non_coordinator_is_refused(backend, autojump_clock):
    with pytest.raises(TypeError, match="Coordinator"):
        await backend.create_workspace("/x", lambda ws: object())
    assert backend.workspaces == []


async def test_a_non_store_is_refused_by_open_backend(autojump_clock):
    with pytest.raises(TypeError, match="RunStore"):
        async with open_backend(object()):  # type: ignore[arg-type]
            pass


def test_trio_runs_serve_runs_an_outside_coordinator_on_an_outside_store(spawn, tmp_path):
    """``trio-runs serve --agent outside_coordinator:plugin --store dict_store:DictStore``: the
    real CLI clients get their outcomes through the outside pieces, the optional capability
    it lacks is a 501, and the outside store is what the server counts."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    server = e2e.serve(
        spawn,
        tmp_path,
        "--agent",
        "outside_coordinator:plugin",
        "--store",
        "dict_store:DictStore",
        env=env,
    )
    ok = e2e.client(spawn, *e2e.run(server, "a", "hello", "--run-id", "out-ok"), env=env)
    bad = e2e.client(spawn, *e2e.run(server, "a", "fail", "--run-id", "out-bad"), env=env)
    assert (ok.finish().code, ok.out.strip()) == (0, "hello")
    assert bad.finish().code == 1
    slow = e2e.client(spawn, *e2e.run(server, "b", "sleep 1", "--run-id", "out-slow"), env=env)
    server.wait_state("out-slow", "pending")  # no SupportsLaneQueries: it cannot say more
    refused = server.http.post("/v1/runs/out-slow/cancel")
    assert (refused.status_code, refused.json()["error"]["code"]) == (501, "not_supported")
    assert slow.finish().code == 0
    metrics = server.http.get("/metrics").text.splitlines()
    assert "trio_runs_runs_accepted_total 3.0" in metrics
    assert 'trio_runs_terminals_total{outcome="failed"} 1.0' in metrics
    # DictStore does not measure delivery latency: the histogram is left out, not faked.
    assert not any(line.startswith("trio_runs_terminal_delivery") for line in metrics)


def test_serve_refuses_a_store_spec_that_is_not_a_store(tmp_path):
    for spec, message in (
        ("dict_store:nonzero_outcomes", "failed to make a store"),
        ("dict_store:LedgerStatistics", "failed to make a store"),
        ("outside_coordinator:Plugin", "does not implement RunStore"),
        ("no_such_module:x", "cannot import store module"),
        ("dict_store", "must look like"),
    ):
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        done = subprocess.run(
            [*e2e.CLI, "serve", "--port", "0", "--store", spec],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
