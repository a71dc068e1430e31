"""Quickstart: one workspace, an agent that streams progress, three runs, three endings.

Run it with ``python examples/quickstart.py``. The first run completes, the second fails and
the third is cancelled while it waits in its session's queue. Each ends in exactly one
terminal ``RunComplete``: this script prints them as they arrive on the workspace's
must-deliver ``run_completions`` broker, then asks the ledger again, as a waiter that
arrives late would.
"""

from __future__ import annotations

import trio

from trio_runs import AgentMessage, RunCall, RunContext, SessionCoordinator, open_backend


async def agent(call: RunCall, ctx: RunContext) -> str:
    """Stream the prompt back word by word (lossy progress), then return it in capitals."""
    for word in call.prompt.split():
        ctx.emit(word)
        await trio.sleep(0.05)
    if "fail" in call.prompt:
        raise RuntimeError(f"the agent refused {call.prompt!r}")
    return call.prompt.upper()


async def main() -> None:
    async with open_backend() as backend:
        factory = SessionCoordinator.factory(agent)
        workspace = await backend.create_workspace("./quickstart", factory)
        coordinator = workspace.sessions  # the SessionCoordinator, typed

        async with workspace.run_completions.subscribe() as terminals:
            names = {
                backend.send_message(workspace.id, AgentMessage("demo", "hello from trio")): "ok",
                backend.send_message(workspace.id, AgentMessage("other", "please fail")): "fails",
                backend.send_message(workspace.id, AgentMessage("demo", "wait in line")): "queued",
            }
            print(f"queued in session 'demo': {coordinator.queued_prompts_list('demo')}")
            coordinator.clear_queue("demo")  # the queued run ends cancelled, right now

            async with workspace.events.subscribe() as progress:
                for _ in names:
                    rc = (await terminals.receive()).payload
                    print(
                        f"terminal {names[rc.run_id]:>6}: {rc.outcome:<9} "
                        f"result={rc.result!r} error={rc.error!r}"
                    )
                words = []
                while True:
                    try:
                        words.append((progress.receive_nowait()).payload.payload)
                    except trio.WouldBlock:
                        break
                print(f"progress seen while waiting (lossy): {words}")

        for run_id, name in names.items():
            late = await backend.wait_run(run_id)  # answered at once from the ledger
            print(f"late waiter {name:>6}: {late.outcome}")


if __name__ == "__main__":
    trio.run(main)
