"""7. Peers: trio-runs against Celery and arq on this machine, one run, repetitions interleaved.

"Submit a no-op job and wait for its result", jobs/s at 1, 8 and 64 concurrent clients, for:

- **Celery 5.5 + Redis**: a ``--pool threads`` worker, Redis as broker and result backend;
  each client a thread looping ``noop.delay().get()``;
- **arq 0.28 + Redis**: one worker; each client an asyncio task looping ``enqueue_job`` then
  ``job.result()`` (worker and result polls every 2 ms, up to 1000 jobs at a time: arq's
  defaults, 0.5 s and 10, tuned in its favour);
- **trio-runs over HTTP**: one ``trio-runs serve`` (a no-op agent, the server's default store)
  and each client its own :class:`~trio_runs.http.RunsClient`, by path: *two requests*
  (``submit`` then ``wait_terminal``), *one request* (``run_prompt``: ``POST .../messages?wait=``),
  *batched* (``run_batch``: each client sends its jobs :data:`BATCH` to a
  ``POST .../batches``), and *multiplexed* (one client shared by every task) once the client
  multiplexes — until then that row says it is pending;
- **trio-runs in-process**: ``Backend.send_message`` + ``Backend.wait_run``, no HTTP;
- **trio-runs on Redis** (issue 13), with 1 and with 2 nodes: ``trio-runs serve --redis URL
  --redis-namespace NS`` nodes on the benchmark's ``redis-server``, each its own process, all
  with one ``--workspace-root``; the clients spread over the nodes round-robin (client ``i`` on
  node ``i % nodes``), by the paths *one request*, *multiplexed* (one shared ``RunsClient`` per
  node) and *batched*. Each cluster has a namespace of its own, so an idle cluster follows a
  quiet stream while the other is measured.

Besides jobs/s, every measurement records each job's submit -> result latency as its client
saw it (a batched job: its batch's round trip); the rows give its 99th percentile per
repetition, next to Celery's and arq's.

Every system runs at once on one machine (a private ``redis-server`` on a free loopback port,
the Celery and arq workers, the trio-runs server: each its own process); the workers not
being measured are paused (SIGSTOP) so their idle polling costs the measured one nothing.
Each repetition measures every system back to back, rotating which goes first; ratios against
Celery and against arq are taken per repetition, then their median.

Celery and arq are **not** trio-runs dependencies. The runner installs the pinned versions of
``benchmarks/peers/requirements.txt`` into a virtualenv of their own,
``benchmarks/peers/.venv`` (gitignored; reused while the requirements are unchanged), with
pip from PyPI, and needs ``redis-server`` on PATH (``apt-get install -y redis-server``).
It is therefore **never** part of the default ``python -m benchmarks`` set or of CI:

    python -m benchmarks.peers [--quick] [--reps N] [--json PATH]
    python -m benchmarks --only peers          # the same, through the registry
    python -m benchmarks.peers --systems redis  # the peers and the Redis-mode rows only

``--trio-runs-only`` measures the trio-runs rows alone (no venv; no Redis unless
``--redis-nodes`` asks for the Redis-mode rows): the smoke test's path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import venv
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import trio

from .._common import (
    MIN_REPS,
    REPO_ROOT,
    Report,
    Row,
    Stat,
    Target,
    header_lines,
    interleaved,
    parser,
    percentile,
    ratios,
    render,
    timer,
    write_json,
)

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
VENV = HERE / ".venv"
STAMP = VENV / "requirements.sha256"

CLIENTS = (1, 8, 64)
JOBS = 1_500
"""Jobs per measurement (shared by its clients); ``--quick``: :data:`QUICK_JOBS`."""
QUICK_JOBS = 150
BATCH = 16
"""Runs per batch request of the batched trio-runs client (as ``benchmarks/http.py``)."""
WARMUP_JOBS = 2
"""Untimed jobs per client before each system's first repetition at a client count."""
STARTUP_SECONDS = 60.0
STOP_SECONDS = 15.0
MEASURE_SECONDS = 600.0
"""The bound on one measurement (the peer driver's answer, a trio-runs trio.run)."""
INSTALL_SECONDS = 600.0

REDIS_NODES = (1, 2)
"""The Redis-mode clusters measured: this many ``serve --redis`` nodes each."""
REDIS_MODES = ("one", "multiplexed", "batch")
"""The client paths measured against each Redis-mode cluster."""
REDIS_TARGET_MODE = "multiplexed"
"""The path the Redis-mode targets are judged on: at 1 client it is the single request, at
more it is how a concurrent program submits (one shared client per node)."""
SPREAD_JOBS = False
"""False: client ``i`` sends every job to node ``i % nodes``, so each session's runs enter
the cluster through one node (R2 held even before cluster-wide lanes). True: job ``k`` of
client ``i`` goes to node ``(i + k) % nodes``, the "any node" load once runs are routed
through Redis lanes (every node claims any session's head)."""


def redis_system(nodes: int, mode: str) -> str:
    """The system name of the Redis-mode cluster of ``nodes`` nodes driven by ``mode``."""
    return f"redis{nodes}-{mode}"


SYSTEMS = (
    "celery",
    "arq",
    "two",
    "one",
    "batch",
    "multiplexed",
    "in-process",
    *(redis_system(n, m) for n in REDIS_NODES for m in REDIS_MODES),
)
LABELS = {
    "celery": "Celery 5.5 + Redis (threads pool)",
    "arq": "arq 0.28 + Redis",
    "two": "trio-runs HTTP, two requests (submit + /wait)",
    "one": "trio-runs HTTP, one request (?wait=)",
    "batch": f"trio-runs HTTP, batched ({BATCH}/request, a batch per client)",
    "multiplexed": "trio-runs HTTP, multiplexed (one shared RunsClient)",
    "in-process": "trio-runs in-process (Backend.send_message + wait_run)",
}
_REDIS_PATHS = {
    "one": "one request (?wait=)",
    "multiplexed": "multiplexed (a shared RunsClient per node)",
    "batch": f"batched ({BATCH}/request)",
}
LABELS.update(
    {
        redis_system(n, m): f"trio-runs on Redis, {n} node{'s' if n > 1 else ''}, {_REDIS_PATHS[m]}"
        for n in REDIS_NODES
        for m in REDIS_MODES
    }
)
PEER_NAMES = {"celery": "Celery", "arq": "arq"}
HTTP_SYSTEMS = ("two", "one", "batch", "multiplexed")
GROUPS = {
    "http": HTTP_SYSTEMS,
    "redis": tuple(redis_system(n, m) for n in REDIS_NODES for m in REDIS_MODES),
}


def _redis_of(system: str) -> tuple[int, str]:
    # "redis2-batch" -> (2, "batch")
    head, mode = system.split("-", 1)
    return int(head.removeprefix("redis")), mode


def _of_cluster(nodes: int) -> list[str]:
    return [redis_system(nodes, m) for m in REDIS_MODES]


def _selected(only: Sequence[str] | None, redis_nodes: Sequence[int]) -> set[str]:
    # The systems to measure: the peers, the named trio-runs ones (default all), and of the
    # Redis-mode ones only those of the clusters asked for.
    if only is None:
        names = set(SYSTEMS)
    else:
        names = set(PEER_NAMES)
        for name in only:
            if name not in GROUPS and name not in SYSTEMS:
                raise ValueError(
                    f"unknown system {name!r}: one of {', '.join(SYSTEMS)}, http, redis"
                )
            names.update(GROUPS.get(name, (name,)))
    return {s for s in names if not s.startswith("redis") or _redis_of(s)[0] in redis_nodes}


PENDING_MULTIPLEXED = (
    "pending: RunsClient does not multiplex concurrent submissions yet (issue 12, item 3)"
)


class Sample(NamedTuple):
    """One measurement: wall seconds, the clients' CPU seconds, jobs ended and completed, and
    each completed job's submit -> result seconds as its client saw them."""

    wall: float
    client_cpu: float
    ended: int
    completed: int
    latencies: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.ended / self.wall if self.wall else float("inf")

    @property
    def p99(self) -> float:
        """The 99th percentile of the latencies, in seconds (NaN without any)."""
        return percentile(self.latencies, 99.0)


# -- processes ---------------------------------------------------------------------------------


def _signal_group(process: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Stop a child started in its own process group (and everything it started): ``sig``,
    then SIGKILL after :data:`STOP_SECONDS`. Waits at most twice that; never raises."""
    if process.poll() is None:
        _signal_group(process, signal.SIGCONT)  # a paused worker cannot act on SIGTERM
        _signal_group(process, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_SECONDS)
    # Whatever the leader did, nothing of its group outlives the benchmark.
    _signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_SECONDS)


def _die_with_parent() -> None:
    # In the child, before exec: SIGKILL when the runner dies, however it dies (even by
    # SIGKILL, which runs no finally). Linux's PR_SET_PDEATHSIG; elsewhere nothing.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def child(
    args: Sequence[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    pipes: bool = False,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[subprocess.Popen[str]]:
    """Start ``args`` in a process group of its own, stderr (and stdout unless ``pipes``) to
    ``log``; stop the group on the way out, whichever way that is."""
    with open(log, "a", encoding="utf-8") as out:
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        yield process
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        stop(process, stop_signal)
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def paused(process: subprocess.Popen[Any]) -> Iterator[None]:
    """Keep a worker stopped (SIGSTOP) while another system is measured."""
    _signal_group(process, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_group(process, signal.SIGCONT)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def free_port() -> int:
    """A free loopback port (the kernel's choice; nothing restarts on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_until(
    ready: Callable[[], bool], process: subprocess.Popen[Any], what: str, log: Path
) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not start within {STARTUP_SECONDS:g}s (see {log}):\n{_tail(log)}"
            )
        time.sleep(0.05)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _http_answers(url: str) -> bool:
    # httpx (the client trio-runs' own uses), keep-alive as every measured request is.
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


# -- the peers' virtualenv -----------------------------------------------------------------------


def _peers_python() -> Path:
    return VENV / "bin" / "python"


def ensure_peers_venv() -> Path:
    """The peers' interpreter: ``benchmarks/peers/.venv``, made and filled from
    ``requirements.txt`` with pip (from PyPI) unless it already holds exactly those pins."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    python = _peers_python()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return python
    print(f"installing the peers into {VENV} (pip install -r {REQUIREMENTS}) ...", flush=True)
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        check=True,
        timeout=INSTALL_SECONDS,
    )
    STAMP.write_text(digest + "\n")
    return python


REDIS_MISSING = (
    "redis-server is not installed: apt-get install -y redis-server "
    "(Celery and arq need a real Redis; --trio-runs-only measures trio-runs alone)"
)


def redis_binary() -> str:
    """``redis-server``'s path, or a RuntimeError saying how to install it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(REDIS_MISSING)
    return binary


# -- trio-runs ---------------------------------------------------------------------------------


@contextlib.contextmanager
def trio_runs_server(
    root: Path, db: str | None, extra: Sequence[str] = (), name: str = "trio-runs"
) -> Iterator[str]:
    """``trio-runs serve`` with a no-op agent on a free loopback port (its workspace root
    ``root/workspaces``, absolute: every node of a cluster resolves a path alike) and
    ``extra`` arguments; its URL. Logs to ``root/NAME.log``."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [
        sys.executable, "-m", "trio_runs", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--agent", "benchmarks.dispatch:trivial_agent",
        "--workspace-root", str((root / "workspaces").resolve()),
        "--drain", "0",
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    if db is not None:
        args += ["--db", db]
    log = root / f"{name}.log"
    url = f"http://127.0.0.1:{port}"
    # SIGINT: the server's graceful shutdown (every run gets its terminal), then SIGKILL.
    with child(args, log=log, env=env, cwd=REPO_ROOT, stop_signal=signal.SIGINT) as process:
        _wait_until(lambda: _http_answers(url), process, name, log)
        yield url


@contextlib.contextmanager
def redis_cluster(root: Path, redis_url: str, nodes: int) -> Iterator[list[str]]:
    """``nodes`` ``trio-runs serve --redis`` nodes on ``redis_url``, under a namespace of their
    own (a fresh one: no earlier run's keys), every node its own process; their URLs. Each
    is stopped on the way out (SIGINT, then SIGKILL), whichever way that is."""
    namespace = f"bench{nodes}-{uuid.uuid4().hex[:8]}"
    extra = ["--redis", redis_url, "--redis-namespace", namespace]
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(trio_runs_server(root, None, extra, name=f"redis{nodes}-node{k}"))
            for k in range(nodes)
        ]


def multiplexing_available() -> bool:
    """Whether :class:`~trio_runs.http.RunsClient` can coalesce concurrent ``run_prompt``
    calls into batches (``RunsClient(multiplex=True)``, issue 12 item 3)."""
    import inspect

    from trio_runs.http import RunsClient

    return "multiplex" in inspect.signature(RunsClient).parameters


async def trio_runs_http(url: str | Sequence[str], clients: int, jobs: int, mode: str) -> Sample:
    """``clients`` tasks sharing ``jobs`` runs over HTTP by ``mode`` (see the module). Given
    several URLs (the nodes of a cluster), client ``i`` talks to node ``i % nodes`` (with
    :data:`SPREAD_JOBS`, each of its jobs to the next node); ``multiplexed``: one shared client
    per node."""
    from trio_runs import RunComplete
    from trio_runs.http import RunsClient

    urls = [url] if isinstance(url, str) else list(url)
    nodes = len(urls)
    async with contextlib.AsyncExitStack() as stack:
        if mode == "multiplexed":
            # Every task on a node shares its one client, which coalesces their run_prompt calls.
            pool = [
                await stack.enter_async_context(RunsClient(u, timeout=60.0, multiplex=True))
                for u in urls
            ]
            count = nodes
        else:
            pool = [
                await stack.enter_async_context(RunsClient(urls[i % nodes], timeout=60.0))
                for i in range(clients * (nodes if SPREAD_JOBS else 1))
            ]
            count = clients
        # A workspace id is a node's own: open the one path on every node.
        workspaces = []
        for u in urls:
            async with RunsClient(u, timeout=60.0) as admin:
                workspaces.append((await admin.create_workspace("peers")).id)
        prefix = uuid.uuid4().hex[:12]
        minted = 0
        sent = [0] * clients

        def mint() -> str:
            nonlocal minted
            minted += 1
            return f"{prefix}-{minted}"

        def node_of(i: int) -> int:
            # Which node client i's next job goes to: its own, or the next in turn.
            if not SPREAD_JOBS:
                return i % nodes
            sent[i] += 1
            return (i + sent[i]) % nodes

        def client_of(i: int, node: int) -> RunsClient:
            if mode == "multiplexed":
                return pool[node]
            # With SPREAD_JOBS, client i owns pool[i * nodes .. i * nodes + nodes - 1],
            # pool[i * nodes + j] on node (i * nodes + j) % nodes == j.
            return pool[i * nodes + node] if SPREAD_JOBS else pool[i % count]

        async def two(i: int, k: int) -> int:
            run_id, node = mint(), node_of(i)
            await client_of(i, node).submit(workspaces[node], f"c{i}", "go", run_id)
            return (await client_of(i, node).wait_terminal(run_id)).outcome == "completed"

        async def one(i: int, k: int) -> int:
            node = node_of(i)
            terminal = await client_of(i, node).run_prompt(workspaces[node], f"c{i}", "go", mint())
            return terminal.outcome == "completed"

        async def batch(i: int, k: int) -> int:
            node = node_of(i)
            results = await client_of(i, node).run_batch(
                workspaces[node], [(f"c{i}", "go", mint()) for _ in range(k)]
            )
            return sum(isinstance(r, RunComplete) and r.outcome == "completed" for r in results)

        step = {"two": two, "one": one, "multiplexed": one, "batch": batch}[mode]
        size = BATCH if mode == "batch" else 1
        await _loop(clients, WARMUP_JOBS * clients, step, size)
        return await _loop(clients, jobs, step, size)


async def trio_runs_in_process(clients: int, jobs: int) -> Sample:
    """The same runs without HTTP: ``send_message`` + ``wait_run`` in this process."""
    from trio_runs import AgentMessage, SessionCoordinator, open_backend

    from ..dispatch import trivial_agent, workspace_path

    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("peers-in-process"), SessionCoordinator.factory(trivial_agent)
        )
        msgs = [AgentMessage(f"c{i}", "go") for i in range(clients)]
        send, wait, workspace_id = backend.send_message, backend.wait_run, ws.id

        async def step(i: int, k: int) -> int:
            return (await wait(send(workspace_id, msgs[i]))).outcome == "completed"

        await _loop(clients, WARMUP_JOBS * clients, step, 1)
        return await _loop(clients, jobs, step, 1)


async def _loop(clients: int, jobs: int, step: Any, size: int) -> Sample:
    # ``clients`` tasks share ``jobs``; each call ``step(client, k)`` does k <= size of them.
    # Each step's round trip is the latency of each of its k jobs (a batch's results reach
    # the caller together).
    shares = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    completed = 0
    latencies: list[float] = []
    clock = time.perf_counter

    async def client(i: int) -> None:
        nonlocal completed
        left = shares[i]
        while left > 0:
            k = min(size, left)
            sent = clock()
            ok = await step(i, k)  # awaited first: `completed += await ...` loses counts
            latencies.extend([clock() - sent] * ok)
            completed += ok
            left -= k

    cpu = time.process_time()
    start = time.perf_counter()
    with trio.fail_after(MEASURE_SECONDS):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
    wall = time.perf_counter() - start
    return Sample(wall, time.process_time() - cpu, jobs, completed, tuple(latencies))


# -- the peers ---------------------------------------------------------------------------------


class Peers:
    """The Redis server, both workers and the driver (``_driver.py``) in the peers' venv."""

    def __init__(self, driver: subprocess.Popen[str], workers: dict[str, subprocess.Popen[str]]):
        self.driver = driver
        self.workers = workers

    def ask(self, command: dict[str, Any], seconds: float = MEASURE_SECONDS) -> dict[str, Any]:
        """Send the driver one command; its answer, waited for at most ``seconds``."""
        stdin: IO[str] | None = self.driver.stdin
        stdout: IO[str] | None = self.driver.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(seconds):
                raise RuntimeError(
                    f"the peers' driver did not answer {command} within {seconds:g}s"
                )
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the peers' driver exited (status {self.driver.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if answer.get("ok") is False:
            raise RuntimeError(f"the peers' driver failed {command}: {answer['error']}")
        return answer

    def measure(self, system: str, clients: int, jobs: int) -> Sample:
        with contextlib.ExitStack() as stack:
            for name, worker in self.workers.items():
                if name != system:
                    stack.enter_context(paused(worker))
            answer = self.ask({"op": "measure", "system": system, "clients": clients, "jobs": jobs})
        return Sample(
            answer["wall"],
            answer["client_cpu"],
            answer["ended"],
            answer["completed"],
            tuple(answer.get("latencies", ())),
        )

    def idle(self) -> contextlib.ExitStack:
        """Pause every worker (while trio-runs is measured)."""
        stack = contextlib.ExitStack()
        for worker in self.workers.values():
            stack.enter_context(paused(worker))
        return stack


@contextlib.contextmanager
def running_redis(root: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """The benchmark's ``redis-server`` on a free loopback port, no persistence; its port and
    process. Database 0 is Celery's, 1 arq's, 2 the Redis-mode trio-runs clusters'."""
    binary = redis_binary()
    port = free_port()
    redis_log = root / "redis.log"
    redis_args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(root),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    with child(redis_args, log=redis_log) as redis:
        _wait_until(lambda: _redis_answers(port), redis, "redis-server", redis_log)
        yield port, redis


@contextlib.contextmanager
def running_peers(root: Path, port: int) -> Iterator[Peers]:
    """The Celery worker, the arq worker and the driver on the Redis at ``port``, all stopped
    on the way out."""
    python = ensure_peers_venv()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(HERE),
        PEERS_CELERY_REDIS=f"redis://127.0.0.1:{port}/0",
        PEERS_ARQ_REDIS=f"redis://127.0.0.1:{port}/1",
    )
    env.pop("VIRTUAL_ENV", None)
    bin_dir = str(python.parent)
    with contextlib.ExitStack() as stack:
        celery_args = [
            str(python), "-m", "celery", "-A", "_celery_app", "worker",
            "--pool", "threads", "--concurrency", "8",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            "--loglevel", "WARNING",
        ]  # fmt: skip
        celery = stack.enter_context(child(celery_args, log=root / "celery.log", env=env, cwd=HERE))
        arq = stack.enter_context(
            child(
                [str(Path(bin_dir) / "arq"), "_arq_app.WorkerSettings"],
                log=root / "arq.log",
                env=env,
                cwd=HERE,
            )
        )
        driver = stack.enter_context(
            child(
                [str(python), str(HERE / "_driver.py")],
                log=root / "driver.log",
                env=env,
                cwd=HERE,
                pipes=True,
            )
        )
        peers = Peers(driver, {"celery": celery, "arq": arq})
        try:
            peers.ask({"op": "ready", "timeout": STARTUP_SECONDS}, STARTUP_SECONDS * 2 + 5)
        except RuntimeError as exc:
            logs = "\n".join(
                f"--- {n}.log\n{_tail(root / f'{n}.log')}" for n in ("celery", "arq", "driver")
            )
            raise RuntimeError(f"{exc}\n{logs}") from None
        yield peers


# -- the report --------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    reps: int = MIN_REPS,
    clients: Sequence[int] = CLIENTS,
    jobs: int | None = None,
    peers: bool = True,
    db: str | None = None,
    redis_nodes: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
) -> Report:
    """Measure every system at every client count, repetitions interleaved; the report.

    ``peers=False`` measures trio-runs alone (nothing installed). ``db`` is the trio-runs
    server's ``--db`` (default: the server's own, a SQLite file). ``redis_nodes``: the
    Redis-mode clusters to measure (default: :data:`REDIS_NODES` with the peers, none
    without). ``only``: the trio-runs systems to measure (names of :data:`SYSTEMS`, or the
    groups ``http``, ``redis``), the peers always with them; default every one."""
    jobs = jobs or (QUICK_JOBS if quick else JOBS)
    multiplexes = multiplexing_available()
    nodes_wanted = tuple(REDIS_NODES if redis_nodes is None and peers else redis_nodes or ())
    wanted = _selected(only, nodes_wanted)
    systems = [s for s in SYSTEMS if s in wanted and (peers or s not in PEER_NAMES)]
    if not multiplexes:
        systems = [s for s in systems if not s.endswith("multiplexed")]
    clusters = sorted({n for n in nodes_wanted if any(s in systems for s in _of_cluster(n))})
    report = Report(
        name="peers",
        title="7. Peers: submit a no-op job and wait for its result, against Celery and arq",
        baseline="Celery 5.5.3 + Redis (threads pool) and arq 0.28.0 + Redis, measured in the "
        "same run, repetition by repetition",
        params={
            "clients": list(clients),
            "jobs": jobs,
            "reps": reps,
            "batch": BATCH,
            "db": db or "server default (SQLite)",
            "redis_nodes": clusters,
            "spread_jobs": SPREAD_JOBS,
        },
    )
    if (peers or clusters) and shutil.which("redis-server") is None:
        report.skipped = REDIS_MISSING
        return report
    all_ended = True
    samples: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-peers-") as tmp:
        root = Path(tmp)
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(running_redis(root))[0] if peers or clusters else None
            the_peers = None
            if peers:
                assert port is not None
                the_peers = stack.enter_context(running_peers(root, port))
            url = ""
            if any(s in systems for s in HTTP_SYSTEMS):
                url = stack.enter_context(trio_runs_server(root, db))
            cluster_urls = {
                n: stack.enter_context(redis_cluster(root, f"redis://127.0.0.1:{port}/2", n))
                for n in clusters
            }

            def measure(system: str, c: int, n: int) -> Sample:
                if _signalled:
                    raise KeyboardInterrupt  # a signal whose KeyboardInterrupt was lost
                if system in ("celery", "arq"):
                    assert the_peers is not None
                    return the_peers.measure(system, c, n)
                with the_peers.idle() if the_peers is not None else contextlib.nullcontext():
                    if system == "in-process":
                        got = trio.run(_cancellable, trio_runs_in_process, c, n)
                    elif system.startswith("redis"):
                        cluster, mode = _redis_of(system)
                        got = trio.run(
                            _cancellable, trio_runs_http, cluster_urls[cluster], c, n, mode
                        )
                    else:
                        got = trio.run(_cancellable, trio_runs_http, url, c, n, system)
                if got is None or _signalled:
                    raise KeyboardInterrupt
                return got

            for c in clients:
                n = max(jobs, c)
                for system in systems:  # warm-up: connections, caches, the workers' first jobs
                    measure(system, c, WARMUP_JOBS * c)
                measured = interleaved(
                    reps, *(functools.partial(measure, system, c, n) for system in systems)
                )
                for system, got in zip(systems, measured, strict=True):
                    samples[system, c] = got
                    all_ended &= all(s.completed == s.ended == n for s in got)
                _add_rows(report, c, systems, samples)
                print(f"   peers: {c} client(s) measured", file=sys.stderr, flush=True)
    if not multiplexes:
        report.notes.append(f"multiplexed row: {PENDING_MULTIPLEXED}")
    report.notes.append(
        "each figure: jobs/s (wall) over the clients' shared jobs; baseline: the named peer's "
        "jobs/s; ratio = this system's jobs/s / the peer's, per repetition (above 1: faster); "
        "p99 latency: each repetition's 99th percentile of the jobs' submit -> result times "
        "(a batched job: its batch's round trip), in ms, ratio below 1: lower than the peer's"
    )
    report.targets.append(
        Target(
            "every job ends",
            "every submitted job's result reached its client, every repetition",
            "all" if all_ended else "NOT ALL",
            all_ended,
        )
    )
    if peers:
        _add_targets(report, clients, samples, multiplexes)
    return report


def _rates(got: Sequence[Sample]) -> list[float]:
    return [s.rate for s in got]


def _p99s(got: Sequence[Sample]) -> list[float]:
    return [s.p99 * 1000.0 for s in got]


P99 = ", p99 latency"
"""The metric suffix of a latency row (ms, each repetition's 99th percentile)."""


def _add_rows(
    report: Report, c: int, systems: Sequence[str], samples: dict[tuple[str, int], list[Sample]]
) -> None:
    # One row per system and peer: its jobs/s beside the peer's, and their per-repetition
    # ratio; then the same for its p99 latency (ms; a ratio below 1: lower than the peer's).
    label = f"{c} client{'s' if c > 1 else ''}"
    for system in systems:
        peers = [p for p in ("celery", "arq") if p in systems and p != system]
        for suffix, unit, of in (("", "jobs/s", _rates), (P99, "ms", _p99s)):
            value = of(samples[system, c])
            if not peers:
                report.add(Row(label, LABELS[system] + suffix, unit, Stat.of(value)))
            for peer in peers:
                base = of(samples[peer, c])
                report.add(
                    Row(
                        label,
                        f"{LABELS[system]}{suffix}, vs {PEER_NAMES[peer]}",
                        unit,
                        Stat.of(value),
                        Stat.of(base),
                        ratios(value, base),
                    )
                )


def _ratio(
    samples: dict[tuple[str, int], list[Sample]],
    system: str,
    peer: str,
    c: int,
    of: Callable[[Sequence[Sample]], list[float]] = _rates,
) -> Stat | None:
    if (system, c) not in samples or (peer, c) not in samples:
        return None
    return ratios(of(samples[system, c]), of(samples[peer, c]))


def _span_of(stat: Stat, unit: str = "x") -> str:
    return f"{stat.median:.2f}{unit} [{stat.min:.2f}..{stat.max:.2f}]"


def _add_targets(
    report: Report,
    clients: Sequence[int],
    samples: dict[tuple[str, int], list[Sample]],
    multiplexes: bool,
) -> None:
    wanted = [
        ("single-request >= 1.5x Celery at 1 client", "one", "celery", 1, 1.5),
        ("multiplexed >= arq at 8 clients", "multiplexed", "arq", 8, 1.0),
        ("multiplexed >= arq at 64 clients", "multiplexed", "arq", 64, 1.0),
        ("batched >= 10x Celery at 64 clients", "batch", "celery", 64, 10.0),
    ]
    for name, system, peer, c, limit in wanted:
        if c not in clients:
            continue
        stat = _ratio(samples, system, peer, c)
        if stat is None:
            if system == "multiplexed" and not multiplexes:
                report.targets.append(
                    Target(name, f"median ratio >= {limit:g}", PENDING_MULTIPLEXED, False)
                )
            continue  # or not measured this run (--systems)
        measured = _span_of(stat)
        report.targets.append(
            Target(name, f"median ratio >= {limit:g}", measured, stat.median >= limit)
        )
    add_redis_targets(report, clients, samples)


def add_redis_targets(
    report: Report, clients: Sequence[int], samples: dict[tuple[str, int], list[Sample]]
) -> None:
    """Append issue 13's targets for the Redis mode, judged on :data:`REDIS_TARGET_MODE` for
    each cluster measured: jobs/s >= arq's at every client count and >= 3x Celery's at 64
    clients; p99 latency below both peers' (the median of the per-repetition ratios below 1).
    A target whose samples are missing (not measured this run) is left out."""
    for nodes in REDIS_NODES:
        system = redis_system(nodes, REDIS_TARGET_MODE)
        who = f"Redis {nodes} node{'s' if nodes > 1 else ''} ({REDIS_TARGET_MODE})"
        for c in clients:
            plural = "s" if c > 1 else ""
            wanted = [(f"{who} >= arq at {c} client{plural}", "arq", 1.0)]
            if c == 64:
                wanted.append((f"{who} >= 3x Celery at 64 clients", "celery", 3.0))
            for name, peer, limit in wanted:
                stat = _ratio(samples, system, peer, c)
                if stat is not None:
                    report.targets.append(
                        Target(
                            name, f"median ratio >= {limit:g}", _span_of(stat), stat.median >= limit
                        )
                    )
            against = [(p, _ratio(samples, system, p, c, _p99s)) for p in PEER_NAMES]
            if any(stat is None for _, stat in against):
                continue
            mine = Stat.of(_p99s(samples[system, c]))
            measured = f"{mine.median:.1f} ms; " + ", ".join(
                f"{_span_of(stat)} {PEER_NAMES[p]}'s" for p, stat in against if stat is not None
            )
            holds = all(stat is not None and stat.median < 1.0 for _, stat in against)
            report.targets.append(
                Target(
                    f"{who} p99 below Celery's and arq's at {c} client{plural}",
                    "median p99 ratio < 1 to each",
                    measured,
                    holds,
                )
            )


_signalled: list[int] = []
_scopes: list[trio.CancelScope] = []


def _cancel_measurements() -> None:
    for scope in _scopes:
        scope.cancel()


def _interrupt(signum: int, frame: object) -> None:
    _signalled.append(signum)
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:  # not inside trio.run: raise here
        raise KeyboardInterrupt from None
    token.run_sync_soon(_cancel_measurements)


async def _cancellable(fn: Callable[..., Awaitable[Sample]], *args: Any) -> Sample | None:
    # Run a measurement that a signal can cancel (None then).
    with trio.CancelScope() as scope:
        _scopes.append(scope)
        try:
            return await fn(*args)
        finally:
            _scopes.remove(scope)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.peers``: run, print the table, optionally write JSON."""
    p = parser("trio-runs against Celery and arq (installs them into benchmarks/peers/.venv).")
    p.add_argument(
        "--trio-runs-only",
        action="store_true",
        help="measure the trio-runs rows alone: no peers' venv, no Redis",
    )
    p.add_argument(
        "--db",
        metavar="PATH",
        help="the trio-runs server's --db (default: the server's own, a SQLite file); "
        "':memory:' for the in-memory store",
    )
    p.add_argument(
        "--jobs", type=int, help=f"jobs per measurement (default {JOBS}, --quick {QUICK_JOBS})"
    )
    p.add_argument(
        "--redis-nodes",
        metavar="N,M",
        help="the Redis-mode clusters to measure, by node count (default: "
        f"{','.join(map(str, REDIS_NODES))} with the peers, none with --trio-runs-only; "
        "'none' for none)",
    )
    p.add_argument(
        "--systems",
        metavar="NAME,...",
        help="the trio-runs systems to measure beside the peers: names ("
        + ", ".join(s for s in SYSTEMS if s not in PEER_NAMES)
        + ") or groups (http, redis); default every one",
    )
    p.add_argument(
        "--markdown",
        metavar="PATH",
        help="also write the README's table (systems by client count) to PATH",
    )
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.reps < MIN_REPS:
        p.error(f"--reps must be at least {MIN_REPS}")
    redis_nodes: tuple[int, ...] | None = None
    if args.redis_nodes is not None:
        try:
            redis_nodes = tuple(
                int(n) for n in args.redis_nodes.split(",") if n and args.redis_nodes != "none"
            )
        except ValueError:
            p.error(f"--redis-nodes: node counts separated by commas, not {args.redis_nodes!r}")
        if not set(redis_nodes) <= set(REDIS_NODES):
            p.error(f"--redis-nodes: measured clusters are {REDIS_NODES}")
    only = None if args.systems is None else [n for n in args.systems.split(",") if n]
    try:
        _selected(only, REDIS_NODES)
    except ValueError as exc:
        p.error(f"--systems: {exc}")
    for line in header_lines():
        print(line)
    print(flush=True)
    start = timer()
    # SIGINT and SIGTERM: the way out through every finally, which stops every child. With
    # our own handler Trio installs none: inside a trio.run the handler cancels the
    # measurement from within Trio (raising there could break Trio's own state), and the
    # KeyboardInterrupt is raised once trio.run has returned.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        report = run(
            quick=args.quick,
            reps=args.reps,
            jobs=args.jobs,
            peers=not args.trio_runs_only,
            db=args.db,
            redis_nodes=redis_nodes,
            only=only,
        )
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"peers benchmark: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peers benchmark: interrupted; every child process stopped", file=sys.stderr)
        return 130
    report.seconds = timer() - start
    print(render(report), end="\n\n", flush=True)
    missed = [t for t in report.targets if not t.holds]
    print(
        f"{len(report.targets) - len(missed)} of {len(report.targets)} targets hold"
        + (f"; not: {', '.join(t.name for t in missed)}" if missed else "")
        + f" ({report.seconds:.0f} s{', --quick' if args.quick else ''})"
    )
    if args.json:
        write_json(args.json, [report], vars(args), report.seconds)
        print(f"wrote {args.json}")
    if args.markdown and not report.skipped:
        from .table import markdown

        # With --json, the table's heading line (date, load, commit) comes from that file.
        document = json.loads(Path(args.json).read_text(encoding="utf-8")) if args.json else None
        table = markdown(report.to_json(), document)
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 1 if args.check and missed else 0
