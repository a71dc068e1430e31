"""``RunService``, the logic behind the HTTP routes, in-process on virtual time.

Each backend refusal maps to its HTTP status and code, and a refused request leaves nothing
accepted or registered; run states go pending → queued/active → outcome; ``wait`` is a
bounded long poll; graceful shutdown gives every run its terminal and then drains.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Backend,
    EventType,
    RunCall,
    RunContext,
    RunLedger,
    RunProgress,
    RunStore,
    SessionCoordinator,
    StoreError,
    open_backend,
)
from trio_runs.agents import demo
from trio_runs.http.metrics import exposition, registry_for
from trio_runs.http.schema import ApiError, CreateWorkspace, SubmitMessage
from trio_runs.http.service import RunService

TIMEOUT = 120  # virtual seconds


_stores: list[RunStore] = []


@pytest.fixture(autouse=True)
def _on_each_store(store: RunStore) -> None:
    # Every test here runs on both stores (tests/conftest.py): service_at opens its backend
    # on the one this test was given.
    _stores[:] = [store]


@asynccontextmanager
async def service_at(root: Path, **kwargs: float) -> AsyncIterator[RunService]:
    with trio.fail_after(TIMEOUT):
        async with open_backend(_stores[0]) as backend:
            yield RunService(backend, demo.coordinator_factory, workspace_root=root, **kwargs)


def scrape(service: RunService) -> str:
    """What ``GET /metrics`` would answer now (Prometheus text format)."""
    body, _ = exposition(registry_for(service), None)
    return body.decode()


@contextmanager
def refused(status: int, code: str) -> Iterator[None]:
    with pytest.raises(ApiError) as info:
        yield
    assert (info.value.status, info.value.code) == (status, code)


async def test_the_same_path_gives_the_same_workspace(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        first, created = await service.create_workspace(CreateWorkspace("project"))
        again, created_again = await service.create_workspace(CreateWorkspace("./project/"))
        assert created
        assert not created_again
        assert first.id == again.id
        assert first.path == os.path.realpath(tmp_path / "project")
        assert [ws.id for ws in service.workspaces()] == [first.id]


@pytest.mark.parametrize("path", ["..", "../elsewhere", "/", "a/../../b"])
async def test_paths_outside_the_root_are_refused(autojump_clock, tmp_path: Path, path: str):
    async with service_at(tmp_path / "root") as service:
        with refused(422, "path_outside_root"):
            await service.create_workspace(CreateWorkspace(path))
        assert service.workspaces() == []


async def test_every_refused_submission_maps_to_its_status_and_registers_nothing(
    autojump_clock, tmp_path: Path
):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        taken = await service.submit(ws.id, SubmitMessage("s", "hello", "taken"))
        assert taken == "taken"
        ledger = service.backend.ledger
        before = ledger.statistics().accepted_total
        cases = [
            ("nope", SubmitMessage("s", "p"), 404, "workspace_not_found"),
            (ws.id, SubmitMessage(" ", "p"), 422, "session_missing"),
            (ws.id, SubmitMessage("s", "  "), 422, "empty_prompt"),
            (ws.id, SubmitMessage("s", "p", "has space"), 422, "invalid_run_id"),
            (ws.id, SubmitMessage("s", "p", "x" * 300), 422, "invalid_run_id"),
            (ws.id, SubmitMessage("s", "p", "taken"), 409, "duplicate_run"),
        ]
        for workspace_id, message, status, code in cases:
            with refused(status, code):
                await service.submit(workspace_id, message)
        assert ledger.statistics().accepted_total == before
        assert ledger.pending_run_ids() == ["taken"] or ledger.state("taken") == "terminal"


async def test_a_workspace_without_an_agent_is_409(autojump_clock, tmp_path: Path):
    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            service = RunService(backend, lambda ws: None, workspace_root=tmp_path)
            ws, _ = await service.create_workspace(CreateWorkspace("w"))
            with refused(409, "agent_not_initialized"):
                await service.submit(ws.id, SubmitMessage("s", "p"))
            with refused(409, "agent_not_initialized"):
                await service.cancel_session(ws.id, "s")
            view = service.session(ws.id, "s")
            assert not view.busy
            assert view.queued == ()


async def test_run_states_from_pending_to_outcome(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        # send_message, not the durable submit (which awaits the store): so that the state
        # before the first run's task started can be seen.
        first = service.backend.send_message(ws.id, AgentMessage("s", "sleep 10"))
        second = service.backend.send_message(ws.id, AgentMessage("s", "queued"))
        # Accepted, its task not started yet; the second already waits behind it.
        assert service.run(first).state == "pending"
        assert service.run(second).state == "queued"
        await trio.testing.wait_all_tasks_blocked()
        assert service.run(first).state == "active"
        assert service.run(second).state == "queued"
        session = service.session(ws.id, "s")
        assert session.busy
        assert session.active == first
        assert [(q.run_id, q.prompt) for q in session.queued] == [(second, "queued")]

        view = await service.wait(first, 1)
        assert view.terminal is None
        assert view.state == "active"
        view = await service.wait(first, 60)
        assert view.state == "completed"
        assert view.terminal is not None
        assert view.terminal.result == "sleep 10"
        done = await service.wait(second, 60)
        assert done.state == "completed"
        # Late waiters are answered at once.
        start = trio.current_time()
        assert (await service.wait(first, 60)).terminal == view.terminal
        assert trio.current_time() == start
        with refused(404, "run_not_found"):
            service.run("never")
        with refused(404, "run_not_found"):
            await service.wait("never", 5)


async def test_cancel_and_clear_queue(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        active = await service.submit(ws.id, SubmitMessage("s", "sleep 100"))
        queued = [await service.submit(ws.id, SubmitMessage("s", f"q{i}")) for i in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        view = await service.clear_queue(ws.id, "s")
        assert view.active == active
        assert view.queued == ()
        for run_id in queued:
            assert service.run(run_id).state == "cancelled"
        await service.cancel_session(ws.id, "s")
        assert (await service.wait(active, 10)).state == "cancelled"
        with refused(404, "workspace_not_found"):
            service.session("nope", "s")


async def test_cancel_run_cancels_that_run_only(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        active = await service.submit(ws.id, SubmitMessage("s", "sleep 100"))
        queued = [await service.submit(ws.id, SubmitMessage("s", f"q{i}")) for i in range(2)]
        other = await service.submit(ws.id, SubmitMessage("t", "sleep 5"))
        await trio.testing.wait_all_tasks_blocked()
        # A queued run ends at once, and leaves the queue; the rest of the lane stays.
        view = await service.cancel_run(queued[0])
        assert view.state == "cancelled"
        assert view.terminal is not None
        assert view.terminal.cancelled
        lane = service.session(ws.id, "s")
        assert lane.active == active
        assert [q.run_id for q in lane.queued] == [queued[1]]
        # An active run ends at its agent's next checkpoint; the one behind it then runs.
        start = trio.current_time()
        assert (await service.cancel_run(active)).state == "active"
        assert (await service.wait(active, 10)).state == "cancelled"
        assert trio.current_time() == start
        done = await service.wait(queued[1], 10)
        assert (done.state, done.terminal and done.terminal.result) == ("completed", "q1")
        assert (await service.wait(other, 10)).state == "completed"
        # An ended run is left as it is: cancelling it again just reports its terminal.
        for run_id in (queued[0], active, queued[1], other):
            before = service.run(run_id)
            assert await service.cancel_run(run_id) == before
        with refused(404, "run_not_found"):
            await service.cancel_run("never")
        assert service.backend.ledger.statistics().duplicates_suppressed == 0


async def test_cancel_run_during_shutdown_reports_the_terminal(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        run_id = await service.submit(ws.id, SubmitMessage("s", "sleep 100"))
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.shutdown, 30)
            await trio.testing.wait_all_tasks_blocked()
            assert service.draining
            start = trio.current_time()
            # Not refused (it starts no work), and the terminal it reports counts as collected.
            view = await service.cancel_run(run_id)
            assert view.state == "cancelled"
        assert trio.current_time() - start < 30


async def test_closing_a_workspace_ends_its_runs_and_keeps_its_counters(
    autojump_clock, tmp_path: Path
):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        runs = [await service.submit(ws.id, SubmitMessage(f"s{i}", "sleep 100")) for i in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        workspace = service.workspace(ws.id)
        async with workspace.events.subscribe():
            # A subscriber that never reads: the 5 events past its buffer are dropped.
            for i in range(int(workspace.events.buffer_size) + 5):
                workspace.events.publish(EventType.CREATED, RunProgress("s0", runs[0], i))
        assert workspace.events.drop_count == 5
        closed = await service.close_workspace(ws.id)
        assert closed.closing
        assert {service.run(r).state for r in runs} == {"cancelled"}
        with refused(404, "workspace_not_found"):
            await service.close_workspace(ws.id)
        text = scrape(service)
        assert "trio_runs_lossy_events_dropped_total 5.0\n" in text
        assert 'trio_runs_terminals_total{outcome="cancelled"} 3.0\n' in text
        assert "trio_runs_workspaces 0.0\n" in text


async def test_metrics_count_runs_by_state(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        await service.submit(ws.id, SubmitMessage("a", "sleep 100"))
        await service.submit(ws.id, SubmitMessage("a", "later"))
        await service.submit(ws.id, SubmitMessage("b", "sleep 100"))
        await trio.testing.wait_all_tasks_blocked()
        text = scrape(service)
        for line in (
            "trio_runs_runs_accepted_total 3.0",
            "trio_runs_runs_pending 3.0",
            "trio_runs_runs_active 2.0",
            "trio_runs_runs_queued 1.0",
            "trio_runs_duplicate_terminals_suppressed_total 0.0",
            "trio_runs_workspaces 1.0",
        ):
            assert f"\n{line}\n" in text
        await service.cancel_session(ws.id, "a")
        await service.cancel_session(ws.id, "b")


async def test_shutdown_ends_every_run_then_drains_until_collected(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path, close_grace=5) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        runs = [await service.submit(ws.id, SubmitMessage(f"s{i}", "sleep 100")) for i in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        collected: list[str] = []

        async def client(run_id: str) -> None:
            view = await service.wait(run_id, 60)
            collected.append(view.state)

        async with trio.open_nursery() as nursery:
            for run_id in runs:
                nursery.start_soon(client, run_id)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await service.shutdown(drain=30)
            # Both terminals were collected by the waiting clients: no need to drain on.
            assert trio.current_time() - start < 30
        assert collected == ["cancelled", "cancelled"]
        assert service.draining
        with refused(503, "shutting_down"):
            await service.submit(ws.id, SubmitMessage("s", "p"))
        with refused(503, "shutting_down"):
            await service.create_workspace(CreateWorkspace("other"))


async def test_shutdown_drain_is_bounded_when_nobody_collects(autojump_clock, tmp_path: Path):
    async with service_at(tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        run_id = await service.submit(ws.id, SubmitMessage("s", "sleep 100"))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await service.shutdown(drain=3)
        assert trio.current_time() - start == pytest.approx(3)
        assert service.run(run_id).state == "cancelled"


async def test_custom_coordinators_without_run_id_queries(autojump_clock, tmp_path: Path):
    class Plain(SessionCoordinator):
        active_run_id = None  # type: ignore[assignment]
        queued_run_ids = None  # type: ignore[assignment]

    async def agent(call: RunCall, ctx: RunContext) -> object:
        await trio.sleep(10)
        return None

    def factory(backend_ws: object) -> Plain:
        from trio_runs import Workspace

        assert isinstance(backend_ws, Workspace)
        return Plain(agent, run_completions=backend_ws.run_completions, ledger=backend_ws.ledger)

    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            assert isinstance(backend, Backend)
            service = RunService(backend, factory, workspace_root=tmp_path)
            ws, _ = await service.create_workspace(CreateWorkspace("w"))
            first = await service.submit(ws.id, SubmitMessage("s", "one"))
            await service.submit(ws.id, SubmitMessage("s", "two"))
            await trio.testing.wait_all_tasks_blocked()
            assert service.run(first).state == "pending"  # cannot tell, says so honestly
            view = service.session(ws.id, "s")
            assert view.active is None
            assert [q.prompt for q in view.queued] == ["two"]
            assert [q.run_id for q in view.queued] == [""]


class FailingDiskStore(RunLedger):
    """A store whose disk fails: acceptances are refused, or (``flush_fails``) not made durable."""

    def __init__(self, *, flush_fails: bool = False) -> None:
        super().__init__()
        self.flush_fails = flush_fails

    def accept(self, run_id: str, session_id: str) -> None:
        if not self.flush_fails:
            raise StoreError("the disk is failing")
        super().accept(run_id, session_id)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.flush_fails:
            raise StoreError("the disk is failing")


@pytest.mark.parametrize("flush_fails", [False, True])
async def test_a_failing_store_is_a_503_and_nothing_is_acknowledged(
    autojump_clock, tmp_path: Path, flush_fails: bool
):
    store = FailingDiskStore(flush_fails=flush_fails)
    async with open_backend(store) as backend:
        service = RunService(backend, demo.coordinator_factory, workspace_root=tmp_path)
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        with refused(503, "store_unavailable"):
            await service.submit(ws.id, SubmitMessage("s", "hello", "r1"))
        if not flush_fails:  # refused before anything was recorded
            assert store.state("r1") is None
            assert store.statistics().accepted_total == 0
