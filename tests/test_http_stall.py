"""Clients that stop reading never hold the server hostage (DESIGN.md, "Service limits").

A stalled reader is a real socket that sends its request and never reads a byte: once the
kernel buffers between it and the server are full, every write to it blocks. The tests
flood such a reader (large prompts: the demo agent echoes each word as a progress event and
the prompt as the result) and check that the server cuts it off within its documented
bounds, that shutdown ends within its grace, and that a client still reading is told why
its stream ends (``end`` event). The ``EventStream`` tests run on the virtual clock; the
socket tests bound every wait in real time; every process and socket is closed in teardown.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from test_e2e import announced_url

from trio_runs import Broker, EventType
from trio_runs.http import RunningServer, RunsClient, ServeOptions, serve
from trio_runs.http.client import SseEvent
from trio_runs.http.journal import open_journal
from trio_runs.http.sse import CLIENT_CONNECTION, EventStream

CLI = [sys.executable, "-m", "trio_runs.cli"]
START_BOUND = 30.0  # seconds for a process to start (a busy shared machine is slow)
SLACK = 5.0  # real seconds allowed on top of a documented bound
CLOSE_GRACE = 1.0
DRAIN = 0.5
GRACEFUL_TIMEOUT = ServeOptions().graceful_timeout  # serve has no flag for it
WRITE_TIMEOUT = 1.0  # in-process servers: ServeOptions(write_timeout=...)
TIMEOUT = 60.0  # real seconds, per in-process test
# Big enough that what the server sends a stalled reader (4 progress events of 50 KB and a
# 200 KB terminal per run: 12 MB) overflows any kernel buffering between the two.
RUNS = 30
PROMPT = " ".join(["x" * 50_000] * 4)
REQUEST = "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"


# -- EventStream on the virtual clock: how it ends, and what it says --------------------------


class FakeConnection:
    """What ``serve`` gives a response: records the write deadlines it is set."""

    write_timeout = 7.0

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    def set_write_deadline(self, deadline: float) -> None:
        self.deadlines.append(deadline)


def fake_workspace(max_backlog: int = 65536) -> Any:
    """What a stream uses of a workspace: its three brokers (and its id)."""
    return SimpleNamespace(
        id="ws",
        run_completions=Broker(buffer_size=1, max_backlog=max_backlog),
        notifications=Broker(),
        events=Broker(),
    )


def close(workspace: Any) -> None:
    """What closing a workspace does to its brokers once every run ended."""
    for broker in (workspace.run_completions, workspace.notifications, workspace.events):
        broker.shutdown()


async def stream_into(
    stream: EventStream,
    frames: list[bytes],
    *,
    blocked: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``stream`` to a client whose writes wait for ``blocked`` (a stalled reader)."""
    started = False

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal started
        if message["type"] == "http.response.body":
            if message["body"] != b": subscribed\n\n" and blocked is not None:
                await blocked.wait()
            frames.append(message["body"] if message["more_body"] else b"<eof>")
            if not started:
                started = True
                task_status.started()

    await stream({"type": "http"}, receive, send)


def sse_events(frames: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` of each event frame (comments and the end of body skipped)."""
    events = []
    for frame in frames:
        if frame == b"<eof>":
            continue
        lines = frame.decode().splitlines()
        fields = dict(line.split(": ", 1) for line in lines if line and line[0] != ":")
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_a_stream_sends_every_queued_event_then_end_with_its_reason(autojump_clock):
    for reason in ("workspace_closed", "shutdown"):
        workspace = fake_workspace()
        frames: list[bytes] = []
        with trio.fail_after(5):
            async with open_journal(workspace) as journal, trio.open_nursery() as nursery:
                stream = EventStream(journal)
                await nursery.start(partial(stream_into, stream, frames))
                workspace.run_completions.publish_must_deliver(EventType.CREATED, "a terminal")
                if reason == "shutdown":
                    stream.end_reason = reason  # what the service does before closing
                close(workspace)
        assert sse_events(frames) == [
            ("run_complete", {"payload": "a terminal"}),
            ("end", {"reason": reason}),
        ]
        assert frames[-1] == b"<eof>"


async def test_an_ending_stream_bounds_its_connection_writes(autojump_clock):
    workspace = fake_workspace()
    connection = FakeConnection()
    CLIENT_CONNECTION.set(connection)  # as serve() does for each connection
    frames: list[bytes] = []
    blocked = trio.Event()
    with trio.fail_after(60):
        async with open_journal(workspace) as journal, trio.open_nursery() as nursery:
            stream = EventStream(journal)
            await nursery.start(partial(stream_into, stream, frames, blocked=blocked))
            workspace.run_completions.publish_must_deliver(EventType.CREATED, "stuck")
            await trio.sleep(10)
            assert connection.deadlines == []  # nothing ended yet: only the write timeout
            close(workspace)
            stream.end("workspace_closed")
            # The connection closes if the client has not taken the rest by then.
            assert connection.deadlines == [trio.current_time() + connection.write_timeout]
            blocked.set()
    # Over: the next response on the connection starts without that deadline.
    assert connection.deadlines[-1] == math.inf
    assert sse_events(frames)[-1] == ("end", {"reason": "workspace_closed"})


async def test_a_consumer_the_broker_disconnects_gets_error_then_end(autojump_clock):
    workspace = fake_workspace(max_backlog=1)
    frames: list[bytes] = []
    blocked = trio.Event()
    with trio.fail_after(5):
        async with open_journal(workspace) as journal:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(stream_into, EventStream(journal), frames, blocked=blocked)
                )
                for i in range(4):  # the stream is stuck on the first: the rest overflow
                    workspace.run_completions.publish_must_deliver(EventType.CREATED, i)
                    await trio.testing.wait_all_tasks_blocked()
                blocked.set()
            assert journal.live.subscriber_count == 0  # its backlog is released with it
            close(workspace)
    events = sse_events(frames)
    assert events[-2][0] == "error"
    assert events[-2][1]["error"]["code"] == "subscriber_overflow"
    assert events[-1] == ("end", {"reason": "slow_consumer"})


# -- real sockets, in-process servers -----------------------------------------------------------

Body = Callable[[RunningServer, httpx.AsyncClient], Awaitable[None]]


def serving(tmp_path: Path, body: Body, **options: Any) -> None:
    """Run ``body`` against a fresh server on a free loopback port, bounded in time."""

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                opts = ServeOptions(port=0, workspace_root=str(tmp_path), drain=DRAIN, **options)
                server: RunningServer = await nursery.start(partial(serve, opts))
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                        await body(server, http)
                finally:
                    server.request_shutdown()

    trio.run(main)


async def open_stalled(url: str, path: str) -> trio.socket.SocketType:
    """A socket that asks for ``path`` and then never reads."""
    parsed = httpx.URL(url)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    await sock.connect((parsed.host, parsed.port))
    await sock.send(REQUEST.format(path=path, host=parsed.host, port=parsed.port).encode())
    return sock


async def flood_runs(http: httpx.AsyncClient, ws: str) -> None:
    """Runs whose events fill every buffer on the way to a stalled reader; all ended."""
    run_ids = []
    for i in range(RUNS):
        response = await http.post(
            f"/v1/workspaces/{ws}/messages", json={"session_id": f"s{i}", "prompt": PROMPT}
        )
        assert response.status_code == 202, response.text
        run_ids.append(response.json()["run_id"])
    for run_id in run_ids:
        done = await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 20})
        assert done.json()["state"] == "completed"


async def new_workspace(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/workspaces", json={"path": "w"})
    assert response.status_code == 201, response.text
    ws: str = response.json()["id"]
    return ws


async def wait_for(condition: Callable[[], bool]) -> float:
    """Real seconds until ``condition`` holds (bounded by the test's fail_after)."""
    started = trio.current_time()
    while not condition():
        await trio.sleep(0.02)
    return trio.current_time() - started


async def read_until_closed(sock: trio.socket.SocketType) -> None:
    """Read what the server had sent until the connection ends (EOF or reset)."""
    try:
        while await sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass


def test_a_reader_that_stops_is_disconnected_within_the_write_timeout(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        service = server.service
        ws = await new_workspace(http)
        brokers = (await service.journal(service.workspace(ws))).live
        with await open_stalled(server.url, f"/v1/workspaces/{ws}/events") as sock:
            await wait_for(lambda: service.stream_connections == 1)
            await flood_runs(http, ws)
            flooded = trio.current_time()
            await wait_for(lambda: service.stream_connections == 0)
            assert trio.current_time() - flooded < WRITE_TIMEOUT + SLACK
            assert brokers.subscriber_count == 0  # its backlog is released with it
            with trio.fail_after(SLACK):
                await read_until_closed(sock)
        # The server goes on serving everyone else.
        assert (await http.get(f"/v1/workspaces/{ws}")).status_code == 200

    serving(tmp_path, body, write_timeout=WRITE_TIMEOUT)


def test_closing_a_workspace_ends_its_streams_stalled_or_not(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        service = server.service
        ws = await new_workspace(http)
        seen: list[SseEvent] = []
        async with RunsClient(server.url) as client, trio.open_nursery() as nursery:
            await nursery.start(partial(client.stream_events, ws, seen.append))
            with await open_stalled(server.url, f"/v1/workspaces/{ws}/events") as sock:
                await wait_for(lambda: service.stream_connections == 2)
                await flood_runs(http, ws)
                assert (await http.delete(f"/v1/workspaces/{ws}")).status_code == 200
                deleted = trio.current_time()
                await wait_for(lambda: service.stream_connections == 0)
                assert trio.current_time() - deleted < WRITE_TIMEOUT + SLACK
                with trio.fail_after(SLACK):
                    await read_until_closed(sock)
        # The client that read got every terminal, then the reason its stream ended.
        assert len([e for e in seen if e.event == "run_complete"]) == RUNS
        assert seen[-1].event == "end"
        assert seen[-1].json() == {"reason": "workspace_closed"}
        assert "trio_runs_event_streams 0" in (await http.get("/metrics")).text

    serving(tmp_path, body, write_timeout=WRITE_TIMEOUT)


def test_shutdown_tells_a_reading_client_why_its_stream_ends(tmp_path: Path):
    seen: list[SseEvent] = []

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await new_workspace(http)
        async with RunsClient(server.url) as client, trio.open_nursery() as nursery:
            await nursery.start(partial(client.stream_events, ws, seen.append))
            response = await http.post(
                f"/v1/workspaces/{ws}/messages", json={"session_id": "a", "prompt": "sleep 30"}
            )
            run_id = response.json()["run_id"]
            await wait_for(lambda: server.service.run(run_id).state == "active")
            server.request_shutdown()  # the stream task returns at the stream's end

    serving(tmp_path, body)
    completes = [e.json() for e in seen if e.event == "run_complete"]
    assert [c["cancelled"] for c in completes] == [True]
    assert seen[-1].event == "end"
    assert seen[-1].json() == {"reason": "shutdown"}


# -- processes: trio-runs serve, as users run it ------------------------------------------------

pytestmark_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Server:
    """A ``trio-runs serve --port 0`` process and the URL it announced."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--workspace-root", str(root), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.http = httpx.Client(timeout=30)
        self.url = self._announced_url()
        self.http.base_url = httpx.URL(self.url)

    def _announced_url(self) -> str:
        url = announced_url(self.proc, START_BOUND)
        if url is None:
            raise AssertionError("the server did not announce its URL")
        return url

    def event_streams(self) -> int:
        metrics = self.http.get("/metrics").text
        match = re.search(r"^trio_runs_event_streams ([\d.]+)", metrics, re.MULTILINE)
        assert match, metrics
        return int(float(match.group(1)))

    def until_streams(self, count: int) -> None:
        deadline = time.monotonic() + START_BOUND
        while self.event_streams() != count:
            assert time.monotonic() < deadline, f"never {count} event stream(s)"
            time.sleep(0.05)

    def submit(self, ws: str, session: str, prompt: str) -> str:
        response = self.http.post(
            f"/v1/workspaces/{ws}/messages", json={"session_id": session, "prompt": prompt}
        )
        assert response.status_code == 202, response.text
        run_id: str = response.json()["run_id"]
        return run_id

    def wait_completed(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            done = self.http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 20})
            assert done.json()["state"] == "completed"

    def sigterm_and_wait(self) -> float:
        """SIGTERM, then the seconds until the process exited (0) within the grace."""
        self.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        bound = CLOSE_GRACE + DRAIN + GRACEFUL_TIMEOUT + SLACK
        try:
            code = self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server was still running {bound}s after SIGTERM") from None
        took = time.monotonic() - signalled
        assert code == 0
        assert self.proc.stdout is not None
        assert "every accepted run has its terminal" in self.proc.stdout.read()
        return took

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def opened() -> Iterator[list[Server | socket.socket]]:
    """Every process and socket a test opens, closed in teardown whatever happened."""
    items: list[Server | socket.socket] = []
    yield items
    for item in items:
        if isinstance(item, Server):
            item.kill()
        else:
            item.close()


def start(opened: list[Server | socket.socket], root: Path) -> Server:
    server = Server(root, "--close-grace", str(CLOSE_GRACE), "--drain", str(DRAIN))
    opened.append(server)
    return server


def stalled(opened: list[Server | socket.socket], server: Server, *paths: str) -> socket.socket:
    """A socket that sends these requests (pipelined) and then never reads."""
    url = httpx.URL(server.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opened.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    sock.settimeout(10)
    sock.connect((url.host, url.port))
    requests = "".join(REQUEST.format(path=p, host=url.host, port=url.port) for p in paths)
    sock.sendall(requests.encode())
    return sock


def workspace(server: Server) -> str:
    response = server.http.post("/v1/workspaces", json={"path": "w"})
    assert response.status_code == 201, response.text
    ws: str = response.json()["id"]
    return ws


@pytestmark_posix
def test_sigterm_with_a_stalled_event_stream_exits_within_the_grace(opened, tmp_path: Path):
    server = start(opened, tmp_path)
    ws = workspace(server)
    stalled(opened, server, f"/v1/workspaces/{ws}/events")
    server.until_streams(1)
    server.wait_completed([server.submit(ws, f"s{i}", PROMPT) for i in range(RUNS)])
    assert server.event_streams() == 1  # still writing to the stalled reader
    server.sigterm_and_wait()


@pytestmark_posix
def test_sigterm_with_stalled_long_polls_exits_within_the_grace(opened, tmp_path: Path):
    server = start(opened, tmp_path)
    ws = workspace(server)
    big = server.submit(ws, "a", " ".join(["y" * 100_000] * 9))  # a 900 KB result
    server.wait_completed([big])
    # Pipelined long polls of it, never read: far more than the buffers hold.
    stalled(opened, server, *[f"/v1/runs/{big}/wait?timeout=60"] * 20)
    server.sigterm_and_wait()
