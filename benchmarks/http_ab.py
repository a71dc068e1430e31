"""A/B of the HTTP server: the same client load against servers started from two source trees.

Issue 12, item 4 (a cheaper server hot path) compares server code, which one tree cannot run
side by side. Each tree given as ``NAME=DIR`` (a checkout or ``git archive`` of the code to
compare) gets its own ``benchmarks._http_server`` child started from ``DIR``; the clients
run here, from this tree, and are the same for every server. Repetitions are interleaved
(the order rotates each repetition) and every ratio is paired with the first tree's figure of
the same repetition. Per mode (``one``: ``run_prompt``, one request per run; ``batch``:
``run_batch``, 16 runs per request; ``two`` and ``bare`` as in :mod:`benchmarks.http`) and
client count: runs/s and the server's CPU ms per run, as median [min..max] and ratios.

    python -m benchmarks.http_ab before=/tmp/before after=/tmp/after --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .http import http_round_trips, running_server


def _stat(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}..{max(values):{fmt}}]"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+", metavar="NAME=DIR", help="the first is the baseline")
    p.add_argument("--modes", default="one,batch")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--round-trips", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    trees = [tuple(t.split("=", 1)) for t in args.trees]
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_server(Path(d).resolve())) for name, d in trees
        }
        for mode in args.modes.split(","):
            for clients in map(int, args.clients.split(",")):
                runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
                for rep in range(args.reps):
                    k = rep % len(trees)
                    for name, _ in trees[k:] + trees[:k]:
                        server = servers[name]
                        n = max(args.round_trips, clients)
                        s = trio.run(
                            http_round_trips, server.url, clients, n, mode, server.cpu_seconds
                        )
                        if s.completed != s.ended:
                            raise AssertionError(f"{name}: a run did not complete")
                        runs[name].append((s.ended / s.wall, s.server_cpu * 1e3 / s.ended))
                base = runs[trees[0][0]]
                for name, _ in trees:
                    mine = runs[name]
                    pairs = list(zip(mine, base, strict=True))
                    print(
                        f"{mode:5} {clients:>2} clients  {name:8}"
                        f"  runs/s {_stat([r for r, _ in mine], '.0f')}"
                        f" ratio {_stat([a[0] / b[0] for a, b in pairs], '.2f')}"
                        f"  server CPU ms/run {_stat([c for _, c in mine], '.3f')}"
                        f" ratio {_stat([a[1] / b[1] for a, b in pairs], '.2f')}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
