"""Where the time goes: cProfile of both sides of one trio-runs HTTP path, by layer.

``python -m benchmarks.peers.profile [--mode one|two|batch|multiplexed] [--clients 8]
[--jobs 3000] [--redis-nodes N]`` runs ``trio-runs serve`` (the no-op agent) under ``cProfile``
and the peers benchmark's client loop (``benchmarks.peers.trio_runs_http``) under ``cProfile``
in this process, then prints each side's CPU self time (``tottime``) grouped by layer: the
Trio scheduler and I/O manager, socket and epoll syscalls, h11, httpx/httpcore, hypercorn,
Starlette, JSON (msgspec / json), coredis (the Redis client), trio-runs' own code, and the
rest. Nothing of Celery or arq is needed.

``--redis-nodes N``: the Redis mode instead, ``N`` ``serve --redis`` nodes on a private
``redis-server`` (needs one on PATH), each under ``cProfile``, the clients spread over them as
in the benchmark; their profiles are merged, and the CPU seconds every process used while
the clients ran (nodes, ``redis-server``, this process) are printed against the wall time,
with the Redis commands a job took (``INFO commandstats``).

``--cpu-only``: no cProfile anywhere (it slows Python several times over): jobs/s, p99, the
CPU milliseconds each process spent per job and Redis' commands per job, as measured.

cProfile clocks wall time: the time spent blocked in ``epoll.poll`` is idleness, listed
apart; every other share is of the busy time. cProfile slows Python code more than C code
and syscalls; the shares are what to read, not the times.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import os
import pstats
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from .._common import REPO_ROOT
from . import child, free_port, trio_runs_http

LAYERS = (
    ("trio-runs", ("trio_runs/",)),
    ("coredis (Redis client)", ("coredis/",)),
    ("anyio (coredis' bridge onto Trio)", ("anyio/",)),
    ("Trio scheduler + I/O manager", ("trio/_core", "trio/_")),
    ("h11", ("h11/",)),
    ("httpx / httpcore", ("httpx/", "httpcore/", "sniffio/")),
    ("hypercorn", ("hypercorn/",)),
    ("Starlette", ("starlette/",)),
    ("JSON (msgspec / json)", ("msgspec", "json/", "_json")),
    ("other third-party (attrs, outcome, ...)", ("site-packages/",)),
    ("standard library (Python)", ("/lib/python3",)),
)


IDLE = "idle: waiting in epoll.poll (not CPU)"


def layer(filename: str, function: str) -> str:
    """The layer a profiled function belongs to (builtins by name: syscalls or C code)."""
    if filename == "~":  # a builtin: C code, named like "<method 'send' of '_socket.socket'...>"
        if "poll' of 'select.epoll" in function:
            return IDLE
        if "_socket.socket" in function or "select.epoll" in function:
            return "socket / epoll syscalls"
        if "SimpleQueue" in function:
            return "queue hand-offs to worker threads (SQLite writer)"
        if "json" in function or "msgspec" in function:
            return "JSON (msgspec / json)"
        return "other builtins (C)"
    for name, needles in LAYERS:
        if any(needle in filename for needle in needles):
            return name
    return "other Python"


def shares(stats: pstats.Stats) -> list[tuple[str, float, float]]:
    """``(layer, seconds, share)`` of self time, largest first; the share is of the busy time
    (everything but :data:`IDLE`, whose share is of the whole)."""
    totals: collections.Counter[str] = collections.Counter()
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        totals[layer(filename, function)] += tottime
    whole = sum(totals.values()) or 1.0
    busy = (whole - totals[IDLE]) or 1.0
    return [
        (name, seconds, seconds / (whole if name == IDLE else busy))
        for name, seconds in totals.most_common()
    ]


def print_shares(title: str, stats: pstats.Stats, top: int) -> None:
    print(f"== {title} (shares of the busy time)")
    for name, seconds, share in shares(stats):
        print(f"   {share * 100:5.1f} %  {seconds:7.2f} s  {name}")
    print("   top functions by self time:")
    stats.sort_stats("tottime").print_stats(top)


def command_stats(port: int) -> dict[str, tuple[int, float]]:
    """Redis' ``INFO commandstats``: calls and microseconds so far, by command (the commands
    scripts run included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        reply = b""
        while b"\r\n" not in reply:  # the bulk reply's header, "$<size>"
            reply += sock.recv(65536) or b"\r\n"
        header, _, body = reply.partition(b"\r\n")
        size = int(header[1:] or 0)
        while len(body) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    stats: dict[str, tuple[int, float]] = {}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line.split(":", 1)
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            stats[name.removeprefix("cmdstat_")] = (int(fields["calls"]), float(fields["usec"]))
    return stats


def print_commands(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]], jobs: int
) -> None:
    """Redis commands per job between two :func:`command_stats` snapshots."""
    rows = sorted(
        (
            (calls - before.get(name, (0, 0.0))[0], usec - before.get(name, (0, 0.0))[1], name)
            for name, (calls, usec) in after.items()
        ),
        reverse=True,
    )
    calls = sum(r[0] for r in rows)
    usec = sum(r[1] for r in rows)
    print(
        f"Redis commands while the clients ran: {calls / jobs:.1f} a job, "
        f"{usec / jobs:.0f} us of Redis' time a job"
    )
    for n, spent, name in rows:
        if n > 0:
            print(f"   {n / jobs:6.2f} a job  {spent / n:6.1f} us each  {name}")
    print()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiled_server(
    root: Path,
    out: Path | None,
    db: str | None,
    extra: Sequence[str] = (),
    name: str = "server",
    pids: list[int] | None = None,
) -> Iterator[str]:
    """``trio-runs serve`` (with ``extra`` arguments) under cProfile; its stats land in ``out``
    when it stops (SIGINT); ``out`` None: not profiled. Its pid is appended to ``pids``."""
    from . import _http_answers, _wait_until

    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    profiler = [] if out is None else ["-m", "cProfile", "-o", str(out)]
    args = [
        sys.executable, *profiler,
        "-m", "trio_runs", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--agent", "benchmarks.dispatch:trivial_agent",
        "--workspace-root", str(root / "workspaces"),
        "--drain", "0",
        *extra,
    ]  # fmt: skip
    if db is not None:
        args += ["--db", db]
    log = root / f"{name}.log"
    url = f"http://127.0.0.1:{port}"
    with child(args, log=log, env=env, cwd=REPO_ROOT, stop_signal=signal.SIGINT) as process:
        _wait_until(lambda: _http_answers(url), process, "trio-runs serve (profiled)", log)
        if pids is not None:
            pids.append(process.pid)
        yield url


@contextlib.contextmanager
def profiled_servers(
    root: Path,
    db: str | None,
    nodes: int,
    pids: dict[str, int],
    ports: list[int],
    profile: bool = True,
) -> Iterator[tuple[list[str], list[Path]]]:
    """One profiled server (``nodes`` 0), or ``nodes`` Redis-mode nodes on a private
    ``redis-server``; their URLs and profile paths. ``pids`` gets every process's pid by name,
    ``ports`` the Redis port (if any)."""
    from . import running_redis

    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        if nodes:
            port, redis = stack.enter_context(running_redis(root))
            pids["redis-server"] = redis.pid
            ports.append(port)
            extra = ["--redis", f"redis://127.0.0.1:{port}/2", "--redis-namespace", "profile"]
        urls, outs = [], []
        for k in range(max(nodes, 1)):
            name = f"node{k}" if nodes else "server"
            got: list[int] = []
            out = root / f"{name}.prof" if profile else None
            outs += [] if out is None else [out]
            urls.append(stack.enter_context(profiled_server(root, out, db, extra, name, got)))
            pids[name] = got[0]
        yield urls, outs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mode", default="one", choices=("one", "two", "batch", "multiplexed"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=3_000)
    p.add_argument("--db", metavar="PATH", help="the server's --db (default: its own)")
    p.add_argument("--top", type=int, default=15, help="functions listed per side")
    p.add_argument(
        "--redis-nodes",
        type=int,
        default=0,
        metavar="N",
        help="profile the Redis mode: N 'serve --redis' nodes on a private redis-server",
    )
    p.add_argument(
        "--cpu-only",
        action="store_true",
        help="no cProfile: CPU per job of every process and Redis commands per job only",
    )
    p.add_argument(
        "--save",
        metavar="DIR",
        help="also keep the profiles (server or node<K>.prof, client.prof) in DIR",
    )
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    profile = not args.cpu_only
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-profile-") as tmp:
        root = Path(tmp)
        client = cProfile.Profile()
        pids: dict[str, int] = {"this process (clients)": os.getpid()}
        ports: list[int] = []
        with profiled_servers(root, args.db, args.redis_nodes, pids, ports, profile) as (
            urls,
            outs,
        ):
            trio.run(trio_runs_http, urls, args.clients, args.clients * 2, args.mode)  # warm
            commands = [command_stats(port) for port in ports]
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if profile:
                client.enable()
            sample = trio.run(trio_runs_http, urls, args.clients, args.jobs, args.mode)
            client.disable()
            used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            commands += [command_stats(port) for port in ports]
        where = f" on {args.redis_nodes} Redis-mode node(s)" if args.redis_nodes else ""
        print(
            f"{args.mode}, {args.clients} clients{where}: {sample.rate:,.0f} jobs/s"
            f"{' under the profilers' if profile else ''} ({sample.completed}/{sample.ended} "
            "completed, p99 "
            f"{sample.p99 * 1000:.1f} ms)\n"
        )
        print(f"CPU seconds while the clients ran ({sample.wall:.2f} s wall):")
        for name, seconds in used.items():
            print(
                f"   {seconds:7.2f} s  {seconds / sample.wall * 100:5.1f} % of a core  "
                f"{seconds / sample.ended * 1000:6.3f} ms a job  {name}"
            )
        print()
        if commands:
            print_commands(commands[0], commands[1], sample.ended)
        if not profile:
            return 0
        missing = [out for out in outs if not out.exists()]
        if missing:
            print(f"no profile written: {missing} (see the logs in {root})", file=sys.stderr)
            return 1
        title = (
            "server (trio-runs serve)"
            if not args.redis_nodes
            else (f"servers ({args.redis_nodes} Redis-mode nodes, merged)")
        )
        if args.save:
            keep = Path(args.save)
            keep.mkdir(parents=True, exist_ok=True)
            for out in outs:
                shutil.copy(out, keep / out.name)
            client.dump_stats(str(keep / "client.prof"))
        print_shares(f"{title}, self time by layer", pstats.Stats(*map(str, outs)), args.top)
        print_shares("client (this process), self time by layer", pstats.Stats(client), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
