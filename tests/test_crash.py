"""Durability under real crashes (DESIGN D1-D4, D6): a ``trio-runs serve`` process on a real
SQLite file, under mixed load, is killed with SIGKILL at a random moment and restarted on the
same database; a checker then compares what every client saw with what the server holds.

The load, per iteration: runs that complete, fail (mid-run and before start), get cancelled,
or are still running or queued at the kill; waiters on ``/wait``; an SSE subscriber; and one
``trio-runs run`` client process blocked on a long run, which must ride through the restart
and exit with its run's terminal (abandoned: exit 6). What must hold after the restart:

- every run that got a ``202`` has exactly one terminal, and the database holds one row for it
  (D1: acknowledged means durable);
- every terminal any client or the SSE stream saw before the crash is the one recorded (D2:
  nothing is shown before it is durable);
- a run that had not ended is ended *abandoned*, before the first request is served (D3);
- resubmitting an acknowledged run id is a ``409 duplicate_run`` (D4);
- the blocked CLI client gets the terminal after the restart (D6).

Seeded. ``TRIO_RUNS_CRASH_ITERATIONS`` (default 10) sets the number of kills; the soak runs
hundreds (see the README). Every wait is bounded in real seconds; every process is killed in
teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from ports import free_port

CLI = [sys.executable, "-m", "trio_runs.cli"]
ITERATIONS = int(os.environ.get("TRIO_RUNS_CRASH_ITERATIONS", "10"))
SEED = int(os.environ.get("TRIO_RUNS_CRASH_SEED", "20261130"))
START_BOUND = 30.0  # seconds for a server to come up (recovery included)
CHECK_BOUND = 30.0  # seconds for the checker to collect every terminal after the restart
CLIENT_TIMEOUT = 25.0  # the CLI client's --timeout: it must outlive the restart

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    # httpx leaves a request body's async generator unexhausted when the server dies mid-send
    # (the test's own load client, not trio-runs): its garbage collection warns.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in.*ByteStream:pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream:ResourceWarning"),
]

PROMPTS = [
    ("hello there", "completed"),
    ("fail", "failed"),
    ("fail-early", "failed"),
    ("sleep 0.3", "completed"),
    ("sleep 30", "any"),  # still running at the kill: abandoned, or cancelled by the load
]


class Server:
    """One ``trio-runs serve`` process on a fixed port and database."""

    def __init__(
        self,
        root: Path,
        db: Path,
        port: int,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / f"server-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--port",
                str(port),
                "--workspace-root",
                str(root),
                "--db",
                str(db),
                "--drain",
                "0",
                *(extra or []),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("the server did not come up in time")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Every process the test starts, killed in teardown whatever happened."""
    processes: list[Any] = []
    yield processes
    for item in processes:
        if isinstance(item, Server):
            item.kill()
        else:
            if item.poll() is None:
                item.kill()
            item.communicate(timeout=10)  # reaps it and closes its pipes


class Observed:
    """What the clients saw before the crash."""

    def __init__(self) -> None:
        self.acknowledged: dict[str, str] = {}  # run id -> prompt
        self.seen: dict[str, dict[str, Any]] = {}  # run id -> terminal, first seen
        self.conflicts: list[str] = []

    def saw(self, terminal: dict[str, Any]) -> None:
        run_id = terminal["run_id"]
        earlier = self.seen.setdefault(run_id, terminal)
        if earlier != terminal:
            self.conflicts.append(f"{run_id}: {earlier} then {terminal}")


async def load(
    url: str,
    workspace: str,
    rng: random.Random,
    observed: Observed,
    tag: str,
    killed: trio.Event,
) -> None:
    """Mixed load until the server is killed (its transport errors end every task)."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as http:

        async def subscriber() -> None:
            async with http.stream("GET", f"/v1/workspaces/{workspace}/events") as stream:
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "run_complete":
                        observed.saw(json.loads(line[6:]))

        async def one_run(n: int) -> None:
            prompt, _ = rng.choice(PROMPTS)
            run_id = f"{tag}-{n}"
            body = {"session_id": f"s{rng.randrange(12)}", "prompt": prompt, "run_id": run_id}
            response = await http.post(f"/v1/workspaces/{workspace}/messages", json=body)
            if response.status_code != 202:
                return
            observed.acknowledged[run_id] = prompt
            if rng.random() < 0.15:
                await http.post(f"/v1/runs/{run_id}/cancel")
            while True:
                waited = await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": "5"})
                if waited.status_code == 200:
                    observed.saw(waited.json()["terminal"])
                    return

        async def guarded(fn: Any, *args: Any) -> None:
            with contextlib.suppress(httpx.TransportError, httpx.StreamError):
                await fn(*args)  # until the server is killed

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, subscriber)
            n = 0
            while not killed.is_set():
                nursery.start_soon(guarded, one_run, n)
                n += 1
                await trio.sleep(rng.uniform(0, 0.02))


def database_terminals(db: Path) -> dict[str, dict[str, Any] | None]:
    with sqlite3.connect(db) as connection:
        return {
            run_id: (json.loads(terminal) if terminal is not None else None)
            for run_id, terminal in connection.execute("SELECT run_id, terminal FROM runs")
        }


def committed(db: Path, run_id: str) -> bool:
    """Whether the run's acceptance is committed (what another reader of the file sees)."""
    with sqlite3.connect(db) as connection:
        found = connection.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return found is not None


def collect_after_restart(url: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    terminals: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + CHECK_BOUND
    with httpx.Client(base_url=url, timeout=10) as http:
        for run_id in run_ids:
            while run_id not in terminals:
                assert time.monotonic() < deadline, f"no terminal for {run_id} after the restart"
                waited = http.get(f"/v1/runs/{run_id}/wait", params={"timeout": "5"})
                assert waited.status_code in (200, 202), waited.text
                if waited.status_code == 200:
                    terminals[run_id] = waited.json()["terminal"]
    return terminals


def test_sigkill_at_random_moments_loses_and_shows_nothing_wrong(
    started: list[Any], tmp_path: Path
):
    rng = random.Random(SEED)
    db = tmp_path / "runs.db"
    port = free_port()
    figures = {"acknowledged": 0, "abandoned": 0, "seen_before_crash": 0, "recovery_s": 0.0}
    server = Server(tmp_path, db, port)
    started.append(server)
    server.wait_ready()
    workspace = httpx.post(f"{server.url}/v1/workspaces", json={"path": "w"}).json()["id"]
    everything: dict[str, str] = {}
    for iteration in range(ITERATIONS):
        observed = Observed()
        # A CLI client blocked on a long run: it must ride through the restart (D6).
        rider_id = f"rider-{iteration}"
        rider = subprocess.Popen(
            [
                *CLI,
                "run",
                "--server",
                server.url,
                "--workspace",
                "w",
                "--session",
                f"rider-{iteration}",
                "--run-id",
                rider_id,
                "--timeout",
                str(CLIENT_TIMEOUT),
                "sleep 60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        started.append(rider)
        kill_after = rng.uniform(0.2, 1.5)

        async def crash_under_load(
            victim: Server = server,
            workspace: str = workspace,
            observed: Observed = observed,
            kill_after: float = kill_after,
            rider_id: str = rider_id,
            tag: str = f"i{iteration}",
        ) -> None:
            killed = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, victim.url, workspace, rng, observed, tag, killed)
                await trio.sleep(kill_after)
                # The rider's run must be durable before the kill, or it proves nothing.
                with trio.fail_after(START_BOUND):
                    while not await trio.to_thread.run_sync(committed, db, rider_id):
                        await trio.sleep(0.02)
                victim.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush, no goodbye
                killed.set()
                # The load's tasks end on their transport errors; a stuck one is a failure.
                nursery.cancel_scope.deadline = trio.current_time() + 15
            assert not nursery.cancel_scope.cancelled_caught, "a client hung after the kill"

        trio.run(crash_under_load)
        server.kill()
        restarted_at = time.monotonic()
        server = Server(tmp_path, db, port)
        started.append(server)
        server.wait_ready()  # recovery happened before the first answer (D3)
        figures["recovery_s"] = max(figures["recovery_s"], time.monotonic() - restarted_at)
        # Workspaces are not durable (runs are): open it again for the next iteration.
        workspace = httpx.post(f"{server.url}/v1/workspaces", json={"path": "w"}).json()["id"]

        acknowledged = sorted(observed.acknowledged)
        after = collect_after_restart(server.url, acknowledged)
        on_disk = database_terminals(db)
        assert observed.conflicts == []
        for run_id in acknowledged:  # D1: acknowledged means durable, with one terminal
            assert on_disk.get(run_id) is not None, f"{run_id} was acknowledged, then lost"
            assert after[run_id] == on_disk[run_id]
        for run_id, terminal in observed.seen.items():  # D2: nothing shown before durable
            assert after.get(run_id, on_disk.get(run_id)) == terminal, run_id
        for run_id in acknowledged:
            terminal = after[run_id]
            if run_id not in observed.seen and terminal.get("abandoned"):
                figures["abandoned"] += 1
            if terminal.get("abandoned"):
                assert terminal["error"]
                assert not terminal["cancelled"]
        for run_id in acknowledged[:20]:  # D4: ids stay taken across the restart
            again = httpx.post(
                f"{server.url}/v1/workspaces/{workspace}/messages",
                json={"session_id": "again", "prompt": "hello", "run_id": run_id},
            )
            assert again.status_code == 409, again.text
            assert again.json()["error"]["code"] == "duplicate_run"
        try:  # D6: the blocked client rode through the restart
            out, err = rider.communicate(timeout=CLIENT_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            rider.kill()
            raise AssertionError("the CLI client hung through the restart") from None
        assert rider.returncode == 6, (out, err)  # abandoned: it was running at the kill
        assert "abandoned" in err
        figures["acknowledged"] += len(acknowledged)
        figures["seen_before_crash"] += len(observed.seen)
        everything.update(observed.acknowledged)
    # Every run ever acknowledged, in every iteration, still has its one terminal.
    on_disk = database_terminals(db)
    assert all(on_disk.get(run_id) is not None for run_id in everything)
    print(f"\ncrash figures over {ITERATIONS} kills (seed {SEED}): {figures}")
    assert figures["acknowledged"] > 0


def test_a_run_set_to_rerun_runs_again_after_sigkill_and_its_client_gets_it(
    started: list[Any], tmp_path: Path
):
    """D3's other policy: with ``after_crash="rerun"``, a run still going at the kill runs
    again from the start after the restart (at least once), and the client blocked on it
    rides through and gets its one completed terminal."""
    db = tmp_path / "runs.db"
    port = free_port()
    log = tmp_path / "starts.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "RERUN_AGENT_LOG": str(log),
    }
    extra = ["--agent", "rerun_agent:plugin"]
    server = Server(tmp_path, db, port, extra, env)
    started.append(server)
    server.wait_ready()
    rider = subprocess.Popen(
        [
            *CLI,
            *("run", "--server", server.url, "--session", "s", "--run-id", "twice"),
            *("--timeout", str(CLIENT_TIMEOUT), "sleep 2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    started.append(rider)
    deadline = time.monotonic() + START_BOUND
    while not (log.exists() and log.read_text().count("twice") == 1):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.02)
    server.kill()
    server = Server(tmp_path, db, port, extra, env)
    started.append(server)
    server.wait_ready()
    out, err = rider.communicate(timeout=CLIENT_TIMEOUT + 10)
    assert (rider.returncode, out.strip()) == (0, "slept 2"), err
    assert log.read_text().split() == ["twice", "twice"]  # ran again, from the start
    assert database_terminals(db)["twice"]["result"] == "slept 2"
