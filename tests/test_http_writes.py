"""How the server writes its answers: a complete JSON answer in one socket write.

hypercorn writes a response's head, its body and the end of its body as separate writes; the
app hands them over together (issue 12, item 4: the writes, not the app, are most of the
server's cost per request). Over loopback one write arrives as one segment, so one
``receive_some`` gets the whole answer. Process-free: the server runs in this test's Trio run
on a free loopback port, bounded in real time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from trio_runs.http import RunningServer, ServeOptions, serve

TIMEOUT = 20.0  # real seconds, per test


@asynccontextmanager
async def serving(root: Path) -> AsyncIterator[tuple[str, int]]:
    """A server on a free loopback port for the block (bounded by TIMEOUT): its host, port."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            opts = ServeOptions(port=0, workspace_root=str(root), drain=0.0)
            server: RunningServer = await nursery.start(partial(serve, opts))
            try:
                url = urlsplit(server.url)
                assert url.hostname is not None
                assert url.port is not None
                yield url.hostname, url.port
            finally:
                server.request_shutdown()


def test_a_complete_answer_leaves_in_one_write(tmp_path: Path):
    """Promise: head and body of a JSON answer, success or error, reach the client together,
    request after request on one kept-alive connection."""

    async def main() -> None:
        async with (
            serving(tmp_path) as (host, port),
            await trio.open_tcp_stream(host, port) as stream,
        ):
            for path, status, body in [
                ("/healthz", 200, {"status": "ok"}),
                ("/nowhere", 404, None),
                ("/healthz", 200, {"status": "ok"}),
            ]:
                request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
                await stream.send_all(request.encode())
                data = await stream.receive_some(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                assert head.startswith(f"HTTP/1.1 {status} ".encode())
                answer = json.loads(rest)
                if body is not None:
                    assert answer == body
                else:
                    assert answer["error"]["code"] == "not_found"

    trio.run(main)


def test_a_connection_close_request_still_gets_its_whole_answer(tmp_path: Path):
    """Promise: a client that asks the server to close the connection after the answer
    (``Connection: close``, as urllib and curl scripts do) gets the answer first: the held
    answer is written before hypercorn ends the connection, never dropped with it."""

    async def main() -> None:
        async with serving(tmp_path) as (host, port):
            for path, status in [("/healthz", 200), ("/nowhere", 404)]:
                async with await trio.open_tcp_stream(host, port) as stream:
                    request = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
                    await stream.send_all(request.encode())
                    data = b""
                    while chunk := await stream.receive_some(65536):
                        data += chunk  # until the server closes the connection
                    head, _, rest = data.partition(b"\r\n\r\n")
                    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data
                    assert isinstance(json.loads(rest), dict)

    trio.run(main)
