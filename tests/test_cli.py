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
import types
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
    assert "0  completed" in out
    assert "4  server unreachable or lost" in out
    assert "7  timed out" in out
    text = " ".join(out.split())
    assert "Ctrl-C, SIGTERM or SIGHUP cancels the run on the server before exiting" in text
    assert "--detach" in text
    assert "--deadline SECONDS" in text


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
    args = argparse.Namespace(
        session="s",
        workspace="w",
        quiet=False,
        output="text",
        detach=False,
        deadline=None,
        label=[],
    )

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

        client = ["--server", url, "--timeout", "5", "--output", "json"]
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
        assert code == cli.EXIT_UNKNOWN_RUN
        assert out == ""
        assert "no run 'nobody' is known" in err


# -- issue 10, item 3: tokens no client could ever match are refused at start-up -----------


@pytest.fixture
def no_serving(monkeypatch):
    # `serve` must refuse before it starts anything: if it got as far as trio.run, fail
    # at once rather than serve forever.
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve started instead of refusing")

    monkeypatch.setattr(cli.trio, "run", started)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "empty or blank"),
        (" ", "empty or blank"),
        (" s3cret", "whitespace"),
        ("s3cret\n", "whitespace"),
        ("s3\tcret", "control or non-ASCII"),
        ("naïve", "control or non-ASCII"),
    ],
)
def test_serve_refuses_a_token_no_client_could_match(
    capsys, monkeypatch, no_serving, token: str, reason: str
):
    monkeypatch.delenv("TRIO_RUNS_TOKEN", raising=False)
    for host in ("0.0.0.0", "127.0.0.1"):
        code, _, err = run_main(["serve", "--host", host, "--port", "0", "--token", token], capsys)
        assert code == 2, err
        assert reason in err
    monkeypatch.setenv("TRIO_RUNS_TOKEN", token or " ")
    code, _, err = run_main(["serve", "--host", "0.0.0.0", "--port", "0"], capsys)
    assert code == 2, err


# -- issue 10, item 5: CLI conventions -------------------------------------------------------


def unreachable() -> list[str]:
    return ["--server", f"http://127.0.0.1:{free_port()}", "--timeout", "0.3"]


def test_run_prints_progress_on_stderr_and_the_result_alone_on_stdout(capsys, tmp_path: Path):
    with server_thread(tmp_path) as url:
        client = ["--server", url, "--timeout", "5"]
        code, out, err = run_main(["run", *client, "--session", "s", "hello world"], capsys)
        assert code == 0, err
        assert out == "hello world\n"
        assert "hello\n" in err
        assert "world\n" in err


def test_run_status_and_cancel_print_json_with_output_json(capsys, tmp_path: Path):
    with server_thread(tmp_path) as url:
        client = ["--server", url, "--timeout", "5", "--output", "json"]
        code, out, err = run_main(
            ["run", *client, "--session", "s", "--run-id", "j1", "hi there"], capsys
        )
        assert code == 0, err
        shown = json.loads(out)
        assert (shown["run_id"], shown["session_id"], shown["state"]) == ("j1", "s", "completed")
        assert shown["terminal"]["result"] == "hi there"

        code, out, err = run_main(
            ["run", *client, "--session", "s", "--run-id", "j2", "fail"], capsys
        )
        assert code == 1
        assert json.loads(out)["state"] == "failed"
        assert "j2 failed" in err

        code, out, _ = run_main(["status", *client, "j1"], capsys)
        assert code == 0
        assert json.loads(out) == shown
        code, out, _ = run_main(["cancel", *client, "--run", "j1"], capsys)
        assert code == 0
        assert json.loads(out) == shown
        code, out, _ = run_main(["cancel", *client, "--session", "s"], capsys)
        assert code == 0
        assert json.loads(out)["session_id"] == "s"


def test_status_and_cancel_print_text_by_default(capsys, tmp_path: Path):
    with server_thread(tmp_path) as url:
        client = ["--server", url, "--timeout", "5"]
        assert (
            run_main(["run", *client, "--session", "s", "--run-id", "t1", "-q", "ok"], capsys)[0]
            == 0
        )
        code, out, _ = run_main(["status", *client, "t1"], capsys)
        assert code == 0
        assert out == "run t1 (session s): completed\nresult: ok\n"
        code, out, _ = run_main(["cancel", *client, "--session", "s"], capsys)
        assert code == 0
        assert out == "session s: idle, 0 queued\n"


def test_an_unknown_run_has_one_exit_status_everywhere(capsys, tmp_path: Path):
    with server_thread(tmp_path) as url:
        client = ["--server", url, "--timeout", "5"]
        for command in (
            ["status", "nobody"],
            ["status", "--wait", "nobody"],
            ["cancel", "--run", "nobody"],
        ):
            for output in ("text", "json"):
                code, out, err = run_main([*command, *client, "--output", output], capsys)
                assert code == cli.EXIT_UNKNOWN_RUN == 5, (command, err)
                assert out == ""
                assert "no run 'nobody' is known" in err


def test_the_exit_statuses_are_one_table_in_the_help_and_the_readme(capsys):
    table = {
        0: "completed",
        1: "failed",
        2: "usage or refused",
        3: "cancelled",
        4: "server unreachable or lost",
        5: "unknown run",
        6: "abandoned",
    }
    constants = [
        cli.EXIT_OK,
        cli.EXIT_FAILED,
        cli.EXIT_USAGE,
        cli.EXIT_CANCELLED,
        cli.EXIT_LOST,
        cli.EXIT_UNKNOWN_RUN,
        cli.EXIT_ABANDONED,
    ]
    assert constants == list(table)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for command in ("run", "status", "cancel"):
        _, out, _ = run_main([command, "--help"], capsys)
        for code, meaning in table.items():
            assert f"  {code}  {meaning}" in out, (command, code)
    for code, meaning in table.items():
        assert f"| {code} | {meaning}" in readme, code


@pytest.mark.parametrize("position", ["before", "after"])
def test_log_level_goes_before_or_after_the_command(capsys, monkeypatch, position: str):
    levels: list[str | None] = []
    real = cli._logging

    def recording(level: str | None, command: str) -> object:
        levels.append(level)
        return real(level, command)

    monkeypatch.setattr(cli, "_logging", recording)
    option = ["--log-level", "debug"]
    command = ["status", "x", *unreachable()]
    argv = [*option, *command] if position == "before" else [*command, *option]
    code, _, err = run_main(argv, capsys)
    assert code == cli.EXIT_LOST, err
    assert levels == ["debug"]
    # Given twice, the one after the command wins.
    code, _, _ = run_main(["--log-level", "error", *command, "--log-level", "info"], capsys)
    assert levels[-1] == "info"


@pytest.fixture
def fake_serve(monkeypatch):
    # Records the options `serve` would serve with, without binding anything.
    import trio_runs.http

    served: list[object] = []

    async def serve(options: object, *, task_status: trio.TaskStatus[object], **_: object) -> None:
        served.append(options)
        task_status.started(types.SimpleNamespace(url="http://fake"))

    monkeypatch.setattr(trio_runs.http, "serve", serve, raising=False)
    for name in ("TRIO_RUNS_HOST", "TRIO_RUNS_PORT", "TRIO_RUNS_AGENT", "TRIO_RUNS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return served


def test_serve_takes_host_port_and_agent_from_the_environment(capsys, monkeypatch, fake_serve):
    monkeypatch.setenv("TRIO_RUNS_HOST", "::1")
    monkeypatch.setenv("TRIO_RUNS_PORT", "9123")
    monkeypatch.setenv("TRIO_RUNS_AGENT", "trio_runs.agents:DemoAgent")
    code, out, err = run_main(["serve"], capsys)
    assert code == 0, err
    options = fake_serve.pop()
    assert (options.host, options.port, options.agent) == (
        "::1",
        9123,
        "trio_runs.agents:DemoAgent",
    )
    assert "serving on http://fake" in out
    # The flags win over the environment.
    code, _, err = run_main(
        ["serve", "--host", "127.0.0.1", "--port", "0", "--agent", "trio_runs.agents:demo"], capsys
    )
    assert code == 0, err
    options = fake_serve.pop()
    assert (options.host, options.port, options.agent) == ("127.0.0.1", 0, "trio_runs.agents:demo")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRIO_RUNS_PORT", "70000", "TRIO_RUNS_PORT: port must be 0..65535"),
        ("TRIO_RUNS_PORT", "http", "TRIO_RUNS_PORT: not a port number"),
        ("TRIO_RUNS_HOST", "0.0.0.0", "refusing to serve on '0.0.0.0' without a token"),
        ("TRIO_RUNS_AGENT", "no.such.module_x:agent", "cannot import agent module"),
    ],
)
def test_serve_refuses_bad_environment_values(
    capsys, monkeypatch, fake_serve, name: str, value: str, message: str
):
    monkeypatch.setenv(name, value)
    code, _, err = run_main(["serve"], capsys)
    assert code == 2
    assert message in err
    assert fake_serve == []


@pytest.mark.parametrize("command", ["", "serve", "run", "status", "cancel", "demo"])
@pytest.mark.parametrize(("columns", "widest"), [(80, 80), (400, 100)])
def test_help_is_wrapped_to_the_terminal(capsys, monkeypatch, command, columns, widest):
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, _ = run_main([*command.split(), "--help"], capsys)
    assert code == 0
    too_wide = [line for line in out.splitlines() if len(line) > widest]
    assert too_wide == []


def test_only_the_demo_needs_rich(capsys, monkeypatch):
    real = cli.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "rich" else real(name)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    code, _, err = run_main(["status", "x", *unreachable()], capsys)
    assert code == cli.EXIT_LOST, err
    code, _, err = run_main(["demo", "--runs", "12", "--no-live"], capsys)
    assert code == cli.EXIT_USAGE
    assert "rich missing" in err
    assert "trio-runs[demo]" in err


def test_rich_is_in_the_demo_extra_only():
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert not any(req.startswith("rich") for req in extras["http"])
    assert any(req.startswith("rich") for req in extras["demo"])
    assert "trio-runs[http]" in extras["demo"]
    assert "trio-runs[demo]" in extras["test"]  # the README's first command runs the demo


def test_serve_max_deadline_defaults_to_a_day_and_takes_none(capsys, fake_serve):
    code, _, err = run_main(["serve"], capsys)
    assert code == 0, err
    assert fake_serve.pop().max_deadline == 86_400
    code, _, err = run_main(["serve", "--max-deadline", "none"], capsys)
    assert code == 0, err
    assert fake_serve.pop().max_deadline is None
    code, _, err = run_main(["serve", "--max-deadline", "60"], capsys)
    assert code == 0, err
    assert fake_serve.pop().max_deadline == 60
    for bad in ("0", "-1", "inf", "soon"):
        code, _, err = run_main(["serve", "--max-deadline", bad], capsys)
        assert code == cli.EXIT_USAGE, bad
