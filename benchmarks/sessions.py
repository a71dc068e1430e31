"""2. Sessions and queues: many sessions, one long queue, and cancelling that queue.

- **10,000 sessions x 1 run**, all submitted at once, every terminal awaited. Floor: 10,000
  bare tasks each setting a ``trio.Event`` a waiter awaits.
- **1 session x 10,000 queued runs**: the lane runs them one after the other, FIFO. Floor: a
  bare-Trio FIFO lane, 10,000 tasks each waiting for its predecessor's Event, then setting its
  own.
- **cancel of a session with 10,000 queued** (behind one active run): the time the
  ``cancel()`` call takes and the time until every one of the 10,001 cancelled terminals was
  delivered to a ``run_completions`` subscriber. Floor: 10,001 bare tasks blocked on Events in
  one cancel scope; ``scope.cancel()``, then the time until each task has unwound and counted
  itself.

``python -m benchmarks.sessions [--quick] [--json PATH]``
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import trio
import trio.testing

from trio_runs import AgentMessage, RunCall, RunContext, SessionCoordinator, open_backend

from ._common import Report, Row, Stat, Stopwatch, Target, Timing, paired, ratios, timing_rows
from .dispatch import floor_runs, messages, trivial_agent, workspace_path

SIZE = 10_000
QUICK_SIZE = 5_000


# -- 10,000 sessions x 1 run ---------------------------------------------------------------


async def runs_many_sessions(n: int) -> Timing:
    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("sessions"), SessionCoordinator.factory(trivial_agent)
        )
        msgs = messages(n)
        watch = Stopwatch()
        run_ids = [backend.send_message(ws.id, msg) for msg in msgs]
        for run_id in run_ids:
            await backend.wait_run(run_id)
        return watch.read()


# -- 1 session x 10,000 queued -------------------------------------------------------------


async def floor_lane(n: int) -> Timing:
    async def task(before: trio.Event | None, done: trio.Event) -> None:
        if before is not None:
            await before.wait()
        done.set()

    async with trio.open_nursery() as nursery:
        watch = Stopwatch()
        events: list[trio.Event] = []
        previous: trio.Event | None = None
        for _ in range(n):
            event = trio.Event()
            nursery.start_soon(task, previous, event)
            events.append(event)
            previous = event
        for event in events:
            await event.wait()
        return watch.read()


async def runs_one_session(n: int) -> Timing:
    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("queue"), SessionCoordinator.factory(trivial_agent)
        )
        msg = AgentMessage("lane", "go")
        watch = Stopwatch()
        run_ids = [backend.send_message(ws.id, msg) for _ in range(n)]
        for run_id in run_ids:
            await backend.wait_run(run_id)
        elapsed = watch.read()
        if ws.coordinator is not None and ws.coordinator.is_busy():
            raise AssertionError("the lane did not drain")
        return elapsed


# -- cancel with 10,000 queued --------------------------------------------------------------


async def blocking_agent(call: RunCall, ctx: RunContext) -> object:
    await trio.sleep_forever()
    return None  # pragma: no cover - cancelled


async def floor_cancel(n: int) -> tuple[Timing, Timing, int]:
    """``(scope.cancel() call, until every task unwound, tasks that unwound)``."""
    unwound = 0

    async def task(blocker: trio.Event) -> None:
        nonlocal unwound
        try:
            await blocker.wait()
        finally:
            unwound += 1

    blocker = trio.Event()
    async with trio.open_nursery() as outer:
        scope = trio.CancelScope()

        async def lane() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        nursery.start_soon(task, blocker)

        done = trio.Event()

        async def run_lane() -> None:
            await lane()
            done.set()

        outer.start_soon(run_lane)
        await trio.testing.wait_all_tasks_blocked()
        watch = Stopwatch()
        scope.cancel()
        called = watch.read()
        await done.wait()
        return called, watch.read(), unwound


async def runs_cancel(n: int) -> tuple[Timing, Timing, int]:
    """``(cancel() call, until every terminal was delivered, terminals delivered)``.

    ``n`` runs in one session: the first is active (its agent blocks), the rest are queued.
    """
    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("cancel"), SessionCoordinator.factory(blocking_agent)
        )
        coordinator = ws.coordinator
        assert coordinator is not None
        delivered = 0
        cancelled = 0
        all_delivered = trio.Event()

        async def subscriber(*, task_status: trio.TaskStatus[None]) -> None:
            nonlocal delivered, cancelled
            async with ws.run_completions.subscribe() as subscription:
                task_status.started()
                async for event in subscription:
                    delivered += 1
                    cancelled += event.payload.cancelled
                    if delivered == n:
                        all_delivered.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(subscriber)
            msg = AgentMessage("lane", "go")
            for _ in range(n):
                backend.send_message(ws.id, msg)
            await trio.testing.wait_all_tasks_blocked()
            if coordinator.queued_prompts("lane") != n - 1:
                raise AssertionError("the queue was not in place before the cancel")
            watch = Stopwatch()
            coordinator.cancel("lane")
            called = watch.read()
            await all_delivered.wait()
            elapsed = watch.read()
            nursery.cancel_scope.cancel()
        if cancelled != n:
            raise AssertionError(f"{cancelled} of {n} terminals were cancelled ones")
        return called, elapsed, delivered


def run(*, quick: bool = False, reps: int = 5, size: int | None = None) -> Report:
    """Measure the three session/queue cases against their floors."""
    size = size or (QUICK_SIZE if quick else SIZE)
    report = Report(
        name="sessions",
        title="2. Sessions and queues",
        baseline="floor: the same shape in bare Trio (tasks + trio.Event; a chained FIFO lane; "
        "a cancel scope over blocked tasks)",
        params={"size": size, "reps": reps},
    )
    if size != SIZE:
        report.notes.append(f"{size:,} instead of {SIZE:,} (--quick)")
    trio.run(floor_runs, min(size, 1_000), size)
    trio.run(runs_many_sessions, min(size, 1_000))

    base, subj = paired(
        reps,
        functools.partial(trio.run, floor_runs, size, size),
        functools.partial(trio.run, runs_many_sessions, size),
    )
    report.rows.extend(timing_rows(f"{size:,} sessions x 1 run", "all ended", subj, base))

    base, subj = paired(
        reps,
        functools.partial(trio.run, floor_lane, size),
        functools.partial(trio.run, runs_one_session, size),
    )
    report.rows.extend(timing_rows(f"1 session x {size:,} queued", "all ended", subj, base))

    n = size + 1
    floor_results, subject_results = paired(
        reps,
        functools.partial(trio.run, floor_cancel, n),
        functools.partial(trio.run, runs_cancel, n),
    )
    label = f"cancel, {size:,} queued + 1 active"
    calls_s = [r[0].cpu * 1e3 for r in subject_results]
    calls_b = [r[0].cpu * 1e3 for r in floor_results]
    report.add(
        Row(
            label,
            "cancel() call (cpu)",
            "ms",
            Stat.of(calls_s),
            Stat.of(calls_b),
            ratios(calls_s, calls_b),
        )
    )
    report.rows.extend(
        timing_rows(
            label,
            "until every terminal delivered",
            [r[1] for r in subject_results],
            [r[1] for r in floor_results],
        )
    )
    delivered = [r[2] for r in subject_results]
    report.add(
        Row(
            label,
            "terminals delivered",
            "count",
            Stat.of(delivered),
            Stat.of(r[2] for r in floor_results),
            note="the floor's count is of bare tasks that unwound",
        )
    )
    report.targets.append(
        Target(
            "cancel delivers every terminal",
            f"{n:,} cancelled terminals delivered in every repetition",
            f"{min(delivered):,}..{max(delivered):,}",
            all(d == n for d in delivered),
        )
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "sessions", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
