"""trio_runs.testing and the pytest plugin: the helpers users test their agents with."""

from __future__ import annotations

import textwrap

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    EventType,
    NotificationType,
    RunComplete,
    SessionCoordinator,
    open_backend,
)
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

pytest_plugins = ["pytester"]
TIMEOUT = 60


class Boom(Exception):
    pass


async def test_scripted_agent_plays_its_steps_in_order(autojump_clock):
    gate = trio.Event()
    agent = ScriptedAgent(emit("a"), sleep(5), wait_for(gate), emit("b"), return_(42), emit("x"))
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        async with ws.events.subscribe() as progress:
            run_id = backend.send_message(ws.id, AgentMessage("s", "go"))
            with trio.fail_after(TIMEOUT):
                await agent.wait_started(run_id)
            await trio.sleep(1000)  # long past the sleep step: now it waits for the gate
            assert agent.finished == []
            assert backend.ledger.state(run_id) == "pending"
            gate.set()
            with trio.fail_after(TIMEOUT):
                rc = await backend.wait_run(run_id)
            payloads = [progress.receive_nowait().payload.payload for _ in range(2)]
            with pytest.raises(trio.WouldBlock):
                progress.receive_nowait()  # nothing after return_
    assert rc.result == 42
    assert payloads == ["a", "b"]
    assert agent.started == agent.finished == [run_id]
    assert [c.prompt for c in agent.calls] == ["go"]


async def test_scripted_agent_scripts_by_prompt_and_raises_classes_with_the_run_id(autojump_clock):
    agent = ScriptedAgent(return_("default"), scripts={"bad": [raise_(Boom)], "ok": []})
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        with trio.fail_after(TIMEOUT):
            bad = await backend.run(ws.id, AgentMessage("s", "bad", run_id="r-bad"))
            ok = await backend.run(ws.id, AgentMessage("s", "ok"))
            other = await backend.run(ws.id, AgentMessage("s", "other"))
    assert (bad.outcome, bad.error) == ("failed", "r-bad")
    assert (ok.outcome, ok.result) == ("completed", None)
    assert other.result == "default"


async def test_scripted_agent_records_cancellations_and_concurrency(autojump_clock):
    agent = ScriptedAgent(sleep(30))
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        a = backend.send_message(ws.id, AgentMessage("s1", "x"))
        b = backend.send_message(ws.id, AgentMessage("s2", "x"))
        backend.send_message(ws.id, AgentMessage("s1", "y"))
        await trio.testing.wait_all_tasks_blocked()
        assert ws.coordinator is not None
        ws.coordinator.cancel("s1")
        with trio.fail_after(TIMEOUT):
            await backend.wait_run(b)
    assert agent.cancelled == [a]
    assert agent.finished == [b]
    assert agent.max_concurrent_per_session == 1


def test_scripts_are_made_of_steps():
    with pytest.raises(TypeError, match="Steps"):
        ScriptedAgent("emit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Steps"):
        ScriptedAgent(scripts={"p": [42]})  # type: ignore[list-item]
    with pytest.raises(ValueError, match="negative"):
        sleep(-1)


@pytest.mark.parametrize(
    ("point", "outcome", "error", "notified"),
    [
        (FaultPoint.BEFORE_RUN, "failed", "injected fault at before_run", True),
        (FaultPoint.AFTER_TERMINAL, "completed", None, True),
        (FaultPoint.MARK_WITHOUT_PUBLISH, "failed", "injected fault at mark_without_publish", True),
    ],
)
async def test_faulty_coordinator_fails_runs_at_its_point(
    autojump_clock, point, outcome, error, notified
):
    agent = ScriptedAgent(return_("ok"))
    faulty: list[FaultyCoordinator] = []

    def factory(ws):
        coordinator = FaultyCoordinator(
            SessionCoordinator.factory(agent)(ws), point, Boom, when=lambda c: c.prompt == "x"
        )
        faulty.append(coordinator)
        return coordinator

    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", factory)
        async with ws.notifications.subscribe() as notes, TerminalRecorder(ws) as rec:
            with trio.fail_after(TIMEOUT):
                hit = await backend.run(ws.id, AgentMessage("s", "x"))
                spared = await backend.run(ws.id, AgentMessage("s", "y"))
            note = notes.receive_nowait().payload
    assert (hit.outcome, hit.error) == (outcome, error)
    assert spared.outcome == "completed"
    assert faulty[0].injected == 1
    assert note.type is NotificationType.AGENT_ERROR
    assert note.run_id == hit.run_id
    rec.assert_exactly_once([hit.run_id, spared.run_id])
    assert backend.ledger.duplicates_suppressed == 0


async def test_faulty_coordinator_at_begin_accepted_refuses_the_send(autojump_clock):
    agent = ScriptedAgent(return_("ok"))
    async with open_backend() as backend:

        def factory(ws):
            inner = SessionCoordinator.factory(agent)(ws)
            return FaultyCoordinator(inner, FaultPoint.BEGIN_ACCEPTED, Boom("full"))

        ws = await backend.create_workspace("/w", factory)
        with pytest.raises(Boom, match="full"):
            backend.send_message(ws.id, AgentMessage("s", "x"))
        assert backend.ledger.accepted_total == 0
        assert not ws.coordinator.is_busy()  # type: ignore[union-attr]
        assert ws.coordinator.queued_prompts("s") == 0  # type: ignore[union-attr]


async def test_failing_prepare_picks_runs_by_id(autojump_clock):
    agent = ScriptedAgent(return_("ok"))
    prepare = failing_prepare(OSError, when=lambda run_id: run_id.startswith("bad"))
    async with open_backend() as backend:
        ws = await backend.create_workspace(
            "/w", SessionCoordinator.factory(agent, prepare=prepare)
        )
        with trio.fail_after(TIMEOUT):
            bad = await backend.run(ws.id, AgentMessage("s", "p", run_id="bad-1"))
            good = await backend.run(ws.id, AgentMessage("s", "p", run_id="good-1"))
    assert (bad.outcome, bad.error) == ("failed", "prepare failed for bad-1")
    assert good.outcome == "completed"
    assert agent.started == ["good-1"]


async def test_terminal_recorder_catches_missing_and_repeated_terminals(autojump_clock):
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
        async with TerminalRecorder(ws) as rec:
            run_id = backend.send_message(ws.id, AgentMessage("s", "x"))
            with trio.fail_after(TIMEOUT):
                rc = await rec.wait_for(run_id)
            rec.assert_exactly_once([run_id])
            with pytest.raises(AssertionError, match=r"1 run\(s\) without a terminal: \['ghost'\]"):
                rec.assert_exactly_once([run_id, "ghost"])
            # A rogue publish straight onto the broker, bypassing the ledger.
            ws.run_completions.publish_must_deliver(EventType.UPDATED, rc)
            with pytest.raises(AssertionError, match="more than one terminal"):
                rec.assert_exactly_once([run_id])
    assert rec.terminal_for(run_id) == rc
    assert rec.terminal_for("ghost") is None
    assert ws.run_completions.subscriber_count == 0


async def test_terminal_recorder_takes_what_is_queued_on_exit(autojump_clock):
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
        async with TerminalRecorder(ws) as rec:
            ws.run_completions.publish_must_deliver(EventType.UPDATED, RunComplete("s", "late"))
        assert [t.run_id for t in rec.terminals] == ["late"]


async def test_terminal_recorder_reports_overflow_and_shutdown(autojump_clock):
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
        async with TerminalRecorder(ws) as rec:
            for n in range(ws.run_completions.max_backlog + 1):
                ws.run_completions.publish_must_deliver(EventType.UPDATED, RunComplete("s", str(n)))
            with pytest.raises(AssertionError, match="overflowed"):
                rec.assert_exactly_once([])
        async with TerminalRecorder(ws) as rec2:
            await backend.close_workspace(ws.id)
            with trio.fail_after(TIMEOUT), pytest.raises(LookupError, match="no terminal for x"):
                await rec2.wait_for("x")


async def test_terminal_recorder_misuse_is_a_clear_error(autojump_clock):
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
        rec = TerminalRecorder(ws)
        with pytest.raises(RuntimeError, match="enter the recorder first"):
            await rec.wait_for("x")
        async with rec:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            await rec.__aenter__()


PLUGIN_TESTS = """
    import pytest
    import trio

    from trio_runs import AgentMessage, SessionCoordinator
    from trio_runs.testing import ScriptedAgent, return_, sleep

    {mark}
    async def test_clean(trio_runs_backend, autojump_clock):
        agent = ScriptedAgent(sleep(3600), return_("ok"))
        ws = await trio_runs_backend.create_workspace("/w", SessionCoordinator.factory(agent))
        start = trio.current_time()
        with trio.fail_after(7200):
            rc = await trio_runs_backend.run(ws.id, AgentMessage("s", "go"))
        assert rc.result == "ok"
        assert trio.current_time() - start == 3600  # virtual time: pytest-trio's clock

    {mark}
    async def test_leaves_runs_running(trio_runs_backend, autojump_clock):
        agent = ScriptedAgent(sleep(3600), return_("ok"))
        ws = await trio_runs_backend.create_workspace("/w", SessionCoordinator.factory(agent))
        for run_id in ("left-active", "left-queued"):
            trio_runs_backend.send_message(ws.id, AgentMessage("s", "go", run_id=run_id))

    {mark}
    @pytest.mark.trio_runs_allow_running
    async def test_leaves_runs_running_on_purpose(trio_runs_backend, autojump_clock):
        agent = ScriptedAgent(sleep(3600), return_("ok"))
        ws = await trio_runs_backend.create_workspace("/w", SessionCoordinator.factory(agent))
        trio_runs_backend.send_message(ws.id, AgentMessage("s", "go"))

    {mark}
    @pytest.mark.trio_runs_allow_running
    async def test_leaves_a_run_no_closing_can_end(trio_runs_backend, autojump_clock):
        trio_runs_backend.ledger.accept("orphan", "s")  # accepted, never dispatched
"""


@pytest.mark.parametrize(
    ("ini", "mark"),
    [
        pytest.param("[pytest]\ntrio_mode = true\n", "", id="trio_mode"),
        pytest.param("[pytest]\n", "@pytest.mark.trio", id="marked-without-trio_mode"),
    ],
)
def test_plugin_backend_fixture_fails_a_test_that_leaves_a_run_running(pytester, ini, mark):
    # The fixture's promise, read literally: a test that forgot a run fails, naming it,
    # rather than passing on the cancelled terminal the backend's closing gives the run.
    pytester.makeini(ini + "addopts = --strict-markers\n")
    pytester.makepyfile(textwrap.dedent(PLUGIN_TESTS).format(mark=mark))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert (
        "Failed: 2 run(s) had not ended at teardown (running or queued; the backend cancels "
        "them now): ['left-active', 'left-queued']" in out
    )
    assert "mark the test @pytest.mark.trio_runs_allow_running" in out
    assert "Failed: 1 accepted run(s) were left without a terminal: ['orphan']" in out
    result.stdout.fnmatch_lines(
        [
            "PASSED *::test_clean",
            "PASSED *::test_leaves_runs_running_on_purpose",
            # A trailing "*": under CI=true the reason follows the name on the same line.
            "FAILED *::test_leaves_runs_running*",
            "FAILED *::test_leaves_a_run_no_closing_can_end*",
        ]
    )


def test_plugin_adds_one_namespaced_fixture_and_leaves_the_clock_to_pytest_trio(pytester):
    # A generic `backend` would be silently shadowed by any user conftest; `autojump_clock`
    # is pytest-trio's and must not be duplicated.
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    lines = result.stdout.str().splitlines()
    start = next(i for i, line in enumerate(lines) if "from trio_runs.pytest_plugin" in line)
    section = []
    for line in lines[start + 1 :]:
        if line.startswith(("---", "===")):
            break
        section.append(line)
    assert [line.split(" -- ")[0] for line in section if " -- " in line] == ["trio_runs_backend"]
    trio_section = next(i for i, line in enumerate(lines) if "from pytest_trio" in line)
    assert any(line.startswith("autojump_clock -- ") for line in lines[trio_section:start])


def test_plugin_backend_fixture_refuses_a_test_that_is_not_a_trio_test(pytester):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile("def test_sync(trio_runs_backend):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Trio fixtures can only be used by Trio tests*"])
