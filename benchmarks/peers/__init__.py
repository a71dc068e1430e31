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
- **trio-runs in-process**: ``Backend.send_message`` + ``Backend.wait_run``, no HTTP.

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

``--trio-runs-only`` measures the trio-runs rows alone (no venv, no Redis): the smoke test's
path.
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

SYSTEMS = ("celery", "arq", "two", "one", "batch", "multiplexed", "in-process")
LABELS = {
    "celery": "Celery 5.5 + Redis (threads pool)",
    "arq": "arq 0.28 + Redis",
    "two": "trio-runs HTTP, two requests (submit + /wait)",
    "one": "trio-runs HTTP, one request (?wait=)",
    "batch": f"trio-runs HTTP, batched ({BATCH}/request, a batch per client)",
    "multiplexed": "trio-runs HTTP, multiplexed (one shared RunsClient)",
    "in-process": "trio-runs in-process (Backend.send_message + wait_run)",
}
PEER_NAMES = {"celery": "Celery", "arq": "arq"}
PENDING_MULTIPLEXED = (
    "pending: RunsClient does not multiplex concurrent submissions yet (issue 12, item 3)"
)


class Sample(NamedTuple):
    """One measurement: wall seconds, the clients' CPU seconds, jobs ended and completed."""

    wall: float
    client_cpu: float
    ended: int
    completed: int

    @property
    def rate(self) -> float:
        return self.ended / self.wall if self.wall else float("inf")


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
def trio_runs_server(root: Path, db: str | None) -> Iterator[str]:
    """``trio-runs serve`` with a no-op agent on a free loopback port; its URL."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [
        sys.executable, "-m", "trio_runs", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--agent", "benchmarks.dispatch:trivial_agent",
        "--workspace-root", str(root / "workspaces"),
        "--drain", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    if db is not None:
        args += ["--db", db]
    log = root / "trio-runs.log"
    url = f"http://127.0.0.1:{port}"
    # SIGINT: the server's graceful shutdown (every run gets its terminal), then SIGKILL.
    with child(args, log=log, env=env, cwd=REPO_ROOT, stop_signal=signal.SIGINT) as process:
        _wait_until(lambda: _http_answers(url), process, "trio-runs serve", log)
        yield url


def multiplexing_available() -> bool:
    """Whether :class:`~trio_runs.http.RunsClient` can coalesce concurrent ``run_prompt``
    calls into batches (``RunsClient(multiplex=True)``, issue 12 item 3)."""
    import inspect

    from trio_runs.http import RunsClient

    return "multiplex" in inspect.signature(RunsClient).parameters


async def trio_runs_http(url: str, clients: int, jobs: int, mode: str) -> Sample:
    """``clients`` tasks sharing ``jobs`` runs over HTTP by ``mode`` (see the module)."""
    from trio_runs import RunComplete
    from trio_runs.http import RunsClient

    async with contextlib.AsyncExitStack() as stack:
        if mode == "multiplexed":
            # Every task shares one client, which coalesces their run_prompt calls.
            shared = RunsClient(url, timeout=60.0, multiplex=True)
            pool = [await stack.enter_async_context(shared)]
        else:
            pool = [
                await stack.enter_async_context(RunsClient(url, timeout=60.0))
                for _ in range(clients)
            ]
        count = len(pool)
        workspace = (await pool[0].create_workspace("peers")).id
        prefix = uuid.uuid4().hex[:12]
        minted = 0

        def mint() -> str:
            nonlocal minted
            minted += 1
            return f"{prefix}-{minted}"

        async def two(i: int, k: int) -> int:
            run_id = mint()
            await pool[i].submit(workspace, f"c{i}", "go", run_id)
            return (await pool[i].wait_terminal(run_id)).outcome == "completed"

        async def one(i: int, k: int) -> int:
            terminal = await pool[i % count].run_prompt(workspace, f"c{i}", "go", mint())
            return terminal.outcome == "completed"

        async def batch(i: int, k: int) -> int:
            results = await pool[i].run_batch(
                workspace, [(f"c{i}", "go", mint()) for _ in range(k)]
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
    shares = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    completed = 0

    async def client(i: int) -> None:
        nonlocal completed
        left = shares[i]
        while left > 0:
            k = min(size, left)
            ok = await step(i, k)  # awaited first: `completed += await ...` loses counts
            completed += ok
            left -= k

    cpu = time.process_time()
    start = time.perf_counter()
    with trio.fail_after(MEASURE_SECONDS):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
    return Sample(time.perf_counter() - start, time.process_time() - cpu, jobs, completed)


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
        return Sample(answer["wall"], answer["client_cpu"], answer["ended"], answer["completed"])

    def idle(self) -> contextlib.ExitStack:
        """Pause every worker (while trio-runs is measured)."""
        stack = contextlib.ExitStack()
        for worker in self.workers.values():
            stack.enter_context(paused(worker))
        return stack


@contextlib.contextmanager
def running_peers(root: Path) -> Iterator[Peers]:
    """Redis, the Celery worker, the arq worker and the driver, all stopped on the way out."""
    python = ensure_peers_venv()
    binary = redis_binary()
    port = free_port()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(HERE),
        PEERS_CELERY_REDIS=f"redis://127.0.0.1:{port}/0",
        PEERS_ARQ_REDIS=f"redis://127.0.0.1:{port}/1",
    )
    env.pop("VIRTUAL_ENV", None)
    bin_dir = str(python.parent)
    redis_log = root / "redis.log"
    redis_args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(root),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(child(redis_args, log=redis_log))
        _wait_until(lambda: _redis_answers(port), redis, "redis-server", redis_log)
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
) -> Report:
    """Measure every system at every client count, repetitions interleaved; the report.

    ``peers=False`` measures trio-runs alone (nothing installed, no Redis). ``db`` is the
    trio-runs server's ``--db`` (default: the server's own, a SQLite file)."""
    jobs = jobs or (QUICK_JOBS if quick else JOBS)
    multiplexes = multiplexing_available()
    systems = [s for s in SYSTEMS if (peers or s not in ("celery", "arq"))]
    if not multiplexes:
        systems.remove("multiplexed")
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
        },
    )
    if peers and shutil.which("redis-server") is None:
        report.skipped = REDIS_MISSING
        return report
    all_ended = True
    samples: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-peers-") as tmp:
        root = Path(tmp)
        with contextlib.ExitStack() as stack:
            the_peers = stack.enter_context(running_peers(root)) if peers else None
            url = stack.enter_context(trio_runs_server(root, db))

            def measure(system: str, c: int, n: int) -> Sample:
                if _signalled:
                    raise KeyboardInterrupt  # a signal whose KeyboardInterrupt was lost
                if system in ("celery", "arq"):
                    assert the_peers is not None
                    return the_peers.measure(system, c, n)
                with the_peers.idle() if the_peers is not None else contextlib.nullcontext():
                    if system == "in-process":
                        got = trio.run(_cancellable, trio_runs_in_process, c, n)
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
        "jobs/s; ratio = this system's jobs/s / the peer's, per repetition (above 1: faster)"
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


def _add_rows(
    report: Report, c: int, systems: Sequence[str], samples: dict[tuple[str, int], list[Sample]]
) -> None:
    # One row per system and peer: its jobs/s beside the peer's, and their per-repetition ratio.
    label = f"{c} client{'s' if c > 1 else ''}"
    for system in systems:
        value = _rates(samples[system, c])
        peers = [p for p in ("celery", "arq") if p in systems and p != system]
        if not peers:
            report.add(Row(label, LABELS[system], "jobs/s", Stat.of(value)))
        for peer in peers:
            base = _rates(samples[peer, c])
            report.add(
                Row(
                    label,
                    f"{LABELS[system]}, vs {PEER_NAMES[peer]}",
                    "jobs/s",
                    Stat.of(value),
                    Stat.of(base),
                    ratios(value, base),
                )
            )


def _ratio(
    samples: dict[tuple[str, int], list[Sample]], system: str, peer: str, c: int
) -> Stat | None:
    if (system, c) not in samples or (peer, c) not in samples:
        return None
    return ratios(_rates(samples[system, c]), _rates(samples[peer, c]))


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
            report.targets.append(
                Target(name, f"median ratio >= {limit:g}", PENDING_MULTIPLEXED, False)
            )
            continue
        measured = f"{stat.median:.2f}x [{stat.min:.2f}..{stat.max:.2f}]"
        report.targets.append(
            Target(name, f"median ratio >= {limit:g}", measured, stat.median >= limit)
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
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.reps < MIN_REPS:
        p.error(f"--reps must be at least {MIN_REPS}")
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
    return 1 if args.check and missed else 0
