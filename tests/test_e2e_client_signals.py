"""End to end, as processes: a ``trio-runs run`` that is killed or hung up on cancels its run
rather than orphaning it, ``--detach`` leaves it running on purpose, and ``--deadline`` ends a
run that takes too long as timed out (exit 7).

Real ``trio-runs serve`` and ``trio-runs run`` processes (the helpers of ``test_e2e.py``);
every wait on a process is bounded and every process is killed in teardown.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from test_e2e import EXIT_BOUND, START_BOUND, Client, Server, client, run, serve, spawn

__all__ = ["spawn"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def wait_for(server: Server, run_id: str, condition: str) -> dict[str, object]:
    """The run as ``GET /v1/runs/{run_id}`` shows it once its state is ``condition``."""
    deadline = time.monotonic() + START_BOUND
    seen: dict[str, object] = {}
    while time.monotonic() < deadline:
        response = server.http.get(f"/v1/runs/{run_id}")
        if response.status_code == 200:
            seen = response.json()
            if seen["state"] == condition:
                return seen
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never became {condition}: {seen}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_client_cancels_its_run_not_its_session(spawn, tmp_path: Path, signum: int):
    """Promise: SIGTERM/SIGHUP of ``trio-runs run`` cancel its run like Ctrl-C (exit 3, the
    server shows it cancelled) instead of orphaning it; the run queued behind goes on."""
    server = serve(spawn, tmp_path)
    name = signal.Signals(signum).name.lower()
    running = client(spawn, *run(server, "a", "sleep 30", "--run-id", name))
    server.wait_state(name, "active")
    behind = client(spawn, *run(server, "a", "queued behind", "--run-id", f"{name}-next", "-q"))
    server.wait_state(f"{name}-next", "queued")
    running.proc.send_signal(signum)
    assert running.finish(bound=EXIT_BOUND).code == 3, running.err
    assert f"cancelling run {name}" in running.err
    assert server.http.get(f"/v1/runs/{name}").json()["state"] == "cancelled"
    assert behind.finish(bound=EXIT_BOUND).code == 0, behind.err
    assert behind.out == "queued behind\n"


def test_detach_leaves_the_run_running_and_prints_its_id(spawn, tmp_path: Path):
    """Promise: ``--detach`` exits 0 at once with the run id on stdout; the run goes on."""
    server = serve(spawn, tmp_path)
    detached = client(spawn, *run(server, "a", "sleep 30", "--run-id", "away", "--detach"))
    assert detached.finish(bound=EXIT_BOUND).code == 0, detached.err
    assert detached.out == "away\n"
    wait_for(server, "away", "active")
    cancelled = client(spawn, "cancel", "--server", server.url, "--run", "away").finish()
    assert cancelled.code == 0, cancelled.err
    wait_for(server, "away", "cancelled")


def test_a_run_past_its_deadline_exits_7_and_the_lane_moves_on(spawn, tmp_path: Path):
    """Promise: ``run --deadline`` ends a hung run failed and timed out (exit 7) at about the
    deadline; the run queued behind it then runs; a deadline above the server's maximum is
    refused (exit 2)."""
    server = serve(spawn, tmp_path, "--max-deadline", "20")
    started = time.monotonic()
    slow = client(spawn, *run(server, "a", "sleep 30", "--run-id", "slow", "--deadline", "1.5"))
    server.wait_state("slow", "active")
    behind: Client = client(spawn, *run(server, "a", "next", "--run-id", "slow-next", "-q"))
    assert slow.finish(bound=EXIT_BOUND).code == 7, slow.err
    assert slow.ended_at - started < 1.5 + EXIT_BOUND
    assert "timed out" in slow.err
    view = wait_for(server, "slow", "failed")
    terminal = view["terminal"]
    assert isinstance(terminal, dict)
    assert terminal["timed_out"] is True
    assert behind.finish(bound=EXIT_BOUND).code == 0, behind.err
    too_long = client(spawn, *run(server, "b", "hi", "--deadline", "21")).finish()
    assert too_long.code == 2
    assert "deadline_too_long" in too_long.err
