"""The cluster checker (issue 13, "Prove it"): three ``trio-runs serve --redis`` node processes
on a real ``redis-server`` (AOF on), a seeded mixed load across >= 30 sessions, waiters and
event-stream subscribers on other nodes than the one that accepted each run, and faults at
seeded random moments: a node SIGKILLed (a fresh node takes its place), a node SIGSTOPped past
its lease and let go again (a zombie), ``redis-server`` killed and restarted from its AOF after
an outage longer than the nodes' ``unavailable_after`` (5 s).

Every node runs ``tests/cluster_agent.py`` (``--agent cluster_agent:agent``), which appends a
``start`` and an ``end`` line per execution, with the node's pid and ``time.monotonic_ns()``,
to one JSONL diary; the checker stamps its faults with the same clock (CLOCK_MONOTONIC is
system-wide on Linux).

What is checked (DESIGN.md, "Distribution (Redis)"); every failure message carries the seed,
and ``TRIO_RUNS_CHECKER_SEED=N`` replays the same plan (the same sessions, prompts,
submission times, choices and fault schedule; the machine's timing is not replayed):

- **R1, one ending.** Every run acknowledged with a 202 has exactly one entry on the
  cluster's terminal stream (``{NS}:terminals``, read with ``XRANGE``), and no id that was
  never submitted has one. Its waiter (``GET /v1/runs/{id}/wait`` on another node) got that
  terminal. Each event-stream subscriber (``GET /v1/runs/{id}/events`` on another node) whose
  stream ran to its ``end`` event with reason ``run_ended`` saw exactly one ``run_complete``,
  equal to it; a stream cut because its node was killed or stopped, or cut or ended with
  reason ``store_unavailable`` while Redis was down, may hold at most that one terminal, and
  is opened again on another node. Any other short end is a failure. A terminal that is not
  abandoned is the one the prompt asks for (``noop``/``sleep`` completed with the prompt as
  result, ``fail`` failed).
- **R2, one active run per session.** The agent's executions of one session never overlap in
  time, with one exemption, stated precisely: an execution is *exempt* when Redis ended its
  run abandoned and its node had been SIGSTOPped, or Redis had been down, at some moment
  before the execution ended. Such an execution is a zombie's: the cluster has already given
  its run its ending, the session's lane has moved on, and whatever the fenced node still
  does is refused (below). An execution with no ``end`` line ends at the moment its node was
  SIGKILLed (or, still running, at the moment of the check). And FIFO: of two runs of one
  session that did not end abandoned, one acknowledged before the other's first submission
  was sent starts first.
- **R3, node death is an ending.** A run whose execution was cut by a SIGKILL ends
  abandoned; an abandoned terminal is only ever given to a run that was pending while some
  node was killed or stopped or Redis was down (with cluster-wide routing the node that
  claimed a run may die before its agent starts, so the claimant cannot be named). A run
  cut by SIGKILL reaches its waiter within ``RECOVERY_BOUND`` of the kill (lease, one sweep,
  slack) unless Redis was down meanwhile.
- **R4, zombies are fenced.** The terminals a zombie's agents produce after SIGCONT are
  refused and counted: Redis's ``fenced`` and ``duplicates`` statistics (``{NS}:stats``)
  plus the surviving nodes' ``trio_runs_duplicate_terminals_suppressed_total`` reach at least
  the number of exempt executions that ended on a node still alive at the check. And the
  zombie stops the runs it no longer owns: a run executing on a node through its whole
  SIGSTOP (which lasts 2 to 3 leases) ends abandoned, and its execution ends within
  ``FENCE_BOUND`` of the SIGCONT (the stopped node's victim run sleeps 15 s past it, so a
  zombie that goes on is seen).
- **R5, Redis down is loud and bounded.** Every answer from a node is JSON; never a 5xx but
  ``503`` with code ``store_unavailable``; every request to a node that was neither killed nor
  stopped meanwhile is answered within its bound (never a hang or a dropped connection); every
  waiter got its terminal within its run's bound. What a ``503`` on a submission promises is
  "not acknowledged, and a retry with the same run id is safe": so a retry answers ``202`` or
  ``409 duplicate_run`` and the run then has exactly one terminal; an id left unacknowledged
  (its retry was not made) has at most one terminal, and without one it is unknown (404) on
  every live node within its run's bound — never half-accepted, pending forever.

``SESSIONS_ON_ANY_NODE`` picks where a session's runs are submitted: ``False`` keeps each
session on one node slot (the node-local lanes hold R2 until cluster-wide routing lands);
``True`` submits each run to a random node.

Each node's log is read at the end: a line saying it met an "unhandled error" (a 500, or a
stream cut with a traceback) is a failure. A node that exits without being killed fails the
run at once. A waiter's (and a subscriber's) bound is its run's: the seconds of work queued
ahead of it in its session plus ``RUN_SLACK``; a request's is its ``?timeout=`` (or the
submission's flush bound) plus ``REQUEST_SLACK``.

At the end of the module, minimal reproductions of what the checker found, one fault each.

The CI-sized run takes about 30 s. ``TRIO_RUNS_SOAK_SECONDS=N`` selects the soak: load
and faults for ``N`` seconds, then the same checks; it prints its figures (runs, faults by
kind, abandoned, fenced, waiter latencies). Every wait is bounded in real time and every
process started is killed in teardown.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_e2e as e2e
import test_redis_cluster as cluster_tests
import trio
from redis_server import BINARY, RedisServer

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, CLOCK_MONOTONIC"),
    # A request cut by its bound (a trio cancel scope around httpx) leaves httpx's and
    # httpcore's body generators to the garbage collector, which warns; the cut is the point.
    pytest.mark.filterwarnings("ignore:Async generator 'http(core|x)\\.:ResourceWarning"),
]

SESSIONS_ON_ANY_NODE = False
"""Submit each run to a random node (``True``) or keep each session on one node slot."""

TTL = 1.5  # the nodes' --lease-ttl
UNAVAILABLE_AFTER = 5.0  # the nodes' RedisStore unavailable_after (not a serve flag)
NODES = 3
SESSIONS = 36
CI_LOAD_SECONDS = 22.0
WAIT_TIMEOUT = 2.0  # the waiters' ?timeout=
REQUEST_SLACK = 6.0  # a busy 2-core machine running 3 nodes, Redis and the checker
WAIT_REQUEST_BOUND = WAIT_TIMEOUT + REQUEST_SLACK
SUBMIT_BOUND = UNAVAILABLE_AFTER + REQUEST_SLACK  # a submission's flush is bounded by it
RECOVERY_BOUND = TTL + TTL / 3 + 5.0  # lease, one sweep, a busy machine's slack
FENCE_BOUND = TTL + 5.0  # a zombie learns it was fenced at its next heartbeat, then stops
RUN_SLACK = 30.0  # recovery, an outage, a stop and the machine's slack, on top of the queue
SSE_READ = 5.0  # the nodes' --heartbeat is 1 s: 5 s of silence is a dead stream
AGENT = "cluster_agent:agent"
TESTS = Path(__file__).resolve().parent
SEED_ENV = "TRIO_RUNS_CHECKER_SEED"
SOAK_ENV = "TRIO_RUNS_SOAK_SECONDS"


def now() -> int:
    return time.monotonic_ns()


# -- the plan and what happened -----------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Run:
    run_id: str
    session: str
    prompt: str
    at: float  # seconds into the load
    slot: int  # the session's node slot (used unless SESSIONS_ON_ANY_NODE)
    retry: bool  # retry a 503'd or cut submission with the same run id
    sse: bool
    seed: int
    ahead: float  # seconds of work queued in its session up to it
    acked: bool = False
    acked_at: int = 0
    first_sent_at: int = 0  # when its first submission request was sent
    submit_pid: int = 0
    attempts: list[str] = dataclasses.field(default_factory=list)
    terminal: dict[str, Any] | None = None  # what its waiter got
    seen_at: int = 0
    streams: list[tuple[list[dict[str, Any]], str, int]] = dataclasses.field(
        default_factory=list
    )  # (terminals, its `end` event's reason or "" if cut, node pid)

    @property
    def bound(self) -> float:
        return self.ahead + RUN_SLACK


@dataclasses.dataclass(frozen=True)
class Execution:
    run_id: str
    session: str
    pid: int
    start: int
    end: int
    ended: bool  # an `end` line (False: cut by SIGKILL, or still running)


class Timeline:
    """The faults, stamped with ``time.monotonic_ns()``."""

    def __init__(self) -> None:
        self.kills: dict[int, int] = {}
        self.stops: list[tuple[int, int, int]] = []  # pid, SIGSTOP, SIGCONT (0: still stopped)
        self.outages: list[tuple[int, int]] = []  # Redis down, up (0: still down)
        self.faults: Counter[str] = Counter()

    def node_faulted(self, pid: int, t0: int, t1: int) -> bool:
        """Whether ``pid`` was killed before ``t1`` or stopped at some moment in [t0, t1]."""
        if pid in self.kills and self.kills[pid] <= t1:
            return True
        return any(p == pid and s <= t1 and (c == 0 or c >= t0) for p, s, c in self.stops)

    def redis_down(self, t0: int, t1: int) -> bool:
        return any(d <= t1 and (u == 0 or u >= t0) for d, u in self.outages)

    def stopped_before(self, pid: int, t: int) -> bool:
        return any(p == pid and s <= t for p, s, _ in self.stops)

    def outage_before(self, t: int) -> bool:
        return any(d <= t for d, _ in self.outages)


class Node:
    """One ``trio-runs serve --redis`` process; stderr goes to a file (a pipe nobody reads
    would fill and block the node)."""

    def __init__(self, cluster: Cluster, slot: int) -> None:
        self.slot = slot
        cluster.started += 1
        self.stderr_path = cluster.tmp / f"node{slot}-{cluster.started}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *e2e.CLI,
                "serve",
                "--port", "0",
                "--workspace-root", str(cluster.root),
                "--redis", cluster.redis.url,
                "--redis-namespace", cluster.namespace,
                "--lease-ttl", str(TTL),
                "--agent", AGENT,
                "--heartbeat", "1",
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=cluster.env,
        )  # fmt: skip
        self.pid = self.proc.pid
        self.url = ""
        self.workspace = ""
        self.http = httpx.AsyncClient(
            timeout=REQUEST_SLACK,
            # Idle connections are dropped well before the server's keep-alive timeout
            # (hypercorn's 5 s, httpx's default too): else a request sent on a connection the
            # server is closing meets "Server disconnected without sending a response", an
            # HTTP keep-alive race, not a fault of the node.
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=64, keepalive_expiry=1.0
            ),
        )

    def wait_url(self) -> str:
        url = e2e.announced_url(self.proc, e2e.START_BOUND)  # type: ignore[arg-type]
        if url is None:
            self.kill()
            raise AssertionError(f"node did not start: {self.stderr_path.read_text()[-3000:]}")
        return url

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@dataclasses.dataclass
class Answer:
    status: int | None  # None: no answer (connection lost, or the bound passed)
    body: Any
    problem: str
    t0: int
    t1: int


async def read_stream(response: httpx.Response, terminals: list[dict[str, Any]]) -> str:
    """Read an event stream, appending each ``run_complete`` to ``terminals``; the data of
    its ``end`` event (``""``: the connection ended first)."""
    event, data = "message", ""
    async with contextlib.aclosing(response.aiter_lines()) as lines:
        async for line in lines:
            if line == "":
                if event == "run_complete":
                    terminals.append(json.loads(data))
                elif event == "end":
                    return data or "end"
                event, data = "message", ""
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
    return ""


def end_reason(data: str) -> str:
    """The ``reason`` of an ``end`` event's data (``""`` for no ``end``)."""
    if not data:
        return ""
    try:
        reason = json.loads(data).get("reason")
    except (ValueError, AttributeError):
        return data
    return str(reason)


class Cluster:
    def __init__(
        self, tmp: Path, redis: RedisServer, seed: int, procs: list[Node], soak: float
    ) -> None:
        self.tmp = tmp
        self.redis = redis
        self.seed = seed
        self.rng = random.Random(seed)
        self.procs = procs
        self.soak = soak
        self.namespace = "k" + uuid.uuid4().hex[:12]
        self.root = tmp / "root"
        (self.root / "w").mkdir(parents=True)
        self.diary = tmp / "diary.jsonl"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "TRIO_RUNS_CLUSTER_AGENT_LOG": str(self.diary),
        }
        self.started = 0
        self.slots: list[Node | None] = [None] * NODES
        self.stopped: set[int] = set()
        self.timeline = Timeline()
        self.runs: list[Run] = []
        self.violations: list[str] = []
        self.unavailable = 0  # 503 answers
        self.answers = 0
        self.cut: Counter[str] = Counter()  # event streams cut by a fault: node, redis
        self.max_overrun = 0.0  # the longest a /wait answer took past its ?timeout=
        self.load_started = 0.0

    # -- nodes ------------------------------------------------------------------------

    async def start_node(self, slot: int) -> Node:
        node = await trio.to_thread.run_sync(Node, self, slot)
        self.procs.append(node)  # teardown kills it whatever happens
        node.url = await trio.to_thread.run_sync(node.wait_url)
        node.http.base_url = httpx.URL(node.url)
        with trio.fail_after(e2e.START_BOUND):
            response = await node.http.post("/v1/workspaces", json={"path": "w"})
        assert response.status_code in (200, 201), response.text
        node.workspace = response.json()["id"]
        self.slots[slot] = node
        return node

    def live(self, slot: int) -> Node | None:
        return None if slot in self.stopped else self.slots[slot]

    async def pick_other(self, than: int, rng: random.Random) -> tuple[int, Node]:
        """A live node on another slot than ``than`` (waits while none is)."""
        while True:
            slots = [s for s in range(NODES) if s != than and self.live(s) is not None]
            if slots:
                slot = rng.choice(slots)
                node = self.live(slot)
                assert node is not None
                return slot, node
            await trio.sleep(0.1)

    # -- requests ---------------------------------------------------------------------

    def violation(self, message: str) -> None:
        self.violations.append(message)

    async def call(self, node: Node, method: str, path: str, bound: float, **kwargs: Any) -> Answer:
        """One request, bounded by ``bound``; checks R5's rules on the answer."""
        t0 = now()
        response: httpx.Response | None = None
        problem = ""
        with trio.move_on_after(bound):
            try:
                response = await node.http.request(method, path, timeout=bound, **kwargs)
            except httpx.TransportError as exc:
                problem = repr(exc)
        t1 = now()
        if response is None:
            problem = problem or f"no answer within {bound}s"
            if not self.timeline.node_faulted(node.pid, t0, t1):
                self.violation(
                    f"{method} {path} on healthy node {node.pid}: {problem} "
                    f"(Redis down meanwhile: {self.timeline.redis_down(t0, t1)})"
                )
            return Answer(None, None, problem, t0, t1)
        self.answers += 1
        try:
            body = response.json()
        except ValueError:
            self.violation(
                f"{method} {path}: a {response.status_code} that is not JSON: {response.text[:300]}"
            )
            return Answer(response.status_code, None, "not JSON", t0, t1)
        status = response.status_code
        if status == 503:
            self.unavailable += 1
            code = body.get("error", {}).get("code") if isinstance(body, dict) else None
            if code != "store_unavailable":
                self.violation(f"{method} {path}: 503 with code {code!r}: {body}")
        elif status >= 500:
            self.violation(
                f"{method} {path} on node {node.pid}: {status} {body} "
                f"(Redis down meanwhile: {self.timeline.redis_down(t0, t1)})"
            )
        return Answer(status, body, "", t0, t1)

    # -- load -------------------------------------------------------------------------

    def plan(self, seconds: float, sessions: int) -> None:
        rate = 160 / CI_LOAD_SECONDS / SESSIONS  # runs per second per session
        for index in range(sessions):
            session = f"s{index:02d}"
            count = max(3, round(rate * seconds * self.rng.uniform(0.7, 1.3)))
            times = sorted(self.rng.uniform(0, seconds) for _ in range(count))
            ahead = 0.0
            recent: list[tuple[float, float]] = []
            for at in times:
                roll = self.rng.random()
                if roll < 0.55:
                    prompt, work = "noop", 0.0
                elif roll < 0.9:
                    work = round(self.rng.uniform(0.1, 2.5), 2)
                    prompt = f"sleep {work}"
                else:
                    prompt, work = "fail", 0.0
                recent = [(t, w) for t, w in recent if t > at - 60] + [(at, work)]
                ahead = sum(w for _, w in recent)
                self.runs.append(
                    Run(
                        run_id=uuid.UUID(int=self.rng.getrandbits(128)).hex,
                        session=session,
                        prompt=prompt,
                        at=at,
                        slot=index % NODES,
                        retry=self.rng.random() < 0.7,
                        sse=self.rng.random() < 0.5,
                        seed=self.rng.getrandbits(32),
                        ahead=ahead,
                    )
                )
        self.runs.sort(key=lambda run: run.at)

    async def load(self, nursery: trio.Nursery) -> None:
        start = trio.current_time()
        for run in list(self.runs):
            await trio.sleep_until(start + run.at)
            nursery.start_soon(self.submit, run, nursery)

    async def submit(self, run: Run, nursery: trio.Nursery, slot: int | None = None) -> None:
        """Submit ``run`` (to ``slot``, else by the routing rule) until it is acknowledged,
        refused for good, or its bound passes; then start its waiter and subscriber."""
        rng = random.Random(run.seed)
        deadline = trio.current_time() + run.bound
        tried = False
        while trio.current_time() < deadline:
            if slot is None and SESSIONS_ON_ANY_NODE:
                target = rng.choice([s for s in range(NODES) if self.live(s) is not None] or [0])
            else:
                target = run.slot if slot is None else slot
            node = self.live(target)
            if node is None or not node.workspace:
                await trio.sleep(0.1)
                continue
            run.first_sent_at = run.first_sent_at or now()
            answer = await self.call(
                node,
                "POST",
                f"/v1/workspaces/{node.workspace}/messages",
                SUBMIT_BOUND,
                json={"session_id": run.session, "prompt": run.prompt, "run_id": run.run_id},
            )
            code = answer.body.get("error", {}).get("code") if isinstance(answer.body, dict) else ""
            if answer.status == 202 or (answer.status == 409 and code == "duplicate_run" and tried):
                run.acked, run.acked_at, run.submit_pid = True, answer.t1, node.pid
                run.slot = target
                run.attempts.append(str(answer.status))
                nursery.start_soon(self.waiter, run)
                if run.sse:
                    nursery.start_soon(self.subscriber, run)
                return
            tried = True
            run.attempts.append(str(answer.status or answer.problem[:40]))
            if answer.status not in (503, None):
                self.violation(f"submission of {run.run_id}: {answer.status} {answer.body}")
                return
            if not run.retry:
                return  # left unacknowledged: checked as never half-accepted
            await trio.sleep(0.2)
        self.violation(f"run {run.run_id} was never acknowledged within {run.bound}s")

    async def waiter(self, run: Run) -> None:
        rng = random.Random(run.seed + 1)
        deadline = trio.current_time() + run.bound
        while trio.current_time() < deadline:
            _, node = await self.pick_other(run.slot, rng)
            answer = await self.call(
                node,
                "GET",
                f"/v1/runs/{run.run_id}/wait",
                WAIT_REQUEST_BOUND,
                params={"timeout": WAIT_TIMEOUT},
            )
            if answer.status is not None:
                overrun = (answer.t1 - answer.t0) / 1e9 - WAIT_TIMEOUT
                self.max_overrun = max(self.max_overrun, overrun)
            if answer.status == 200 and answer.body.get("terminal"):
                run.terminal, run.seen_at = answer.body["terminal"], answer.t1
                return
            if answer.status not in (202, 404, 503, None):
                self.violation(f"wait for {run.run_id}: {answer.status} {answer.body}")
                return
            if answer.status != 202:
                await trio.sleep(0.1)
        self.violation(
            f"the waiter of run {run.run_id} ({run.prompt!r}, session {run.session}) got no "
            f"terminal within its bound of {run.bound:.1f}s"
        )

    async def subscriber(self, run: Run) -> None:
        rng = random.Random(run.seed + 2)
        deadline = trio.current_time() + run.bound
        while trio.current_time() < deadline:
            _, node = await self.pick_other(run.slot, rng)
            terminals: list[dict[str, Any]] = []
            ended = ""  # the data of its `end` event, once it came
            problem = ""
            t0 = now()
            with trio.move_on_at(deadline) as bounded:
                try:
                    async with node.http.stream(
                        "GET",
                        f"/v1/runs/{run.run_id}/events",
                        timeout=httpx.Timeout(REQUEST_SLACK, read=SSE_READ),
                    ) as response:
                        if response.status_code != 200:
                            await response.aread()
                            if response.status_code == 503 or response.status_code == 404:
                                if response.status_code == 503:
                                    self.unavailable += 1
                                await trio.sleep(0.1)
                                continue
                            self.violation(
                                f"events of {run.run_id}: {response.status_code} {response.text}"
                            )
                            return
                        ended = await read_stream(response, terminals)
                except httpx.TransportError as exc:
                    problem = repr(exc)
            t1 = now()
            reason = end_reason(ended)
            run.streams.append((terminals, reason, node.pid))
            if reason == "run_ended":
                return
            if bounded.cancelled_caught:
                break  # its bound passed mid-stream: said below
            # Ended short of its run's end: by its node's death or stop (cut), or by Redis
            # going away (cut, or a loud `end` saying store_unavailable). Open it again.
            if self.timeline.node_faulted(node.pid, t0, t1):
                self.cut[f"node ({reason or 'cut'})"] += 1
            elif self.timeline.redis_down(t0, t1) and reason in ("", "store_unavailable"):
                self.cut[f"redis ({reason or 'cut'})"] += 1
            else:
                self.violation(
                    f"the event stream of {run.run_id} on healthy node {node.pid} ended short "
                    f"of its run's end ({reason or problem or 'closed'}; "
                    f"{len(terminals)} terminals; Redis down: {self.timeline.redis_down(t0, t1)})"
                )
                return
            await trio.sleep(0.2)
        self.violation(f"no event stream of {run.run_id} reached its end within {run.bound}s")

    # -- faults -----------------------------------------------------------------------

    async def faults(self, kinds: list[str], seconds: float, nursery: trio.Nursery) -> None:
        """Inject ``kinds`` in order at seeded moments over ``seconds`` (one at a time)."""
        start = trio.current_time()
        gap = seconds / (len(kinds) + 1)
        for index, kind in enumerate(kinds):
            at = gap * (index + 0.5) + self.rng.uniform(0, gap * 0.5)
            await trio.sleep_until(start + at)
            await self.fault(kind, nursery)

    async def soak_faults(self, seconds: float, nursery: trio.Nursery) -> None:
        end = trio.current_time() + seconds
        kinds = ["kill", "stop", "redis"]
        while True:
            await trio.sleep(self.rng.uniform(2.0, 8.0))
            if trio.current_time() >= end:
                return
            await self.fault(self.rng.choice(kinds), nursery)

    async def victim_run(self, slot: int, prompt: str, nursery: trio.Nursery) -> int:
        """Submit ``prompt`` to ``slot`` in a session of its own and return the slot of the
        node that executes it, once its agent has started (from the diary: with cluster-wide
        routing any node may claim it), so that the fault lands on a node mid-run."""
        run = Run(
            run_id=uuid.UUID(int=self.rng.getrandbits(128)).hex,
            session=f"v{len(self.runs)}",
            prompt=prompt,
            at=trio.current_time() - self.load_started,
            slot=slot,
            retry=True,
            sse=True,
            seed=self.rng.getrandbits(32),
            ahead=float(prompt.split()[1]),
        )
        self.runs.append(run)
        await self.submit(run, nursery, slot)
        marker = f'"run": "{run.run_id}"'
        with trio.move_on_after(e2e.START_BOUND):
            while True:
                text = await trio.to_thread.run_sync(self.diary_text)
                for line in text.splitlines():
                    if marker in line and '"ev": "start"' in line:
                        pid = json.loads(line)["pid"]
                        for index, node in enumerate(self.slots):
                            if node is not None and node.pid == pid and self.live(index):
                                return index
                await trio.sleep(0.05)
        return slot

    def diary_text(self) -> str:
        return self.diary.read_text() if self.diary.exists() else ""

    async def fault(self, kind: str, nursery: trio.Nursery) -> None:
        self.timeline.faults[kind] += 1
        if kind == "redis":
            down = self.rng.uniform(0.3, 7.0) if self.soak else self.rng.uniform(5.5, 7.0)
            self.timeline.outages.append((now(), 0))
            await trio.to_thread.run_sync(self.redis.kill)
            await trio.sleep(down)
            await trio.to_thread.run_sync(self.redis.start)
            self.timeline.outages[-1] = (self.timeline.outages[-1][0], now())
            return
        slot = self.rng.choice([s for s in range(NODES) if self.live(s) is not None])
        if kind == "kill":
            slot = await self.victim_run(slot, "sleep 60", nursery)
            node = self.slots[slot]
            assert node is not None
            self.slots[slot] = None
            self.timeline.kills[node.pid] = now()
            node.proc.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(node.proc.wait, 10)
            await self.start_node(slot)
        elif kind == "stop":
            pause = self.rng.uniform(2 * TTL, 3 * TTL)
            # Long enough to be still running well past FENCE_BOUND after SIGCONT, unless the
            # zombie stops it (R4).
            slot = await self.victim_run(slot, f"sleep {round(pause + 15, 2)}", nursery)
            node = self.slots[slot]
            assert node is not None
            self.stopped.add(slot)
            stopped_at = now()
            self.timeline.stops.append((node.pid, stopped_at, 0))
            node.proc.send_signal(signal.SIGSTOP)
            try:
                await trio.sleep(pause)
            finally:
                node.proc.send_signal(signal.SIGCONT)
                self.timeline.stops[-1] = (node.pid, stopped_at, now())
                self.stopped.discard(slot)

    # -- the run ----------------------------------------------------------------------

    async def run(self, seconds: float) -> None:
        for slot in range(NODES):
            await self.start_node(slot)
        self.plan(seconds, SESSIONS)
        async with trio.open_nursery() as watching:
            watching.start_soon(self.watch_nodes)
            async with trio.open_nursery() as nursery:
                self.load_started = trio.current_time()
                nursery.start_soon(self.load, nursery)
                if self.soak:
                    nursery.start_soon(self.soak_faults, seconds, nursery)
                else:
                    kinds = ["kill", "stop", "redis"]
                    self.rng.shuffle(kinds)
                    nursery.start_soon(self.faults, kinds, seconds, nursery)
            # Every task is bounded by its run's bound: the nursery closing is the drain.
            watching.cancel_scope.cancel()

    async def watch_nodes(self) -> None:
        """Fail the run at once when a node exits that the checker did not kill (a crash),
        instead of letting every request to it time out."""
        while True:
            await trio.sleep(0.25)
            for node in self.procs:
                code = node.proc.poll()
                if code is not None and node.pid not in self.timeline.kills:
                    tail = (await trio.to_thread.run_sync(node.stderr_text))[-3000:]
                    raise AssertionError(
                        f"seed {self.seed}: node {node.pid} (slot {node.slot}) exited by itself "
                        f"with {code}:\n{tail}"
                    )

    # -- the checks -------------------------------------------------------------------

    def redis_cli(self, *args: str) -> str:
        cli = str(Path(BINARY or "redis-server").with_name("redis-cli"))
        done = subprocess.run(
            [cli, "-p", str(self.redis.port), "--raw", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    def terminals(self) -> dict[str, list[dict[str, Any]]]:
        lines = self.redis_cli("XRANGE", "{" + self.namespace + "}:terminals", "-", "+")
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        rows = lines.splitlines()
        for i, line in enumerate(rows[:-3]):
            if line == "id" and rows[i + 2] == "rc":
                found[rows[i + 1]].append(json.loads(rows[i + 3]))
        return found

    def stats(self) -> dict[str, int]:
        items = self.redis_cli("HGETALL", "{" + self.namespace + "}:stats").split()
        return {items[i]: int(items[i + 1]) for i in range(0, len(items) - 1, 2)}

    def executions(self, at: int) -> list[Execution]:
        starts: dict[tuple[str, int], dict[str, Any]] = {}
        ends: dict[tuple[str, int], int] = {}
        for line in self.diary_text().splitlines():
            record = json.loads(line)
            key = (record["run"], record["pid"])
            if record["ev"] == "start":
                starts[key] = record
            else:
                ends[key] = record["t"]
        found = []
        for key, start in starts.items():
            end = ends.get(key)
            cut = self.timeline.kills.get(start["pid"], at)
            found.append(
                Execution(
                    key[0], start["session"], start["pid"], start["t"],
                    end if end is not None else cut, end is not None,
                )
            )  # fmt: skip
        return found

    async def settle_unacknowledged(self, run: Run) -> None:
        """Wait (bounded) until a run whose submission was never acknowledged is either
        ended (it was accepted after all: the terminal checks then hold it to one terminal)
        or unknown to every live node (never accepted): never pending past the bound."""
        deadline = trio.current_time() + run.bound
        answers: list[Answer] = []
        while trio.current_time() < deadline:
            answers = [
                await self.call(node, "GET", f"/v1/runs/{run.run_id}", SUBMIT_BOUND)
                for node in self.slots
                if node is not None
            ]
            if all(a.status == 404 for a in answers) or any(
                a.status == 200 and a.body.get("terminal") for a in answers
            ):
                return
            await trio.sleep(0.5)
        self.violation(
            f"unacknowledged run {run.run_id} (attempts {run.attempts}) is neither ended nor "
            f"unknown {run.bound:.0f}s on: {[(a.status, a.body) for a in answers]}"
        )

    def pids(self) -> set[int]:
        return {node.pid for node in self.procs}

    def dump_timeline(self) -> None:
        # For whoever reads a failure: the faults, with the wall clock of the nodes' logs.
        wall, mono = time.time(), now()
        (self.tmp / "timeline.json").write_text(
            json.dumps(
                {
                    "wall_minus_monotonic_s": wall - mono / 1e9,
                    "nodes": [[n.slot, n.pid, n.stderr_path.name] for n in self.procs],
                    "kills": self.timeline.kills,
                    "stops": self.timeline.stops,
                    "outages": self.timeline.outages,
                    "runs": [dataclasses.asdict(run) for run in self.runs],
                },
                indent=1,
            )
        )

    async def check(self) -> dict[str, object]:
        # R5: an unacknowledged submission is never half-accepted (settled before the
        # terminals are read: one accepted after all may still be running).
        for run in self.runs:
            if not run.acked:
                await self.settle_unacknowledged(run)
        checked_at = now()
        terminals = await trio.to_thread.run_sync(self.terminals)
        stats = await trio.to_thread.run_sync(self.stats)
        executions = await trio.to_thread.run_sync(self.executions, checked_at)
        runs = {run.run_id: run for run in self.runs}
        same = ("result", "error", "cancelled", "abandoned")

        def key(rc: dict[str, Any]) -> tuple[object, ...]:
            return tuple(rc.get(k) for k in same)

        # R1: one terminal per acknowledged run, in Redis, to its waiter, on every stream.
        for run_id in terminals.keys() - runs.keys():
            self.violation(f"a terminal for run {run_id}, never submitted: {terminals[run_id]}")
        for run in self.runs:
            ends = terminals.get(run.run_id, [])
            if len(ends) > 1:
                self.violation(f"run {run.run_id} has {len(ends)} terminals in Redis: {ends}")
            if not run.acked:
                continue
            if len(ends) != 1:
                self.violation(f"acknowledged run {run.run_id} has no terminal in Redis")
                continue
            (rc,) = ends
            if run.terminal is not None and key(run.terminal) != key(rc):
                self.violation(f"the waiter of {run.run_id} got {run.terminal}, Redis holds {rc}")
            for seen, reason, pid in run.streams:
                if len(seen) > 1 or (reason == "run_ended" and len(seen) != 1):
                    self.violation(
                        f"a stream of {run.run_id} on node {pid} carried {len(seen)} terminals "
                        f"(end: {reason or 'none, cut'})"
                    )
                if any(key(t) != key(rc) for t in seen):
                    self.violation(f"a stream of {run.run_id} showed {seen}, Redis holds {rc}")
            if not rc.get("abandoned"):
                if run.prompt == "fail":
                    good = bool(rc.get("error")) and not rc.get("cancelled")
                else:
                    good = rc.get("result") == run.prompt and rc.get("error") is None
                if not good:
                    self.violation(f"run {run.run_id} ({run.prompt!r}) ended as {rc}")
        # R3: abandoned only for a reason; a run cut by SIGKILL ends abandoned.
        by_run = {run_id: ends[0] for run_id, ends in terminals.items() if ends}
        for run_id, rc in by_run.items():
            run = runs.get(run_id)
            if run is None or not rc.get("abandoned"):
                continue
            # With cluster-wide routing the node that claimed a run may die before its agent
            # starts (no diary line names it): any node's fault while the run was pending
            # explains an abandonment.
            seen = run.seen_at or checked_at
            pending = (run.first_sent_at, seen)
            reason = (
                any(self.timeline.node_faulted(pid, *pending) for pid in self.pids())
                or self.timeline.redis_down(*pending)
                or not run.acked
            )
            if not reason:
                self.violation(f"run {run_id} ended abandoned with no fault to explain it: {rc}")
        for execution in executions:
            rc = by_run.get(execution.run_id)
            if (
                not execution.ended
                and execution.pid in self.timeline.kills
                and rc is not None
                and not rc.get("abandoned")
            ):
                self.violation(f"run {execution.run_id} was cut by SIGKILL but ended {rc}")

            run = runs.get(execution.run_id)
            killed = self.timeline.kills.get(execution.pid, 0)
            if not execution.ended and killed and run is not None and run.seen_at:
                late = (run.seen_at - killed) / 1e9
                if late > RECOVERY_BOUND and not self.timeline.redis_down(killed, run.seen_at):
                    self.violation(
                        f"run {execution.run_id}, cut by SIGKILL, ended {late:.1f}s after the "
                        f"kill (bound {RECOVERY_BOUND}s)"
                    )
        # R4: a run its node held through a whole stop (past the lease) ends abandoned, and
        # the zombie stops the runs it no longer owns.
        for pid, stopped, resumed in self.timeline.stops:
            for execution in executions:
                rc = by_run.get(execution.run_id)
                if (
                    execution.pid == pid
                    and execution.start < stopped
                    and execution.end > resumed
                    and rc is not None
                    and not rc.get("abandoned")
                ):
                    self.violation(
                        f"run {execution.run_id} ran on node {pid} through its stop past the "
                        f"lease, yet ended {rc}"
                    )
                if (
                    execution.pid == pid
                    and execution.start < stopped
                    and execution.end > resumed
                    and rc is not None
                    and rc.get("abandoned")
                    and (execution.end - resumed) / 1e9 > FENCE_BOUND
                ):
                    self.violation(
                        f"zombie {pid} went on with run {execution.run_id} (abandoned in Redis) "
                        f"for {(execution.end - resumed) / 1e9:.1f}s after SIGCONT "
                        f"(bound {FENCE_BOUND}s; {'ended' if execution.ended else 'still running'})"
                    )

        # R2: no two executions of one session overlap, zombies' exempt.
        def exempt(e: Execution) -> bool:
            rc = by_run.get(e.run_id)
            return bool(rc and rc.get("abandoned")) and (
                self.timeline.stopped_before(e.pid, e.end) or self.timeline.outage_before(e.end)
            )

        by_session: dict[str, list[Execution]] = defaultdict(list)
        for execution in executions:
            if not exempt(execution):
                by_session[execution.session].append(execution)
        for session, held in by_session.items():
            held.sort(key=lambda e: e.start)
            for a, b in itertools.pairwise(held):
                if b.start < a.end:
                    self.violation(f"session {session}: executions overlap: {a} and {b}")
            # FIFO: a run acknowledged before another's first submission was sent was
            # accepted first, so it starts first (runs ended abandoned are not held to it).
            fifo = [
                (runs[e.run_id], e)
                for e in held
                if e.run_id in runs
                and runs[e.run_id].acked
                and not by_run.get(e.run_id, {}).get("abandoned")
            ]
            for run_a, a in fifo:
                for run_b, b in fifo:
                    if run_a.acked_at < run_b.first_sent_at and b.start < a.start:
                        self.violation(
                            f"session {session}: run {run_b.run_id} ({run_b.prompt!r}) started "
                            f"before {run_a.run_id} ({run_a.prompt!r}), acknowledged before it "
                            "was submitted"
                        )
        # R4: a zombie's terminals are refused and counted.
        alive = {node.pid for node in self.slots if node is not None}
        zombie_ends = [e for e in executions if exempt(e) and e.ended and e.pid in alive]
        suppressed = 0
        for node in filter(None, self.slots):
            with trio.fail_after(SUBMIT_BOUND):  # /metrics is text, not the JSON call() checks
                text = (await node.http.get("/metrics", timeout=SUBMIT_BOUND)).text
            match = re.search(r"^trio_runs_duplicate_terminals_suppressed_total (\S+)$", text, re.M)
            suppressed += int(float(match.group(1))) if match else 0
        counted = stats.get("fenced", 0) + stats.get("duplicates", 0) + suppressed
        if counted < len(zombie_ends):
            self.violation(
                f"{len(zombie_ends)} zombie executions ended, only {counted} refusals counted "
                f"({stats}, suppressed {suppressed})"
            )
        # R5: no request met an unhandled error (a 500, or a stream cut with a traceback).
        tracebacks = 0
        for node in self.procs:
            text = await trio.to_thread.run_sync(node.stderr_text)
            tracebacks += text.count("Traceback (most recent call last)")
            for line in text.splitlines():
                if "unhandled error in" in line:
                    self.violation(f"node {node.pid} logged: {line}")
        outcomes: Counter[str] = Counter()
        for rc in by_run.values():
            outcomes[
                "abandoned" if rc.get("abandoned")
                else "cancelled" if rc.get("cancelled")
                else "failed" if rc.get("error")
                else "completed"
            ] += 1  # fmt: skip
        latencies = sorted(
            (r.seen_at - r.acked_at) / 1e9 for r in self.runs if r.acked and r.seen_at
        )
        return {
            "seed": self.seed,
            "runs": len(self.runs),
            "acknowledged": sum(r.acked for r in self.runs),
            "unacknowledged": sum(not r.acked for r in self.runs),
            "terminals": dict(outcomes),
            "faults": dict(self.timeline.faults),
            "executions": len(executions),
            "zombie executions (exempt)": sum(exempt(e) for e in executions),
            "cluster stats": stats,
            "suppressed on live nodes": suppressed,
            "503 answers": self.unavailable,
            "tracebacks logged by nodes": tracebacks,
            "answers": self.answers,
            "streams": sum(len(r.streams) for r in self.runs),
            "streams cut by a fault": dict(self.cut),
            "waiter latency s (median, p99, max)": (
                round(latencies[len(latencies) // 2], 3),
                round(latencies[int(len(latencies) * 0.99)], 3),
                round(latencies[-1], 3),
            )
            if latencies
            else None,
            "max /wait overrun s": round(self.max_overrun, 3),
        }


# -- the tests ----------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[Node]]:
    """Every node started in a test, killed in teardown whatever happened."""
    started: list[Node] = []
    yield started
    for node in started:
        node.kill()


def seed_for() -> int:
    """``TRIO_RUNS_CHECKER_SEED`` if set, else a fresh seed (printed in any failure)."""
    given = os.environ.get(SEED_ENV)
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


def failure(cluster: Cluster, figures: object) -> str:
    violations = cluster.violations
    kinds = dict(Counter(" ".join(v.split()[:2]) for v in violations))
    return (
        f"seed {cluster.seed} ({SEED_ENV}={cluster.seed} replays it; the faults and the diary "
        f"are in {cluster.tmp}): {len(violations)} violations, by kind {kinds}:\n"
        + "\n".join(violations[:40])
        + f"\nfigures: {figures}"
    )


async def checked(cluster: Cluster, seconds: float, bound: float) -> dict[str, object]:
    try:
        with trio.fail_after(bound):
            await cluster.run(seconds)
            figures = await cluster.check()
    except trio.TooSlowError:
        raise AssertionError(f"not done within {bound}s: " + failure(cluster, None)) from None
    finally:
        for node in cluster.procs:
            with trio.move_on_after(5):
                await node.http.aclose()
        gc.collect()  # the cut requests' generators are finalised here, under the filter
        await trio.to_thread.run_sync(cluster.dump_timeline)
    print(json.dumps(figures, indent=2))
    assert not cluster.violations, failure(cluster, figures)
    return figures


async def test_a_faulted_cluster_keeps_every_promise(
    redis_server: RedisServer, processes: list[Node], tmp_path: Path, real_clock: None
) -> None:
    """The CI-sized checker: ~160 runs over 36 sessions in 22 s; one SIGKILL, one zombie, one
    Redis outage past ``unavailable_after``, in a seeded order at seeded moments."""
    seed = seed_for()
    cluster = Cluster(tmp_path, redis_server, seed, processes, soak=0)
    figures = await checked(cluster, CI_LOAD_SECONDS, 80)
    faults = figures["faults"]
    assert faults == {"kill": 1, "stop": 1, "redis": 1}, (seed, faults)
    assert cluster.unavailable >= 1, f"seed {seed}: no request met the Redis outage: {figures}"


@pytest.mark.skipif(not os.environ.get(SOAK_ENV), reason=f"the soak runs with {SOAK_ENV}=N")
async def test_soak(
    redis_server: RedisServer, processes: list[Node], tmp_path: Path, real_clock: None
) -> None:
    """The soak: load and random faults for ``TRIO_RUNS_SOAK_SECONDS``, then every check."""
    seconds = float(os.environ[SOAK_ENV])
    seed = seed_for()
    cluster = Cluster(tmp_path, redis_server, seed, processes, soak=seconds)
    await checked(cluster, seconds, seconds + 120)


# -- minimal reproductions of what the checker found (one fault, no load) -----------------


def test_a_wait_on_another_node_while_redis_is_down_is_a_503(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """R5: a waiter on node B of a run accepted on node A, while Redis is down, is answered
    503 ``store_unavailable`` (or 202 at its timeout), never a 500 — nor a hang."""
    namespace = "r" + uuid.uuid4().hex[:12]
    started: list[e2e.Server | e2e.Client] = []
    try:
        a, b = cluster_tests.start_nodes(started, tmp_path, redis_server.url, namespace, 2)
        run_id = cluster_tests.submit(a, "s", "sleep 30")
        deadline = time.monotonic() + e2e.START_BOUND
        while b.http.get(f"/v1/runs/{run_id}").status_code != 200:  # B knows the run
            assert time.monotonic() < deadline
            time.sleep(0.05)
        redis_server.kill()
        for _ in range(3):
            started_at = time.monotonic()
            response = b.http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 1}, timeout=15)
            assert time.monotonic() - started_at < 1 + REQUEST_SLACK
            assert response.status_code in (202, 503), (response.status_code, response.text)
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "store_unavailable"
    finally:
        for item in started:
            item.kill()


def diary_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_zombie_stops_a_run_it_claimed_from_another_node(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """R4: node B runs a run accepted by node A (cluster-wide routing); B is stopped past its
    lease, the run ends abandoned, and when B comes back it stops that run (it no longer
    owns it) within ``FENCE_BOUND`` instead of running it to its end."""
    namespace = "z" + uuid.uuid4().hex[:12]
    diary = tmp_path / "diary.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TRIO_RUNS_CLUSTER_AGENT_LOG": str(diary),
    }
    (tmp_path / "w").mkdir()
    flags = ["--redis", redis_server.url, "--redis-namespace", namespace, "--lease-ttl", str(TTL)]
    started: list[e2e.Server] = []
    try:
        for _ in range(2):
            started.append(e2e.Server(tmp_path, *flags, "--agent", AGENT, env=env))
        for node in started:
            node.wait_url()
        a, b = started
        on_b = ""
        for attempt in range(20):  # until B claims one of A's runs
            run_id = cluster_tests.submit(a, f"z{attempt}", "sleep 30")
            deadline = time.monotonic() + e2e.START_BOUND
            while not (pids := [d["pid"] for d in diary_lines(diary) if d["run"] == run_id]):
                assert time.monotonic() < deadline, f"run {run_id} never started"
                time.sleep(0.05)
            if pids[0] == b.proc.pid:
                on_b = run_id
                break
        if not on_b:
            pytest.skip("node B never claimed a run accepted by node A")
        b.proc.send_signal(signal.SIGSTOP)
        try:
            ended = cluster_tests.wait_terminal(a, on_b, RECOVERY_BOUND)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        assert ended["abandoned"] is True
        while not any(d["ev"] == "end" and d["run"] == on_b for d in diary_lines(diary)):
            assert time.monotonic() - resumed < FENCE_BOUND, (
                f"zombie B still runs {on_b}, abandoned in Redis, {FENCE_BOUND}s after SIGCONT"
            )
            time.sleep(0.05)
    finally:
        for node in started:
            node.kill()


def test_a_run_through_a_redis_restart_ends_once_and_never_cancelled_by_a_user(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """R3/R4/R5: Redis away for three leases (killed, restarted from its AOF) while a node
    runs a run. Nobody declared the node dead (no node swept while Redis was away, and none
    sweeps until Redis has been up for 1.5 leases), so it takes its lease back and the run
    ends as its agent ends it: completed. It must never end ``cancelled`` with reason
    ``user``, which nobody asked for (a claim that found the lease expired used to fence
    the node, which then cancelled its own run under a new lease)."""
    namespace = "f" + uuid.uuid4().hex[:12]
    started: list[e2e.Server | e2e.Client] = []
    try:
        (a,) = cluster_tests.start_nodes(started, tmp_path, redis_server.url, namespace, 1)
        run_id = cluster_tests.submit(a, "s", "sleep 8")
        a.wait_state(run_id, "active")
        redis_server.kill()
        time.sleep(3 * TTL)
        redis_server.start()
        ended = cluster_tests.wait_terminal(a, run_id, 8 + RECOVERY_BOUND + UNAVAILABLE_AFTER)
        assert ended.get("reason") != "user", json.dumps(ended)
        completed = ended["error"] is None and ended["cancelled"] is False
        assert completed or ended.get("abandoned") is True, json.dumps(ended)
    finally:
        for item in started:
            item.kill()


def test_a_lost_claim_reply_does_not_wedge_its_session(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """R1/R2: Redis killed (and restarted from its AOF) while a node claims runs as fast as
    they come: a claim Redis ran but whose reply the node never got must still end in a
    terminal, and its session's lane must go on. Statistical: five restarts under a storm
    of no-op runs over 40 sessions; every acknowledged run must end within the bound."""
    namespace = "l" + uuid.uuid4().hex[:12]
    started: list[e2e.Server | e2e.Client] = []
    acked: list[str] = []
    stop = threading.Event()

    def storm(worker: int) -> None:
        with httpx.Client(base_url=node.url, timeout=REQUEST_SLACK + UNAVAILABLE_AFTER) as http:
            workspace = http.post("/v1/workspaces", json={"path": "w"}).json()["id"]
            count = 0
            while not stop.is_set():
                count += 1
                run_id = uuid.uuid4().hex
                try:
                    response = http.post(
                        f"/v1/workspaces/{workspace}/messages",
                        json={"session_id": f"l{worker}-{count % 5}", "prompt": "noop",
                              "run_id": run_id},
                    )  # fmt: skip
                except httpx.TransportError:
                    continue
                if response.status_code == 202:
                    acked.append(run_id)
                else:
                    time.sleep(0.05)

    try:
        (node,) = cluster_tests.start_nodes(started, tmp_path, redis_server.url, namespace, 1)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(storm, worker) for worker in range(8)]
            try:
                for _ in range(5):
                    time.sleep(1.0)
                    redis_server.restart()
                time.sleep(1.0)
            finally:
                stop.set()
            for future in futures:
                future.result(timeout=30)
        deadline = time.monotonic() + RECOVERY_BOUND + 10
        missing = list(acked)
        while missing and time.monotonic() < deadline:
            missing = [
                run_id
                for run_id in missing
                if node.http.get(f"/v1/runs/{run_id}").json().get("state") not in (
                    "completed", "failed", "cancelled"
                )
            ]  # fmt: skip
            time.sleep(0.2)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged runs never ended"
    finally:
        stop.set()
        for item in started:
            item.kill()
