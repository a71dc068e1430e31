"""A/B of the HTTP server: the same client load against servers started from two source trees.

Issue 12, item 4 (a cheaper server hot path) compares server code, which one tree cannot run
side by side. Each tree given as ``NAME=DIR`` (a checkout or ``git archive`` of the code to
compare) gets its own ``benchmarks._http_server`` child started from ``DIR``; the clients
run here, from this tree, and are the same for every server. Repetitions are interleaved
(the order rotates each repetition) and every ratio is paired with the first tree's figure of
the same repetition. Per mode (``one``: ``run_prompt``, one request per run; ``batch``:
``run_batch``, 16 runs per request; ``two`` and ``bare`` as in :mod:`benchmarks.http`) and
client count: runs/s and the server's CPU ms per run, as median [min..max] and ratios.

``--client-per-tree`` compares client code too: every measurement's clients then run in a
child process started from the tree whose server they load (the tree's own ``RunsClient``
and ``benchmarks.http``), and the clients' CPU ms per run is reported as well.

    python -m benchmarks.http_ab before=/tmp/before after=/tmp/after --reps 5
    python -m benchmarks.http_ab before=/tmp/before after=/tmp/after --modes batch \
        --clients 64 --client-per-tree
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .http import Sample, Server, http_round_trips, running_server

# What a --client-per-tree child runs, from the tree under test: its own http_round_trips
# (and so its own RunsClient) against the server of pid PID, printing the sample as JSON.
_CHILD = """
import json, os, sys, trio
from benchmarks.http import http_round_trips

url, clients, n, mode, pid = sys.argv[1:6]

def server_cpu():
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

s = trio.run(http_round_trips, url, int(clients), int(n), mode, server_cpu)
print(json.dumps([s.wall, s.server_cpu, s.client_cpu, s.ended, s.completed]))
"""

_CHILD_SECONDS = 900.0


def _measure(server: Server, tree: str, clients: int, n: int, mode: str, in_child: bool) -> Sample:
    if not in_child:
        return trio.run(http_round_trips, server.url, clients, n, mode, server.cpu_seconds)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    args = [server.url, str(clients), str(n), mode, str(server.process.pid)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=_CHILD_SECONDS,
        check=True,
    )
    wall, server_cpu, client_cpu, ended, completed = json.loads(done.stdout.splitlines()[-1])
    return Sample(wall, [], server_cpu, client_cpu, ended, completed)


def _stat(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}..{max(values):{fmt}}]"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+", metavar="NAME=DIR", help="the first is the baseline")
    p.add_argument("--modes", default="one,batch")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--round-trips", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--client-per-tree",
        action="store_true",
        help="run each measurement's clients from the tree under test (compares client code)",
    )
    args = p.parse_args(argv)
    trees = [tuple(t.split("=", 1)) for t in args.trees]
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_server(Path(d).resolve())) for name, d in trees
        }
        for mode in args.modes.split(","):
            for clients in map(int, args.clients.split(",")):
                runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n, _ in trees}
                for rep in range(args.reps):
                    k = rep % len(trees)
                    for name, tree in trees[k:] + trees[:k]:
                        n = max(args.round_trips, clients)
                        s = _measure(servers[name], tree, clients, n, mode, args.client_per_tree)
                        if s.completed != s.ended:
                            raise AssertionError(f"{name}: a run did not complete")
                        runs[name].append(
                            (
                                s.ended / s.wall,
                                s.server_cpu * 1e3 / s.ended,
                                s.client_cpu * 1e3 / s.ended,
                            )
                        )
                base = runs[trees[0][0]]
                for name, _ in trees:
                    mine = runs[name]
                    pairs = list(zip(mine, base, strict=True))
                    client_cpu = ""
                    if args.client_per_tree:
                        client_cpu = (
                            f"  client CPU ms/run {_stat([m[2] for m in mine], '.3f')}"
                            f" ratio {_stat([a[2] / b[2] for a, b in pairs], '.2f')}"
                        )
                    print(
                        f"{mode:5} {clients:>2} clients  {name:8}"
                        f"  runs/s {_stat([m[0] for m in mine], '.0f')}"
                        f" ratio {_stat([a[0] / b[0] for a, b in pairs], '.2f')}"
                        f"  server CPU ms/run {_stat([m[1] for m in mine], '.3f')}"
                        f" ratio {_stat([a[1] / b[1] for a, b in pairs], '.2f')}" + client_cpu,
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
