"""What ``benchmarks.http`` runs in a child process: the trio-runs HTTP service, trivial agent.

The server gets its own interpreter (and so its own core on a 2-core machine), as it would in
production; the clients measured run in the parent. It binds 127.0.0.1 on a free port, prints
its URL as the first line of stdout, and serves until its stdin closes (the parent exited or
is done) or it gets SIGINT/SIGTERM — so it never outlives the benchmark.

``--db PATH`` chooses the run store as ``trio-runs serve --db`` does: ``:memory:`` for the
in-memory ``RunLedger``, a file for the SQLite store; without it, the server's default (a
SQLite file under its temporary workspace root).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile

import trio

from trio_runs import SessionCoordinator
from trio_runs.http import ServeOptions, serve

from .dispatch import trivial_agent


async def _stop_at_eof(stop: trio.Event) -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    stop.set()


async def _serve(root: str, db: str | None) -> None:
    options = ServeOptions(host="127.0.0.1", port=0, workspace_root=root, drain=0.0, db=db)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                serve,
                options,
                coordinator_factory=SessionCoordinator.factory(trivial_agent),
                handle_signals=True,
            )
        )
        print(server.url, flush=True)
        nursery.start_soon(_stop_at_eof, stop)
        await stop.wait()
        server.request_shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The benchmarks' HTTP server (trivial agent).")
    p.add_argument(
        "--db",
        metavar="PATH",
        help="the run store: ':memory:' (in-memory RunLedger) or a SQLite file "
        "(default: the server's, under its temporary workspace root)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="http server: %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-http-") as root:
        trio.run(_serve, root, args.db)


if __name__ == "__main__":
    main()
