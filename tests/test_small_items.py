"""Issue 14's smaller complaints, each reproduced: stale names, specs that need PYTHONPATH=.,
progress nested twice, a coordinator that needs a cast to reach its session methods."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import trio

from trio_runs import (
    AgentMessage,
    AgentNotInitialized,
    NotSupported,
    RunProgress,
    SessionCoordinator,
)
from trio_runs.testing import FaultPoint, FaultyCoordinator, ScriptedAgent, emit, return_
from trio_runs.testing import wait_for as wait_for_step

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60
START_BOUND = 30.0  # real seconds for a server process to start


STALE = "cr" + "ush"  # spelled apart, so this file does not name it either


def test_no_shipped_text_names_the_project_it_grew_from():
    # "the in-process `... run`": a name from the seed, meaningless to a user.
    shipped = [ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
    for folder in ("trio_runs", "examples", "tests", "benchmarks"):
        shipped += (ROOT / folder).rglob("*.py")
    stale = [str(p.relative_to(ROOT)) for p in shipped if STALE in p.read_text("utf-8").lower()]
    assert stale == []


async def test_progress_reads_one_level_deep_with_payloads(backend, autojump_clock):
    # The complaint: `ev.payload.payload["step"]`. The envelope (Event) is skipped by
    # payloads(), leaving the RunProgress: which run, and what the agent emitted.
    release = trio.Event()
    agent = ScriptedAgent(wait_for_step(release), emit({"step": 1}), emit({"step": 2}))
    ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
    seen: list[RunProgress] = []
    async with ws.events.subscribe() as subscription:
        run_id = backend.send_message(ws.id, AgentMessage("s", "go"))
        release.set()
        with trio.fail_after(TIMEOUT):
            async for progress in subscription.payloads():
                seen.append(progress)
                if len(seen) == 2:
                    break
    assert [(p.run_id, p.payload) for p in seen] == [(run_id, {"step": 1}), (run_id, {"step": 2})]
    # The wire carries the same one level: the SSE `progress` data is RunProgress.to_dict().
    assert seen[0].to_dict()["payload"] == {"step": 1}


async def test_workspace_sessions_is_the_coordinator_typed(backend, autojump_clock):
    ws = await backend.create_workspace("/w", SessionCoordinator.factory(ScriptedAgent()))
    assert ws.sessions is ws.coordinator
    assert ws.sessions.queued_run_ids("s") == []  # a SessionCoordinator-only method, no cast
    bare = await backend.create_workspace("/bare", lambda workspace: None)
    with pytest.raises(AgentNotInitialized):
        bare.sessions  # noqa: B018
    other = await backend.create_workspace(
        "/other",
        lambda workspace: FaultyCoordinator(
            SessionCoordinator(
                ScriptedAgent(return_(1)),
                run_completions=workspace.run_completions,
                ledger=workspace.ledger,
            ),
            FaultPoint.BEFORE_RUN,
            when=lambda call: False,
        ),
    )
    with pytest.raises(NotSupported, match="not a SessionCoordinator"):
        other.sessions  # noqa: B018


# -- `--agent mymodule:agent` from the module's own directory ------------------------------

MODULE = """
    from trio_runs import RunLedger

    async def agent(call, ctx):
        return call.prompt[::-1]

    def make_store():
        return RunLedger()
"""


def console_script() -> str:
    # The installed entry point, as a user runs it (`python -m` would put the current
    # directory on sys.path by itself and hide the complaint).
    found = shutil.which("trio-runs", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the trio-runs console script is not installed next to this Python")
    return found


def announced_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_BOUND
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"serving on (http://[^\s;]+)", line)
        if match:
            return match.group(1)
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"the server did not start: {err}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes")
def test_serve_imports_agent_and_store_specs_from_the_current_directory(tmp_path: Path):
    (tmp_path / "mymodule.py").write_text(textwrap.dedent(MODULE), encoding="utf-8")
    env = dict(os.environ)
    # The complaint is about a shell without PYTHONPATH=. ; keep only entries that are not
    # the current directory (a mutant run puts its copy of the package there).
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p not in ("", ".")]
    env["PYTHONPATH"] = os.pathsep.join(kept)
    command = [console_script(), "serve", "--port", "0", "--workspace-root", str(tmp_path)]
    command += ["--agent", "mymodule:agent", "--store", "mymodule:make_store"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = announced_url(proc)
        with httpx.Client(base_url=url, timeout=10) as http:
            workspace = http.post("/v1/workspaces", json={"path": str(tmp_path)}).json()
            answer = http.post(
                f"/v1/workspaces/{workspace['id']}/messages",
                params={"wait": "10"},
                json={"session_id": "s", "prompt": "hello"},
            )
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.text)["terminal"]["result"] == "olleh"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
