"""6. The durable store: what ``SqliteLedger`` costs against the in-memory ``RunLedger``.

Three workloads, each run on both stores in the same process run, their repetitions
interleaved (rotating which store goes first) and every ratio taken per repetition
(SQLite / in-memory), so a slow spell of this shared machine hits both sides of a ratio:

1. **Dispatch**: N trivial runs through ``Backend.send_message`` -> ``wait_run`` with one
   ``run_completions`` subscriber, in batches of 1,000: the shape of
   ``benchmarks.dispatch``. A terminal is visible (``wait_run`` returns) only once the
   writer thread committed it. Reported: CPU and wall time per run (the CPU time counts
   every thread of the process, the writer's included), and commits per 1,000 runs - fewer
   than the 2,000 writes (an acceptance and a terminal per run) they hold: group commit.
2. **HTTP**: submit + wait round trips over loopback, as in ``benchmarks.http`` (C clients,
   each its own ``RunsClient`` and session), one server process per store
   (``benchmarks._http_server --db``): ``submit`` answers 202 only once the acceptance is
   committed, and ``wait_terminal`` sees the terminal once it is committed.
3. **Memory**: RSS after runs whose agent returns a fresh 1 MiB string, 10 in flight, the
   store at its default retention, in a fresh subprocess per repetition. The in-memory
   ledger keeps every result (about 10 GiB after 10,000 runs): it runs a tenth as many, and
   its figure at the full count is an estimate (start + 10 x its growth).

The SQLite files live in a fresh temporary directory per repetition, on the repository's
filesystem (never a tmpfs), with ``synchronous="FULL"``: every commit is fsynced. The
latency of an fsync there is measured too: each commit waits for at least one.

``python -m benchmarks.durable [--quick] [--json PATH]``
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, NamedTuple

import trio

from trio_runs import RunCall, RunContext, RunLedger, SessionCoordinator, open_backend
from trio_runs.ledger import RunStore
from trio_runs.sqlite import SqliteLedger, SqliteRetention, open_sqlite_ledger

from ._common import (
    REPO_ROOT,
    Report,
    Row,
    Stat,
    Target,
    Timing,
    interleaved,
    percentile,
    ratios,
    rss_now,
    rss_peak,
    settle,
    timing_rows,
)
from .dispatch import BATCH, messages, timed_runs, workspace_path
from .http import Server, missing_http_extra

FULL_SIZES = (10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)
DISPATCH_TARGET = 1.5
"""SQLite / in-memory CPU per run, at every N."""

CLIENTS = (1, 8, 64)
ROUND_TRIPS = 2_000
QUICK_ROUND_TRIPS = 100
HTTP_TARGET = 1.15
"""SQLite / in-memory wall time per HTTP round trip, at every client count."""

RESULT_BYTES = 1 << 20
MEMORY_RUNS = 10_000
MEMORY_RUNS_IN_MEMORY = 1_000
"""The in-memory ledger keeps every result: a tenth of the runs (~1 GiB), not ~10 GiB."""
QUICK_MEMORY_RUNS = 100
QUICK_MEMORY_RUNS_IN_MEMORY = 10
QUICK_RETENTION_BYTES = 20 << 20
"""``--quick`` scales the retention's byte bound down with the runs (the default, 1 GiB, is
a tenth of 10,000 x 1 MiB; 20 MiB is a fifth of 100 x 1 MiB, and two batches in flight)."""
MEMORY_BATCH = 10
"""Runs in flight in the memory workload: each holds 1 MiB (and its JSON) until it is
committed, and that is the workload's own memory, not the store's."""
RSS_TARGET_BYTES = 150_000_000
"""Peak RSS of the SQLite process after the memory workload: 150 MB."""

FSYNC_SAMPLES = 50
MIB = 1 << 20
STARTUP_SECONDS = 30.0


# -- where the databases go --------------------------------------------------------------


def _filesystem(path: str) -> str:
    """The type of the filesystem ``path`` is on (``/proc/mounts``), or ``"unknown"``."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def database_dir() -> str:
    """A directory on the repository's filesystem for the benchmark's databases.

    The system's temporary directory when it is on the same device as the repository (and
    not in memory); otherwise ``.trio-runs/bench`` in the repository (git-ignored).
    """
    tmp = tempfile.gettempdir()
    if os.stat(tmp).st_dev == os.stat(REPO_ROOT).st_dev and _filesystem(tmp) not in {
        "tmpfs",
        "ramfs",
    }:
        return tmp
    fallback = REPO_ROOT / ".trio-runs" / "bench"
    fallback.mkdir(parents=True, exist_ok=True)
    return str(fallback)


@contextlib.contextmanager
def database_file(directory: str) -> Iterator[str]:
    """A path for a new database in a fresh directory, removed (with its WAL) afterwards."""
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-durable-", dir=directory) as d:
        yield os.path.join(d, "runs.db")


@contextlib.asynccontextmanager
async def opened_store(
    db: str | None, retention: SqliteRetention | None = None
) -> AsyncIterator[RunStore]:
    """The in-memory ``RunLedger`` (``db=None``) or the ``SqliteLedger`` at ``db``."""
    if db is None:
        yield RunLedger()
        return
    async with open_sqlite_ledger(db, retention=retention, synchronous="FULL") as ledger:
        yield ledger


def _commits(store: RunStore) -> int:
    return store.commits if isinstance(store, SqliteLedger) else 0


# -- 1. dispatch -------------------------------------------------------------------------


async def dispatch_runs(n: int, batch: int, db: str | None) -> tuple[Timing, int]:
    """Time for ``n`` trivial runs (``benchmarks.dispatch``'s shape) and the commits made.

    The store is opened before the clock starts and closed after it stops.
    """
    async with opened_store(db) as store, open_backend(store) as backend:
        commits = _commits(store)
        elapsed = await timed_runs(backend, n, batch, "durable")
        return elapsed, _commits(store) - commits


def _dispatch_in_memory(n: int, batch: int) -> tuple[Timing, int]:
    return trio.run(dispatch_runs, n, batch, None)


def _dispatch_sqlite(n: int, batch: int, directory: str) -> tuple[Timing, int]:
    with database_file(directory) as db:
        return trio.run(dispatch_runs, n, batch, db)


def fsync_latencies(directory: str, count: int = FSYNC_SAMPLES) -> list[float]:
    """Seconds for each of ``count`` fsyncs, each after a 4 KiB write, in ``directory``."""
    latencies = []
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-fsync-", dir=directory) as d:
        fd = os.open(os.path.join(d, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * 4096
            for _ in range(count):
                os.write(fd, block)
                start = time.perf_counter()
                os.fsync(fd)
                latencies.append(time.perf_counter() - start)
        finally:
            os.close(fd)
    return latencies


def _measure_disk(report: Report, reps: int, directory: str) -> None:
    samples = [fsync_latencies(directory) for _ in range(reps)]
    for pct in (50.0, 99.0):
        report.add(
            Row(
                "disk",
                f"fsync after a 4 KiB write, p{pct:g}",
                "ms",
                Stat.of(percentile(s, pct) * 1e3 for s in samples),
                note=f"{FSYNC_SAMPLES} fsyncs per repetition in the databases' directory: what "
                "each SQLite commit waits for at least once (synchronous=FULL)",
            )
        )


def _measure_dispatch(
    report: Report, sizes: Sequence[int], batch: int, reps: int, directory: str
) -> None:
    warm = min(2_000, sizes[0])
    _dispatch_in_memory(warm, batch)
    _dispatch_sqlite(warm, batch, directory)
    per_n: dict[int, tuple[Stat, Stat]] = {}
    for n in sizes:
        memory, sqlite = interleaved(
            reps,
            functools.partial(_dispatch_in_memory, n, batch),
            functools.partial(_dispatch_sqlite, n, batch, directory),
        )
        label = f"dispatch, N={n:,}"
        subj, base = [t for t, _ in sqlite], [t for t, _ in memory]
        report.rows.extend(timing_rows(label, "cost per run", subj, base, per=n, unit="us"))
        per_n[n] = (
            ratios([t.cpu for t in subj], [t.cpu for t in base]),
            ratios([t.wall for t in subj], [t.wall for t in base]),
        )
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
        report.add(
            Row(
                label,
                "commits per 1,000 runs",
                "count",
                Stat.of(c * 1000 / n for _, c in sqlite),
                note="SqliteLedger.commits during the timed runs: each one transaction and one "
                "fsync, holding the acceptances and terminals (2 writes per run) queued "
                "meanwhile",
            )
        )
    worst = max(cpu.median for cpu, _ in per_n.values())
    report.targets.append(
        Target(
            "durable dispatch",
            f"SQLite <= {DISPATCH_TARGET:g}x the in-memory ledger per run at every N (CPU)",
            ", ".join(
                f"{n:,}: {cpu.median:.2f}x (wall {wall.median:.2f}x)"
                for n, (cpu, wall) in per_n.items()
            ),
            worst <= DISPATCH_TARGET,
        )
    )


# -- 2. HTTP -------------------------------------------------------------------------------


class Sample(NamedTuple):
    """One repetition at one client count: wall seconds, latencies, the server process's
    CPU seconds, round trips ended and completed."""

    wall: float
    latencies: list[float]
    server_cpu: float
    ended: int
    completed: int


def _read_line(fd: int, timeout: float) -> str:
    # The first line the child prints, read unbuffered (no text buffer can swallow it).
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"the HTTP server printed no URL within {timeout:g}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").partition("\n")[0].strip()


@contextlib.contextmanager
def running_servers(*dbs: str) -> Iterator[list[Server]]:
    """``benchmarks._http_server --db DB`` per database, in child processes started together;
    each stopped gracefully (its stdin closed) on the way out."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with contextlib.ExitStack() as stack:
        processes = []
        for db in dbs:
            process = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks._http_server", "--db", db],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=REPO_ROOT,
                )
            )
            processes.append(process)
        stack.callback(_stop, processes)
        servers = []
        for process in processes:
            assert process.stdout is not None
            url = _read_line(process.stdout.fileno(), STARTUP_SECONDS)
            if not url.startswith("http://"):
                raise RuntimeError(f"the HTTP server did not start (said {url!r})")
            servers.append(Server(url, process))
        yield servers


def _stop(processes: Sequence[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.stdin is not None:
            process.stdin.close()  # the child's signal to shut down gracefully
    for process in processes:
        try:
            process.wait(timeout=STARTUP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def http_round_trips(server: Server, clients: int, round_trips: int) -> Sample:
    """``round_trips`` shared by ``clients`` tasks, each its own ``RunsClient`` and session:
    ``submit`` under a fresh run id, then ``wait_terminal`` (after one untimed each)."""
    import httpx

    from trio_runs.http import RunsClient

    def new_client() -> RunsClient:
        # Plain HTTP: a transport that loads no CA certificates (25 ms per client otherwise),
        # with httpx's default limits, the ones RunsClient sets.
        transport = httpx.AsyncHTTPTransport(verify=False)
        return RunsClient(server.url, timeout=60.0, transport=transport)

    async with contextlib.AsyncExitStack() as stack:
        pool = [await stack.enter_async_context(new_client()) for _ in range(clients)]
        workspace = (await pool[0].create_workspace("bench")).id
        prefix = uuid.uuid4().hex[:12]
        minted = 0

        async def submit_and_wait(i: int) -> bool:
            nonlocal minted
            minted += 1
            run_id = f"{prefix}-{minted}"
            await pool[i].submit(workspace, f"c{i}", "go", run_id)
            return (await pool[i].wait_terminal(run_id)).outcome == "completed"

        async def timed(total: int) -> Sample:
            per_client = [total // clients + (i < total % clients) for i in range(clients)]
            latencies: list[float] = []
            completed = 0

            async def client(i: int) -> None:
                nonlocal completed
                for _ in range(per_client[i]):
                    start = time.perf_counter()
                    ok = await submit_and_wait(i)  # (not `completed += await`: it races)
                    completed += ok
                    latencies.append(time.perf_counter() - start)

            server_start = server.cpu_seconds()
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, i)
            wall = time.perf_counter() - start
            cpu = server.cpu_seconds() - server_start
            return Sample(wall, latencies, cpu, len(latencies), completed)

        warm = await timed(clients)
        if warm.completed != warm.ended:
            raise AssertionError("a warm-up round trip did not complete")
        return await timed(round_trips)


def _http(server: Server, clients: int, round_trips: int) -> Sample:
    return trio.run(http_round_trips, server, clients, round_trips)


def _measure_http(
    report: Report, clients: Sequence[int], round_trips: int, reps: int, directory: str
) -> None:
    def per_trip_ms(samples: Sequence[Sample]) -> list[float]:
        return [s.wall * 1e3 / s.ended for s in samples]

    def row(label: str, metric: str, unit: str, subj: list[float], base: list[float]) -> Row:
        return Row(label, metric, unit, Stat.of(subj), Stat.of(base), ratios(subj, base))

    per_c: dict[int, Stat] = {}
    all_ended = True
    with (
        database_file(directory) as db,
        running_servers(":memory:", db) as (memory_server, sqlite_server),
    ):
        for c in clients:
            n = max(round_trips, c)
            memory, sqlite = interleaved(
                reps,
                functools.partial(_http, memory_server, c, n),
                functools.partial(_http, sqlite_server, c, n),
            )
            label = f"HTTP, {c} client{'s' if c > 1 else ''}"
            trip = per_trip_ms(sqlite)
            per_c[c] = ratios(trip, per_trip_ms(memory))
            report.add(
                Row(
                    label,
                    "throughput (wall)",
                    "runs/s",
                    Stat.of(s.ended / s.wall for s in sqlite),
                    Stat.of(s.ended / s.wall for s in memory),
                )
            )
            report.add(row(label, "time per round trip (wall)", "ms", trip, per_trip_ms(memory)))
            for pct in (50.0, 99.0):
                report.add(
                    row(
                        label,
                        f"latency p{pct:g} (submit -> terminal)",
                        "ms",
                        [percentile(s.latencies, pct) * 1e3 for s in sqlite],
                        [percentile(s.latencies, pct) * 1e3 for s in memory],
                    )
                )
            report.add(
                row(
                    label,
                    "server CPU per round trip",
                    "ms",
                    [s.server_cpu * 1e3 / s.ended for s in sqlite],
                    [s.server_cpu * 1e3 / s.ended for s in memory],
                )
            )
            all_ended &= all(s.completed == s.ended == n for s in (*sqlite, *memory))
    worst = max(s.median for s in per_c.values())
    report.targets.append(
        Target(
            "durable HTTP round trip",
            f"SQLite <= {HTTP_TARGET:g}x the in-memory server per round trip at every client "
            "count (wall)",
            ", ".join(f"{c}: {s.median:.2f}x" for c, s in per_c.items()),
            worst <= HTTP_TARGET,
        )
    )
    report.targets.append(
        Target(
            "every durable HTTP round trip ends",
            "every submitted run's completed terminal reached its client, both stores",
            "all" if all_ended else "NOT ALL",
            all_ended,
        )
    )


# -- 3. memory -----------------------------------------------------------------------------


def _file_bytes(*paths: str) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


async def _big_results(
    n: int, batch: int, result_bytes: int, db: str | None, retention_bytes: int | None
) -> dict[str, int]:
    size = result_bytes

    async def agent(call: RunCall, ctx: RunContext) -> object:
        return "x" * size  # a new string every run: nothing is shared between terminals

    retention = None if retention_bytes is None else SqliteRetention(bytes=retention_bytes)
    async with opened_store(db, retention) as store, open_backend(store) as backend:
        ws = await backend.create_workspace(
            workspace_path("durable-memory"), SessionCoordinator.factory(agent)
        )
        msgs = messages(batch)
        remaining = n
        while remaining:
            k = min(batch, remaining)
            run_ids = [backend.send_message(ws.id, msgs[i]) for i in range(k)]
            for run_id in run_ids:
                rc = await backend.wait_run(run_id)
                if rc.outcome != "completed":
                    raise AssertionError(f"run {run_id} ended {rc.outcome}: {rc.error}")
            remaining -= k
        del rc
        gc.collect()
        figures = {
            "end_rss": rss_now(),
            "peak_rss": rss_peak(),
            "retained": store.statistics().retained,
            "commits": _commits(store),
            "db_bytes": 0,
        }
        if db is not None:
            figures["db_bytes"] = await trio.to_thread.run_sync(_file_bytes, db, db + "-wal")
    return figures


def rss_after_runs(
    kind: str,
    n: int,
    *,
    batch: int = MEMORY_BATCH,
    result_bytes: int = RESULT_BYTES,
    retention_bytes: int | None = None,
    directory: str | None = None,
) -> dict[str, int]:
    """In this (fresh) process: RSS before and after ``n`` runs returning ``result_bytes``.

    ``kind`` is ``"sqlite"`` (a new database in ``directory``) or ``"memory"``. The end RSS
    is read after the runs, the store still open, the garbage collected.
    """
    settle()
    start_rss = rss_now()
    with contextlib.ExitStack() as stack:
        db = None
        if kind == "sqlite":
            db = stack.enter_context(database_file(directory or database_dir()))
        elif kind != "memory":
            raise ValueError(f"kind must be 'sqlite' or 'memory', got {kind!r}")
        figures = trio.run(_big_results, n, batch, result_bytes, db, retention_bytes)
    return {"start_rss": start_rss, **figures}


def rss_in_subprocess(kind: str, n: int, **kwargs: Any) -> dict[str, int]:
    """:func:`rss_after_runs` in a new interpreter; what it measured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = (
        "import json, sys; from benchmarks.durable import rss_after_runs; "
        "kind, n, kwargs = json.loads(sys.argv[1]); "
        "print(json.dumps(rss_after_runs(kind, n, **kwargs)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([kind, n, kwargs])],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the RSS child ({kind}, N={n}) failed:\n{out.stderr}")
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _measure_memory(
    report: Report,
    runs: int,
    runs_in_memory: int,
    retention_bytes: int | None,
    reps: int,
    directory: str,
    batch: int = MEMORY_BATCH,
    result_bytes: int = RESULT_BYTES,
) -> None:
    if retention_bytes is not None and retention_bytes < 2 * batch * result_bytes:
        # A waiter that comes after its terminal was evicted would get UnknownRun.
        raise ValueError("the retention must hold at least two batches of results")
    common = {"batch": batch, "result_bytes": result_bytes}
    memory, sqlite = interleaved(
        reps,
        functools.partial(rss_in_subprocess, "memory", runs_in_memory, **common),
        functools.partial(
            rss_in_subprocess,
            "sqlite",
            runs,
            retention_bytes=retention_bytes,
            directory=directory,
            **common,
        ),
    )
    size = f"{result_bytes / MIB:g} MiB" if result_bytes >= MIB else f"{result_bytes:,} bytes"
    label = f"memory, {runs:,} runs x {size} (in-memory: {runs_in_memory:,})"
    note = (
        f"baseline: the in-memory ledger after {runs_in_memory:,} runs, which keeps every "
        "result (no ratio: not the same number of runs)"
    )

    def mib(samples: Sequence[dict[str, int]], key: str) -> Stat:
        return Stat.of(s[key] / MIB for s in samples)

    peak = mib(sqlite, "peak_rss")
    for metric, key in (("peak RSS", "peak_rss"), ("RSS after the runs", "end_rss")):
        report.add(Row(label, metric, "MiB", mib(sqlite, key), mib(memory, key), note=note))
    report.add(
        Row(
            label,
            "RSS above start",
            "MiB",
            Stat.of((s["end_rss"] - s["start_rss"]) / MIB for s in sqlite),
            Stat.of((s["end_rss"] - s["start_rss"]) / MIB for s in memory),
            note=note,
        )
    )
    report.add(
        Row(
            label,
            "RSS at start (imports)",
            "MiB",
            mib(sqlite, "start_rss"),
            mib(memory, "start_rss"),
        )
    )
    scale = runs / runs_in_memory
    report.add(
        Row(
            f"memory, in-memory ledger estimated at {runs:,} runs",
            "RSS after the runs",
            "MiB",
            Stat.of(
                (s["start_rss"] + scale * (s["end_rss"] - s["start_rss"])) / MIB for s in memory
            ),
            note=f"start + {scale:g} x the growth measured after {runs_in_memory:,} runs",
        )
    )
    report.add(
        Row(
            label,
            "terminals retained",
            "count",
            Stat.of(s["retained"] for s in sqlite),
            Stat.of(s["retained"] for s in memory),
        )
    )
    report.add(
        Row(label, "database + WAL on disk", "MiB", mib(sqlite, "db_bytes")),
    )
    report.add(
        Row(
            label,
            "commits per 1,000 runs",
            "count",
            Stat.of(s["commits"] * 1000 / runs for s in sqlite),
        )
    )
    report.targets.append(
        Target(
            "durable RSS",
            f"SQLite peak RSS <= {RSS_TARGET_BYTES / 1e6:g} MB after {runs:,} runs x {size}, "
            "every repetition",
            f"{peak.median * MIB / 1e6:.0f} MB [{peak.min * MIB / 1e6:.0f}.."
            f"{peak.max * MIB / 1e6:.0f}]",
            peak.max * MIB <= RSS_TARGET_BYTES,
        )
    )


# -- the report ------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    reps: int = 5,
    sizes: Sequence[int] | None = None,
    batch: int = BATCH,
    clients: Sequence[int] = CLIENTS,
    round_trips: int | None = None,
    memory_runs: int | None = None,
    memory_runs_in_memory: int | None = None,
    result_bytes: int = RESULT_BYTES,
    retention_bytes: int | None = None,
) -> Report:
    """Measure the three workloads on both stores; an empty ``clients`` skips HTTP, a
    ``memory_runs`` of 0 skips memory."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    round_trips = round_trips or (QUICK_ROUND_TRIPS if quick else ROUND_TRIPS)
    if memory_runs is None:
        memory_runs = QUICK_MEMORY_RUNS if quick else MEMORY_RUNS
    if memory_runs_in_memory is None:
        memory_runs_in_memory = QUICK_MEMORY_RUNS_IN_MEMORY if quick else MEMORY_RUNS_IN_MEMORY
    if retention_bytes is None and quick:
        retention_bytes = QUICK_RETENTION_BYTES
    directory = database_dir()
    missing = missing_http_extra() if clients else ""
    report = Report(
        name="durable",
        title="6. Durable store: SqliteLedger against the in-memory RunLedger",
        baseline="the in-memory RunLedger: the same workload in the same run, repetitions "
        "interleaved",
        params={
            "sizes": list(sizes),
            "batch": batch,
            "clients": list(clients),
            "round_trips": round_trips,
            "memory_runs": memory_runs,
            "memory_runs_in_memory": memory_runs_in_memory,
            "result_bytes": result_bytes,
            "memory_batch": MEMORY_BATCH,
            "retention": "default"
            if retention_bytes is None
            else f"default, bytes={retention_bytes:,}",
            "synchronous": "FULL",
            "db_dir": f"{directory} ({_filesystem(directory)})",
            "reps": reps,
        },
    )
    _measure_disk(report, reps, directory)
    _measure_dispatch(report, sizes, batch, reps, directory)
    if missing:
        report.notes.append(f"HTTP skipped: {missing}")
    elif clients:
        _measure_http(report, clients, round_trips, reps, directory)
    if memory_runs:
        _measure_memory(
            report,
            memory_runs,
            memory_runs_in_memory,
            retention_bytes,
            reps,
            directory,
            result_bytes=result_bytes,
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "durable", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
