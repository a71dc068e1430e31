"""Real node processes on a real ``redis-server`` (DESIGN R1, R3, R4): ``trio-runs serve
--redis`` nodes, runs submitted to one and waited on from another over HTTP, and the faults
the promises are about — a node killed with SIGKILL, a node stopped past its lease with
SIGSTOP and let go again (a zombie). Every wait is bounded; every process (nodes and Redis)
is killed in teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import test_e2e as e2e
from redis_server import BINARY, RedisServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

spawn = e2e.spawn  # the process fixture: everything started is killed in teardown

TTL = 1.5  # the nodes' --lease-ttl here
RECOVERY_BOUND = TTL + TTL / 3 + 5.0  # lease, one sweep interval, and a busy machine's slack
BOUND = 30.0


def redis_cli(server: RedisServer, *args: str) -> str:
    cli = str(Path(BINARY or "redis-server").with_name("redis-cli"))
    done = subprocess.run(
        [cli, "-p", str(server.port), "--no-raw", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout


def stream_run_ids(server: RedisServer, namespace: str) -> list[str]:
    """The run id of every entry on the cluster's terminal stream, in order."""
    cli = str(Path(BINARY or "redis-server").with_name("redis-cli"))
    done = subprocess.run(
        [cli, "-p", str(server.port), "--raw", "XRANGE", "{" + namespace + "}:terminals", "-", "+"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    lines = done.stdout.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "id"]


def cluster_stats(server: RedisServer, namespace: str) -> dict[str, int]:
    cli = str(Path(BINARY or "redis-server").with_name("redis-cli"))
    done = subprocess.run(
        [cli, "-p", str(server.port), "--raw", "HGETALL", "{" + namespace + "}:stats"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    items = done.stdout.split()
    return {items[i]: int(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def suppressed(node: e2e.Server) -> int:
    """The node's count of its own terminals refused (``/metrics``)."""
    text = node.http.get("/metrics").text
    match = re.search(r"^trio_runs_duplicate_terminals_suppressed_total (\S+)$", text, re.M)
    assert match, text
    return int(float(match.group(1)))


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    return redis_server


def start_nodes(
    spawn: list[e2e.Server | e2e.Client],
    tmp_path: Path,
    url: str,
    namespace: str,
    count: int,
    first: int = 0,
    *extra: str,
    env: dict[str, str] | None = None,
) -> list[e2e.Server]:
    nodes = [
        e2e.Server(
            tmp_path / f"node{i}",
            "--redis",
            url,
            "--redis-namespace",
            namespace,
            "--lease-ttl",
            str(TTL),
            *extra,
            env=env,
        )
        for i in range(first, first + count)
    ]
    spawn.extend(nodes)  # before anything can fail: teardown kills them whatever happens
    for node in nodes:
        node.wait_url()
    return nodes


def submit(node: e2e.Server, session: str, prompt: str) -> str:
    workspace = node.http.post("/v1/workspaces", json={"path": "w"}).json()["id"]
    run_id = uuid.uuid4().hex
    response = node.http.post(
        f"/v1/workspaces/{workspace}/messages",
        json={"session_id": session, "prompt": prompt, "run_id": run_id},
    )
    assert response.status_code == 202, response.text
    return run_id


def wait_terminal(node: e2e.Server, run_id: str, bound: float = BOUND) -> dict[str, object]:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        response = node.http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 1})
        if response.status_code == 200 and response.json().get("terminal"):
            terminal = response.json()["terminal"]
            assert isinstance(terminal, dict)
            return terminal
        time.sleep(0.02)
    raise AssertionError(f"no terminal for run {run_id} on {node.url} within {bound}s")


def test_runs_submitted_to_one_node_end_once_for_waiters_on_another(spawn, redis, tmp_path):
    """R1: a run accepted on node A is seen pending and then ended on node B, over HTTP."""
    namespace = "c" + uuid.uuid4().hex[:12]
    a, b = start_nodes(spawn, tmp_path, redis.url, namespace, 2)
    ids = [submit(a, f"s{i % 3}", f"hello {i}") for i in range(9)]
    for i, run_id in enumerate(ids):
        terminal = wait_terminal(b, run_id)
        assert terminal["result"] == f"hello {i}"
        assert b.http.get(f"/v1/runs/{run_id}").json()["state"] == "completed"
    assert sorted(stream_run_ids(redis, namespace)) == sorted(ids)


def test_a_killed_nodes_runs_end_abandoned_on_the_survivor_within_the_lease(spawn, redis, tmp_path):
    """R3: SIGKILL a node mid-run; each of its runs ends abandoned, once, within the bound."""
    namespace = "c" + uuid.uuid4().hex[:12]
    (a,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1)
    ids = [submit(a, f"s{i}", "sleep 60") for i in range(4)]
    for run_id in ids:
        a.wait_state(run_id, "active")  # claimed by a: the only node yet
    (b,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, first=1)
    assert b.http.get(f"/v1/runs/{ids[0]}").json()["state"] == "pending"
    a.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for run_id in ids:
        terminal = wait_terminal(b, run_id, RECOVERY_BOUND)
        assert terminal["abandoned"] is True
        assert terminal["error"]
    assert time.monotonic() - killed_at < RECOVERY_BOUND
    assert sorted(stream_run_ids(redis, namespace)) == sorted(ids)
    assert cluster_stats(redis, namespace)["abandoned"] == len(ids)
    # The session goes on: a new run of a dead node's session runs on the survivor.
    again = submit(b, "s0", "after")
    assert wait_terminal(b, again)["result"] == "after"


def test_a_zombie_node_is_fenced_and_every_run_still_has_one_terminal(spawn, redis, tmp_path):
    """R4: SIGSTOP a node past its lease, then SIGCONT: the survivor ended its runs
    abandoned; the zombie's own terminals are refused and counted, never a second one."""
    namespace = "c" + uuid.uuid4().hex[:12]
    (a,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1)
    ids = [submit(a, f"s{i}", "sleep 8") for i in range(3)]  # still running when a stops
    for run_id in ids:
        a.wait_state(run_id, "active")  # claimed by a: the only node yet
    (b,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, first=1)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        ends = [wait_terminal(b, run_id, RECOVERY_BOUND) for run_id in ids]
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert all(end["abandoned"] is True for end in ends)
    # The zombie wakes and its agents finish: each of their terminals is refused and counted,
    # by Redis (fenced: it no longer holds its lease) or by the zombie itself when the
    # abandoned terminal reached it first.
    deadline = time.monotonic() + BOUND
    while cluster_stats(redis, namespace).get("fenced", 0) + suppressed(a) < len(ids):
        assert time.monotonic() < deadline, (cluster_stats(redis, namespace), suppressed(a))
        time.sleep(0.1)
    assert sorted(stream_run_ids(redis, namespace)) == sorted(ids)  # one terminal each
    for run_id in ids:
        # Every node, the zombie too, shows the one terminal: the abandoned one.
        assert wait_terminal(a, run_id)["abandoned"] is True
    # The zombie serves again, under a new lease.
    again = submit(a, "s9", "back")
    assert wait_terminal(b, again)["result"] == "back"
    assert json.loads(json.dumps(cluster_stats(redis, namespace)))["abandoned"] == len(ids)


def test_a_dead_nodes_sessions_go_on_on_the_survivor_in_order(spawn, redis, tmp_path):
    """R2 + R3: a session's active run is on a node that is SIGKILLed, its queued runs wait
    in Redis; the active one ends abandoned and the queued ones then run on the survivor,
    one at a time, in acceptance order."""
    namespace = "c" + uuid.uuid4().hex[:12]
    (a,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1)
    active = submit(a, "s", "sleep 60")
    a.wait_state(active, "active")  # claimed by a: the only node yet
    queued = [submit(a, "s", f"after {i}") for i in range(3)]
    (b,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, first=1)
    assert b.http.get(f"/v1/runs/{queued[0]}").json()["state"] in ("pending", "queued")
    a.proc.send_signal(signal.SIGKILL)
    assert wait_terminal(b, active, RECOVERY_BOUND)["abandoned"] is True
    ended = [wait_terminal(b, run_id) for run_id in queued]
    assert [end["result"] for end in ended] == [f"after {i}" for i in range(3)]
    # In acceptance order, one at a time: each started after the one before ended.
    for earlier, later in itertools.pairwise(ended):
        assert isinstance(earlier["ended_at"], float)
        assert isinstance(later["started_at"], float)
        assert earlier["ended_at"] <= later["started_at"]
    assert sorted(stream_run_ids(redis, namespace)) == sorted([active, *queued])


def test_a_node_stopped_with_sigterm_leaves_cleanly_and_its_queued_runs_go_on(
    spawn, redis, tmp_path
):
    """A graceful stop (a rolling restart): the node exits 0, its running run ends
    cancelled (shutdown), and the runs it accepted that wait in their lane run elsewhere."""
    namespace = "c" + uuid.uuid4().hex[:12]
    (a,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1)
    running = submit(a, "s", "sleep 60")
    a.wait_state(running, "active")
    waiting = [submit(a, "s", f"w{i}") for i in range(2)]
    a.proc.send_signal(signal.SIGTERM)
    out, err = a.proc.communicate(timeout=BOUND)
    assert a.proc.returncode == 0, err
    assert "runs waiting in their lanes go on" in out
    assert "Traceback" not in err
    (b,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, first=1)
    end = wait_terminal(b, running)
    assert (end["cancelled"], end["reason"]) == (True, "shutdown")
    assert [wait_terminal(b, run_id)["result"] for run_id in waiting] == ["w0", "w1"]


def test_a_dead_nodes_run_runs_again_elsewhere_when_its_workspace_reruns(spawn, redis, tmp_path):
    """R3, "or re-run by policy": with an agent whose coordinator says after_crash="rerun",
    a run whose node dies goes back to the head of its lane and runs again on a survivor
    (its terminal says attempt 2); the runs queued behind it wait for it."""
    namespace = "c" + uuid.uuid4().hex[:12]
    log = tmp_path / "starts.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "RERUN_AGENT_LOG": str(log),
    }
    agent = ("--agent", "rerun_agent:plugin")
    (a,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, 0, *agent, env=env)
    first = submit(a, "s", "sleep 3")
    a.wait_state(first, "active")  # claimed by a: the only node yet
    behind = submit(a, "s", "sleep 0")
    (b,) = start_nodes(spawn, tmp_path, redis.url, namespace, 1, 1, *agent, env=env)
    a.proc.send_signal(signal.SIGKILL)
    again = wait_terminal(b, first, RECOVERY_BOUND + 5)
    assert (again["result"], again.get("attempt")) == ("slept 3", 2), again
    after = wait_terminal(b, behind)
    assert after["result"] == "slept 0"
    assert isinstance(after["started_at"], float)
    assert isinstance(again["ended_at"], float)
    assert again["ended_at"] <= after["started_at"]  # its lane waited for it
    assert log.read_text().split() == [first, first, behind]
    assert cluster_stats(redis, namespace).get("rerun") == 1
    assert sorted(stream_run_ids(redis, namespace)) == sorted([first, behind])
