"""The ``trio-runs`` command line, in-process: help, usage errors, exit statuses.

``main()`` runs its own ``trio.run``, so these are plain functions. The few that touch the
network talk to a loopback port nothing listens on, with a short ``--timeout``, or to a
server running its own ``trio.run`` in a thread (every wait on it bounded).
"""

from __future__ import annotations

import io
import json
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trio_runs import cli


def free_port() -> int:
    # A port nothing listens on: bound, then released (connections to it are refused).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(args)
    except SystemExit as exit:  # argparse: --help and usage errors
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("serve", "run", "status", "cancel", "demo"):
        assert command in out
    assert "trio-runs demo" in out
    assert "bench" not in out


def test_bench_is_not_a_command_of_the_installed_cli(capsys):
    # The benchmarks are not in the wheel: they run as `python -m benchmarks` from a checkout.
    code, out, err = run_main(["bench", "--quick"], capsys)
    assert code == 2
    assert out == ""
    assert "usage:" in err
    assert "invalid choice: 'bench'" in err


def test_serve_help_documents_the_demo_agent_and_the_api(capsys):
    code, out, _ = run_main(["serve", "--help"], capsys)
    assert code == 0
    for text in ("sleep N", "fail-early", "--token", "TRIO_RUNS_TOKEN", "/v1/runs/{run_id}/wait"):
        assert text in out


def test_run_help_documents_the_exit_statuses(capsys):
    code, out, _ = run_main(["run", "--help"], capsys)
    assert code == 0
    assert "0 completed" in out
    assert "4 server unreachable or lost" in out
    assert "Ctrl-C cancels the run on the server before exiting" in " ".join(out.split())


def test_cancel_help_offers_a_run_or_a_session(capsys):
    code, out, _ = run_main(["cancel", "--help"], capsys)
    assert code == 0
    assert "(--run RUN_ID | --session SESSION)" in out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["run", "no session"],
        ["serve", "--port", "70000"],
        ["serve", "--heartbeat", "0"],
        ["run", "--session", "s", "--timeout", "-1", "x"],
        ["demo", "--runs", "0"],
        ["nonsense"],
        ["cancel"],
        ["cancel", "--run", "r", "--session", "s"],
        ["cancel", "--run", "r", "--queue-only"],
        ["cancel", "--run", "r", "--workspace", "w"],
        ["cancel", "--queue-only"],
    ],
)
def test_usage_errors_exit_2(capsys, args: list[str]):
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert "usage:" in err


def test_serve_refuses_a_public_address_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv("TRIO_RUNS_TOKEN", raising=False)
    code, _, err = run_main(["serve", "--host", "0.0.0.0", "--port", "0"], capsys)
    assert code == 2
    assert "refusing to serve on '0.0.0.0' without a token" in err


def test_serve_explains_an_agent_it_cannot_load(capsys):
    code, _, err = run_main(["serve", "--agent", "no.such.module_x:agent"], capsys)
    assert code == 2
    assert "cannot import agent module" in err


def test_run_needs_a_prompt(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run_main(["run", "--session", "s", "-"], capsys)
    assert code == 2
    assert "empty" in err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))
    code, _, err = run_main(["run", "--session", "s"], capsys)
    assert code == 2
    assert "no prompt" in err


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--session", "s", "hello"],
        ["status", "some-run"],
        ["cancel", "--session", "s"],
        ["cancel", "--run", "r"],
    ],
)
def test_an_unreachable_server_is_exit_4_within_the_timeout(capsys, command: list[str]):
    server = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_main([*command, "--server", server, "--timeout", "0.3"], capsys)
    assert code == 4
    assert "server lost" in err
    assert "within 0.3s" in err


def test_a_missing_http_extra_is_explained(capsys, monkeypatch):
    real = cli.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "starlette" else real(name)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    code, _, err = run_main(["status", "x"], capsys)
    assert code == 2
    assert "starlette missing" in err
    assert "trio-runs[http]" in err


def test_the_demo_runs_a_small_workload_clean(capsys):
    code, out, _ = run_main(["demo", "--runs", "12", "--no-live"], capsys)
    assert code == 0, out
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") >= 3
    }
    assert rows["accepted"] == "12"
    assert rows["hung"] == "0"
    assert rows["duplicate terminals"] == "0"
    assert int(rows["completed"]) + int(rows["failed"]) + int(rows["cancelled"]) == 12
    assert "OK:" in out


def test_run_still_ends_right_when_the_event_stream_is_refused(capsys, monkeypatch, tmp_path):
    # Live progress is best effort: a refused stream must not keep the run from its end.
    import argparse
    from functools import partial

    import trio

    from trio_runs.http import ClientError, RunsClient, ServeOptions, serve

    async def refuse(self: RunsClient, *args: object, **kwargs: object) -> None:
        raise ClientError(503, "nope", "no stream for you")

    monkeypatch.setattr(RunsClient, "stream_events", refuse)
    args = argparse.Namespace(session="s", workspace="w", quiet=False)

    async def main() -> int:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                options = ServeOptions(port=0, workspace_root=str(tmp_path), drain=0)
                server = await nursery.start(partial(serve, options))
                try:
                    client = RunsClient(server.url, timeout=5)
                    return await cli._run_main(client, args, "still fine", "rid")
                finally:
                    server.request_shutdown()

    assert trio.run(main) == 0
    out, err = capsys.readouterr()
    assert out == "still fine\n"
    assert "rid accepted" in err


@contextmanager
def server_thread(root: Path) -> Iterator[str]:
    """A server on a free loopback port, in its own thread and ``trio.run``; yields its URL."""
    from trio_runs.http import RunningServer, ServeOptions, serve

    started: queue.Queue[tuple[RunningServer, trio.lowlevel.TrioToken] | BaseException] = (
        queue.Queue()
    )

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                options = ServeOptions(port=0, workspace_root=str(root), drain=0)
                server = await nursery.start(partial(serve, options))
                started.put((server, trio.lowlevel.current_trio_token()))

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            started.put(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    item = started.get(timeout=20)
    if isinstance(item, BaseException):
        raise item
    server, token = item
    try:
        yield server.url
    finally:
        trio.from_thread.run_sync(server.request_shutdown, trio_token=token)
        thread.join(timeout=20)
        assert not thread.is_alive()


def wait_state(http: httpx.Client, run_id: str, state: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if http.get(f"/v1/runs/{run_id}").json().get("state") == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"run {run_id} never became {state}")


def test_cancel_run_cancels_that_run_only(capsys, tmp_path: Path):
    with server_thread(tmp_path) as url, httpx.Client(base_url=url, timeout=5) as http:
        ws = http.post("/v1/workspaces", json={"path": "."}).json()["id"]
        for run_id, prompt in (("first", "sleep 30"), ("second", "after you")):
            body = {"session_id": "s", "prompt": prompt, "run_id": run_id}
            assert http.post(f"/v1/workspaces/{ws}/messages", json=body).status_code == 202
        wait_state(http, "first", "active")
        wait_state(http, "second", "queued")

        client = ["--server", url, "--timeout", "5"]
        code, out, err = run_main(["cancel", "--run", "first", *client], capsys)
        assert code == 0, err
        shown = json.loads(out)
        assert (shown["run_id"], shown["session_id"]) == ("first", "s")
        assert shown["state"] in {"active", "cancelled"}
        ended = http.get("/v1/runs/first/wait", params={"timeout": 5}).json()
        assert ended["state"] == "cancelled"
        # Only that run: the one queued behind it in the same session still runs.
        after = http.get("/v1/runs/second/wait", params={"timeout": 5}).json()
        assert after["state"] == "completed"
        assert after["terminal"]["result"] == "after you"

        # Cancelling an ended run just shows its terminal.
        code, out, _ = run_main(["cancel", "--run", "second", *client], capsys)
        assert code == 0
        assert json.loads(out) == after
        code, out, err = run_main(["cancel", "--run", "nobody", *client], capsys)
        assert code == 2
        assert out == ""
        assert "no run 'nobody' is known" in err
