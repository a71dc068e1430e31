"""``Backend``, ``Workspace`` and ``open_backend``: the registry, submission, waiting, closing.

Everything runs on the virtual clock; every wait is bounded with ``trio.fail_after`` so a
regression fails instead of hanging, and "let it settle" is ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import uuid
from typing import Any

import pytest
import trio
import trio.testing
from dict_store import nonzero_outcomes

from trio_runs import (
    AgentMessage,
    AgentNotInitialized,
    Attachment,
    Backend,
    BackendClosed,
    Broker,
    DuplicateRun,
    EmptyPrompt,
    Event,
    InvalidRunId,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    SessionMissing,
    Subscription,
    TrioRunsError,
    UnknownRun,
    Workspace,
    WorkspaceClosing,
    WorkspaceNotFound,
    open_backend,
)

TIMEOUT = 60  # virtual seconds


# -- helpers -------------------------------------------------------------------------------


class GatedAgent:
    """An agent whose runs block until :attr:`release` is set; records what happened.

    ``shield_cleanup`` makes a cancelled run spend that many seconds in a shielded cleanup
    before its cancellation is honoured (an agent that ignores cancellation for a while).
    """

    def __init__(self, shield_cleanup: float = 0.0) -> None:
        self.shield_cleanup = shield_cleanup
        self.release = trio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.calls: list[RunCall] = []

    async def __call__(self, call: RunCall, ctx: RunContext) -> str:
        self.started.append(call.run_id)
        self.calls.append(call)
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled.append(call.run_id)
            if self.shield_cleanup:
                with trio.CancelScope(shield=True):
                    await trio.sleep(self.shield_cleanup)
            raise
        return f"done: {call.prompt}"


async def quick_agent(call: RunCall, ctx: RunContext) -> str:
    await trio.sleep(1)
    return f"answer to {call.prompt}"


async def failing_agent(call: RunCall, ctx: RunContext) -> str:
    await trio.sleep(1)
    raise RuntimeError(f"agent failed on {call.prompt}")


def drain(sub: Subscription[Any]) -> list[Event[Any]]:
    """Everything queued for ``sub`` right now."""
    out: list[Event[Any]] = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def collect_until_end(sub: Subscription[Any]) -> list[Any]:
    """Every payload until the subscription ends (the broker shut down); bounded."""
    with trio.fail_after(TIMEOUT):
        return [event.payload async for event in sub]


def msg(session_id: str = "s1", prompt: str = "hi", run_id: str = "", **kw: Any) -> AgentMessage:
    return AgentMessage(session_id=session_id, prompt=prompt, run_id=run_id, **kw)


# ``backend`` (tests/conftest.py) runs every test here on both stores: ``RunLedger`` and the
# independently written ``DictStore``.


class CountingFactory:
    """A ``coordinator_factory`` that counts calls and records the workspaces it was given."""

    def __init__(self, agent: Any = quick_agent) -> None:
        self.agent = agent
        self.workspaces: list[Workspace] = []

    def __call__(self, workspace: Workspace) -> SessionCoordinator:
        self.workspaces.append(workspace)
        return SessionCoordinator.factory(self.agent)(workspace)


# -- create_workspace / get_workspace ----------------------------------------------------------


async def test_same_resolved_path_gives_the_same_workspace(
    backend, tmp_path, monkeypatch, autojump_clock
):
    """str, Path, a relative path, a non-normalised one and a symlink all name one workspace;
    the factory is called only for the first."""
    project = tmp_path / "project"
    project.mkdir()
    link = tmp_path / "link"
    link.symlink_to(project, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    factory = CountingFactory()

    ws = await backend.create_workspace(project, factory)
    aliases: list[str | os.PathLike[str]] = [
        str(project),
        project,
        "project",
        pathlib.Path("project"),
        str(tmp_path / "project" / ".." / "project") + os.sep,
        link,
        str(link),
        "link",
    ]
    for alias in aliases:
        assert await backend.create_workspace(alias, factory) is ws, alias
    assert len(factory.workspaces) == 1
    assert backend.workspaces == [ws]


async def test_different_paths_give_different_workspaces(backend, tmp_path, autojump_clock):
    factory = CountingFactory()
    a = await backend.create_workspace(tmp_path / "a", factory)
    b = await backend.create_workspace(tmp_path / "b", factory)
    assert a is not b
    assert isinstance(a.id, str)
    assert isinstance(b.id, str)
    assert a.id != b.id
    assert backend.get_workspace(a.id) is a
    assert backend.get_workspace(b.id) is b
    assert set(backend.workspaces) == {a, b}
    assert factory.workspaces == [a, b]


async def test_factory_is_called_synchronously_with_the_ready_workspace(
    backend, tmp_path, autojump_clock
):
    """The factory runs in the caller's task, before create_workspace returns, with the new
    workspace whose brokers and (the backend's) ledger already exist."""
    caller = trio.lowlevel.current_task()
    seen: dict[str, Any] = {}

    def factory(workspace: Workspace) -> SessionCoordinator:
        seen["task"] = trio.lowlevel.current_task()
        seen["workspace"] = workspace
        assert isinstance(workspace, Workspace)
        assert isinstance(workspace.id, str)
        assert isinstance(workspace.run_completions, Broker)
        assert isinstance(workspace.notifications, Broker)
        assert isinstance(workspace.events, Broker)
        assert workspace.ledger is backend.ledger
        assert not workspace.closing
        coordinator = SessionCoordinator(
            quick_agent,
            run_completions=workspace.run_completions,
            ledger=workspace.ledger,
            events=workspace.events,
        )
        seen["coordinator"] = coordinator
        return coordinator

    ws = await backend.create_workspace(tmp_path, factory)
    assert seen["task"] is caller
    assert seen["workspace"] is ws
    assert ws.coordinator is seen["coordinator"]
    uuid.UUID(ws.id)  # a UUID string
    with trio.fail_after(TIMEOUT):
        rc = await backend.run(ws.id, msg(prompt="q"))
    assert rc.result == "answer to q"


async def test_factory_returning_none_makes_a_workspace_without_agent(
    backend, tmp_path, autojump_clock
):
    ws = await backend.create_workspace(tmp_path, lambda workspace: None)
    assert ws.coordinator is None
    assert backend.get_workspace(ws.id) is ws
    with pytest.raises(AgentNotInitialized):
        backend.send_message(ws.id, msg(run_id="r1"))
    assert backend.ledger.statistics().accepted_total == 0
    assert backend.ledger.state("r1") is None
    assert ws.run_ids == frozenset()
    with trio.fail_after(TIMEOUT):
        await backend.close_workspace(ws.id)
    assert ws.closed


async def test_factory_raising_registers_nothing_and_retry_works(backend, tmp_path, autojump_clock):
    other = await backend.create_workspace(tmp_path / "other", CountingFactory())
    given: list[Workspace] = []

    class FactoryError(Exception):
        pass

    def bad_factory(workspace: Workspace) -> SessionCoordinator:
        given.append(workspace)
        raise FactoryError("no model configured")

    with pytest.raises(FactoryError):
        await backend.create_workspace(tmp_path / "p", bad_factory)
    assert backend.workspaces == [other]
    with pytest.raises(WorkspaceNotFound):
        backend.get_workspace(given[0].id)

    factory = CountingFactory()
    ws = await backend.create_workspace(tmp_path / "p", factory)
    assert factory.workspaces == [ws]
    assert ws.id != given[0].id
    assert set(backend.workspaces) == {other, ws}
    with trio.fail_after(TIMEOUT):
        assert (await backend.run(ws.id, msg())).outcome == "completed"


async def test_factory_returning_a_non_coordinator_registers_nothing(
    backend, tmp_path, autojump_clock
):
    with pytest.raises(TypeError, match="Coordinator"):
        await backend.create_workspace(tmp_path, lambda workspace: object())
    assert backend.workspaces == []
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    assert backend.workspaces == [ws]


class BytesPath:
    """An ``os.PathLike`` whose path is bytes, not text."""

    def __fspath__(self) -> bytes:
        return b"/tmp/bytes-path"


@pytest.mark.parametrize(
    "bad",
    [None, 42, 3.5, b"/tmp/bytes-path", ["a"], BytesPath()],
    ids=["none", "int", "float", "bytes", "list", "bytes-pathlike"],
)
async def test_bad_path_type_raises_type_error(backend, bad, autojump_clock):
    factory = CountingFactory()
    with pytest.raises(TypeError):
        await backend.create_workspace(bad, factory)
    assert factory.workspaces == []
    assert backend.workspaces == []


async def test_empty_path_raises_value_error(backend, autojump_clock):
    factory = CountingFactory()
    with pytest.raises(ValueError, match="empty"):
        await backend.create_workspace("", factory)
    assert factory.workspaces == []
    assert backend.workspaces == []


async def test_get_workspace_unknown_id_raises(backend, tmp_path, autojump_clock):
    await backend.create_workspace(tmp_path, CountingFactory())
    with pytest.raises(WorkspaceNotFound):
        backend.get_workspace("no-such-workspace")
    with pytest.raises(WorkspaceNotFound):
        backend.get_workspace(str(uuid.uuid4()))


# -- send_message ---------------------------------------------------------------------------------


def snapshot(backend: Backend, ws: Workspace, sessions: list[str], run_ids: list[str]) -> Any:
    """Everything a refused ``send_message`` must leave untouched."""
    ledger = backend.ledger
    coordinator = ws.coordinator
    state: dict[str, Any] = {
        "pending": ledger.statistics().pending,
        "accepted_total": ledger.statistics().accepted_total,
        "terminals": ledger.statistics().retained,
        "pending_ids": ledger.pending_run_ids(),
        "ids": {run_id: ledger.state(run_id) for run_id in run_ids},
        "ws_runs": ws.run_ids,
    }
    if coordinator is not None:
        state["busy"] = coordinator.is_busy()
        state["sessions"] = {
            s: (
                coordinator.is_session_busy(s),
                coordinator.queued_prompts(s),
                coordinator.queued_prompts_list(s),
            )
            for s in sessions
        }
        if isinstance(coordinator, SessionCoordinator):
            state["session_count"] = coordinator.session_count
            state["active"] = {s: coordinator.active_run_id(s) for s in sessions}
    return state


async def test_send_message_is_sync_and_returns_the_run_id(backend, tmp_path, autojump_clock):
    """A caller-supplied run id is kept; otherwise a fresh UUID4 string is minted."""
    assert not inspect.iscoroutinefunction(Backend.send_message)
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    assert backend.send_message(ws.id, msg(run_id="my-run")) == "my-run"
    minted = backend.send_message(ws.id, msg())
    assert isinstance(minted, str)
    assert uuid.UUID(minted).version == 4
    assert str(uuid.UUID(minted)) == minted
    other = backend.send_message(ws.id, msg())
    assert other != minted
    # Accepted synchronously: registered in the ledger before any checkpoint.
    assert {backend.ledger.state(r) for r in ("my-run", minted, other)} == {"pending"}
    assert ws.run_ids == {"my-run", minted, other}
    with trio.fail_after(TIMEOUT):
        rcs = [await backend.wait_run(r) for r in ("my-run", minted, other)]
    assert [rc.run_id for rc in rcs] == ["my-run", minted, other]
    assert all(rc.outcome == "completed" for rc in rcs)


REFUSED = [
    pytest.param(msg(prompt=""), EmptyPrompt, id="empty-prompt"),
    pytest.param(msg(prompt=" \t\n "), EmptyPrompt, id="whitespace-prompt"),
    pytest.param(
        msg(prompt="", attachments=(Attachment("blob.bin", b"\x00\x01\x02"),)),
        EmptyPrompt,
        id="binary-only-attachment",
    ),
    pytest.param(
        msg(prompt=" ", attachments=(Attachment.text("blank.txt", "  \n"),)),
        EmptyPrompt,
        id="blank-text-attachment",
    ),
    pytest.param(msg(session_id=""), SessionMissing, id="empty-session"),
    pytest.param(msg(session_id="  \t"), SessionMissing, id="blank-session"),
    pytest.param(msg(session_id="s2", run_id="has space"), InvalidRunId, id="space-in-run-id"),
    pytest.param(msg(session_id="s2", run_id="tab\tid"), InvalidRunId, id="tab-in-run-id"),
    pytest.param(msg(session_id="s2", run_id="   "), InvalidRunId, id="blank-run-id"),
    pytest.param(msg(session_id="s2", run_id="nl\n"), InvalidRunId, id="newline-in-run-id"),
    pytest.param(msg(session_id="s2", run_id="x" * 257), InvalidRunId, id="run-id-too-long"),
    pytest.param(msg(run_id="active-run"), DuplicateRun, id="duplicate-of-active-run"),
    pytest.param(msg(session_id="s2", run_id="queued-run"), DuplicateRun, id="dup-queued"),
    pytest.param(msg(session_id="s3", run_id="finished-run"), DuplicateRun, id="dup-finished"),
    pytest.param({"session_id": "s1", "prompt": "hi"}, TypeError, id="dict-not-message"),
    pytest.param("hi", TypeError, id="str-not-message"),
    pytest.param(None, TypeError, id="none-not-message"),
]


@pytest.mark.parametrize(("bad_msg", "error"), REFUSED)
async def test_refused_send_message_leaves_no_trace(
    backend, tmp_path, bad_msg, error, autojump_clock
):
    """Each refusal is raised synchronously and reserves, registers and starts nothing.

    The workspace is busy when it happens (one finished run, one active run and one queued
    run in session s1), so any stray reservation or registration would show.
    """
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    with trio.fail_after(TIMEOUT):
        agent.release.set()
        await backend.run(ws.id, msg(session_id="s3", run_id="finished-run"))
    agent.release = trio.Event()
    backend.send_message(ws.id, msg(run_id="active-run", prompt="first"))
    backend.send_message(ws.id, msg(run_id="queued-run", prompt="second"))
    await trio.testing.wait_all_tasks_blocked()
    assert ws.coordinator.active_run_id("s1") == "active-run"
    assert ws.coordinator.queued_prompts("s1") == 1

    sessions = ["s1", "s2", "s3", "  \t", ""]
    run_ids = ["active-run", "queued-run", "finished-run"]
    if isinstance(bad_msg, AgentMessage) and isinstance(bad_msg.run_id, str):
        run_ids.append(bad_msg.run_id)
    before = snapshot(backend, ws, sessions, run_ids)

    with pytest.raises(error):
        backend.send_message(ws.id, bad_msg)

    assert snapshot(backend, ws, sessions, run_ids) == before
    await trio.testing.wait_all_tasks_blocked()
    assert snapshot(backend, ws, sessions, run_ids) == before
    assert agent.started == ["finished-run", "active-run"]

    # The workspace is unharmed: the runs it had go on to complete.
    agent.release.set()
    with trio.fail_after(TIMEOUT):
        assert (await backend.wait_run("queued-run")).result == "done: second"


async def test_send_to_unknown_workspace_raises_workspace_not_found(
    backend, tmp_path, autojump_clock
):
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    before = snapshot(backend, ws, ["s1"], ["r1"])
    with pytest.raises(WorkspaceNotFound):
        backend.send_message("no-such-workspace", msg(run_id="r1"))
    assert snapshot(backend, ws, ["s1"], ["r1"]) == before


async def test_blank_prompt_with_a_text_attachment_is_accepted(backend, tmp_path, autojump_clock):
    agent = GatedAgent()
    agent.release.set()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    notes = Attachment.text("notes.md", "summarise this", mime_type="text/markdown")
    run_id = backend.send_message(ws.id, msg(prompt="  ", attachments=(notes,)))
    with trio.fail_after(TIMEOUT):
        rc = await backend.wait_run(run_id)
    assert rc.outcome == "completed"
    assert agent.calls[0].attachments == (notes,)
    assert agent.calls[0].run_id == run_id


async def test_send_while_closing_raises_workspace_closing_and_leaves_no_trace(
    backend, tmp_path, autojump_clock
):
    """While a close is in progress (an agent is busy in a shielded cleanup), sends are refused
    with WorkspaceClosing and change nothing; once closed, the workspace is not found."""
    agent = GatedAgent(shield_cleanup=5)
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    backend.send_message(ws.id, msg(run_id="active"))
    await trio.testing.wait_all_tasks_blocked()
    assert agent.started == ["active"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.close_workspace, ws.id)
        await trio.testing.wait_all_tasks_blocked()
        assert ws.closing
        assert not ws.closed
        assert agent.cancelled == ["active"]  # in its shielded cleanup now

        before = snapshot(backend, ws, ["s1", "s2"], ["active", "late"])
        with pytest.raises(WorkspaceClosing):
            backend.send_message(ws.id, msg(session_id="s2", run_id="late"))
        with pytest.raises(WorkspaceClosing):
            backend.send_message(ws.id, msg(run_id="late"))
        assert snapshot(backend, ws, ["s1", "s2"], ["active", "late"]) == before
        with pytest.raises(WorkspaceClosing):
            await backend.create_workspace(tmp_path, CountingFactory())

    assert ws.closed
    with pytest.raises(WorkspaceNotFound):
        backend.send_message(ws.id, msg(run_id="later"))
    assert backend.ledger.state("late") is None
    assert backend.ledger.state("later") is None
    assert backend.ledger.get("active") == RunComplete("s1", "active", cancelled=True)


# -- wait_run / run -------------------------------------------------------------------------------


async def test_late_waiter_gets_the_terminal_at_once(backend, tmp_path, autojump_clock):
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    run_id = backend.send_message(ws.id, msg(prompt="q"))
    with trio.fail_after(TIMEOUT):
        first = await backend.wait_run(run_id)
    await trio.sleep(100)
    start = trio.current_time()
    with trio.fail_after(TIMEOUT):
        late = await backend.wait_run(run_id)
    assert trio.current_time() == start
    assert late == first == RunComplete("s1", run_id, result="answer to q")


async def test_wait_run_unknown_id_raises_unknown_run(backend, autojump_clock):
    with trio.fail_after(TIMEOUT), pytest.raises(UnknownRun):
        await backend.wait_run("never-accepted")


async def test_many_concurrent_waiters_each_get_the_terminal_once(
    backend, tmp_path, autojump_clock
):
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    run_id = backend.send_message(ws.id, msg(prompt="shared"))
    got: list[tuple[int, RunComplete]] = []

    async def waiter(i: int) -> None:
        got.append((i, await backend.wait_run(run_id)))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            agent.release.set()
    assert sorted(i for i, _ in got) == list(range(50))
    first = got[0][1]
    assert first == RunComplete("s1", run_id, result="done: shared")
    assert all(rc is first for _, rc in got)


async def test_backend_run_returns_the_completed_terminal(backend, tmp_path, autojump_clock):
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    with trio.fail_after(TIMEOUT):
        rc = await backend.run(ws.id, msg(prompt="q", run_id="r1"))
    assert rc == RunComplete("s1", "r1", result="answer to q")
    assert backend.ledger.get("r1") == rc


async def test_backend_run_returns_a_failed_terminal_instead_of_raising(
    backend, tmp_path, autojump_clock
):
    ws = await backend.create_workspace(tmp_path, CountingFactory(failing_agent))
    with trio.fail_after(TIMEOUT):
        rc = await backend.run(ws.id, msg(prompt="q"))
    assert rc.outcome == "failed"
    assert rc.error == "agent failed on q"
    assert not ws.closing
    with trio.fail_after(TIMEOUT):
        assert (await backend.run(ws.id, msg(prompt="again"))).outcome == "failed"


async def test_backend_run_raises_what_send_message_raises(backend, tmp_path, autojump_clock):
    ws = await backend.create_workspace(tmp_path, CountingFactory())
    with trio.fail_after(TIMEOUT), pytest.raises(EmptyPrompt):
        await backend.run(ws.id, msg(prompt=""))
    assert backend.ledger.statistics().accepted_total == 0


# -- close_workspace ------------------------------------------------------------------------------


async def test_close_gives_active_queued_and_just_accepted_runs_one_cancelled_terminal(
    backend, tmp_path, autojump_clock
):
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg(run_id="active-1"))
        backend.send_message(ws.id, msg(run_id="queued-1"))
        backend.send_message(ws.id, msg(session_id="s2", run_id="active-2"))
        await trio.testing.wait_all_tasks_blocked()
        assert ws.coordinator.queued_run_ids("s1") == ["queued-1"]
        # Accepted right before the close, with no checkpoint in between.
        backend.send_message(ws.id, msg(run_id="just-1"))
        backend.send_message(ws.id, msg(session_id="s3", run_id="just-3"))
        start = trio.current_time()
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id)
        assert trio.current_time() == start  # cooperative agents: no grace period needed
        payloads = await collect_until_end(terminals)  # ends: the broker shut down

    run_ids = ["active-1", "queued-1", "active-2", "just-1", "just-3"]
    assert sorted(rc.run_id for rc in payloads) == sorted(run_ids)
    assert all(rc.cancelled and rc.error is None for rc in payloads)
    for rc in payloads:
        assert backend.ledger.get(rc.run_id) == rc
    assert nonzero_outcomes(backend.ledger) == {"cancelled": 5}
    assert backend.ledger.statistics().pending == 0
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert sorted(agent.started) == ["active-1", "active-2"]  # the others never started
    assert sorted(agent.cancelled) == ["active-1", "active-2"]
    assert ws.closed
    assert ws.run_ids == frozenset()
    assert ws.run_completions.is_shut_down
    assert ws.notifications.is_shut_down
    assert ws.events.is_shut_down
    assert backend.workspaces == []
    with pytest.raises(WorkspaceNotFound):
        backend.get_workspace(ws.id)
    with pytest.raises(WorkspaceNotFound):
        backend.send_message(ws.id, msg())


async def test_subscribers_drain_queued_terminals_before_their_iteration_ends(
    backend, tmp_path, autojump_clock
):
    """A subscriber that did not read during the close still gets every terminal, then ends."""
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    async with ws.run_completions.subscribe() as terminals:
        agent.release.set()
        with trio.fail_after(TIMEOUT):
            await backend.run(ws.id, msg(run_id="done-before"))
        agent.release = trio.Event()
        backend.send_message(ws.id, msg(run_id="cut-short"))
        with trio.fail_after(TIMEOUT):
            await backend.close_workspace(ws.id)
        assert terminals.backlog == 2
        payloads = await collect_until_end(terminals)
    assert [(rc.run_id, rc.outcome) for rc in payloads] == [
        ("done-before", "completed"),
        ("cut-short", "cancelled"),
    ]


async def test_close_waits_for_an_agent_that_ignores_cancellation_for_a_while(
    backend, tmp_path, autojump_clock
):
    """An agent shielded for 5 s past a grace of 2 s: the close cannot cut a shield short, so
    it ends when the shield does, with every run terminal (the queued one at once)."""
    agent = GatedAgent(shield_cleanup=5)
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    backend.send_message(ws.id, msg(run_id="stubborn"))
    backend.send_message(ws.id, msg(run_id="queued"))
    await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        done = trio.Event()

        async def close() -> None:
            await backend.close_workspace(ws.id, grace=2)
            done.set()

        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.ledger.get("queued") == RunComplete("s1", "queued", cancelled=True)
        assert backend.ledger.state("stubborn") == "pending"
        with trio.fail_after(TIMEOUT):
            await done.wait()
        assert trio.current_time() - start == 5

    assert ws.closed
    assert backend.ledger.get("stubborn") == RunComplete("s1", "stubborn", cancelled=True)
    assert backend.ledger.statistics().pending == 0


class IgnoringCoordinator(SessionCoordinator):
    """A coordinator whose ``cancel_all`` does nothing (so only the grace deadline helps)."""

    def cancel_all(self) -> None:
        pass


async def test_close_cuts_off_runs_after_grace_when_cancel_all_is_ignored(
    backend, tmp_path, autojump_clock
):
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, IgnoringCoordinator.factory(agent))
    backend.send_message(ws.id, msg(run_id="a"))
    backend.send_message(ws.id, msg(run_id="q"))
    backend.send_message(ws.id, msg(session_id="s2", run_id="b"))
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    with trio.fail_after(TIMEOUT):
        await backend.close_workspace(ws.id, grace=3)
    assert trio.current_time() - start == 3
    for run_id, session in [("a", "s1"), ("q", "s1"), ("b", "s2")]:
        assert backend.ledger.get(run_id) == RunComplete(session, run_id, cancelled=True)
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert ws.closed


async def test_closing_twice_concurrently_is_fine(backend, tmp_path, autojump_clock):
    agent = GatedAgent(shield_cleanup=1)
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    async with ws.run_completions.subscribe() as terminals:
        backend.send_message(ws.id, msg(run_id="r1"))
        backend.send_message(ws.id, msg(session_id="s2", run_id="r2"))
        await trio.testing.wait_all_tasks_blocked()
        closed: list[int] = []

        async def close(i: int) -> None:
            await backend.close_workspace(ws.id)
            assert ws.closed
            closed.append(i)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close, 1)
                nursery.start_soon(close, 2)
        payloads = await collect_until_end(terminals)
    assert sorted(closed) == [1, 2]
    assert sorted((rc.run_id, rc.outcome) for rc in payloads) == [
        ("r1", "cancelled"),
        ("r2", "cancelled"),
    ]
    assert backend.ledger.statistics().duplicates_suppressed == 0
    with pytest.raises(WorkspaceNotFound):
        await backend.close_workspace(ws.id)


async def test_same_path_can_be_created_again_after_close(backend, tmp_path, autojump_clock):
    factory = CountingFactory()
    first = await backend.create_workspace(tmp_path, factory)
    with trio.fail_after(TIMEOUT):
        await backend.close_workspace(first.id)
    second = await backend.create_workspace(str(tmp_path), factory)
    assert second is not first
    assert second.id != first.id
    assert factory.workspaces == [first, second]
    assert backend.workspaces == [second]
    with trio.fail_after(TIMEOUT):
        assert (await backend.run(second.id, msg(prompt="q"))).result == "answer to q"


# -- open_backend -------------------------------------------------------------------------------


class TaskTracker(trio.abc.Instrument):
    """Records tasks spawned while installed and which of them have exited."""

    def __init__(self) -> None:
        self.live: set[trio.lowlevel.Task] = set()
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.live.add(task)
        self.spawned += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.live.discard(task)


async def start_mixed_runs(backend: Backend, tmp_path: pathlib.Path, agent: GatedAgent) -> list:
    """Two workspaces with active, queued and just-accepted runs; returns the run ids."""
    ws1 = await backend.create_workspace(tmp_path / "one", CountingFactory(agent))
    ws2 = await backend.create_workspace(tmp_path / "two", CountingFactory(agent))
    ids = [
        backend.send_message(ws1.id, msg(run_id="w1-active")),
        backend.send_message(ws1.id, msg(run_id="w1-queued")),
        backend.send_message(ws2.id, msg(run_id="w2-active")),
    ]
    await trio.testing.wait_all_tasks_blocked()
    ids.append(backend.send_message(ws1.id, msg(run_id="w1-just")))
    ids.append(backend.send_message(ws2.id, msg(session_id="s9", run_id="w2-just")))
    return ids


async def test_leaving_open_backend_normally_closes_every_workspace_gracefully(
    tmp_path, autojump_clock
):
    agent = GatedAgent()
    tracker = TaskTracker()
    trio.lowlevel.add_instrument(tracker)
    try:
        with trio.fail_after(TIMEOUT):
            async with open_backend() as backend:
                ids = await start_mixed_runs(backend, tmp_path, agent)
                workspaces = backend.workspaces
                start = trio.current_time()
    finally:
        trio.lowlevel.remove_instrument(tracker)
    assert trio.current_time() == start  # graceful: the agents honoured the cancellation
    assert tracker.spawned > 0
    assert tracker.live == set()  # no task outlived the block
    # The graceful close cancelled the active runs (a run accepted just before leaving the
    # block may have become active before the close began: then it was cancelled too).
    assert {"w1-active", "w2-active"} <= set(agent.started)
    assert sorted(agent.cancelled) == sorted(agent.started)
    assert "w1-queued" not in agent.started
    for run_id in ids:
        assert backend.ledger.get(run_id).outcome == "cancelled", run_id
    assert backend.ledger.statistics().pending == 0
    assert backend.ledger.statistics().duplicates_suppressed == 0
    assert len(workspaces) == 2
    assert all(ws.closed for ws in workspaces)
    assert all(ws.run_completions.is_shut_down for ws in workspaces)
    assert backend.workspaces == []
    with pytest.raises(BackendClosed):
        await backend.create_workspace(tmp_path / "three", CountingFactory())


class BodyError(Exception):
    pass


class BodyInterrupt(BaseException):
    pass


@pytest.mark.parametrize("error_type", [BodyError, BodyInterrupt])
async def test_leaving_open_backend_with_an_exception_reraises_it_unwrapped(
    tmp_path, error_type, autojump_clock
):
    """The block's exception comes out as itself (not an ExceptionGroup); every accepted run
    still has its one cancelled terminal; no task is left running."""
    ledger = RunLedger()
    agent = GatedAgent()
    error = error_type("the request handler blew up")
    tracker = TaskTracker()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with open_backend(ledger=ledger) as backend:
            seen["ids"] = await start_mixed_runs(backend, tmp_path, agent)
            seen["workspaces"] = backend.workspaces
            raise error

    trio.lowlevel.add_instrument(tracker)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(error_type) as excinfo:
            await scenario()
    finally:
        trio.lowlevel.remove_instrument(tracker)
    assert excinfo.value is error
    assert tracker.live == set()
    for run_id in seen["ids"]:
        assert ledger.get(run_id) is not None, run_id
        assert ledger.get(run_id).outcome == "cancelled", run_id
    assert ledger.statistics().pending == 0
    assert ledger.statistics().duplicates_suppressed == 0
    assert all(ws.closed for ws in seen["workspaces"])


async def test_open_backend_cancelled_from_outside_ends_every_run(tmp_path, autojump_clock):
    """An enclosing cancel scope that fires inside the block is honoured (the Cancelled is not
    turned into an error), and the runs still end cancelled."""
    ledger = RunLedger()
    agent = GatedAgent()
    ids: list[str] = []
    with trio.fail_after(TIMEOUT):
        with trio.move_on_after(7) as scope:
            async with open_backend(ledger=ledger) as backend:
                ids = await start_mixed_runs(backend, tmp_path, agent)
                await trio.sleep_forever()
    assert scope.cancelled_caught
    assert len(ids) == 5
    assert all(ledger.get(run_id).outcome == "cancelled" for run_id in ids)
    assert ledger.statistics().pending == 0


async def test_open_backend_uses_the_given_ledger(tmp_path, autojump_clock):
    ledger = RunLedger(retain=10)
    with trio.fail_after(TIMEOUT):
        async with open_backend(ledger=ledger) as backend:
            assert backend.ledger is ledger
            ws = await backend.create_workspace(tmp_path, CountingFactory())
            assert ws.ledger is ledger
            await backend.run(ws.id, msg(run_id="r1", prompt="q"))
    assert ledger.get("r1") == RunComplete("s1", "r1", result="answer to q")
    assert ledger.statistics().accepted_total == 1


async def test_runs_outlive_the_request_that_started_them(backend, tmp_path, autojump_clock):
    """A run sent from a task that is then cancelled (or just returns) keeps going."""
    agent = GatedAgent()
    ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
    ids: list[str] = []

    async def request_then_hang() -> None:
        ids.append(backend.send_message(ws.id, msg(run_id="from-cancelled", prompt="a")))
        await trio.sleep_forever()

    async def request_then_return() -> None:
        ids.append(backend.send_message(ws.id, msg(session_id="s2", run_id="from-gone")))

    async with trio.open_nursery() as requests:
        requests.start_soon(request_then_hang)
        requests.start_soon(request_then_return)
        await trio.testing.wait_all_tasks_blocked()
        requests.cancel_scope.cancel()

    await trio.testing.wait_all_tasks_blocked()
    assert sorted(ids) == ["from-cancelled", "from-gone"]
    assert agent.cancelled == []
    assert {backend.ledger.state(r) for r in ids} == {"pending"}
    agent.release.set()
    with trio.fail_after(TIMEOUT):
        assert await backend.wait_run("from-cancelled") == RunComplete(
            "s1", "from-cancelled", result="done: a"
        )
        assert (await backend.wait_run("from-gone")).outcome == "completed"


async def test_open_backend_honours_close_grace_on_normal_exit(tmp_path, autojump_clock):
    """A normal exit gives runs ``close_grace`` to end before cutting them off."""
    agent = GatedAgent()
    with trio.fail_after(TIMEOUT):
        async with open_backend(close_grace=4) as backend:
            ws = await backend.create_workspace(tmp_path, IgnoringCoordinator.factory(agent))
            backend.send_message(ws.id, msg(run_id="r1"))
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
    assert trio.current_time() - start == 4
    assert backend.ledger.get("r1") == RunComplete("s1", "r1", cancelled=True)
    assert ws.closed


@pytest.mark.parametrize("leaves", [1, 2])
async def test_exception_group_raised_in_open_backend_comes_out_as_itself(
    tmp_path, leaves, autojump_clock
):
    """The promise that "an exception raised in the block comes out as itself" holds for an
    ExceptionGroup the block raises (e.g. from a nursery of its own): neither unwrapped nor
    wrapped again."""
    group = ExceptionGroup("handler failed", [ValueError("a"), KeyError("b")][:leaves])
    agent = GatedAgent()

    async def scenario() -> None:
        async with open_backend() as backend:
            ws = await backend.create_workspace(tmp_path, CountingFactory(agent))
            backend.send_message(ws.id, msg())
            raise group

    with trio.fail_after(TIMEOUT), pytest.raises(ExceptionGroup) as excinfo:
        await scenario()
    assert excinfo.value is group


class SendAsSoonAsVisible(trio.abc.Instrument):
    """Between any two task steps, as soon as a workspace is listed by the backend, send it a
    message, once (as a task scheduled at that moment would); record what came back."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.outcomes: list[Any] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.outcomes:
            return
        for ws in self.backend.workspaces:
            try:
                self.outcomes.append(self.backend.send_message(ws.id, msg(run_id="early")))
            except BaseException as exc:
                self.outcomes.append(exc)


async def test_send_to_a_workspace_as_soon_as_it_is_listed(backend, tmp_path, autojump_clock):
    """A workspace the backend lists (``backend.workspaces`` / ``get_workspace``) takes runs:
    a send the moment it becomes visible, before ``create_workspace`` has even returned, is
    accepted and runs (or is refused with a documented error, registering nothing)."""
    instrument = SendAsSoonAsVisible(backend)
    trio.lowlevel.add_instrument(instrument)
    try:
        ws = await backend.create_workspace(tmp_path, CountingFactory())
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert len(instrument.outcomes) == 1  # the send happened during create_workspace
    outcome = instrument.outcomes[0]
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, TrioRunsError), repr(outcome)
        assert backend.ledger.state("early") is None
        assert not ws.coordinator.is_busy()
    else:
        assert outcome == "early"
        with trio.fail_after(TIMEOUT):
            assert (await backend.wait_run("early")).outcome == "completed"
