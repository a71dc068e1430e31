"""Where the time goes: cProfile of both sides of one trio-runs HTTP path, by layer.

``python -m benchmarks.peers.profile [--mode one|two|batch|multiplexed] [--clients 8]
[--jobs 3000]`` runs ``trio-runs serve`` (the no-op agent) under ``cProfile`` and the peers
benchmark's client loop (``benchmarks.peers.trio_runs_http``) under ``cProfile`` in this process,
then prints each side's CPU self time (``tottime``) grouped by layer: the Trio scheduler and
I/O manager, socket and epoll syscalls, h11, httpx/httpcore, hypercorn, Starlette, JSON
(msgspec / json), trio-runs' own code, and the rest. Nothing of Celery or arq is needed.

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
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from .._common import REPO_ROOT
from . import child, free_port, trio_runs_http

LAYERS = (
    ("trio-runs", ("trio_runs/",)),
    ("Trio scheduler + I/O manager", ("trio/_core", "trio/_")),
    ("h11", ("h11/",)),
    ("httpx / httpcore / anyio", ("httpx/", "httpcore/", "anyio/", "sniffio/")),
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


@contextlib.contextmanager
def profiled_server(root: Path, out: Path, db: str | None) -> Iterator[str]:
    """``trio-runs serve`` under cProfile; its stats land in ``out`` when it stops (SIGINT)."""
    from . import _http_answers, _wait_until

    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [
        sys.executable, "-m", "cProfile", "-o", str(out),
        "-m", "trio_runs", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--agent", "benchmarks.dispatch:trivial_agent",
        "--workspace-root", str(root / "workspaces"),
        "--drain", "0",
    ]  # fmt: skip
    if db is not None:
        args += ["--db", db]
    log = root / "server.log"
    url = f"http://127.0.0.1:{port}"
    with child(args, log=log, env=env, cwd=REPO_ROOT, stop_signal=signal.SIGINT) as process:
        _wait_until(lambda: _http_answers(url), process, "trio-runs serve (profiled)", log)
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mode", default="one", choices=("one", "two", "batch", "multiplexed"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=3_000)
    p.add_argument("--db", metavar="PATH", help="the server's --db (default: its own)")
    p.add_argument("--top", type=int, default=15, help="functions listed per side")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-profile-") as tmp:
        root = Path(tmp)
        out = root / "server.prof"
        client = cProfile.Profile()
        with profiled_server(root, out, args.db) as url:
            trio.run(trio_runs_http, url, args.clients, args.clients * 2, args.mode)  # warm
            client.enable()
            sample = trio.run(trio_runs_http, url, args.clients, args.jobs, args.mode)
            client.disable()
        print(
            f"{args.mode}, {args.clients} clients: {sample.rate:,.0f} jobs/s under the profilers "
            f"({sample.completed}/{sample.ended} completed)\n"
        )
        if not out.exists():
            print(f"the server wrote no profile (see {root / 'server.log'})", file=sys.stderr)
            return 1
        print_shares(
            "server (trio-runs serve), self time by layer", pstats.Stats(str(out)), args.top
        )
        print_shares("client (this process), self time by layer", pstats.Stats(client), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
