"""5. HTTP: submit + wait round trips over loopback, beside the in-process figure.

The server (``trio_runs.http.serve``, the trivial agent) runs in a child process bound to
127.0.0.1, as it would in production; C concurrent clients (C = 1, 8, 64) run in this process,
each its own :class:`~trio_runs.http.RunsClient` (its own connections) and its own session,
each looping: ``submit`` a prompt under a fresh run id, then ``wait_terminal`` for its end -
two HTTP requests per round trip, the way ``trio-runs run`` does it. Reported per C:
round trips/s and the wall time per round trip, latency p50/p99 (submit sent -> terminal
received), and the server's CPU per round trip (read from ``/proc/<pid>/stat``).

Two baselines, each measured in the same run, repetition by repetition:

- **in-process**: the same C clients doing ``Backend.send_message`` + ``Backend.wait_run``
  in one process, no HTTP - what the same work costs without the service;
- **bare HTTP**: the same C clients sending two ``GET /healthz`` per round trip to the same
  server - the HTTP stack itself (httpx -> hypercorn -> Starlette -> JSON), no runs. The
  ratio against it is what the run service adds on top of the stack.

Beside them, from the same interleaved repetitions (issue 12): the same C clients with **one
request per run** (``RunsClient.run_prompt``: ``POST .../messages?wait=S`` answers with the
terminal) and **batched** (``RunsClient.run_batch``: :data:`BATCH` runs per
``POST .../batches``, their terminals streamed back in its answer), each against the
two-request figure and the bare-HTTP baseline; and **multiplexed**: the C clients are C tasks
sharing one ``RunsClient(multiplex=True)``, each calling ``run_prompt`` for one run at a time,
which the client coalesces into batch requests (no caller batches anything itself).

``python -m benchmarks.http [--quick] [--json PATH]`` / ``python -m benchmarks --only http``
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import trio

from trio_runs import AgentMessage, RunComplete, SessionCoordinator, open_backend

from ._common import REPO_ROOT, Report, Row, Stat, Target, interleaved, percentile, ratios
from .dispatch import trivial_agent, workspace_path

CLIENTS = (1, 8, 64)
ROUND_TRIPS = 2_000
"""Round trips per repetition and client count (``--quick``: :data:`QUICK_ROUND_TRIPS`)."""
QUICK_ROUND_TRIPS = 150
IN_PROCESS_ROUND_TRIPS = 5_000
BATCH = 16
"""Runs per batch request of the batched client (its last batch may be smaller)."""
WARMUP = 1
"""Untimed round trips per client before the clock starts (connections, caches)."""
STARTUP_SECONDS = 30.0
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Sample(NamedTuple):
    """One repetition at one client count: wall seconds, latencies, CPU seconds spent by the
    server process and by this (the clients') process, round trips ended and completed."""

    wall: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    ended: int
    completed: int


# -- the server ------------------------------------------------------------------------------


class Server(NamedTuple):
    url: str
    process: subprocess.Popen[str]

    def cpu_seconds(self) -> float:
        """The server process's user + system CPU so far (0.0 where /proc is missing)."""
        try:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as f:
                # Fields after the command name (which may hold spaces, so split past ")").
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / TICKS


@contextlib.contextmanager
def running_server(tree: Path = REPO_ROOT) -> Iterator[Server]:
    """Start the server child from the source tree ``tree`` (this checkout by default; the
    A/B benchmark starts one per tree); yield it once it printed its URL; stop it on the way
    out."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    with subprocess.Popen(
        [sys.executable, "-m", "benchmarks._http_server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tree,
    ) as process:
        try:
            assert process.stdout is not None
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                if not selector.select(STARTUP_SECONDS):
                    raise RuntimeError(
                        f"the HTTP server from {tree} printed no URL within {STARTUP_SECONDS:g}s"
                    )
            url = process.stdout.readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"the HTTP server from {tree} did not start (said {url!r})")
            yield Server(url, process)
        finally:
            # Closing its stdin is the child's signal to shut down gracefully.
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=STARTUP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the clients ------------------------------------------------------------------------------


async def _clients(
    clients: int,
    round_trips: int,
    one: Callable[[int, int], Awaitable[int]],
    server_cpu: Callable[[], float],
    batch: int = 1,
) -> Sample:
    """``clients`` tasks sharing ``round_trips`` round trips: each call ``one(client, k)``
    does ``k`` of them (at most ``batch``) and returns how many completed. A latency is
    recorded per call (for a batch: sent -> its last terminal)."""
    per_client = [round_trips // clients + (i < round_trips % clients) for i in range(clients)]
    latencies: list[float] = []
    completed = ended = 0

    async def client(i: int) -> None:
        nonlocal completed, ended
        left = per_client[i]
        while left > 0:
            k = min(batch, left)
            start = time.perf_counter()
            ok = await one(i, k)
            latencies.append(time.perf_counter() - start)
            completed += ok
            ended += k
            left -= k

    server_start, client_start = server_cpu(), time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, i)
    wall = time.perf_counter() - start
    return Sample(
        wall,
        latencies,
        server_cpu() - server_start,
        time.process_time() - client_start,
        ended,
        completed,
    )


async def http_round_trips(
    url: str, clients: int, round_trips: int, mode: str, server_cpu: Callable[[], float]
) -> Sample:
    """Round trips over HTTP, by ``mode``: ``two`` (submit + wait_terminal), ``one``
    (``run_prompt``: submit and wait in one request), ``batch`` (``run_batch``, up to
    :data:`BATCH` runs per request), ``mux`` (``run_prompt`` of C tasks sharing one
    multiplexing client), ``bare`` (two ``GET /healthz``)."""
    from trio_runs.http import RunsClient

    async with contextlib.AsyncExitStack() as stack:
        if mode == "mux":
            shared = RunsClient(url, timeout=60.0, multiplex=True)
            pool = [await stack.enter_async_context(shared)] * clients
        else:
            pool = [
                await stack.enter_async_context(RunsClient(url, timeout=60.0))
                for _ in range(clients)
            ]
        workspace = (await pool[0].create_workspace("bench")).id
        prefix = uuid.uuid4().hex[:12]
        minted = 0

        def mint() -> str:
            nonlocal minted
            minted += 1
            return f"{prefix}-{minted}"

        async def submit_and_wait(i: int, k: int) -> int:
            run_id = mint()
            await pool[i].submit(workspace, f"c{i}", "go", run_id)
            return (await pool[i].wait_terminal(run_id)).outcome == "completed"

        async def one_request(i: int, k: int) -> int:
            terminal = await pool[i].run_prompt(workspace, f"c{i}", "go", mint())
            return terminal.outcome == "completed"

        async def batched(i: int, k: int) -> int:
            messages = [(f"c{i}", "go", mint()) for _ in range(k)]
            results = await pool[i].run_batch(workspace, messages)
            return sum(isinstance(r, RunComplete) and r.outcome == "completed" for r in results)

        async def two_healthz(i: int, k: int) -> int:
            await pool[i].health()
            await pool[i].health()
            return True

        one = {
            "two": submit_and_wait,
            "one": one_request,
            "mux": one_request,
            "batch": batched,
            "bare": two_healthz,
        }[mode]
        batch = BATCH if mode == "batch" else 1
        warm = await _clients(clients, WARMUP * clients * batch, one, server_cpu, batch)
        if warm.completed != warm.ended:
            raise AssertionError("a warm-up round trip did not complete")
        return await _clients(clients, round_trips, one, server_cpu, batch)


def _no_server() -> float:
    return 0.0


async def in_process_round_trips(clients: int, round_trips: int) -> Sample:
    """The same round trips without HTTP: ``send_message`` + ``wait_run`` in this process."""
    async with open_backend() as backend:
        ws = await backend.create_workspace(
            workspace_path("http-in-process"), SessionCoordinator.factory(trivial_agent)
        )
        msgs = [AgentMessage(f"c{i}", "go") for i in range(clients)]
        send, wait, workspace_id = backend.send_message, backend.wait_run, ws.id

        async def submit_and_wait(i: int, k: int) -> int:
            return (await wait(send(workspace_id, msgs[i]))).outcome == "completed"

        await _clients(clients, WARMUP * clients, submit_and_wait, _no_server)
        return await _clients(clients, round_trips, submit_and_wait, _no_server)


# -- the report -------------------------------------------------------------------------------


def missing_http_extra() -> str:
    """Why the service cannot be measured here ("" when it can)."""
    try:
        importlib.import_module("trio_runs.http.server")
        importlib.import_module("trio_runs.http.client")
    except ImportError as exc:
        return f"the HTTP extra is not installed ({exc}): pip install -e '.[bench]'"
    return ""


def _per_trip_ms(samples: Sequence[Sample]) -> list[float]:
    return [s.wall * 1e3 / s.ended for s in samples]


def _pct_ms(samples: Sequence[Sample], pct: float) -> list[float]:
    return [percentile(s.latencies, pct) * 1e3 for s in samples]


def _cpu_ms(samples: Sequence[Sample], which: str) -> list[float]:
    return [getattr(s, which) * 1e3 / s.ended for s in samples]


def _row(
    label: str, metric: str, unit: str, subject: list[float], base: list[float], note: str
) -> Row:
    return Row(label, metric, unit, Stat.of(subject), Stat.of(base), ratios(subject, base), note)


def _add_one_request_rows(
    report: Report,
    label: str,
    two: Sequence[Sample],
    bare: Sequence[Sample],
    single: Sequence[Sample],
    batched: Sequence[Sample],
) -> None:
    # Issue 12: one request per run (submit ?wait=) and batches, next to two requests per
    # run and the bare HTTP stack, all from the same interleaved repetitions.
    kinds = (("one request", single), (f"batched ({BATCH}/request)", batched))
    for kind, samples in kinds:
        report.add(
            Row(
                label,
                f"throughput, {kind} (wall)",
                "runs/s",
                Stat.of(s.ended / s.wall for s in samples),
                Stat.of(s.ended / s.wall for s in two),
                ratios([s.ended / s.wall for s in samples], [s.ended / s.wall for s in two]),
                "baseline: two requests per run",
            )
        )
    report.add(
        _row(
            label,
            "latency p50, one request (submit -> terminal)",
            "ms",
            _pct_ms(single, 50.0),
            _pct_ms(two, 50.0),
            "baseline: two requests per run",
        )
    )
    for kind, samples in kinds:
        report.add(
            _row(
                label,
                f"time per run, {kind}, vs bare HTTP (wall)",
                "ms",
                _per_trip_ms(samples),
                _per_trip_ms(bare),
                "baseline: two GET /healthz per round trip",
            )
        )
        report.add(
            _row(
                label,
                f"server CPU per run, {kind}",
                "ms",
                _cpu_ms(samples, "server_cpu"),
                _cpu_ms(two, "server_cpu"),
                "baseline: two requests per run",
            )
        )


def _add_multiplexed_rows(
    report: Report,
    label: str,
    two: Sequence[Sample],
    bare: Sequence[Sample],
    single: Sequence[Sample],
    mux: Sequence[Sample],
) -> None:
    # Issue 12, item 3: C tasks sharing one multiplexing client, each run_prompt one run at a
    # time, against two requests per run, one request per run and the bare HTTP stack.
    def per_s(samples: Sequence[Sample]) -> list[float]:
        return [s.ended / s.wall for s in samples]

    for base, note in ((two, "two requests per run"), (single, "one request per run")):
        report.add(
            Row(
                label,
                f"throughput, multiplexed, vs {note.replace(' per run', '')} (wall)",
                "runs/s",
                Stat.of(per_s(mux)),
                Stat.of(per_s(base)),
                ratios(per_s(mux), per_s(base)),
                f"baseline: {note}",
            )
        )
    report.add(
        _row(
            label,
            "latency p50, multiplexed (run_prompt -> terminal)",
            "ms",
            _pct_ms(mux, 50.0),
            _pct_ms(two, 50.0),
            "baseline: two requests per run",
        )
    )
    report.add(
        _row(
            label,
            "time per run, multiplexed, vs bare HTTP (wall)",
            "ms",
            _per_trip_ms(mux),
            _per_trip_ms(bare),
            "baseline: two GET /healthz per round trip",
        )
    )
    for which in ("server_cpu", "client_cpu"):
        report.add(
            _row(
                label,
                f"{which.replace('_', ' ')} per run, multiplexed",
                "ms",
                _cpu_ms(mux, which),
                _cpu_ms(two, which),
                "baseline: two requests per run",
            )
        )


def run(
    *,
    quick: bool = False,
    reps: int = 5,
    clients: Sequence[int] = CLIENTS,
    round_trips: int | None = None,
) -> Report:
    """Measure HTTP round trips at every client count against the in-process and bare-HTTP
    baselines, every repetition running all three back to back."""
    round_trips = round_trips or (QUICK_ROUND_TRIPS if quick else ROUND_TRIPS)
    report = Report(
        name="http",
        title="5. HTTP: submit + wait round trips over loopback (server in its own process)",
        baseline="in-process: the same clients calling Backend.send_message + wait_run; "
        "bare HTTP: two GET /healthz per round trip to the same server; two requests per run: "
        f"submit + wait, against one request per run (?wait=), batches of {BATCH} "
        "and multiplexed (C tasks sharing one RunsClient(multiplex=True))",
        params={"clients": list(clients), "round_trips": round_trips, "reps": reps},
    )
    missing = missing_http_extra()
    if missing:
        report.skipped = missing
        return report
    all_ended = True
    with running_server() as server:
        http = functools.partial(http_round_trips, server.url, server_cpu=server.cpu_seconds)
        for c in clients:
            n = max(round_trips, c)
            # In-process round trips are ~100x cheaper: more of them, for a stable figure.
            n_inproc = max(n, IN_PROCESS_ROUND_TRIPS)
            trio.run(in_process_round_trips, c, n_inproc)  # warm-up
            subj, inproc, bare, single, batched, mux = interleaved(
                reps,
                functools.partial(trio.run, http, c, n, "two"),
                functools.partial(trio.run, in_process_round_trips, c, n_inproc),
                functools.partial(trio.run, http, c, n, "bare"),
                functools.partial(trio.run, http, c, n, "one"),
                functools.partial(trio.run, http, c, n, "batch"),
                functools.partial(trio.run, http, c, n, "mux"),
            )
            label = f"{c} client{'s' if c > 1 else ''}"
            report.add(
                Row(
                    label,
                    "throughput (wall)",
                    "runs/s",
                    Stat.of(s.ended / s.wall for s in subj),
                    Stat.of(s.ended / s.wall for s in inproc),
                    note="baseline: in-process",
                )
            )
            http_ms = _per_trip_ms(subj)
            report.add(
                _row(
                    label,
                    "time per round trip (wall)",
                    "ms",
                    http_ms,
                    _per_trip_ms(inproc),
                    "baseline: in-process",
                )
            )
            for pct in (50.0, 99.0):
                report.add(
                    _row(
                        label,
                        f"latency p{pct:g} (submit -> terminal)",
                        "ms",
                        _pct_ms(subj, pct),
                        _pct_ms(inproc, pct),
                        "baseline: in-process",
                    )
                )
            report.add(
                _row(
                    label,
                    "time per round trip, vs bare HTTP (wall)",
                    "ms",
                    http_ms,
                    _per_trip_ms(bare),
                    "baseline: two GET /healthz per round trip",
                )
            )
            report.add(
                _row(
                    label,
                    "server CPU per round trip",
                    "ms",
                    _cpu_ms(subj, "server_cpu"),
                    _cpu_ms(bare, "server_cpu"),
                    "baseline: bare HTTP",
                )
            )
            report.add(
                _row(
                    label,
                    "client CPU per round trip",
                    "ms",
                    _cpu_ms(subj, "client_cpu"),
                    _cpu_ms(bare, "client_cpu"),
                    "baseline: bare HTTP",
                )
            )
            _add_one_request_rows(report, label, subj, bare, single, batched)
            _add_multiplexed_rows(report, label, subj, bare, single, mux)
            all_ended &= all(s.completed == s.ended == n for s in (*subj, *single, *batched, *mux))
    report.targets.append(
        Target(
            "every HTTP round trip ends",
            "every submitted run's completed terminal reached its client, every repetition",
            "all" if all_ended else "NOT ALL",
            all_ended,
        )
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "http", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
