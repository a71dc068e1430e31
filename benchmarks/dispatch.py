"""1. Dispatch overhead: N trivial runs through ``Backend.send_message`` vs the bare-Trio floor.

The subject: N runs whose agent returns at once, each submitted with ``send_message``, its
terminal awaited with ``wait_run`` and fanned out to one ``run_completions`` subscriber. The
floor: the same N trivial tasks started in a bare Trio nursery, each setting a ``trio.Event``
that a waiter awaits. Both submit in batches of ``batch`` (so at most ``batch`` runs are in
flight, as a steady stream would keep them) and await every terminal of a batch in order
before the next; the clock stops when the waiter and the subscriber have seen every one.

``python -m benchmarks.dispatch [--quick] [--json PATH]``
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Sequence

import trio

from trio_runs import (
    AgentMessage,
    Backend,
    RunCall,
    RunContext,
    RunLedger,
    SessionCoordinator,
    open_backend,
)

from ._common import Report, Row, Stat, Stopwatch, Target, Timing, paired, ratios, timing_rows

FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000, 30_000)
BATCH = 1_000
RATIO_TARGET = 2.5
FLATNESS_TARGET = 1.10
"""Flat: the ratio at the largest N is at most this multiple of the ratio at the smallest."""


async def trivial_agent(call: RunCall, ctx: RunContext) -> object:
    """An agent that returns at once: all that is measured is the machinery around it."""
    return None


def messages(count: int, prefix: str = "s") -> list[AgentMessage]:
    """``count`` messages, one per session; reused batch after batch (each send mints an id)."""
    return [AgentMessage(f"{prefix}{i}", "go") for i in range(count)]


def workspace_path(name: str) -> str:
    # Workspaces are keyed by resolved path; nothing is written there.
    return f"{tempfile.gettempdir()}/trio-runs-bench-{name}"


async def floor_runs(n: int, batch: int = BATCH) -> Timing:
    """Time for ``n`` bare tasks, each setting an Event a waiter awaits, ``batch`` at once."""

    async def task(done: trio.Event) -> None:
        done.set()

    async with trio.open_nursery() as nursery:
        watch = Stopwatch()
        remaining = n
        while remaining:
            k = min(batch, remaining)
            events = []
            for _ in range(k):
                event = trio.Event()
                nursery.start_soon(task, event)
                events.append(event)
            for event in events:
                await event.wait()
            remaining -= k
        return watch.read()


async def trio_runs_runs(n: int, batch: int = BATCH, retain: int | None = None) -> Timing:
    """Time for ``n`` trivial runs via ``send_message`` -> ``wait_run`` + one subscriber.

    The ledger keeps its default retention unless ``retain`` is given.
    """
    async with open_backend(None if retain is None else RunLedger(retain=retain)) as backend:
        return await timed_runs(backend, n, batch)


async def timed_runs(backend: Backend, n: int, batch: int, name: str = "dispatch") -> Timing:
    """Time for ``n`` trivial runs on ``backend``, in batches of ``batch``: ``send_message``
    each, then ``wait_run`` each, with one subscriber that must see every terminal."""
    ws = await backend.create_workspace(
        workspace_path(name), SessionCoordinator.factory(trivial_agent)
    )
    msgs = messages(min(batch, n))
    all_seen = trio.Event()
    seen = 0

    async def subscriber(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal seen
        async with ws.run_completions.subscribe() as subscription:
            task_status.started()
            async for _ in subscription:
                seen += 1
                if seen == n:
                    all_seen.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(subscriber)
        send, wait, workspace_id = backend.send_message, backend.wait_run, ws.id
        watch = Stopwatch()
        remaining = n
        while remaining:
            k = min(batch, remaining)
            run_ids = [send(workspace_id, msgs[i]) for i in range(k)]
            for run_id in run_ids:
                await wait(run_id)
            remaining -= k
        await all_seen.wait()
        elapsed = watch.read()
        nursery.cancel_scope.cancel()
    if seen != n:
        raise AssertionError(f"the subscriber saw {seen} terminals of {n}")
    return elapsed


def run(
    *, quick: bool = False, reps: int = 5, sizes: Sequence[int] | None = None, batch: int = BATCH
) -> Report:
    """Measure runs/s and the per-run cost ratio against the floor for every N in ``sizes``."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    report = Report(
        name="dispatch",
        title="1. Dispatch overhead: trivial runs via Backend.send_message -> wait_run "
        "(+1 run_completions subscriber)",
        baseline="floor: the same N trivial tasks in a bare Trio nursery, each setting a "
        "trio.Event a waiter awaits",
        params={"sizes": list(sizes), "batch": batch, "reps": reps},
    )
    # Warm both paths up (imports, caches, the allocator) before anything is timed.
    trio.run(floor_runs, min(2_000, sizes[0]), batch)
    trio.run(trio_runs_runs, min(2_000, sizes[0]), batch)
    per_n_ratio: dict[int, Stat] = {}
    for n in sizes:
        base, subj = paired(
            reps,
            functools.partial(trio.run, floor_runs, n, batch),
            functools.partial(trio.run, trio_runs_runs, n, batch),
        )
        label = f"N={n:,}"
        cpu_ratio = ratios([t.cpu for t in subj], [t.cpu for t in base])
        per_n_ratio[n] = cpu_ratio
        report.rows.extend(timing_rows(label, "cost per run", subj, base, per=n, unit="us"))
        report.add(
            Row(
                label,
                "of which garbage collection (cpu)",
                "us",
                Stat.of(t.gc * 1e6 / n for t in subj),
                Stat.of(t.gc * 1e6 / n for t in base),
                note="CPU time inside gc collections (gc.callbacks), per run",
            )
        )
        report.add(
            Row(
                label,
                "throughput (wall)",
                "runs/s",
                Stat.of(n / t.wall for t in subj),
                Stat.of(n / t.wall for t in base),
            )
        )
    worst = max(per_n_ratio.values(), key=lambda s: s.median)
    report.targets.append(
        Target(
            "dispatch ratio",
            f"<= {RATIO_TARGET:g}x the floor at every N (CPU cost per run)",
            ", ".join(f"{n:,}: {s.median:.2f}x" for n, s in per_n_ratio.items()),
            worst.median <= RATIO_TARGET,
        )
    )
    if len(sizes) > 1:
        first, last = per_n_ratio[sizes[0]].median, per_n_ratio[sizes[-1]].median
        report.targets.append(
            Target(
                "dispatch flat in N",
                f"ratio at N={sizes[-1]:,} <= {FLATNESS_TARGET:g}x the ratio at N={sizes[0]:,}",
                f"{last:.2f}x / {first:.2f}x = {last / first:.2f}",
                last <= FLATNESS_TARGET * first,
            )
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "dispatch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
