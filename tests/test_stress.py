"""A seeded randomized stress of the guarantee.

Thousands of runs over dozens of sessions in two workspaces, with random cancels,
clear_queue calls, failing agents, failing ``prepare``, deliberate duplicate terminals, waiters
arriving before, during and long after their runs, and one workspace closed at a random
moment. Afterwards: every accepted run id has exactly one terminal on ``run_completions`` and
in the ledger, its outcome is one the run could have had, every waiter returned that same
terminal, and ``duplicates_suppressed`` accounts for every refused publish.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict

import attrs
import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    Workspace,
    WorkspaceClosing,
    WorkspaceNotFound,
    current_run_id,
    open_backend,
)
from trio_runs.ledger import OnVisible

RUNS = 2_400
SESSIONS_PER_WORKSPACE = 30  # two workspaces: 60 sessions


class CountingLedger(RunLedger):
    """A ledger that counts every refused terminal, to check duplicates_suppressed."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.recorded: Counter[str] = Counter()

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        first = super().complete(rc, on_visible)
        if first:
            self.recorded[rc.run_id] += 1
        else:
            self.refused += 1
        return first


@attrs.define
class Plan:
    """What the driver decided for one run, so its outcome can be checked."""

    workspace: Workspace
    session_id: str
    behaviour: str  # "ok", "fail", "prepare-fail", "slow"


async def run_stress(seed: int) -> None:
    rng = random.Random(seed)
    ledger = CountingLedger()
    plans: dict[str, Plan] = {}
    prepare_fails: set[str] = set()
    waiter_results: dict[str, list[RunComplete]] = defaultdict(list)
    seen: dict[str, list[RunComplete]] = defaultdict(list)
    injected_duplicates = 0
    refused_sends = 0

    async def agent(call: RunCall, ctx: RunContext) -> object:
        behaviour = plans[call.run_id].behaviour
        for i in range(rng.randint(0, 3)):
            ctx.emit(i)  # lossy; nobody reads events here, so most are dropped
            await trio.sleep(rng.random())
        if behaviour == "slow":
            await trio.sleep(rng.uniform(5, 20))
        if behaviour == "fail":
            raise RuntimeError(f"agent failed for {call.run_id}")
        return call.prompt

    async def prepare(call: RunCall) -> None:
        await trio.sleep(0)
        if current_run_id() in prepare_fails:
            raise OSError(f"prepare failed for {current_run_id()}")

    factory = SessionCoordinator.factory(agent, prepare=prepare)

    async def collect(workspace: Workspace, ready: trio.Event) -> None:
        async with workspace.run_completions.subscribe() as subscription:
            ready.set()
            async for event in subscription:
                seen[event.payload.run_id].append(event.payload)

    async def wait_for(run_id: str, delay: float) -> None:
        await trio.sleep(delay)
        waiter_results[run_id].append(await backend.wait_run(run_id))

    with trio.fail_after(100_000):  # virtual seconds: a hang fails, it does not block CI
        async with open_backend(ledger=ledger) as backend, trio.open_nursery() as observers:
            workspaces = [
                await backend.create_workspace(f"/stress/{seed}/{i}", factory) for i in range(2)
            ]
            for workspace in workspaces:
                ready = trio.Event()
                observers.start_soon(collect, workspace, ready)
                await ready.wait()
            close_at = rng.randrange(RUNS // 4, RUNS)
            closer_done = trio.Event()

            async def close_one() -> None:
                await backend.close_workspace(workspaces[0].id)
                closer_done.set()

            for n in range(RUNS):
                workspace = rng.choice(workspaces)
                session_id = f"s{rng.randrange(SESSIONS_PER_WORKSPACE)}"
                behaviour = rng.choices(
                    ["ok", "fail", "prepare-fail", "slow"], weights=[70, 10, 8, 12]
                )[0]
                run_id = f"run-{seed}-{n}"
                plans[run_id] = Plan(workspace, session_id, behaviour)
                if behaviour == "prepare-fail":
                    prepare_fails.add(run_id)
                msg = AgentMessage(session_id, f"prompt {n}", run_id=run_id)
                try:
                    backend.send_message(workspace.id, msg)
                except (WorkspaceClosing, WorkspaceNotFound):
                    del plans[run_id]
                    refused_sends += 1
                    continue
                if rng.random() < 0.3:
                    observers.start_soon(wait_for, run_id, rng.choice([0, 0.5, 3, 60]))

                roll = rng.random()
                coordinator = workspace.coordinator
                assert isinstance(coordinator, SessionCoordinator)
                if roll < 0.04:
                    coordinator.cancel(session_id)  # may cancel the run just accepted
                elif roll < 0.06:
                    coordinator.clear_queue(session_id)
                elif roll < 0.065:
                    coordinator.cancel_all()
                if n == close_at:
                    observers.start_soon(close_one)
                if rng.random() < 0.2:
                    await trio.sleep(rng.random() * 2)
                if rng.random() < 0.02:
                    # A rogue second terminal for some finished run: the ledger refuses it.
                    done = [r for r in plans if ledger.get(r) is not None]
                    if done:
                        victim = rng.choice(done)
                        assert not ledger.complete(RunComplete("x", victim, error="duplicate"))
                        injected_duplicates += 1

            # Waiters that arrive long after everything ended.
            for run_id in rng.sample(sorted(plans), 50):
                observers.start_soon(wait_for, run_id, 10_000)
            await backend.close_workspace(workspaces[1].id)
            with trio.fail_after(1_000):
                await closer_done.wait()
            # The brokers shut down, so the collectors end; the late waiters finish.

    accepted = set(plans)
    assert len(accepted) + refused_sends == RUNS
    assert len(accepted) >= RUNS // 4
    assert len({(p.workspace.id, p.session_id) for p in plans.values()}) >= 50

    # Exactly one terminal per accepted run, on the broker and in the ledger, and the same one.
    assert set(seen) == accepted
    for run_id in accepted:
        assert len(seen[run_id]) == 1, (run_id, seen[run_id])
        assert ledger.recorded[run_id] == 1
        assert ledger.get(run_id) == seen[run_id][0]
    assert ledger.pending_count == 0

    # Every waiter returned, with that terminal.
    for run_id, results in waiter_results.items():
        assert all(rc == seen[run_id][0] for rc in results)
    assert sum(map(len, waiter_results.values())) >= 50

    # Refused publishes are exactly the injected duplicates, and all were counted.
    assert ledger.refused == injected_duplicates
    assert ledger.duplicates_suppressed == injected_duplicates

    # Outcomes are ones the run could have had; cancellation is never an error.
    outcomes: Counter[str] = Counter()
    for run_id, plan in plans.items():
        rc = seen[run_id][0]
        assert rc.session_id == plan.session_id
        outcomes[rc.outcome] += 1
        if rc.cancelled:
            assert rc.error is None
            continue
        if plan.behaviour == "prepare-fail":
            assert rc.error == f"prepare failed for {run_id}"
        elif plan.behaviour == "fail":
            assert rc.error == f"agent failed for {run_id}"
        else:
            assert rc.outcome == "completed"
            assert rc.result == f"prompt {run_id.rsplit('-', 1)[1]}"
    # The workload really exercised every ending.
    assert min(outcomes["completed"], outcomes["failed"], outcomes["cancelled"]) > 50, outcomes


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_accepted_run_has_exactly_one_terminal(
    autojump_clock: object, seed: int, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.ERROR, logger="trio_runs"):
        await run_stress(seed)
    # The backend's last resort (which logs an error) was never needed: every terminal came
    # from the coordinator or the dispatcher's marker-guarded fallback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
