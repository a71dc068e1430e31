"""An agent whose runs run again after a crash: ``--agent rerun_agent:plugin``.

``sleep N`` sleeps N seconds and returns ``"slept N"``; every start is appended to the file
named by ``$RERUN_AGENT_LOG`` (one line per start), so a test can count executions.
"""

from __future__ import annotations

import os

import trio

from trio_runs import Coordinator, RunCall, RunContext, SessionCoordinator, Workspace


async def sleeper(call: RunCall, ctx: RunContext) -> str:
    log = os.environ.get("RERUN_AGENT_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{call.run_id}\n")
    seconds = float(call.prompt.split()[1])
    await trio.sleep(seconds)
    return f"slept {seconds:g}"


class Plugin:
    def coordinator_factory(self, workspace: Workspace) -> Coordinator:
        return SessionCoordinator.factory(sleeper, after_crash="rerun")(workspace)


plugin = Plugin()
