"""End to end, as processes: resumable event streams and ``trio-runs follow``.

A real ``trio-runs serve`` process (the helpers of ``test_e2e.py``). A client whose
connection drops resumes with ``Last-Event-ID`` and misses nothing the server still held,
nor gets anything twice (the drop is made by a TCP proxy in the test that cuts every
connection); a resume from before the window opens with a gap; ``trio-runs follow`` prints a
run's progress and its outcome, for a run that ended long ago and for one another client
started and that is still running. Every wait is bounded in real time; every process is
killed in teardown.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import aclosing
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from ports import free_port
from test_e2e import EXIT_BOUND, START_BOUND, Server, client, run, serve, spawn

from trio_runs import RunComplete, RunProgress
from trio_runs.http import EventGap, RunsClient, StreamItem

__all__ = ["spawn"]  # the fixture, used by name

TIMEOUT = 60.0  # real seconds for one test's async part


class CuttingProxy:
    """A TCP proxy to the server whose :meth:`cut` breaks every connection open through it."""

    def __init__(self, url: str) -> None:
        target = httpx.URL(url)
        self.host, self.port = str(target.host), int(target.port or 80)
        self._open: set[trio.CancelScope] = set()
        self.connections = 0
        self.downstream = b""
        """Everything sent to the client so far (it reads it even after a cut)."""

    async def handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        async with downstream, await trio.open_tcp_stream(self.host, self.port) as upstream:
            with trio.CancelScope() as scope:
                self._open.add(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pipe, downstream, upstream, nursery.cancel_scope)
                        nursery.start_soon(
                            self._pipe_down, upstream, downstream, nursery.cancel_scope
                        )
                finally:
                    self._open.discard(scope)

    async def _pipe_down(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
                self.downstream += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> None:
        for scope in list(self._open):
            scope.cancel()


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


async def submit(http: httpx.AsyncClient, ws: str, prompt: str) -> str:
    response = await http.post(
        f"/v1/workspaces/{ws}/messages", json={"session_id": "s", "prompt": prompt}
    )
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def wait_ended(http: httpx.AsyncClient, run_id: str) -> None:
    response = await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 20})
    assert response.status_code == 200, response.text


def seen(items: list[StreamItem]) -> list[tuple[str, object]]:
    """Each item as (run id, progress payload or "END")."""
    out: list[tuple[str, object]] = []
    for item in items:
        if isinstance(item, RunProgress):
            out.append((item.run_id, item.payload))
        elif isinstance(item, RunComplete):
            out.append((item.run_id, "END"))
        else:
            out.append(("gap", item))
    return out


# Leaving a workspace's (endless) event stream early leaves httpx's own async generators
# under the response to the garbage collector (they are closed with the response; trio
# warns that they were not exhausted).
@pytest.mark.filterwarnings("ignore:Async generator 'http:ResourceWarning")
def test_a_resumed_stream_misses_nothing_and_repeats_nothing(spawn, tmp_path: Path):
    """Promise: when the connection of ``RunsClient.events`` drops, the client reconnects with
    ``Last-Event-ID`` and gets every event of the time it was away, once, in order.
    Fault: every connection through the proxy is cut right after a run's terminal; two more
    runs happen while the client is disconnected."""
    server = serve(spawn, tmp_path)
    items: list[StreamItem] = []
    expected: list[tuple[str, object]] = []
    proxy = CuttingProxy(server.url)

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
                async with (
                    httpx.AsyncClient(base_url=server.url, timeout=30) as http,
                    RunsClient(f"http://127.0.0.1:{port}", timeout=10) as runs,
                ):
                    ws = (await runs.create_workspace("w")).id
                    first = await submit(http, ws, "a1 a2 a3")
                    expected.extend([(first, w) for w in ("a1", "a2", "a3")] + [(first, "END")])
                    last = ""
                    async with aclosing(runs.events(ws, last_event_id=0)) as events:
                        async for item in events:
                            items.append(item)
                            if isinstance(item, RunComplete) and item.run_id == first:
                                proxy.cut()  # the client is away while these two run
                                for prompt in ("b1 b2 b3", "c1 c2"):
                                    run_id = await submit(http, ws, prompt)
                                    await wait_ended(http, run_id)
                                    words = prompt.split()
                                    expected.extend([(run_id, w) for w in words])
                                    expected.append((run_id, "END"))
                                    last = run_id
                            elif isinstance(item, RunComplete) and item.run_id == last:
                                break
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen(items) == expected
    assert proxy.connections == 2  # the first, and the one that resumed


@pytest.mark.filterwarnings("ignore:Async generator 'http:ResourceWarning")
def test_a_stream_dropped_before_its_first_event_resumes_from_where_it_began(spawn, tmp_path: Path):
    """Promise: a fresh stream tells the client where it begins (an id-only frame), so a
    connection that drops before any event arrived resumes from there: the client gets what
    happened meanwhile, and nothing from before it subscribed.
    Fault: the connection is cut once the stream began, then a run happens."""
    server = serve(spawn, tmp_path)
    proxy = CuttingProxy(server.url)
    items: list[StreamItem] = []
    after: list[str] = []

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
                async with (
                    httpx.AsyncClient(base_url=server.url, timeout=30) as http,
                    RunsClient(f"http://127.0.0.1:{port}", timeout=10) as runs,
                ):
                    ws = (await runs.create_workspace("w")).id
                    await wait_ended(http, await submit(http, ws, "old news"))  # ids 1 to 3
                    done = trio.Event()

                    async def consume() -> None:
                        async with aclosing(runs.events(ws)) as events:
                            async for item in events:
                                items.append(item)
                                if isinstance(item, RunComplete):
                                    done.set()
                                    return

                    nursery.start_soon(consume)
                    while b"id: 3\n\n" not in proxy.downstream:
                        await trio.sleep(0.01)
                    proxy.cut()
                    after.append(await submit(http, ws, "new words"))
                    await wait_ended(http, after[0])
                    await done.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen(items) == [(after[0], "new"), (after[0], "words"), (after[0], "END")]
    assert proxy.connections == 2


@pytest.mark.filterwarnings("ignore:Async generator 'http:ResourceWarning")
def test_a_resume_from_before_the_window_opens_with_a_gap(spawn, tmp_path: Path):
    """Promise: with ``--event-window 4``, a resume after event 1 of 11 is told that the
    first event still held is 8 (a gap) before it gets 8 to 11; a malformed Last-Event-ID is
    a JSON 422 before any stream opens."""
    server = serve(spawn, tmp_path, "--event-window", "4")
    ws = server.http.post("/v1/workspaces", json={"path": "w"}).json()["id"]
    words = " ".join(f"w{i}" for i in range(1, 11))  # 10 progress events and a terminal
    response = server.http.post(
        f"/v1/workspaces/{ws}/messages?wait=20", json={"session_id": "s", "prompt": words}
    )
    assert response.json()["state"] == "completed", response.text
    frames: list[tuple[str, str]] = []
    with server.http.stream(
        "GET", f"/v1/workspaces/{ws}/events", headers={"Last-Event-ID": "1"}
    ) as stream:
        fields: dict[str, str] = {}
        for line in stream.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                frames.append((fields.get("id", ""), fields["event"]))
            fields = {}
            if frames and frames[-1] == ("11", "run_complete"):
                break
    assert frames == [
        ("", "gap"),
        ("8", "progress"),
        ("9", "progress"),
        ("10", "progress"),
        ("11", "run_complete"),
    ]

    async def typed() -> list[StreamItem]:
        got: list[StreamItem] = []
        with trio.fail_after(TIMEOUT):
            async with (
                RunsClient(server.url, timeout=10) as runs,
                aclosing(runs.events(ws, last_event_id=1)) as events,
            ):
                async for item in events:
                    got.append(item)
                    if isinstance(item, RunComplete):
                        return got
        raise AssertionError("the stream ended")

    got = trio.run(typed)
    assert got[0] == EventGap(last_event_id=1, first_id=8)
    assert [getattr(item, "payload", None) for item in got[1:4]] == ["w8", "w9", "w10"]
    bad = server.http.get(f"/v1/workspaces/{ws}/events", headers={"Last-Event-ID": "soon"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_last_event_id"


def follow(server: Server, *args: str) -> list[str]:
    return ["follow", "--server", server.url, "--timeout", "10", *args]


def test_follow_of_a_finished_run_prints_its_progress_and_its_outcome(spawn, tmp_path: Path):
    """Promise: ``trio-runs follow`` of a run that ended before it started prints the
    run's progress (stderr) and result (stdout) and exits with the run's status, as ``run``
    does; an unknown run exits 5."""
    server = serve(spawn, tmp_path)
    done = client(spawn, *run(server, "a", "one two three", "--run-id", "done", "-q")).finish()
    assert done.code == 0, done.err
    failed = client(spawn, *run(server, "b", "fail", "--run-id", "failed", "-q")).finish()
    assert failed.code == 1, failed.err

    late = client(spawn, *follow(server, "done")).finish(bound=EXIT_BOUND)
    assert late.code == 0, late.err
    assert late.out == "one two three\n"
    assert late.err.splitlines() == ["one", "two", "three"]
    as_json = client(spawn, *follow(server, "done", "--output", "json")).finish(bound=EXIT_BOUND)
    assert json.loads(as_json.out)["terminal"]["result"] == "one two three"
    late_failure = client(spawn, *follow(server, "failed")).finish(bound=EXIT_BOUND)
    assert late_failure.code == 1
    assert "failed: the demo agent failed mid-run" in late_failure.err
    unknown = client(spawn, *follow(server, "no-such-run")).finish(bound=EXIT_BOUND)
    assert unknown.code == 5


def test_follow_of_a_live_run_another_client_started(spawn, tmp_path: Path):
    """Promise: ``trio-runs follow`` of a run another client submitted (and left running)
    prints its progress as it comes and its result when it ends, exit 0; a follower of a run
    that gets cancelled exits 3."""
    server = serve(spawn, tmp_path)
    detached = client(spawn, *run(server, "a", "sleep 2", "--run-id", "live", "--detach"))
    assert detached.finish(bound=EXIT_BOUND).code == 0, detached.err
    server.wait_state("live", "active")
    following = client(spawn, *follow(server, "live"))
    doomed = client(spawn, *run(server, "b", "sleep 30", "--run-id", "doomed", "--detach"))
    assert doomed.finish(bound=EXIT_BOUND).code == 0, doomed.err
    server.wait_state("doomed", "active")
    watching = client(spawn, *follow(server, "doomed"))
    assert following.finish(bound=2 + START_BOUND).code == 0, following.err
    assert following.out == "sleep 2\n"
    assert following.err.splitlines() == ["tick 1", "tick 2"]
    cancelled = client(spawn, "cancel", "--server", server.url, "--run", "doomed").finish()
    assert cancelled.code == 0, cancelled.err
    assert watching.finish(bound=EXIT_BOUND).code == 3, watching.err
    assert "was cancelled" in watching.err


def test_a_follower_gets_the_ending_across_a_server_crash(spawn, tmp_path: Path):
    """Promise: ``trio-runs follow`` outlives a server that is killed and restarted (on the
    same port, with its durable store): it reconnects and gets the run's ending from the
    store, here abandoned (exit 6), never a hang.
    Fault: SIGKILL of the server while the run is active."""
    port = str(free_port())
    db = str(tmp_path / "runs.db")
    server = serve(spawn, tmp_path, "--port", port, "--db", db)
    detached = client(spawn, *run(server, "a", "sleep 30", "--run-id", "crashy", "--detach"))
    assert detached.finish(bound=EXIT_BOUND).code == 0, detached.err
    server.wait_state("crashy", "active")
    following = client(spawn, "follow", "--server", server.url, "--timeout", "30", "crashy")
    deadline = time.monotonic() + START_BOUND
    while "trio_runs_event_streams 1.0" not in server.http.get("/metrics").text:
        assert time.monotonic() < deadline, "the follower never connected"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    serve(spawn, tmp_path, "--port", port, "--db", db)
    ended = following.finish(bound=30 + EXIT_BOUND)
    assert ended.code == 6, ended.err
    assert "abandoned" in ended.err
