"""Runs in view over HTTP: ``GET /v1/runs`` (filters, cursor pages), run metadata in
``GET /v1/runs/{id}``, and ``trio-runs ls`` against a real server.

The store's own listing rules are tests/test_run_metadata.py's; here: the service maps them
to the API faithfully (every filter, every page, typed errors that change nothing), a store
that cannot list is a 501, and the CLI shows what the server holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from dict_store import DictStore

from trio_runs import RunLedger, RunStore, open_backend
from trio_runs.agents import demo
from trio_runs.http.schema import (
    ApiError,
    CreateWorkspace,
    RunListQuery,
    SubmitMessage,
    parse_run_list_query,
)
from trio_runs.http.service import RunService

TIMEOUT = 120  # virtual seconds


@asynccontextmanager
async def service_on(store: RunStore, root: Path) -> AsyncIterator[RunService]:
    with trio.fail_after(TIMEOUT):
        async with open_backend(store) as backend:
            yield RunService(backend, demo.coordinator_factory, workspace_root=root)


@contextmanager
def refused(status: int, code: str) -> Iterator[None]:
    with pytest.raises(ApiError) as info:
        yield
    assert (info.value.status, info.value.code) == (status, code)


async def _all_pages(service: RunService, **filters: object) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await service.list_runs(RunListQuery(cursor=cursor, limit=2, **filters))  # type: ignore[arg-type]
        assert len(page.runs) <= 2
        seen.extend(run.run_id for run in page.runs)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


async def test_listing_filters_and_pages_match_the_runs(autojump_clock, tmp_path: Path):
    async with service_on(RunLedger(), tmp_path) as service:
        first, _ = await service.create_workspace(CreateWorkspace("one"))
        second, _ = await service.create_workspace(CreateWorkspace("two"))
        submitted: list[tuple[str, str, str, str]] = []  # run id, workspace, session, team
        for i in range(7):
            ws = first if i % 2 == 0 else second
            session = f"s{i % 3}"
            team = "red" if i < 4 else "blue"
            run_id = await service.submit(
                ws.id,
                SubmitMessage(session, "echo hi", run_id=f"run-{i}", labels={"team": team}),
            )
            submitted.append((run_id, ws.id, session, team))
            # Distinct acceptance times: newest first is then a strict order.
            await trio.sleep(1)
        for run_id, *_ in submitted:
            await service.wait(run_id, 60)
        newest_first = [run_id for run_id, *_ in reversed(submitted)]

        assert await _all_pages(service) == newest_first
        assert await _all_pages(service, workspace=first.id) == [
            r for r, ws, _, _ in reversed(submitted) if ws == first.id
        ]
        assert await _all_pages(service, path="two") == [
            r for r, ws, _, _ in reversed(submitted) if ws == second.id
        ]
        assert await _all_pages(service, session_id="s1") == [
            r for r, _, s, _ in reversed(submitted) if s == "s1"
        ]
        assert await _all_pages(service, label=("team", "blue")) == [
            r for r, _, _, t in reversed(submitted) if t == "blue"
        ]
        assert await _all_pages(service, state="ended") == newest_first
        assert await _all_pages(service, state="running") == []

        page = await service.list_runs(RunListQuery(limit=1))
        (view,) = page.runs
        assert view.labels == {"team": "blue"}
        assert view.terminal is not None
        assert view.terminal.outcome == "completed"
        assert view.accepted_at is not None
        assert view.started_at is not None
        assert view.accepted_at <= view.started_at <= (view.terminal.ended_at or 0)
        body = page.to_dict()
        assert body["runs"][0]["labels"] == {"team": "blue"}
        assert isinstance(body["next_cursor"], str)


async def test_running_runs_are_listed_with_their_metadata(autojump_clock, tmp_path: Path):
    async with service_on(RunLedger(), tmp_path) as service:
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        # "sleep 30" keeps the first run active and the second queued behind it.
        active = await service.submit(
            ws.id, SubmitMessage("s", "sleep 30", run_id="active", labels={"k": "v"})
        )
        queued = await service.submit(ws.id, SubmitMessage("s", "sleep 30", run_id="queued"))
        await trio.sleep(1)
        page = await service.list_runs(RunListQuery(state="running"))
        states = {view.run_id: view.state for view in page.runs}
        assert states == {active: "active", queued: "queued"}
        view = await service.view(active)
        assert view.state == "active"
        assert view.labels == {"k": "v"}
        assert view.accepted_at is not None
        assert view.started_at is not None
        assert (await service.view(queued)).started_at is None
        await service.cancel_session(ws.id, "s")
        ended = await service.wait(active, 60)
        assert ended.terminal is not None
        assert ended.terminal.reason == "session_cancel"
        assert ended.labels == {"k": "v"}


async def test_bad_list_queries_are_typed_422s(autojump_clock, tmp_path: Path):
    async with service_on(RunLedger(), tmp_path) as service:
        with refused(422, "invalid_cursor"):
            await service.list_runs(RunListQuery(cursor="not-a-cursor"))
        with refused(404, "workspace_not_found"):
            await service.list_runs(RunListQuery(workspace="no-such-workspace"))
        with refused(422, "path_outside_root"):
            await service.list_runs(RunListQuery(path="../elsewhere"))
    bad_queries = [
        [("limit", "0")],
        [("limit", "1001")],
        [("limit", "ten")],
        [("limit", "\u0661")],
        [("state", "queued")],
        [("label", "no-equals")],
        [("label", "=value")],
        [("session", "a b")],
        [("workspace", "x"), ("path", "y")],
        [("session", "a"), ("session", "b")],
        [("sort", "asc")],
        [("cursor", "")],
        [("path", "p" * 4097)],
        [("path", "")],
    ]
    for pairs in bad_queries:
        with pytest.raises(ApiError) as info:
            parse_run_list_query(pairs)
        assert info.value.status == 422, pairs
    parsed = parse_run_list_query([("label", "a=b=c"), ("limit", "5"), ("state", "ended")])
    assert parsed == RunListQuery(label=("a", "b=c"), limit=5, state="ended")


async def test_a_store_that_cannot_list_is_a_501(autojump_clock, tmp_path: Path):
    async with service_on(DictStore(), tmp_path) as service:
        with refused(501, "not_supported"):
            await service.list_runs(RunListQuery())
        ws, _ = await service.create_workspace(CreateWorkspace("w"))
        run_id = await service.submit(ws.id, SubmitMessage("s", "echo hi"))
        view = await service.wait(run_id, 60)
        # The run is still shown; only what that store keeps.
        assert view.terminal is not None
        assert view.terminal.outcome == "completed"


# -- a real server and the CLI ----------------------------------------------------------


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_runs", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class Server:
    """A real ``trio-runs serve`` on a SQLite file, restartable on the same port."""

    def __init__(self, root: Path) -> None:
        from ports import free_port

        self.root = root
        self.port = free_port()
        self.env = {**os.environ, "TRIO_RUNS_SERVER": f"http://127.0.0.1:{self.port}"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "trio_runs", "serve", "--port", str(self.port)]
        command += ["--workspace-root", str(self.root), "--db", str(self.root / "runs.db")]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "serve exited at start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.env['TRIO_RUNS_SERVER']}/healthz", timeout=1).is_success:
                    return
            time.sleep(0.05)
        raise AssertionError("serve did not answer within 60 s")

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown) and its exit status, bounded."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    running = Server(tmp_path)
    try:
        running.start()
        yield running.env
    finally:
        running.kill()


def test_a_reason_tells_user_cancel_from_shutdown_across_a_restart(tmp_path: Path):
    server = Server(tmp_path)
    try:
        server.start()
        for run_id in ("by-user", "by-shutdown"):
            detached = _cli(
                "run",
                "--session",
                run_id,
                "--run-id",
                run_id,
                "--detach",
                "sleep 30",
                env=server.env,
            )
            assert detached.returncode == 0, detached.stderr
        cancelled = _cli("cancel", "--run", "by-user", env=server.env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert _cli("status", "--wait", "by-user", env=server.env).returncode == 3
        assert server.stop() == 0
        server.start()
        reasons = {}
        for run_id in ("by-user", "by-shutdown"):
            status = _cli("status", run_id, "--output", "json", env=server.env)
            assert status.returncode == 0, status.stderr
            terminal = json.loads(status.stdout)["terminal"]
            assert terminal["cancelled"] is True
            reasons[run_id] = terminal["reason"]
        assert reasons == {"by-user": "user", "by-shutdown": "shutdown"}
        ended = _cli("ls", "--state", "ended", "--output", "json", env=server.env)
        assert [run["run_id"] for run in json.loads(ended.stdout)["runs"]] == [
            "by-shutdown",
            "by-user",
        ]
    finally:
        server.kill()


def test_ls_shows_what_the_server_holds(server: dict[str, str]):
    for i, team in enumerate(["red", "blue", "red"]):
        done = _cli(
            "run",
            "--session",
            f"s{i}",
            "--run-id",
            f"run-{i}",
            "--label",
            f"team={team}",
            "echo hi",
            env=server,
        )
        assert done.returncode == 0, done.stderr
    listed = _cli("ls", env=server)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["RUN_ID", "SESSION", "STATE", "ACCEPTED", "TOOK", "LABELS"]
    assert [line.split()[0] for line in lines[1:]] == ["run-2", "run-1", "run-0"]
    assert "team=blue" in lines[2]

    red = _cli("ls", "--label", "team=red", "--output", "json", env=server)
    assert red.returncode == 0, red.stderr
    body = json.loads(red.stdout)
    assert [run["run_id"] for run in body["runs"]] == ["run-2", "run-0"]
    assert body["next_cursor"] is None
    assert all(run["labels"] == {"team": "red"} for run in body["runs"])

    first_page = _cli("ls", "--limit", "2", env=server)
    assert first_page.returncode == 0
    assert len(first_page.stdout.splitlines()) == 3
    assert "--all" in first_page.stderr
    everything = _cli("ls", "--limit", "1", "--all", "--output", "json", env=server)
    assert [run["run_id"] for run in json.loads(everything.stdout)["runs"]] == [
        "run-2",
        "run-1",
        "run-0",
    ]

    bad = _cli("ls", "--state", "queued", env=server)
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr
    status = _cli("status", "run-1", "--output", "json", env=server)
    view = json.loads(status.stdout)
    assert view["labels"] == {"team": "blue"}
    assert view["accepted_at"] <= view["started_at"] <= view["terminal"]["ended_at"]
