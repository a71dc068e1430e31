"""``trio-runs demo --nodes N``: the guarantee checked across a cluster of node processes.

It starts a private ``redis-server`` (a free loopback port, a temporary directory, AOF with
``appendfsync always``) and N node processes on it, sharing one ``--workspace-root``:
``node0`` and, up to the last, ``trio-runs serve --redis`` nodes; the last one a
``trio-runs worker`` (no HTTP) when N >= 3. Then, over HTTP, as separate clients would:

- ``node0`` starts alone with room for a few runs only, and gets long runs ("doomed") with
  runs queued behind them in the same sessions: it runs the long ones, nobody else can;
- the other nodes join; the mixed load goes to random serve nodes, node0 included, and
  every run is waited on from the node that accepted it and another: completions, failures
  before start and mid-run, a session's queue cleared and its active run cancelled from
  *other* nodes, one run cancelled by id from another node, late waiters after the end; an
  observer follows the event stream on every serve node that lives to the end;
- once a third of the load has ended, ``node0`` is killed with SIGKILL while it runs work
  and clients are using it: their waiters go on waiting on another node, a submission it
  may or may not have accepted is sent again elsewhere under the same run id.

Every promise is then checked: each accepted run ended exactly once (every waiter on every
node saw the same terminal; every node's event stream carried it once), as its scenario
dictates; the killed node's runs ended ``failed`` and ``abandoned`` within the lease TTL, a
sweep interval and some slack for a busy machine; the runs it had accepted (those queued
behind its own among them) ran on other nodes; no session ever had two runs running at
once, and no run ran twice — both from a journal the nodes' agent (:data:`agent`) writes as
runs start and end. Every process it started is stopped when it returns, also on errors,
Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Final, Literal

import attrs
import trio

from ..agents import DemoAgent
from ..coordinator import RunContext, new_run_id
from ..events import RunCall, RunComplete
from .client import ClientError, RunsClient, ServerLost, SseEvent

__all__ = [
    "ENV_JOURNAL",
    "LEASE_TTL",
    "ClusterDemoError",
    "ClusterDemoReport",
    "JournalAgent",
    "JournalSpan",
    "NodeSummary",
    "agent",
    "overlapping_sessions",
    "read_journal",
    "run_cluster_demo",
]

logger = logging.getLogger("trio_runs.http")

ENV_JOURNAL: Final = "TRIO_RUNS_DEMO_JOURNAL"
"""The directory :class:`JournalAgent` writes its journal to (unset: it writes none)."""

LEASE_TTL: Final = 2.0
"""The nodes' ``--lease-ttl``: short, so that the killed node's runs end within seconds."""

RECOVERY_SLACK: Final = 3.0
"""Seconds allowed beyond the lease TTL and a sweep interval (a third of the TTL) for the
killed node's runs to reach their waiters: process start-up and scheduling on a busy machine."""

MIN_RUNS: Final = 24
WORKSPACE: Final = "cluster-demo"
_START_BOUND: Final = 30.0  # a node process to announce itself (a busy machine is slow)
_STOP_GRACE: Final = 10.0  # a node to stop after SIGTERM before it is killed
_VICTIM_TIMEOUT: Final = 5.0  # node0's clients' liveness bound: its death is noticed in 5 s
_REDIS_START_BOUND: Final = 10.0
_URL = re.compile(r"serving on (http://[^\s;]+)")

Outcome = Literal["completed", "failed", "cancelled"]
Role = Literal["serve", "worker"]


# -- the nodes' agent --------------------------------------------------------------------


def _append(path: str, kind: str, call: RunCall) -> None:
    # One short line per write with O_APPEND: lines of concurrent runs never interleave.
    # CLOCK_MONOTONIC is one clock for every process of the machine: the demo compares the
    # nodes' times with each other and with the moment it killed a node.
    with open(path, "a", encoding="utf-8") as journal:
        journal.write(f"{kind}\t{call.run_id}\t{call.session_id}\t{time.monotonic():.6f}\n")


class JournalAgent(DemoAgent):
    """The demo agent (see :mod:`trio_runs.agents`), keeping a journal of where and when
    each run ran, which the cluster demo checks "one active run per session" and "no run
    ran twice" with.

    With ``$TRIO_RUNS_DEMO_JOURNAL`` naming a directory, each run appends a ``start`` line
    before its work and an ``end`` line after it, however it ends, to ``DIR/<pid>.log``
    (run id, session id, ``time.monotonic()``). Without it, it is the demo agent.
    """

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        """Run the prompt as the demo agent does, between two journal lines.

        Cancelled, it still writes its ``end`` line (shielded, one short write), then the
        cancellation goes on. It never writes the journal on the event loop's thread.
        """
        directory = os.environ.get(ENV_JOURNAL, "")
        if not directory:
            return await super().__call__(call, ctx)
        path = os.path.join(directory, f"{os.getpid()}.log")
        await trio.to_thread.run_sync(_append, path, "start", call)
        try:
            return await super().__call__(call, ctx)
        finally:
            # The end is written before the run's terminal exists (the coordinator publishes
            # it after the agent returns), so it precedes the start of the session's next run.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_append, path, "end", call)


agent = JournalAgent(word_delay=0.02)
"""The nodes' agent in the cluster demo: ``--agent trio_runs.http.cluster_demo:agent``."""


# -- the report ---------------------------------------------------------------------------


@attrs.frozen(slots=True)
class NodeSummary:
    """One node process of the demo and what became of it."""

    name: str
    role: Role
    pid: int
    url: str
    """The serve node's URL ("" for a worker)."""
    ran: int
    """Runs its agent started (from the journal)."""
    fate: str
    """``killed (SIGKILL)``, ``stopped`` (exit 0 after SIGTERM), or how it ended otherwise."""


@attrs.frozen(slots=True)
class ClusterDemoReport:
    """What the cluster demo observed; :attr:`violations` lists every broken promise."""

    redis_url: str
    namespace: str
    lease_ttl: float
    nodes: tuple[NodeSummary, ...]
    planned: int
    accepted: int
    refused: int
    outcomes: dict[str, int]
    waiters_returned: int
    hung: int
    duplicates: int
    """Runs whose waiters did not all see the same one terminal."""
    streamed_twice: int
    """Runs whose terminal a node's event stream carried more than once."""
    missing_from_stream: int
    unexpected: int
    killed_running: int
    """Runs the killed node was running when it was killed (from the journal)."""
    abandoned: int
    """Runs that ended ``abandoned`` (only the killed node's may)."""
    abandoned_latency: float
    """Seconds from the kill to the last of its runs' terminals reaching a waiter."""
    abandoned_bound: float
    resumed_elsewhere: int
    """Runs the killed node accepted (the ones queued behind its own among them) that ran
    and completed on another node."""
    resumed_expected: int
    reattached: int
    """Waiters that were waiting on the killed node and went on waiting on another one."""
    resubmitted: int
    """Submissions to the killed node that died with it, sent again (same run id) to another."""
    overlapping_sessions: int
    """Sessions that had two runs running at once (from the journal): must be 0."""
    ran_twice: int
    """Runs whose agent started more than once: must be 0."""
    progress_events: int
    elapsed: float
    logs: str = ""
    """Where the processes' logs and the journal were kept ("" once removed: they are kept
    only when a promise broke)."""

    @property
    def runs_per_second(self) -> float:
        """Accepted runs per second of wall time (node start-up included)."""
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def violations(self) -> list[str]:
        """Human-readable descriptions of every guarantee that did not hold."""
        problems = []
        if self.hung:
            problems.append(f"{self.hung} waiter(s) hung")
        if self.duplicates:
            problems.append(f"{self.duplicates} run(s) ended more than once")
        if self.streamed_twice:
            problems.append(
                f"{self.streamed_twice} run(s) ended twice on a node's event stream (the same "
                "terminal, published twice)"
            )
        if self.missing_from_stream:
            problems.append(
                f"{self.missing_from_stream} terminal(s) never reached a node's event stream"
            )
        if self.unexpected:
            problems.append(f"{self.unexpected} run(s) ended differently than they must")
        if self.refused or self.accepted != self.planned:
            problems.append(f"{self.planned - self.accepted} submission(s) were not accepted")
        ended = sum(self.outcomes.values())
        if ended != self.accepted:
            problems.append(f"{self.accepted - ended} accepted run(s) have no terminal")
        if self.killed_running == 0:
            problems.append("the killed node was running nothing when it was killed")
        if self.abandoned_latency > self.abandoned_bound:
            problems.append(
                f"the killed node's runs ended {self.abandoned_latency:.1f}s after the kill "
                f"(bound {self.abandoned_bound:.1f}s)"
            )
        if self.resumed_elsewhere != self.resumed_expected:
            problems.append(
                f"{self.resumed_expected - self.resumed_elsewhere} run(s) the killed node "
                "accepted did not run on another node"
            )
        if self.overlapping_sessions:
            problems.append(f"{self.overlapping_sessions} session(s) had two active runs")
        if self.ran_twice:
            problems.append(f"{self.ran_twice} run(s) ran twice")
        for node in self.nodes:
            if node.fate not in ("stopped", "killed (SIGKILL)"):
                problems.append(f"{node.name} ({node.role}) {node.fate}")
        return problems


class ClusterDemoError(Exception):
    """The cluster could not be started (Redis or a node did not come up)."""


# -- the workload ---------------------------------------------------------------------------


Kind = Literal[
    "doomed", "behind doomed", "lane", "lane queued", "cancel one", "after cancelled", "single"
]


@attrs.frozen(slots=True)
class _Plan:
    kind: Kind
    session_id: str
    prompt: str
    expected: Outcome


@attrs.define
class _Run:
    plan: _Plan
    run_id: str
    node: int
    accepted: bool = False
    terminals: list[RunComplete] = attrs.field(factory=list)
    seen_at: float = 0.0


@attrs.frozen(slots=True)
class _Workload:
    doomed: list[list[_Plan]]
    lanes: list[list[_Plan]]
    cancel_one: list[list[_Plan]]
    singles: list[_Plan]


def _plan(runs: int, rng: random.Random) -> _Workload:
    share = max(1, runs // 12)
    doomed = [
        [
            _Plan("doomed", f"doomed-{k}", "sleep 30", "failed"),
            _Plan("behind doomed", f"doomed-{k}", f"after node death {k} a", "completed"),
            _Plan("behind doomed", f"doomed-{k}", f"after node death {k} b", "completed"),
        ]
        for k in range(max(2, runs // 40))
    ]
    lanes = [
        [
            _Plan("lane", f"lane-{k}", "sleep 30", "cancelled"),
            _Plan("lane queued", f"lane-{k}", f"queued {k} a", "cancelled"),
            _Plan("lane queued", f"lane-{k}", f"queued {k} b", "cancelled"),
        ]
        for k in range(max(1, share // 2))
    ]
    cancel_one = [
        [
            _Plan("cancel one", f"one-{k}", "sleep 30", "cancelled"),
            _Plan("after cancelled", f"one-{k}", f"goes on {k}", "completed"),
        ]
        for k in range(max(1, share // 2))
    ]
    singles = [_Plan("single", f"s-{k % 8}", "fail-early", "failed") for k in range(share)]
    singles += [_Plan("single", f"s-{k % 8}", "fail", "failed") for k in range(share)]
    planned = sum(map(len, (*doomed, *lanes, *cancel_one))) + len(singles)
    for k in range(max(0, runs - planned)):
        prompt = "sleep 1" if k % 10 == 9 else f"hello from demo client {k}"
        singles.append(_Plan("single", f"s-{k % 8}", prompt, "completed"))
    rng.shuffle(singles)
    return _Workload(doomed, lanes, cancel_one, singles)


# -- processes ------------------------------------------------------------------------------


@attrs.define
class _Node:
    name: str
    role: Role
    process: trio.Process
    log: str
    url: str = ""
    killed: bool = False


class _Cluster:
    """The processes of one demo run; :meth:`stop` ends every one of them (bounded)."""

    def __init__(self, scratch: str, redis_binary: str) -> None:
        self.scratch = scratch
        self.root = os.path.join(scratch, "root")
        self.journal = os.path.join(scratch, "journal")
        self.redis_binary = redis_binary
        self.redis: trio.Process | None = None
        self.redis_url = ""
        self.namespace = f"demo-{uuid.uuid4().hex[:12]}"
        self.nodes: list[_Node] = []
        self.exit_codes: dict[str, int | None] = {}

    def _env(self) -> dict[str, str]:
        # The nodes get every option as a flag; none of the user's TRIO_RUNS_* settings
        # (a token, another Redis) may leak into the demo's own cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RUNS_")}
        env[ENV_JOURNAL] = self.journal
        return env

    async def _spawn(self, args: list[str], log: str) -> trio.Process:
        def open_log() -> int:
            return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        fd = await trio.to_thread.run_sync(open_log)
        try:
            return await trio.lowlevel.open_process(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.scratch,
                # A process group of its own: Ctrl-C in the terminal reaches the demo alone,
                # which stops the nodes, then Redis, in that order.
                start_new_session=True,
            )
        finally:
            os.close(fd)  # the child has its own copy

    async def start_redis(self) -> None:
        """Start ``redis-server`` on a free loopback port; returns once it answers PING."""
        directory = os.path.join(self.scratch, "redis")
        await trio.to_thread.run_sync(partial(os.makedirs, directory, exist_ok=True))
        for _ in range(3):  # the free port may be taken before Redis binds it: try another
            port = await _free_port()
            args = [
                self.redis_binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", directory,
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--maxmemory-policy", "noeviction",
            ]  # fmt: skip
            self.redis = await self._spawn(args, os.path.join(self.scratch, "redis.log"))
            with trio.move_on_after(_REDIS_START_BOUND):
                while self.redis.returncode is None:
                    if await _answers_ping(port):
                        self.redis_url = f"redis://127.0.0.1:{port}/0"
                        return
                    await trio.sleep(0.02)
            await _stop(self.redis, 0)
        raise ClusterDemoError(
            f"redis-server did not start: {await _tail(os.path.join(self.scratch, 'redis.log'))}"
        )

    async def start_node(self, name: str, role: Role, capacity: int | None = None) -> _Node:
        """Start one node process; returns once it announced itself (bounded)."""
        args = [
            sys.executable, "-m", "trio_runs.cli", role,
            "--redis", self.redis_url,
            "--redis-namespace", self.namespace,
            "--lease-ttl", f"{LEASE_TTL:g}",
            "--agent", "trio_runs.http.cluster_demo:agent",
            "--close-grace", "1",
        ]  # fmt: skip
        if role == "serve":
            args += ["--port", "0", "--workspace-root", self.root, "--drain", "0.2"]
        if capacity is not None:
            args += ["--capacity", str(capacity)]
        log = os.path.join(self.scratch, f"{name}.log")
        node = _Node(name, role, await self._spawn(args, log), log)
        self.nodes.append(node)  # before anything can fail: stop() ends it whatever happens
        marker = _URL if role == "serve" else re.compile(r"worker running up to")
        with trio.move_on_after(_START_BOUND):
            while node.process.returncode is None:
                text = await trio.Path(log).read_text(errors="replace")
                found = marker.search(text)
                if found:
                    node.url = found.group(1) if role == "serve" else ""
                    return node
                await trio.sleep(0.05)
        raise ClusterDemoError(f"{name} ({role}) did not start: {await _tail(log)}")

    async def kill(self, node: _Node) -> None:
        """SIGKILL ``node`` (no goodbye: its lease just stops being renewed)."""
        node.killed = True
        node.process.kill()
        with trio.move_on_after(_STOP_GRACE):
            await node.process.wait()

    async def stop(self) -> None:
        """Stop every process started: the nodes with SIGTERM (SIGKILL past a grace), then
        Redis. Shielded and bounded: it completes even when the demo was cancelled."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for node in self.nodes:
                    nursery.start_soon(_stop, node.process, _STOP_GRACE)
            for node in self.nodes:
                self.exit_codes[node.name] = node.process.returncode
            if self.redis is not None:
                await _stop(self.redis, _STOP_GRACE)


async def _stop(process: trio.Process, grace: float) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(_STOP_GRACE):
            await process.wait()


async def _free_port() -> int:
    sock = trio.socket.socket()
    try:
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
    finally:
        sock.close()


async def _answers_ping(port: int) -> bool:
    with trio.move_on_after(1.0):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(64)).startswith(b"+PONG")
            except (OSError, trio.BrokenResourceError):
                return False
    return False


async def _tail(path: str) -> str:
    try:
        return (await trio.Path(path).read_text(errors="replace"))[-2000:]
    except OSError as exc:
        return f"(no log: {exc})"


@asynccontextmanager
async def _cluster(scratch: str, redis_binary: str) -> AsyncIterator[_Cluster]:
    cluster = _Cluster(scratch, redis_binary)
    try:
        for directory in (cluster.root, cluster.journal):
            await trio.to_thread.run_sync(os.makedirs, directory)
        yield cluster
    finally:
        await cluster.stop()


# -- the journal ------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class JournalSpan:
    """One run's time in its agent on one node process, from :class:`JournalAgent`'s journal."""

    run_id: str
    session_id: str
    pid: int
    """The node process that ran it."""
    start: float
    end: float | None
    """``None``: no end line (the node died while the run ran)."""


def read_journal(directory: str) -> list[JournalSpan]:
    """Every span the journal in ``directory`` records, node by node. Blocking file I/O: call
    it in a thread from async code. A run started twice on one node gives two spans."""
    spans: list[JournalSpan] = []
    for path in sorted(glob.glob(os.path.join(directory, "*.log"))):
        pid = int(os.path.basename(path).split(".")[0])
        started: dict[str, tuple[str, float]] = {}
        ended: dict[str, float] = {}
        with open(path, encoding="utf-8") as journal:
            for line in journal:
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 4:
                    continue  # a line cut short by SIGKILL
                kind, run_id, session_id, at = fields
                if kind == "start":
                    if run_id in started:  # the same run started twice on one node
                        spans.append(JournalSpan(run_id, session_id, pid, float(at), float(at)))
                    started[run_id] = (session_id, float(at))
                elif kind == "end":
                    ended[run_id] = float(at)
        spans += [
            JournalSpan(run_id, session_id, pid, at, ended.get(run_id))
            for run_id, (session_id, at) in started.items()
        ]
    return spans


def overlapping_sessions(spans: list[JournalSpan], killed_pid: int, killed_at: float) -> int:
    """How many sessions had two runs in their agents at once (R2 says: none).

    A span of ``killed_pid`` without an end stopped at ``killed_at``, when its node died; one
    of any other node without an end never stopped.
    """
    by_session: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    for span in spans:
        end = span.end
        if end is None:
            end = killed_at if span.pid == killed_pid else float("inf")
        by_session[span.session_id].append((span.start, end))
    overlapping = 0
    for intervals in by_session.values():
        intervals.sort()
        if any(nxt[0] < prev[1] for prev, nxt in itertools.pairwise(intervals)):
            overlapping += 1
    return overlapping


# -- the demo -----------------------------------------------------------------------------------


async def run_cluster_demo(
    nodes: int = 3,
    runs: int = 120,
    *,
    redis_binary: str,
    seed: int = 0,
    hang_after: float = 30.0,
    on_tick: Callable[[dict[str, int]], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ClusterDemoReport:
    """Run the cluster demo (see the module docstring); returns what was observed.

    ``redis_binary``: the ``redis-server`` to start. Every wait is bounded by
    ``hang_after`` seconds (a waiter past it counts as hung). ``on_tick`` gets live counters
    about ten times a second, ``on_step`` one line per step (nodes started, the kill).
    Raises :class:`ClusterDemoError` when Redis or a node does not start. Cancelled (Ctrl-C),
    it stops every process it started before the cancellation goes on.
    """
    if nodes < 2:
        raise ValueError(f"the cluster demo needs at least 2 nodes, got {nodes}")
    if runs < MIN_RUNS:
        raise ValueError(f"the cluster demo needs at least {MIN_RUNS} runs, got {runs}")
    step = on_step or (lambda line: None)
    rng = random.Random(seed)
    workload = _plan(runs, rng)
    started = time.monotonic()
    scratch = await trio.to_thread.run_sync(partial(tempfile.mkdtemp, prefix="trio-runs-demo-"))
    keep = False  # the nodes' and Redis's logs are kept when something went wrong
    try:
        async with _cluster(scratch, redis_binary) as cluster:
            await cluster.start_redis()
            step(f"redis-server on {cluster.redis_url} (AOF, appendfsync always)")
            report = await _drive(cluster, nodes, workload, rng, hang_after, on_tick, step, started)
        # The nodes' exit statuses are known only once stop() ran.
        summaries = tuple(
            attrs.evolve(node, fate=_fate(node, cluster.exit_codes.get(node.name)))
            for node in report.nodes
        )
        report = attrs.evolve(report, nodes=summaries, elapsed=time.monotonic() - started)
        keep = bool(report.violations)
        return attrs.evolve(report, logs=scratch if keep else "")
    except ClusterDemoError as exc:
        keep = True
        raise ClusterDemoError(f"{exc}\n(the processes' logs are in {scratch})") from None
    finally:
        if not keep:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(shutil.rmtree, scratch, ignore_errors=True))


def _fate(node: NodeSummary, code: int | None) -> str:
    if node.fate:
        return node.fate
    if code == 0:
        return "stopped"
    return "still running (killed)" if code is None else f"exited with status {code}"


async def _drive(
    cluster: _Cluster,
    count: int,
    workload: _Workload,
    rng: random.Random,
    hang_after: float,
    on_tick: Callable[[dict[str, int]], None] | None,
    step: Callable[[str], None],
    started: float,
) -> ClusterDemoReport:
    records: list[_Run] = []
    live = Counter[str]()
    seen: defaultdict[tuple[int, str], int] = defaultdict(int)
    killed_at = 0.0
    # Mid-demo: once a third of the load has ended (none of it the doomed runs, which
    # nothing but the kill ends), node0 is killed.
    kill_after = (
        len(workload.singles) + sum(map(len, (*workload.lanes, *workload.cancel_one)))
    ) // 3
    third_ended = trio.Event()

    # The stack exits first: it closes the clients and stops the ticker, then the nursery
    # has nothing left to wait for.
    async with trio.open_nursery() as root, AsyncExitStack() as stack:
        ticker = trio.CancelScope()
        if on_tick is not None:
            root.start_soon(_ticker, on_tick, live, ticker)
        stack.callback(ticker.cancel)

        # node0 alone, with room for the doomed runs only: they are its, and nothing else
        # can be (it is full until it dies).
        victim = await cluster.start_node("node0", "serve", capacity=len(workload.doomed))
        step(f"node0 (serve, pid {victim.process.pid}) on {victim.url}: the node to be killed")
        # node0's client notices its death within a few seconds (its liveness bound); the
        # survivors' keep the usual bound, generous for a busy machine.
        first = await stack.enter_async_context(
            RunsClient(victim.url, timeout=_VICTIM_TIMEOUT, max_connections=None)
        )
        victim_ws = (await first.create_workspace(WORKSPACE)).id
        clients = [first]  # index 0: node0, then the other serve nodes
        workspaces = [victim_ws]

        def lost_to_the_kill(node: int, exc: Exception) -> bool:
            # node0's answers lost because it was killed: the client goes to another node.
            return node == 0 and victim.killed and isinstance(exc, ServerLost)

        async def submit(plan: _Plan, node: int) -> _Run:
            run = _Run(plan, new_run_id(), node)
            records.append(run)
            resubmitting = False
            while True:
                try:
                    await clients[run.node].submit(
                        workspaces[run.node],
                        plan.session_id,
                        plan.prompt,
                        run.run_id,
                        resubmitting=resubmitting,
                    )
                    break
                except (ClientError, ServerLost) as exc:
                    if not lost_to_the_kill(run.node, exc):
                        live["refused"] += 1
                        logger.error("demo: submission refused: %s", exc)
                        return run
                    # Maybe accepted before node0 died: the same run id again elsewhere is
                    # safe, its duplicate_run is that acceptance (never a second run).
                    run.node, resubmitting = rng.choice(survivors), True
                    live["resubmitted"] += 1
            run.accepted = True
            live["accepted"] += 1
            return run

        doomed = [await submit(plan, 0) for lane in workload.doomed for plan in lane]
        for run in doomed:
            if run.plan.kind == "doomed":
                await _until_active(first, run.run_id, hang_after)

        # The others join: serve nodes and, from three nodes on, a worker last.
        roles: list[Role] = ["serve"] * (count - 1)
        if count >= 3:
            roles[-1] = "worker"
        async with trio.open_nursery() as starting:
            for k, role in enumerate(roles, start=1):
                starting.start_soon(cluster.start_node, f"node{k}", role)
        cluster.nodes.sort(key=lambda node: int(node.name[4:]))
        for node in cluster.nodes[1:]:
            where = f"on {node.url}" if node.url else "(no HTTP)"
            step(f"{node.name} ({node.role}, pid {node.process.pid}) {where}")
        for node in cluster.nodes[1:]:
            if node.role == "serve":
                client = RunsClient(node.url, timeout=10.0, max_connections=None)
                clients.append(await stack.enter_async_context(client))
                workspaces.append((await client.create_workspace(WORKSPACE)).id)
        survivors = list(range(1, len(clients)))

        def serving() -> list[int]:
            # The serve nodes: node0 too while it lives.
            return survivors if victim.killed else [0, *survivors]

        def any_node() -> int:
            return rng.choice(serving())

        def others(node: int) -> int:
            # Another serve node than ``node`` where there is one.
            return rng.choice([k for k in serving() if k != node] or [node])

        async def waiter(run: _Run, node: int) -> None:
            with trio.move_on_after(hang_after) as bound:
                while True:
                    try:
                        rc = await clients[node].wait_terminal(run.run_id)
                        break
                    except (ClientError, ServerLost) as exc:
                        if not lost_to_the_kill(node, exc):
                            logger.error("demo: waiter for %s failed: %s", run.run_id, exc)
                            live["hung"] += 1
                            return
                        # Its node died: wait on another, as any client would.
                        node = rng.choice(survivors)
                        live["reattached"] += 1
            if bound.cancelled_caught:
                live["hung"] += 1
                return
            if not run.terminals:
                run.seen_at = time.monotonic()
                live[rc.outcome] += 1
                live["ended"] += 1
                if live["ended"] >= kill_after:
                    third_ended.set()
            run.terminals.append(rc)
            live["waiters"] += 1

        def observe(node: int, event: SseEvent) -> None:
            if event.event == "progress":
                live["progress"] += 1
            elif event.event == "run_complete":
                data = event.json()
                if isinstance(data, dict) and isinstance(data.get("run_id"), str):
                    seen[node, data["run_id"]] += 1

        async with trio.open_nursery() as observers:
            # On every serve node that lives to the end (node0's stream dies with it).
            for k in survivors:
                follow = partial(clients[k].stream_events, workspaces[k], partial(observe, k))
                await observers.start(follow)

            async with trio.open_nursery() as load:
                for run in doomed:
                    load.start_soon(waiter, run, rng.choice(survivors))
                    load.start_soon(waiter, run, rng.choice(survivors))

                async def single(plan: _Plan) -> None:
                    run = await submit(plan, any_node())
                    if run.accepted:
                        load.start_soon(waiter, run, run.node)
                        await waiter(run, others(run.node))

                async def lane(plans: list[_Plan]) -> None:
                    # Submitted to one node; its queue cleared on another, its active run
                    # cancelled on a third (where there is one). On the nodes that live.
                    node = rng.choice(survivors)
                    group = [await submit(plan, node) for plan in plans]
                    for run in group:
                        if run.accepted:
                            load.start_soon(waiter, run, node)
                            load.start_soon(waiter, run, others(node))
                    await _until_active(clients[node], group[0].run_id, hang_after)
                    clearing = rng.choice([k for k in survivors if k != node] or [node])
                    cancelling = rng.choice([k for k in survivors if k != node] or [node])
                    try:
                        session = plans[0].session_id
                        await clients[clearing].clear_queue(workspaces[clearing], session)
                        await clients[cancelling].cancel_session(workspaces[cancelling], session)
                    except (ClientError, ServerLost) as exc:
                        live["refused"] += 1
                        logger.error("demo: cancelling %s failed: %s", plans[0].session_id, exc)

                async def cancel_one(plans: list[_Plan]) -> None:
                    # The active run cancelled by id on another node; the session goes on.
                    node = rng.choice(survivors)
                    group = [await submit(plan, node) for plan in plans]
                    for run in group:
                        if run.accepted:
                            load.start_soon(waiter, run, others(node))
                    await _until_active(clients[node], group[0].run_id, hang_after)
                    cancelling = rng.choice([k for k in survivors if k != node] or [node])
                    try:
                        await clients[cancelling].cancel_run(group[0].run_id)
                    except (ClientError, ServerLost) as exc:
                        live["refused"] += 1
                        logger.error("demo: cancelling run %s failed: %s", group[0].run_id, exc)

                async def kill_mid_demo() -> None:
                    nonlocal killed_at
                    with trio.move_on_after(hang_after):
                        await third_ended.wait()
                    killed_at = time.monotonic()
                    await cluster.kill(victim)
                    step(
                        f"killed node0 with SIGKILL at {killed_at - started:.1f}s, while it ran "
                        f"{len(workload.doomed)} runs and clients were using it"
                    )

                for plans in workload.lanes:
                    load.start_soon(lane, plans)
                for plans in workload.cancel_one:
                    load.start_soon(cancel_one, plans)
                for plan in workload.singles:
                    load.start_soon(single, plan)
                load.start_soon(kill_mid_demo)

            # Late waiters: every run once more, long after it ended, on a surviving node.
            async with trio.open_nursery() as late:
                for run in records:
                    if run.accepted:
                        late.start_soon(waiter, run, rng.choice(survivors))
            # Every node's stream carries every terminal of the workspace: wait (bounded)
            # for the last ones to arrive before the observers stop.
            accepted = [run.run_id for run in records if run.accepted]
            with trio.move_on_after(5.0):
                while True:
                    if all(seen[k, r] for k in survivors for r in accepted):
                        break
                    await trio.sleep(0.02)
            observers.cancel_scope.cancel()

    spans = await trio.to_thread.run_sync(read_journal, cluster.journal)
    return _report(cluster, records, live, seen, spans, killed_at, survivors)


def _report(
    cluster: _Cluster,
    records: list[_Run],
    live: Counter[str],
    seen: defaultdict[tuple[int, str], int],
    spans: list[JournalSpan],
    killed_at: float,
    observers: list[int],
) -> ClusterDemoReport:
    victim = cluster.nodes[0]
    pids = {node.process.pid: node for node in cluster.nodes}
    ran_on = Counter(span.pid for span in spans)
    starts = Counter(span.run_id for span in spans)
    where: dict[str, int] = {span.run_id: span.pid for span in spans}
    killed_running = sum(1 for span in spans if span.pid == victim.process.pid and span.end is None)
    outcomes = Counter[str]()
    duplicates = twice = missing = unexpected = abandoned = resumed = resumed_expected = 0
    latency = 0.0
    for run in records:
        if not run.accepted:
            continue
        counts = [seen[k, run.run_id] for k in observers]
        if len(set(run.terminals)) > 1:
            duplicates += 1
            logger.error("demo: run %s ended more than once: %s", run.run_id, set(run.terminals))
        if any(c > 1 for c in counts):
            twice += 1
            logger.error(
                "demo: run %r (%s, %s) seen ending %s time(s) on the serve nodes' streams",
                run.plan.prompt,
                run.plan.kind,
                run.run_id,
                counts,
            )
        missing += sum(1 for c in counts if c == 0)
        if not run.terminals:
            continue
        terminal = run.terminals[0]
        outcomes[terminal.outcome] += 1
        must_abandon = run.plan.kind == "doomed"
        if terminal.abandoned:
            abandoned += 1
        if must_abandon and terminal.abandoned:
            latency = max(latency, run.seen_at - killed_at)
        if terminal.outcome != run.plan.expected or terminal.abandoned != must_abandon:
            unexpected += 1
            logger.error(
                "demo: %r (%s) ended %s%s, expected %s",
                run.plan.prompt,
                run.plan.kind,
                terminal.outcome,
                " (abandoned)" if terminal.abandoned else "",
                run.plan.expected,
            )
        if run.node == 0 and run.plan.kind != "doomed" and run.plan.expected == "completed":
            # Accepted by node0, which was full: it ran elsewhere, before or after the kill.
            resumed_expected += 1
            node = pids.get(where.get(run.run_id, -1))
            if terminal.outcome == "completed" and node is not None and node is not victim:
                resumed += 1
    summaries = tuple(
        NodeSummary(
            node.name,
            node.role,
            node.process.pid,
            node.url,
            ran_on[node.process.pid],
            "killed (SIGKILL)" if node.killed else "",
        )
        for node in cluster.nodes
    )
    return ClusterDemoReport(
        redis_url=cluster.redis_url,
        namespace=cluster.namespace,
        lease_ttl=LEASE_TTL,
        nodes=summaries,
        planned=len(records),
        accepted=sum(run.accepted for run in records),
        refused=live["refused"],
        outcomes={k: outcomes.get(k, 0) for k in ("completed", "failed", "cancelled")},
        waiters_returned=live["waiters"],
        hung=live["hung"],
        duplicates=duplicates,
        streamed_twice=twice,
        missing_from_stream=missing,
        unexpected=unexpected,
        killed_running=killed_running,
        abandoned=abandoned,
        abandoned_latency=latency,
        abandoned_bound=LEASE_TTL + LEASE_TTL / 3 + RECOVERY_SLACK,
        resumed_elsewhere=resumed,
        resumed_expected=resumed_expected,
        reattached=live["reattached"],
        resubmitted=live["resubmitted"],
        overlapping_sessions=overlapping_sessions(spans, victim.process.pid, killed_at),
        ran_twice=sum(1 for n in starts.values() if n > 1),
        progress_events=live["progress"],
        elapsed=0.0,
    )


async def _until_active(client: RunsClient, run_id: str, bound: float) -> None:
    # Poll the run until the node that accepted it says it runs (bounded): the lanes cancel
    # an *active* run and the runs queued behind it. A failure to ask is logged, not raised:
    # the run's outcome tells whether the cancel came too early.
    with trio.move_on_after(bound):
        try:
            while True:
                if (await client.run(run_id)).state == "active":
                    break
                await trio.sleep(0.02)
        except (ClientError, ServerLost) as exc:
            logger.error("demo: asking for run %s failed: %s", run_id, exc)
        return
    logger.warning("demo: run %s did not become active in %gs", run_id, bound)


async def _ticker(
    on_tick: Callable[[dict[str, int]], None], live: Counter[str], scope: trio.CancelScope
) -> None:
    with scope:
        while True:
            on_tick(dict(live))
            await trio.sleep(0.1)
