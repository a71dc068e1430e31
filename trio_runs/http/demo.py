"""``trio-runs demo``: the guarantee, checked end to end over real HTTP.

An in-process server (hypercorn on a free loopback port, the built-in demo agent) and many
client runs driven through :class:`RunsClient`, as separate clients would: completions,
failures before start (``fail-early``) and mid-run (``fail``), cancels while queued and
while active, a workspace closed mid-flight, several waiters per run and late waiters
after the end. An observer follows each workspace's event stream.

It ends with a table and fails (non-zero exit) if any waiter hung, any run was seen ending
twice (two ``run_complete`` events, or waiters that disagree), any accepted run's terminal
never reached the event stream, any run ended differently than its scenario dictates, or
any submission was refused.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, Literal

import attrs
import trio
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..agents import DemoAgent
from ..coordinator import new_run_id
from ..events import RunComplete
from .client import ClientError, RunsClient, ServerLost, SseEvent
from .cluster_demo import MIN_RUNS as CLUSTER_MIN_RUNS
from .cluster_demo import ClusterDemoError, ClusterDemoReport, run_cluster_demo
from .server import RunningServer, ServeOptions, serve

__all__ = ["DemoReport", "cluster_report_tables", "main", "report_table", "run_demo"]

logger = logging.getLogger("trio_runs.http")

MIN_RUNS: Final = 8
Outcome = Literal["completed", "failed", "cancelled"]


@attrs.frozen(slots=True)
class _Plan:
    scenario: str
    workspace: str
    session_id: str
    prompt: str
    expected: Outcome


@attrs.define
class _Run:
    plan: _Plan
    run_id: str
    accepted: bool = False
    terminals: list[RunComplete] = attrs.field(factory=list)
    streamed: int = 0


@attrs.frozen(slots=True)
class DemoReport:
    """What the demo observed; :attr:`violations` lists every broken promise (none: OK)."""

    planned: int
    accepted: int
    refused: int
    outcomes: dict[str, int]
    waiters_returned: int
    hung: int
    duplicates: int
    missing_from_stream: int
    unexpected: int
    progress_events: int
    duplicates_suppressed: int
    elapsed: float

    @property
    def runs_per_second(self) -> float:
        """Accepted runs per second of wall time."""
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def violations(self) -> list[str]:
        """Human-readable descriptions of every guarantee that did not hold."""
        problems = []
        if self.hung:
            problems.append(f"{self.hung} waiter(s) hung")
        if self.duplicates:
            problems.append(f"{self.duplicates} run(s) ended more than once")
        if self.missing_from_stream:
            problems.append(f"{self.missing_from_stream} terminal(s) never reached the stream")
        if self.unexpected:
            problems.append(f"{self.unexpected} run(s) ended differently than they must")
        if self.refused or self.accepted != self.planned:
            problems.append(f"{self.planned - self.accepted} submission(s) were not accepted")
        ended = sum(self.outcomes.values())
        if ended != self.accepted:
            problems.append(f"{self.accepted - ended} accepted run(s) have no terminal")
        return problems


def _plan(runs: int, seed: int) -> tuple[list[list[_Plan]], list[list[_Plan]], list[_Plan]]:
    # Lanes: one long active run with two queued behind it (queue cleared, then cancelled).
    # Closing: per session, one long active run and one queued, in the workspace closed
    # mid-flight. Singles: completions, fail-early and fail, over a handful of sessions.
    share = max(1, runs // 12)
    lanes = [
        [
            _Plan("cancel while active", "main", f"lane-{k}", "sleep 30", "cancelled"),
            _Plan("cancel while queued", "main", f"lane-{k}", f"queued {k} a", "cancelled"),
            _Plan("cancel while queued", "main", f"lane-{k}", f"queued {k} b", "cancelled"),
        ]
        for k in range(share)
    ]
    closing = [
        [
            _Plan("workspace closed", "closing", f"closing-{k}", "sleep 30", "cancelled"),
            _Plan("workspace closed", "closing", f"closing-{k}", f"never runs {k}", "cancelled"),
        ]
        for k in range(share)
    ]
    singles = [
        _Plan("fail-early", "main", f"s-{k % 8}", "fail-early", "failed") for k in range(share)
    ]
    singles += [_Plan("fail mid-run", "main", f"s-{k % 8}", "fail", "failed") for k in range(share)]
    rest = runs - 3 * share - 2 * share - len(singles)
    for k in range(rest):
        prompt = "sleep 1" if k % 10 == 9 else f"hello from demo client {k}"
        singles.append(_Plan("completes", "main", f"s-{k % 8}", prompt, "completed"))
    random.Random(seed).shuffle(singles)
    return lanes, closing, singles


async def run_demo(
    runs: int = 120,
    *,
    seed: int = 0,
    hang_after: float = 30.0,
    on_tick: Callable[[dict[str, int]], None] | None = None,
) -> DemoReport:
    """Run the mixed workload against an in-process server; returns what was observed.

    Every wait is bounded by ``hang_after`` seconds (a waiter past it counts as hung).
    ``on_tick`` gets live counters about ten times a second.
    """
    if runs < MIN_RUNS:
        raise ValueError(f"the mixed workload needs at least {MIN_RUNS} runs, got {runs}")
    lanes, closing, singles = _plan(runs, seed)
    # The durable default, on a database of the demo's own that it removes afterwards.
    scratch = await trio.to_thread.run_sync(partial(tempfile.mkdtemp, prefix="trio-runs-demo-"))
    try:
        return await _run_workload(
            ServeOptions(
                port=0,
                drain=0.5,
                close_grace=5.0,
                heartbeat=5.0,
                db=os.path.join(scratch, "runs.db"),
            ),
            lanes,
            closing,
            singles,
            seed=seed,
            hang_after=hang_after,
            on_tick=on_tick,
        )
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(shutil.rmtree, scratch, ignore_errors=True))


async def _run_workload(
    options: ServeOptions,
    lanes: list[list[_Plan]],
    closing: list[list[_Plan]],
    singles: list[_Plan],
    *,
    seed: int,
    hang_after: float,
    on_tick: Callable[[dict[str, int]], None] | None,
) -> DemoReport:
    records: list[_Run] = []
    by_id: dict[str, _Run] = {}
    live = Counter[str]()
    started = time.monotonic()
    agent = DemoAgent(word_delay=0.02)

    async with trio.open_nursery() as root:
        server: RunningServer = await root.start(
            partial(serve, options, coordinator_factory=agent.coordinator_factory)
        )
        ticker = trio.CancelScope()
        if on_tick is not None:
            root.start_soon(_ticker, on_tick, live, ticker)
        try:
            async with RunsClient(server.url, timeout=10.0, max_connections=None) as client:
                workspaces = {
                    name: (await client.create_workspace(f".trio-runs-demo/{name}-{seed}")).id
                    for name in ("main", "closing")
                }

                def observe(event: SseEvent) -> None:
                    if event.event == "progress":
                        live["progress"] += 1
                    elif event.event == "run_complete":
                        data = event.json()
                        run = by_id.get(data.get("run_id", "")) if isinstance(data, dict) else None
                        if run is not None:
                            run.streamed += 1

                async with trio.open_nursery() as observers:
                    for workspace_id in workspaces.values():
                        await observers.start(partial(client.stream_events, workspace_id, observe))

                    async def submit(plan: _Plan) -> _Run:
                        run = _Run(plan, new_run_id())
                        records.append(run)
                        by_id[run.run_id] = run
                        try:
                            await client.submit(
                                workspaces[plan.workspace], plan.session_id, plan.prompt, run.run_id
                            )
                        except (ClientError, ServerLost) as exc:
                            live["refused"] += 1
                            logger.error("demo: submission refused: %s", exc)
                            return run
                        run.accepted = True
                        live["accepted"] += 1
                        return run

                    async def waiter(run: _Run) -> None:
                        with trio.move_on_after(hang_after) as bound:
                            try:
                                rc = await client.wait_terminal(run.run_id)
                            except (ClientError, ServerLost) as exc:
                                logger.error("demo: waiter for %s failed: %s", run.run_id, exc)
                                live["hung"] += 1
                                return
                        if bound.cancelled_caught:
                            live["hung"] += 1
                            return
                        if not run.terminals:
                            live[rc.outcome] += 1
                        run.terminals.append(rc)
                        live["waiters"] += 1

                    async def single(plan: _Plan) -> None:
                        run = await submit(plan)
                        if run.accepted:
                            await waiter(run)

                    async def lane(plans: list[_Plan], nursery: trio.Nursery) -> None:
                        group = [await submit(plan) for plan in plans]
                        for run in group:
                            if run.accepted:
                                nursery.start_soon(waiter, run)
                                nursery.start_soon(waiter, run)
                        workspace_id = workspaces[plans[0].workspace]
                        session_id = plans[0].session_id
                        queued_ids = [run.run_id for run in group[1:]]
                        try:
                            await _until(
                                client,
                                workspace_id,
                                session_id,
                                group[0].run_id,
                                queued_ids,
                                hang_after,
                            )
                            await client.clear_queue(workspace_id, session_id)
                            await client.cancel_session(workspace_id, session_id)
                        except (ClientError, ServerLost) as exc:
                            live["refused"] += 1
                            logger.error("demo: cancelling session %s failed: %s", session_id, exc)

                    async def close_mid_flight(nursery: trio.Nursery) -> None:
                        group = [await submit(plan) for plans in closing for plan in plans]
                        for run in group:
                            if run.accepted:
                                nursery.start_soon(waiter, run)
                        first = group[0]
                        try:
                            await _until(
                                client,
                                workspaces["closing"],
                                first.plan.session_id,
                                first.run_id,
                                [group[1].run_id],
                                hang_after,
                            )
                            await client.close_workspace(workspaces["closing"])
                        except (ClientError, ServerLost) as exc:
                            live["refused"] += 1
                            logger.error("demo: closing the workspace failed: %s", exc)

                    async with trio.open_nursery() as clients:
                        clients.start_soon(close_mid_flight, clients)
                        for plans in lanes:
                            clients.start_soon(lane, plans, clients)
                        for plan in singles:
                            clients.start_soon(single, plan)

                    # Late waiters: every run once more, long after it ended.
                    async with trio.open_nursery() as late:
                        for run in records:
                            if run.accepted:
                                late.start_soon(waiter, run)
                    # The closing workspace's stream ended when it closed; the main one's
                    # ends when the server shuts down, below.
                    server.request_shutdown()
        finally:
            server.request_shutdown()
            ticker.cancel()
        duplicates_suppressed = server.service.backend.ledger.statistics().duplicates_suppressed

    outcomes = Counter[str]()
    duplicates = missing = unexpected = 0
    for run in records:
        if not run.accepted:
            continue
        distinct = set(run.terminals)
        if len(distinct) > 1 or run.streamed > 1:
            duplicates += 1
        if run.streamed == 0:
            missing += 1
        if run.terminals:
            outcome = run.terminals[0].outcome
            outcomes[outcome] += 1
            if outcome != run.plan.expected:
                unexpected += 1
                logger.error(
                    "demo: %r (%s) ended %s, expected %s",
                    run.plan.prompt,
                    run.plan.scenario,
                    outcome,
                    run.plan.expected,
                )
    return DemoReport(
        planned=len(records),
        accepted=sum(run.accepted for run in records),
        refused=live["refused"],
        outcomes={k: outcomes.get(k, 0) for k in ("completed", "failed", "cancelled")},
        waiters_returned=live["waiters"],
        hung=live["hung"],
        duplicates=duplicates,
        missing_from_stream=missing,
        unexpected=unexpected,
        progress_events=live["progress"],
        duplicates_suppressed=duplicates_suppressed,
        elapsed=time.monotonic() - started,
    )


async def _until(
    client: RunsClient,
    workspace_id: str,
    session_id: str,
    active: str,
    queued: list[str],
    bound: float,
) -> None:
    # Poll the session until ``active`` runs and ``queued`` wait behind it (bounded).
    with trio.move_on_after(bound):
        while True:
            view = await client.session(workspace_id, session_id)
            if view.active == active and [q.run_id for q in view.queued] == queued:
                return
            await trio.sleep(0.02)
    logger.warning("demo: session %s did not reach its expected state in %gs", session_id, bound)


async def _ticker(
    on_tick: Callable[[dict[str, int]], None], live: Counter[str], scope: trio.CancelScope
) -> None:
    with scope:
        while True:
            on_tick(dict(live))
            await trio.sleep(0.1)


def _live_view(counters: dict[str, int], planned: int, elapsed: float) -> Table:
    ended = sum(counters.get(k, 0) for k in ("completed", "failed", "cancelled"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column()
    grid.add_row(
        ProgressBar(total=planned, completed=ended, width=40),
        Text(f"{ended}/{planned} runs ended  {elapsed:.1f}s", style="bold"),
    )
    grid.add_row(
        Text(f"accepted {counters.get('accepted', 0)}"),
        Text.assemble(
            ("completed ", "green"),
            str(counters.get("completed", 0)),
            ("  failed ", "red"),
            str(counters.get("failed", 0)),
            ("  cancelled ", "yellow"),
            str(counters.get("cancelled", 0)),
        ),
    )
    grid.add_row(
        Text(f"hung {counters.get('hung', 0)}"),
        Text(
            f"waiters returned {counters.get('waiters', 0)}  "
            f"progress events {counters.get('progress', 0)}"
        ),
    )
    return grid


_OK = "[green]ok[/]"


def _zero(value: int) -> str:
    # The "must be" cell of a count that must be zero.
    return _OK if value == 0 else "[red bold]0: VIOLATED[/]"


def _promise_table(title: str, report: DemoReport | ClusterDemoReport, waiters: str) -> Table:
    # The closing table both demos open with: its columns, then the outcome counts.
    table = Table(title=title, show_lines=False)
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_column("must be", justify="left")
    table.add_row("accepted", str(report.accepted), f"{report.planned} (all)")
    table.add_row("completed", str(report.outcomes["completed"]), "")
    table.add_row("failed", str(report.outcomes["failed"]), "")
    table.add_row("cancelled", str(report.outcomes["cancelled"]), "")
    table.add_row(waiters, str(report.waiters_returned), "")
    table.add_row("hung", str(report.hung), _zero(report.hung))
    table.add_row("duplicate terminals", str(report.duplicates), _zero(report.duplicates))
    return table


def _throughput_rows(table: Table, report: DemoReport | ClusterDemoReport) -> None:
    # The rows both demos close with.
    table.add_row("progress events seen (lossy)", str(report.progress_events), "")
    table.add_row("runs/s", f"{report.runs_per_second:.1f}", f"({report.elapsed:.2f}s)")


def report_table(report: DemoReport) -> Table:
    """The closing table: counts, the two must-be-zero rows, throughput."""
    table = _promise_table("trio-runs demo", report, "waiters returned")
    table.add_row(
        "terminals missing from stream",
        str(report.missing_from_stream),
        _zero(report.missing_from_stream),
    )
    table.add_row("unexpected outcomes", str(report.unexpected), _zero(report.unexpected))
    _throughput_rows(table, report)
    return table


def main(
    *,
    runs: int = 120,
    seed: int = 0,
    hang_after: float = 30.0,
    live: bool = True,
    nodes: int | None = None,
    redis_binary: str | None = None,
) -> int:
    """Run the demo with a live display and the closing table; returns the exit status.

    With ``nodes``, the cluster demo (:mod:`trio_runs.http.cluster_demo`) on
    ``redis_binary``, a ``redis-server``.
    """
    console = Console()
    if nodes is not None:
        if redis_binary is None:
            raise ValueError("the cluster demo needs a redis-server")
        return _cluster_main(console, nodes, runs, seed, hang_after, live, redis_binary)
    if runs < MIN_RUNS:
        console.print(f"trio-runs demo: --runs must be at least {MIN_RUNS}", style="red")
        return 2
    planned = runs
    started = time.monotonic()
    display = Live(console=console, auto_refresh=False, transient=True)
    show_live = live and console.is_terminal

    def tick(counters: dict[str, int]) -> None:
        if show_live:
            display.update(_live_view(counters, planned, time.monotonic() - started), refresh=True)

    console.print(
        f"trio-runs demo: an in-process server on loopback and {runs} client runs over HTTP "
        "(completions, failures before start and mid-run, cancels while queued and active, "
        "a workspace closed mid-flight, late waiters)"
    )
    if show_live:
        display.start()
    try:
        report = trio.run(lambda: run_demo(runs, seed=seed, hang_after=hang_after, on_tick=tick))
    finally:
        if show_live:
            display.stop()
    console.print(report_table(report))
    problems = report.violations
    if problems:
        console.print("[red bold]FAILED:[/] " + "; ".join(problems))
        return 1
    console.print(
        "[green bold]OK:[/] every accepted run ended exactly once and every waiter saw it "
        f"({report.duplicates_suppressed} second terminal(s) suppressed by the ledger)"
    )
    return 0


# -- the cluster demo's display --------------------------------------------------------------


def cluster_report_tables(report: ClusterDemoReport) -> tuple[Table, Table]:
    """The cluster demo's closing tables: the nodes, then the promises and their counts."""
    nodes = Table(title=f"nodes (redis {report.redis_url}, lease {report.lease_ttl:g}s)")
    for column in ("node", "role", "pid", "url", "ran", "end"):
        right = column in ("pid", "ran")
        nodes.add_column(column, justify="right" if right else "left", no_wrap=True)
    for node in report.nodes:
        end = f"[red]{node.fate}[/]" if node.fate.startswith("killed") else node.fate
        nodes.add_row(node.name, node.role, str(node.pid), node.url or "-", str(node.ran), end)

    table = _promise_table(
        f"trio-runs demo --nodes {len(report.nodes)}",
        report,
        "waiters returned (on every serve node)",
    )

    def equal(value: int, expected: int) -> str:
        return _OK if value == expected else f"[red bold]{expected}: VIOLATED[/]"

    table.add_row(
        "terminals twice on a node's stream",
        str(report.streamed_twice),
        _zero(report.streamed_twice),
    )
    table.add_row(
        "terminals missing from a node's stream",
        str(report.missing_from_stream),
        _zero(report.missing_from_stream),
    )
    table.add_row("unexpected outcomes", str(report.unexpected), _zero(report.unexpected))
    table.add_row(
        "runs the killed node was running",
        str(report.killed_running),
        _OK if report.killed_running else "[red bold]> 0: VIOLATED[/]",
    )
    table.add_row(
        "  ended abandoned", str(report.abandoned), equal(report.abandoned, report.killed_running)
    )
    late = report.abandoned_latency > report.abandoned_bound
    table.add_row(
        "  seconds from the kill to their terminals",
        f"{report.abandoned_latency:.2f}",
        ("[red bold]" if late else "[green]")
        + f"<= {report.abandoned_bound:.2f}{': VIOLATED' if late else ''}[/]",
    )
    table.add_row(
        "runs it accepted that ran elsewhere",
        str(report.resumed_elsewhere),
        equal(report.resumed_elsewhere, report.resumed_expected),
    )
    table.add_row("waiters on it that went on on another node", str(report.reattached), "")
    table.add_row("submissions to it sent again elsewhere", str(report.resubmitted), "")
    table.add_row(
        "sessions with two active runs",
        str(report.overlapping_sessions),
        _zero(report.overlapping_sessions),
    )
    table.add_row("runs that ran twice", str(report.ran_twice), _zero(report.ran_twice))
    _throughput_rows(table, report)
    return nodes, table


async def _until_signalled(
    demo: Callable[[], Awaitable[ClusterDemoReport]],
) -> ClusterDemoReport | None:
    # SIGTERM and SIGHUP end the demo as Ctrl-C does: the demo is cancelled, which stops every
    # process it started (they are in process groups of their own, and would outlive a demo
    # killed by the signal's default action). None: interrupted.
    result: list[ClusterDemoReport] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(await demo())
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    return result[0] if result else None


def _cluster_main(
    console: Console,
    nodes: int,
    runs: int,
    seed: int,
    hang_after: float,
    live: bool,
    redis_binary: str,
) -> int:
    if nodes < 2:
        console.print("trio-runs demo: --nodes must be at least 2", style="red")
        return 2
    if runs < CLUSTER_MIN_RUNS:
        console.print(f"trio-runs demo: --runs must be at least {CLUSTER_MIN_RUNS}", style="red")
        return 2
    started = time.monotonic()
    display = Live(console=console, auto_refresh=False, transient=True)
    show_live = live and console.is_terminal

    def tick(counters: dict[str, int]) -> None:
        if show_live:
            display.update(_live_view(counters, runs, time.monotonic() - started), refresh=True)

    def step(line: str) -> None:
        console.print(f"  {line}")

    worker = " (the last a worker)" if nodes >= 3 else ""
    console.print(
        f"trio-runs demo --nodes {nodes}: redis-server and {nodes} node processes{worker}, "
        f"{runs} client runs over HTTP on random nodes, waited on from others; one node "
        "killed (SIGKILL) mid-demo while it runs work"
    )
    if show_live:
        display.start()
    try:
        report = trio.run(
            partial(
                _until_signalled,
                partial(
                    run_cluster_demo,
                    nodes,
                    runs,
                    redis_binary=redis_binary,
                    seed=seed,
                    hang_after=hang_after,
                    on_tick=tick,
                    on_step=step,
                ),
            )
        )
    except ClusterDemoError as exc:
        console.print(f"[red bold]FAILED:[/] the cluster did not start: {exc}")
        return 1
    except BaseExceptionGroup as group:
        # Ctrl-C lands in whichever task runs, and comes out of its nurseries in a group.
        _, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
        report = None
    except KeyboardInterrupt:
        report = None
    finally:
        if show_live:
            display.stop()
    if report is None:
        console.print("interrupted: every process the demo started was stopped")
        return 130
    for table in cluster_report_tables(report):
        console.print(table)
    problems = report.violations
    if problems:
        console.print("[red bold]FAILED:[/] " + "; ".join(problems))
        console.print(f"the nodes' and Redis's logs and the agents' journal: {report.logs}")
        return 1
    console.print(
        f"[green bold]OK:[/] every accepted run ended exactly once and every waiter on every "
        f"node saw it; the killed node's {report.abandoned} runs ended abandoned "
        f"{report.abandoned_latency:.1f}s after the kill, the {report.resumed_elsewhere} "
        "runs it had accepted ran on other nodes; no session ever had two active runs; "
        "every process stopped"
    )
    return 0
