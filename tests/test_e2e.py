"""End to end, the way users run it: ``trio-runs serve`` and ``trio-runs run`` as processes.

A server on a free loopback port and several clients blocking on their runs from other
processes: every client exits with its run's outcome, and none hangs when the server is
killed (``kill -9``), stalls (``SIGSTOP``) or shuts down (``SIGTERM``). Every wait on a
process is bounded; every process is killed in teardown.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "trio_runs.cli"]
START_BOUND = 30.0  # seconds for a process to start (a busy shared machine is slow)
CLIENT_TIMEOUT = 3.0  # the clients' --timeout (liveness bound) in these tests
EXIT_BOUND = CLIENT_TIMEOUT + 5.0  # a lost client must be gone within this after the loss

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def announced_url(proc: subprocess.Popen[str], bound: float) -> str | None:
    """The URL a ``trio-runs serve`` process prints on stdout; ``None`` if it exits first or
    ``bound`` seconds pass. The pipe is read unbuffered: a buffered ``readline`` could take a
    second line into its buffer, where the selector would never see it again."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + bound
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            seen += chunk
            match = re.search(rb"serving on (http://[^\s;]+)", seen)
            if match:
                return match.group(1).decode()
    return None


class Server:
    """A ``trio-runs serve --port 0`` process and the URL it announced."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--workspace-root", str(root), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.http = httpx.Client(timeout=5)
        self.url = ""

    def wait_url(self) -> None:
        """Read the URL the server announces on stdout (bounded)."""
        self.url = self._announced_url()
        self.http.base_url = httpx.URL(self.url)

    def _announced_url(self) -> str:
        url = announced_url(self.proc, START_BOUND)
        if url is None:
            raise AssertionError(f"the server did not announce its URL: {self.stderr()}")
        return url

    def wait_state(self, run_id: str, state: str, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            response = self.http.get(f"/v1/runs/{run_id}", headers=headers)
            if response.status_code == 200 and response.json()["state"] == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} never became {state}: {response.text}")

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Client:
    """One ``trio-runs`` client command running as its own process."""

    def __init__(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._stdin = stdin
        self.code: int | None = None
        self.out = self.err = ""
        self.ended_at = 0.0

    def finish(self, bound: float = START_BOUND) -> Client:
        try:
            self.out, self.err = self.proc.communicate(self._stdin, timeout=bound)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
            raise AssertionError(f"{self.proc.args} hung for {bound}s") from None
        self.ended_at = time.monotonic()
        self.code = self.proc.returncode
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[list[Server | Client]]:
    """Everything started in a test, killed in teardown whatever happened."""
    started: list[Server | Client] = []
    yield started
    for item in started:
        item.kill()


def serve(spawn: list[Server | Client], root: Path, *extra: str, **kwargs: object) -> Server:
    server = Server(root, *extra, **kwargs)  # type: ignore[arg-type]
    spawn.append(server)  # before anything can fail: teardown kills it whatever happens
    server.wait_url()
    return server


def client(spawn: list[Server | Client], *args: str, **kwargs: object) -> Client:
    started = Client(*args, **kwargs)  # type: ignore[arg-type]
    spawn.append(started)
    return started


def run(server: Server, session: str, prompt: str, *extra: str) -> list[str]:
    return [
        "run",
        "--server",
        server.url,
        "--session",
        session,
        "--timeout",
        str(CLIENT_TIMEOUT),
        *extra,
        prompt,
    ]


def three_runs(spawn: list[Server | Client], server: Server, prefix: str) -> list[Client]:
    """Clients of an active run and one queued behind it in session a, one active in b."""
    clients = []
    for i, (session, state) in enumerate([("a", "active"), ("a", "queued"), ("b", "active")]):
        clients.append(client(spawn, *run(server, session, "sleep 30", "--run-id", f"{prefix}{i}")))
        server.wait_state(f"{prefix}{i}", state)
    return clients


def test_every_outcome_has_its_exit_status(spawn, tmp_path: Path):
    server = serve(spawn, tmp_path)
    ok = client(spawn, *run(server, "a", "hello from a process", "--run-id", "e2e-ok"))
    failed = client(spawn, *run(server, "b", "fail"))
    early = client(spawn, *run(server, "c", "fail-early"))
    piped = client(spawn, *run(server, "d", "-", "--quiet"), stdin="words from stdin\n")
    empty = client(spawn, *run(server, "e", "   "))
    doomed = client(spawn, *run(server, "f", "sleep 30", "--run-id", "e2e-doomed"))
    server.wait_state("e2e-doomed", "active")
    cancel = client(spawn, "cancel", "--server", server.url, "--session", "f").finish()

    assert ok.finish().code == 0, ok.err
    assert ok.out == "hello from a process\n"  # the result alone: progress is on stderr
    assert [line for line in ok.err.splitlines() if " " not in line] == [
        "hello",
        "from",
        "a",
        "process",
    ]
    assert "e2e-ok accepted" in ok.err
    assert failed.finish().code == 1
    assert "failed: the demo agent failed mid-run" in failed.err
    assert early.finish().code == 1
    assert "failed in prepare" in early.err
    assert piped.finish().code == 0, piped.err
    assert piped.out == "words from stdin\n"
    assert empty.finish().code == 2
    assert "empty_prompt" in empty.err
    assert cancel.code == 0, cancel.err
    assert cancel.out.startswith("session f: ")
    assert doomed.finish().code == 3
    assert "was cancelled" in doomed.err

    status = client(spawn, "status", "--server", server.url, "e2e-ok").finish()
    assert status.code == 0
    assert status.out == "run e2e-ok (session a): completed\nresult: hello from a process\n"
    as_json = client(spawn, "status", "--server", server.url, "e2e-ok", "--output", "json")
    assert json.loads(as_json.finish().out)["terminal"]["result"] == "hello from a process"
    unknown = client(spawn, "status", "--server", server.url, "no-such-run").finish()
    assert unknown.code == 5
    waited = client(spawn, "status", "--wait", "--server", server.url, "e2e-doomed").finish()
    assert waited.code == 3


def test_kill_9_the_server_every_client_exits_4_within_the_bound(spawn, tmp_path: Path):
    server = serve(spawn, tmp_path)
    clients = three_runs(spawn, server, "k")
    server.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for each in clients:
        each.finish(bound=EXIT_BOUND + 5)
        assert each.code == 4, each.err
        assert "server lost" in each.err
        assert each.ended_at - killed_at < EXIT_BOUND


def test_a_stalled_server_is_noticed_within_the_bound(spawn, tmp_path: Path):
    server = serve(spawn, tmp_path)
    stalled = client(spawn, *run(server, "a", "sleep 30", "--run-id", "st"))
    server.wait_state("st", "active")
    server.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        stalled.finish(bound=EXIT_BOUND + 5)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert stalled.code == 4, stalled.err
    assert stalled.ended_at - stopped_at < EXIT_BOUND


def test_sigterm_gives_every_client_its_cancelled_terminal(spawn, tmp_path: Path):
    server = serve(spawn, tmp_path)
    clients = three_runs(spawn, server, "t")
    server.proc.send_signal(signal.SIGTERM)
    for each in clients:
        each.finish(bound=EXIT_BOUND)
        assert each.code == 3, each.err
        assert "was cancelled" in each.err
    assert server.proc.wait(timeout=EXIT_BOUND) == 0
    assert server.proc.stdout is not None
    assert "every accepted run has its terminal" in server.proc.stdout.read()


def test_ctrl_c_cancels_the_remote_run_before_exiting(spawn, tmp_path: Path):
    server = serve(spawn, tmp_path)
    running = client(spawn, *run(server, "a", "sleep 30", "--run-id", "ctrl-c"))
    server.wait_state("ctrl-c", "active")
    behind = client(spawn, *run(server, "a", "queued behind", "--run-id", "ctrl-c-next", "-q"))
    server.wait_state("ctrl-c-next", "queued")
    running.proc.send_signal(signal.SIGINT)
    assert running.finish(bound=EXIT_BOUND).code == 3, running.err
    assert "cancelling run ctrl-c" in running.err
    assert server.http.get("/v1/runs/ctrl-c").json()["state"] == "cancelled"
    # Only that run was cancelled, not its session: the run queued behind it still completes.
    assert behind.finish(bound=EXIT_BOUND).code == 0, behind.err
    assert behind.out == "queued behind\n"
    assert server.http.get("/v1/runs/ctrl-c-next").json()["state"] == "completed"


def test_tokens_and_binding(spawn, tmp_path: Path):
    refused = client(spawn, "serve", "--host", "0.0.0.0", "--port", "0").finish()
    assert refused.code == 2
    assert "without a token" in refused.err
    # A token no client could ever match is refused too, instead of answering 401 to all.
    blank = client(spawn, "serve", "--host", "0.0.0.0", "--port", "0", "--token", " ").finish()
    assert blank.code == 2
    assert "token is empty or blank" in blank.err

    env = {**os.environ, "TRIO_RUNS_TOKEN": "e2e-secret"}
    server = serve(spawn, tmp_path, env=env)
    assert server.http.get("/healthz").status_code == 200
    assert server.http.get("/v1/workspaces").status_code == 401
    no_token = {k: v for k, v in os.environ.items() if k != "TRIO_RUNS_TOKEN"}
    anonymous = client(spawn, *run(server, "a", "hi"), env=no_token)
    with_token = client(spawn, *run(server, "a", "hi", "--quiet"), env=env)
    assert anonymous.finish().code == 2
    assert "unauthorized" in anonymous.err
    assert with_token.finish().code == 0, with_token.err
    assert with_token.out == "hi\n"
