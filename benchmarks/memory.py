"""4. Memory: bytes per retained terminal and per pending run; peak RSS as N grows.

- **Bytes per retained terminal** (``tracemalloc``): K trivial runs through ``send_message``;
  once they all ended, what is still allocated, per run - the ledger's record of each
  terminal (and anything else a finished run leaves behind, so a leak shows here). Baseline:
  the least a late waiter can be answered from, a ``dict`` of run id -> ``RunComplete``.
- **Bytes per pending run** (``tracemalloc``): K runs accepted and not ended - *active* (K
  sessions, each agent blocked) and *queued* (one session, K runs behind a blocked one).
  Baseline: a bare Trio task blocked on its own ``trio.Event``.
- **Peak RSS after N runs** with the default retention (``RunLedger(retain=100_000)``), each
  N in a fresh subprocess so one N's peak cannot pollute another's; must be flat in N.
  Baseline: the same N bare tasks in the floor of the dispatch benchmark, also in a fresh
  subprocess. ``--quick`` scales retention and N down by 50 (retain 2,000; N 2k and 20k): the same
  shape, N = retain and N = 10 x retain.

``python -m benchmarks.memory [--quick] [--json PATH]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence

import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    open_backend,
)

from . import _common
from ._common import REPO_ROOT, Report, Row, Stat, Target, ratios, settle
from .dispatch import BATCH, messages, trivial_agent, workspace_path

TRACE_RUNS = 10_000
QUICK_TRACE_RUNS = 2_000
FULL_RSS = (100_000, 1_000_000)
FULL_RETAIN = 100_000
QUICK_RSS = (2_000, 20_000)
QUICK_RETAIN = 2_000
BYTES_PER_TERMINAL_TARGET = 512
RSS_GROWTH_TARGET = 1.10


def _traced() -> int:
    _common.settle()  # what is garbage is not retained
    return tracemalloc.get_traced_memory()[0]


# -- bytes per retained terminal -------------------------------------------------------------


async def retained_terminal_bytes(k: int) -> float:
    """Bytes still allocated per run after ``k`` trivial runs ended (all retained)."""
    async with open_backend(RunLedger(retain=max(k, 1))) as backend:
        ws = await backend.create_workspace(
            workspace_path("memory"), SessionCoordinator.factory(trivial_agent)
        )
        msgs = messages(min(BATCH, k))
        # Warm up one batch so caches and free lists exist before the measurement.
        for run_id in [backend.send_message(ws.id, m) for m in msgs[:10]]:
            await backend.wait_run(run_id)
        before = _traced()
        remaining = k - 10
        while remaining > 0:
            n = min(len(msgs), remaining)
            run_ids = [backend.send_message(ws.id, msgs[i]) for i in range(n)]
            for run_id in run_ids:
                await backend.wait_run(run_id)
            remaining -= n
        del run_ids
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        if backend.ledger.terminal_count != k:
            raise AssertionError("the ledger did not retain every terminal")
        return (after - before) / (k - 10)


def floor_terminal_bytes(k: int) -> float:
    """Bytes per entry of the least a late waiter needs: ``{run_id: RunComplete}``."""
    table: dict[str, RunComplete] = {}
    before = _traced()
    for i in range(k):
        run_id = f"{i:08x}-0000-4000-8000-000000000000"
        table[run_id] = RunComplete("s0", run_id)
    after = _traced()
    del table
    return (after - before) / k


# -- bytes per pending run -------------------------------------------------------------------


async def pending_run_bytes(k: int, queued: bool) -> float:
    """Bytes per run accepted and not ended: ``k`` blocked (``queued``: in one lane)."""
    release = trio.Event()

    async def blocked(call: RunCall, ctx: RunContext) -> object:
        await release.wait()
        return None

    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("pending"), SessionCoordinator.factory(blocked)
        )
        msgs = [AgentMessage("lane", "go")] if queued else messages(k)
        if queued:
            # The lane's head, blocked: everything measured queues behind it.
            backend.send_message(ws.id, msgs[0])
            await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        run_ids = [backend.send_message(ws.id, msgs[0 if queued else i]) for i in range(k)]
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        if backend.ledger.pending_count < k:
            raise AssertionError("the runs were not pending")
        release.set()
        for run_id in run_ids:
            await backend.wait_run(run_id)
        return (after - before) / k


async def floor_pending_bytes(k: int) -> float:
    """Bytes per bare Trio task blocked on its own Event."""

    async def task(event: trio.Event) -> None:
        await event.wait()

    async with trio.open_nursery() as nursery:
        before = _traced()
        events = []
        for _ in range(k):
            event = trio.Event()
            nursery.start_soon(task, event)
            events.append(event)
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        for event in events:
            event.set()
    return (after - before) / k


def _traced_figure(reps: int, measure: object, *args: object) -> Stat:
    samples = []
    for _ in range(reps):
        settle()
        tracemalloc.start()
        try:
            if callable(measure):
                value = measure(*args)
            else:  # pragma: no cover - defensive
                raise TypeError(measure)
            samples.append(float(value))
        finally:
            tracemalloc.stop()
    return Stat.of(samples)


# -- peak RSS after N runs, one subprocess each ----------------------------------------------


def rss_in_subprocess(kind: str, n: int, retain: int) -> dict[str, int]:
    """Run ``benchmarks._rss_child.measure`` in a new interpreter; what it measured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = (
        "import json; from benchmarks._rss_child import measure; "
        f"print(json.dumps(measure({kind!r}, {n}, {retain})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the RSS child ({kind}, N={n}) failed:\n{out.stderr}")
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(
    *,
    quick: bool = False,
    reps: int = 5,
    trace_runs: int | None = None,
    rss_sizes: Sequence[int] | None = None,
    retain: int | None = None,
) -> Report:
    """Measure bytes per retained terminal and pending run, and peak RSS per N."""
    k = trace_runs or (QUICK_TRACE_RUNS if quick else TRACE_RUNS)
    sizes = tuple(rss_sizes) if rss_sizes is not None else QUICK_RSS if quick else FULL_RSS
    keep = retain or (QUICK_RETAIN if quick else FULL_RETAIN)
    report = Report(
        name="memory",
        title="4. Memory: bytes per retained terminal and per pending run; peak RSS after N runs",
        baseline="floor: {run_id: RunComplete} per terminal; a bare Trio task blocked on an "
        "Event per pending run; the dispatch floor's process for RSS",
        params={"traced_runs": k, "rss_sizes": list(sizes), "retain": keep, "reps": reps},
    )
    terminal = _traced_figure(reps, lambda: trio.run(retained_terminal_bytes, k))
    terminal_floor = _traced_figure(reps, floor_terminal_bytes, k)
    report.add(
        Row(
            f"{k:,} runs ended",
            "bytes per retained terminal",
            "bytes",
            terminal,
            terminal_floor,
            ratios(terminal.samples, terminal_floor.samples),
        )
    )
    pending_floor = _traced_figure(reps, lambda: trio.run(floor_pending_bytes, k))
    for queued in (False, True):
        pending = _traced_figure(reps, lambda q=queued: trio.run(pending_run_bytes, k, q))
        report.add(
            Row(
                f"{k:,} runs {'queued in 1 session' if queued else 'active, 1 per session'}",
                "bytes per pending run",
                "bytes",
                pending,
                pending_floor,
                ratios(pending.samples, pending_floor.samples),
            )
        )
    report.targets.append(
        Target(
            "bytes per retained terminal",
            f"<= {BYTES_PER_TERMINAL_TARGET} bytes",
            f"{terminal.median:.0f} bytes",
            terminal.median <= BYTES_PER_TERMINAL_TARGET,
        )
    )

    peaks: dict[int, Stat] = {}
    for n in sizes:
        subject: list[dict[str, int]] = []
        floor: list[dict[str, int]] = []
        for rep in range(reps):
            order = ("floor", "trio_runs") if rep % 2 == 0 else ("trio_runs", "floor")
            for kind in order:
                (floor if kind == "floor" else subject).append(rss_in_subprocess(kind, n, keep))
        label = f"N={n:,} (retain {keep:,})"
        mib = 1024 * 1024
        peak = Stat.of(r["peak_rss"] / mib for r in subject)
        peak_floor = Stat.of(r["peak_rss"] / mib for r in floor)
        peaks[n] = peak
        report.add(
            Row(
                label, "peak RSS", "MiB", peak, peak_floor, ratios(peak.samples, peak_floor.samples)
            )
        )
        end = Stat.of(r["end_rss"] / mib for r in subject)
        end_floor = Stat.of(r["end_rss"] / mib for r in floor)
        report.add(
            Row(
                label,
                "RSS at the end",
                "MiB",
                end,
                end_floor,
                ratios(end.samples, end_floor.samples),
            )
        )
        growth = [(r["peak_rss"] - r["start_rss"]) / mib for r in subject]
        growth_floor = [(r["peak_rss"] - r["start_rss"]) / mib for r in floor]
        report.add(
            Row(
                label,
                "peak RSS above start",
                "MiB",
                Stat.of(growth),
                Stat.of(growth_floor),
                ratios(growth, growth_floor),
            )
        )
        report.add(
            Row(
                label,
                "RSS at start (imports)",
                "MiB",
                Stat.of(r["start_rss"] / mib for r in subject),
                Stat.of(r["start_rss"] / mib for r in floor),
            )
        )
    if len(sizes) > 1:
        small, large = peaks[sizes[0]].median, peaks[sizes[-1]].median
        report.targets.append(
            Target(
                "RSS flat in N",
                f"peak RSS after {sizes[-1]:,} runs within {RSS_GROWTH_TARGET - 1:.0%} of after "
                f"{sizes[0]:,}",
                f"{large:.1f} MiB / {small:.1f} MiB = {large / small:.3f}",
                large <= RSS_GROWTH_TARGET * small,
            )
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
