"""Many waiters, early and late: every one of them gets the run's one terminal, once.

Run it with ``python examples/waiters.py``. Twenty runs are submitted across four sessions;
for each run, waiters start before it begins, while it runs, and long after it ended. A
waiter that arrives late is answered at once from the ledger; none hangs, none sees two
endings. The script prints a summary and exits non-zero if any waiter disagreed.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict

import trio

from trio_runs import (
    AgentMessage,
    RunCall,
    RunComplete,
    RunContext,
    SessionCoordinator,
    open_backend,
)

RUNS = 20
WAITERS_PER_RUN = 10


async def agent(call: RunCall, ctx: RunContext) -> int:
    """Work for a little while; every fifth run fails."""
    await trio.sleep(0.01 * (1 + int(call.prompt) % 5))
    if int(call.prompt) % 5 == 4:
        raise ValueError(f"run {call.prompt} failed on purpose")
    return int(call.prompt) ** 2


async def main(seed: int = 7) -> int:
    rng = random.Random(seed)
    seen: dict[str, list[RunComplete]] = defaultdict(list)
    async with open_backend() as backend:
        workspace = await backend.create_workspace("./waiters", SessionCoordinator.factory(agent))

        async def waiter(run_id: str, delay: float) -> None:
            await trio.sleep(delay)
            with trio.fail_after(10):  # a waiter that hangs is a bug: fail loudly instead
                seen[run_id].append(await backend.wait_run(run_id))

        async with trio.open_nursery() as nursery:
            for n in range(RUNS):
                msg = AgentMessage(f"session-{n % 4}", str(n))
                run_id = backend.send_message(workspace.id, msg)
                for _ in range(WAITERS_PER_RUN):
                    # Before the run starts, while it runs, and well after it ended.
                    nursery.start_soon(waiter, run_id, rng.choice([0.0, 0.02, 0.5, 1.0]))
            workspace.sessions.cancel("session-3")  # its runs all end cancelled

    disagreements = 0
    outcomes: dict[str, int] = defaultdict(int)
    for terminals in seen.values():
        if len(terminals) != WAITERS_PER_RUN or len(set(terminals)) != 1:
            disagreements += 1
        outcomes[terminals[0].outcome] += 1
    print(f"runs: {len(seen)}, waiters returned: {sum(map(len, seen.values()))}")
    print(f"outcomes: {dict(sorted(outcomes.items()))}")
    print(f"runs whose waiters disagreed or went missing: {disagreements}")
    return 1 if disagreements or len(seen) != RUNS else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
