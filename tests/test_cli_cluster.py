"""The cluster from the command line, as processes: ``trio-runs demo --nodes 3`` (its own
``redis-server`` and node processes, one killed mid-demo) exits 0 with its summary, and
``trio-runs worker`` runs work a ``serve --redis`` node accepted. Every wait is bounded; every
process started here is stopped in teardown (the demo stops its own children on SIGTERM).

Skipped with the reason only when ``redis-server`` is not installed (a failure where
``TRIO_RUNS_REQUIRE_REDIS=1``, as in CI).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import attrs
import pytest
import test_e2e as e2e
from redis_server import BINARY, RedisServer, required

from trio_runs.http import cluster_demo

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

spawn = e2e.spawn  # the process fixture: everything started is killed in teardown

DEMO_BOUND = 120.0  # the demo takes ~10 s here; a busy shared machine is much slower
BOUND = 30.0


def needs_redis_server() -> None:
    if BINARY is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if required():
            pytest.fail(f"{reason}, and TRIO_RUNS_REQUIRE_REDIS=1")
        pytest.skip(reason)


def without_trio_runs_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RUNS_")}


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``trio-runs demo ARGS`` to its end (bounded). Past the bound it gets SIGTERM, on which
    it stops every process it started (they are in process groups of their own, so killing
    the demo alone would leave them running), then SIGKILL."""
    proc = subprocess.Popen(
        [*e2e.CLI, "demo", "--no-live", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env or without_trio_runs_settings(),
    )
    try:
        out, err = proc.communicate(timeout=DEMO_BOUND)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
        raise AssertionError(f"demo {args} hung for {DEMO_BOUND}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_demo_across_three_nodes_keeps_every_promise_with_a_node_killed():
    needs_redis_server()
    env = without_trio_runs_settings()
    env["COLUMNS"] = "240"  # one line per table row and per message
    started = time.monotonic()
    done = run_demo("--nodes", "3", env=env)
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert "OK: every accepted run ended exactly once" in out
    assert "VIOLATED" not in out
    # The cluster: Redis, two serve nodes and a worker, node0 killed while it ran work.
    assert "redis-server on redis://127.0.0.1:" in out
    assert "node0 (serve, pid " in out
    assert "node1 (serve, pid " in out
    assert "node2 (worker, pid " in out
    assert "killed node0 with SIGKILL" in out
    assert "killed (SIGKILL)" in out
    assert out.count("stopped") >= 2  # node1 and node2 exit 0 after SIGTERM
    rows = {
        cells[0]: cells[1]
        for line in out.splitlines()
        if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) >= 3
    }
    assert rows["accepted"] == "120"
    assert rows["hung"] == "0"
    assert rows["runs the killed node was running"] == "3"
    assert rows["ended abandoned"] == "3"
    assert rows["runs it accepted that ran elsewhere"] != "0"
    assert rows["sessions with two active runs"] == "0"
    assert rows["runs that ran twice"] == "0"
    assert elapsed < DEMO_BOUND


def test_demo_nodes_without_redis_server_is_a_usage_error_naming_the_package(tmp_path: Path):
    env = without_trio_runs_settings()
    env["PATH"] = str(tmp_path)  # no redis-server on it (the CLI runs as sys.executable -m)
    done = run_demo("--nodes", "3", env=env)
    assert done.returncode == 2, done
    assert "redis-server" in done.stderr
    assert "apt-get install redis-server" in done.stderr
    assert done.stdout == ""


def test_demo_needs_two_nodes():
    done = run_demo("--nodes", "1")
    assert done.returncode == 2
    assert "at least 2 nodes" in done.stderr


def test_worker_without_redis_is_a_usage_error():
    done = subprocess.run(
        [*e2e.CLI, "worker"],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=without_trio_runs_settings(),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "--redis" in done.stderr
    assert done.stdout == ""


def test_worker_runs_work_a_serve_node_accepted(spawn, tmp_path: Path):
    """A serve node with room for one run, busy with it; the run submitted next can only run
    on the worker: it does (the agent's journal says which process ran it), and the worker
    stops on SIGTERM with exit 0."""
    needs_redis_server()
    journal = tmp_path / "journal"
    journal.mkdir()
    env = without_trio_runs_settings()
    env["TRIO_RUNS_DEMO_JOURNAL"] = str(journal)
    namespace = "w" + uuid.uuid4().hex[:12]
    with RedisServer(tmp_path / "redis") as redis:
        cluster = ["--redis", redis.url, "--redis-namespace", namespace, "--lease-ttl", "2"]
        agent = ["--agent", "trio_runs.http.cluster_demo:agent"]
        node = e2e.serve(spawn, tmp_path / "root", *cluster, *agent, "--capacity", "1", env=env)
        workspace = node.http.post("/v1/workspaces", json={"path": "w"}).json()["id"]

        def submit(session: str, prompt: str) -> str:
            run_id = uuid.uuid4().hex
            response = node.http.post(
                f"/v1/workspaces/{workspace}/messages",
                json={"session_id": session, "prompt": prompt, "run_id": run_id},
            )
            assert response.status_code == 202, response.text
            return run_id

        busy = submit("a", "sleep 60")
        node.wait_state(busy, "active")  # the node is full
        worker = e2e.client(spawn, "worker", *cluster, *agent, env=env)
        handed = submit("b", "hello from the serve node")
        response = node.http.get(f"/v1/runs/{handed}/wait", params={"timeout": BOUND})
        deadline = time.monotonic() + BOUND
        while response.status_code != 200 and time.monotonic() < deadline:
            response = node.http.get(f"/v1/runs/{handed}/wait", params={"timeout": 5})
        assert response.status_code == 200, response.text
        terminal = response.json()["terminal"]
        assert terminal["result"] == "hello from the serve node"
        ran = {
            path.stem: path.read_text()
            for path in journal.glob("*.log")
            if f"start\t{handed}\t" in path.read_text()
        }
        assert list(ran) == [str(worker.proc.pid)], ran
        worker.proc.send_signal(signal.SIGTERM)
        worker.finish(BOUND)
        assert worker.code == 0, worker.err
        assert "worker stopped" in worker.out


# -- the demo's own checks catch what they are for (no Redis, no processes) -----------------


def write_journal(directory: Path, pid: int, lines: list[tuple[str, str, str, float]]) -> None:
    text = "".join(f"{kind}\t{run}\t{session}\t{at}\n" for kind, run, session, at in lines)
    (directory / f"{pid}.log").write_text(text)


def test_the_journal_check_finds_two_active_runs_of_one_session(tmp_path: Path):
    write_journal(tmp_path, 1, [("start", "r1", "s", 1.0), ("end", "r1", "s", 2.0)])
    write_journal(tmp_path, 2, [("start", "r2", "s", 2.5), ("end", "r2", "s", 3.0)])
    write_journal(tmp_path, 3, [("start", "r3", "t", 1.0), ("end", "r3", "t", 5.0)])
    spans = cluster_demo.read_journal(str(tmp_path))
    assert cluster_demo.overlapping_sessions(spans, killed_pid=0, killed_at=0.0) == 0
    # r4 of session s starts on node 3 while r2 runs on node 2.
    write_journal(
        tmp_path,
        3,
        [("start", "r3", "t", 1.0), ("end", "r3", "t", 5.0), ("start", "r4", "s", 2.9)],
    )
    spans = cluster_demo.read_journal(str(tmp_path))
    assert cluster_demo.overlapping_sessions(spans, killed_pid=0, killed_at=0.0) == 1


def test_a_killed_nodes_unended_run_stops_at_the_kill(tmp_path: Path):
    # Node 1 died at 4.0 while r1 ran (no end line; a line cut short by the kill is ignored).
    (tmp_path / "1.log").write_text("start\tr1\ts\t1.0\nend\tr1\t")
    write_journal(tmp_path, 2, [("start", "r2", "s", 5.0), ("end", "r2", "s", 6.0)])
    spans = cluster_demo.read_journal(str(tmp_path))
    assert [(s.run_id, s.end) for s in spans] == [("r1", None), ("r2", 6.0)]
    assert cluster_demo.overlapping_sessions(spans, killed_pid=1, killed_at=4.0) == 0
    # Had the next run started before the node died, that would be two at once.
    assert cluster_demo.overlapping_sessions(spans, killed_pid=1, killed_at=5.5) == 1
    # A run of a live node with no end line never stopped: anything after it overlaps.
    assert cluster_demo.overlapping_sessions(spans, killed_pid=9, killed_at=4.0) == 1


def test_the_report_names_every_broken_promise():
    report = cluster_demo.ClusterDemoReport(
        redis_url="redis://127.0.0.1:1/0",
        namespace="n",
        lease_ttl=2.0,
        nodes=(
            cluster_demo.NodeSummary("node0", "serve", 1, "http://x", 3, "killed (SIGKILL)"),
            cluster_demo.NodeSummary("node1", "worker", 2, "", 9, "exited with status 1"),
        ),
        planned=10,
        accepted=10,
        refused=0,
        outcomes={"completed": 7, "failed": 3, "cancelled": 0},
        waiters_returned=20,
        hung=0,
        duplicates=0,
        streamed_twice=0,
        missing_from_stream=0,
        unexpected=0,
        killed_running=3,
        abandoned=3,
        abandoned_latency=9.0,
        abandoned_bound=5.0,
        resumed_elsewhere=5,
        resumed_expected=6,
        reattached=2,
        resubmitted=0,
        overlapping_sessions=1,
        ran_twice=0,
        progress_events=0,
        elapsed=1.0,
    )
    problems = "; ".join(report.violations)
    assert "ended 9.0s after the kill (bound 5.0s)" in problems
    assert "1 run(s) the killed node accepted did not run on another node" in problems
    assert "1 session(s) had two active runs" in problems
    assert "node1 (worker) exited with status 1" in problems
    assert len(report.violations) == 4
    healthy = attrs.evolve(
        report,
        abandoned_latency=1.0,
        resumed_elsewhere=6,
        overlapping_sessions=0,
        nodes=report.nodes[:1],
    )
    assert healthy.violations == []
