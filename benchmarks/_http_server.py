"""What ``benchmarks.http`` runs in a child process: the trio-runs HTTP service, trivial agent.

The server gets its own interpreter (and so its own core on a 2-core machine), as it would in
production; the clients measured run in the parent. It binds 127.0.0.1 on a free port, prints
its URL as the first line of stdout, and serves until its stdin closes (the parent exited or
is done) or it gets SIGINT/SIGTERM — so it never outlives the benchmark.
"""

from __future__ import annotations

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


async def _serve(root: str) -> None:
    options = ServeOptions(host="127.0.0.1", port=0, workspace_root=root, drain=0.0)
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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="http server: %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="trio-runs-bench-http-") as root:
        trio.run(_serve, root)


if __name__ == "__main__":
    main()
