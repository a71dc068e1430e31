"""How to test your own agent with trio_runs.testing — run: python -m pytest examples/

The ``trio_runs_backend`` fixture comes from trio-runs' pytest plugin (installed with the
package): an open backend that fails the test if a run has not ended by teardown (mark a test
``@pytest.mark.trio_runs_allow_running`` to leave runs running on purpose). It needs
pytest-trio, and works with ``trio_mode = true`` (as here) or in tests marked
``@pytest.mark.trio``. ``autojump_clock`` is pytest-trio's: sleeps run on virtual time.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_runs import AgentMessage, Backend, SessionCoordinator
from trio_runs.testing import (
    ScriptedAgent,
    TerminalRecorder,
    emit,
    failing_prepare,
    raise_,
    return_,
    sleep,
    wait_for,
)


async def test_a_run_that_fails_midway_ends_failed_once(trio_runs_backend: Backend, autojump_clock):
    backend = trio_runs_backend
    agent = ScriptedAgent(emit("thinking"), sleep(30), raise_(RuntimeError("model timed out")))
    workspace = await backend.create_workspace("/my-project", SessionCoordinator.factory(agent))
    async with TerminalRecorder(workspace) as terminals:
        run_id = backend.send_message(workspace.id, AgentMessage("chat-1", "summarise"))
        with trio.fail_after(60):  # virtual seconds: a hang fails the test at once
            rc = await terminals.wait_for(run_id)
    assert rc.outcome == "failed"
    assert rc.error == "model timed out"
    terminals.assert_exactly_once([run_id])


async def test_cancel_while_queued_is_cancelled_not_failed(
    trio_runs_backend: Backend, autojump_clock
):
    backend = trio_runs_backend
    release = trio.Event()
    agent = ScriptedAgent(
        return_("unused"),
        scripts={"slow": [wait_for(release), return_("done")]},
    )
    workspace = await backend.create_workspace("/my-project", SessionCoordinator.factory(agent))
    async with TerminalRecorder(workspace) as terminals:
        first = backend.send_message(workspace.id, AgentMessage("chat-1", "slow"))
        queued = backend.send_message(workspace.id, AgentMessage("chat-1", "next"))
        await trio.testing.wait_all_tasks_blocked()
        workspace.sessions.clear_queue("chat-1")  # the coordinator, typed
        release.set()
        with trio.fail_after(60):
            assert (await terminals.wait_for(first)).result == "done"
        assert terminals.terminal_for(queued).outcome == "cancelled"  # type: ignore[union-attr]
    terminals.assert_exactly_once([first, queued])
    assert agent.started == [first]  # the queued run never started


async def test_a_failing_prepare_still_answers_the_waiter(
    trio_runs_backend: Backend, autojump_clock
):
    backend = trio_runs_backend
    agent = ScriptedAgent(return_("ok"))
    factory = SessionCoordinator.factory(agent, prepare=failing_prepare(OSError("no models")))
    workspace = await backend.create_workspace("/my-project", factory)
    with trio.fail_after(60):
        rc = await backend.run(workspace.id, AgentMessage("chat-1", "hello"))
    assert (rc.outcome, rc.error) == ("failed", "no models")
    assert agent.started == []
