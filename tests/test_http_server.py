"""The HTTP API over real loopback: hypercorn on Trio on an ephemeral port, httpx as client.

Real sockets mean real time, so these tests are plain functions that call ``trio.run``
themselves instead of pytest-trio tests on the virtual clock (the autojump clock would
jump over every network wait). Each is bounded by ``trio.fail_after``; a server that
stopped answering fails the test in seconds instead of hanging it. Where a test waits for
the server to notice something (a client going away), it polls a condition under that bound.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from shapes import without_times

from trio_runs import RunCall, RunContext, SessionCoordinator
from trio_runs.http import (
    MAX_BODY_BYTES,
    BindRefused,
    ClientError,
    RunningServer,
    RunsClient,
    ServeOptions,
    ServerLost,
    check_bind,
    serve,
)
from trio_runs.http.client import SseEvent

TIMEOUT = 20.0  # real seconds, per test
JSON = {"content-type": "application/json"}

Body = Callable[[RunningServer, httpx.AsyncClient], Awaitable[None]]


def serving(tmp_path: Path, body: Body, *, factory: Any = None, **options: Any) -> None:
    """Run ``body`` against a fresh server on a free loopback port, bounded in time."""

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                opts = ServeOptions(port=0, workspace_root=str(tmp_path), drain=0.2, **options)
                server: RunningServer = await nursery.start(
                    partial(serve, opts, coordinator_factory=factory)
                )
                headers = {"authorization": f"Bearer {opts.token}"} if opts.token else {}
                try:
                    async with httpx.AsyncClient(
                        base_url=server.url, timeout=10, headers=headers
                    ) as http:
                        await body(server, http)
                finally:
                    server.request_shutdown()

    trio.run(main)


async def workspace(http: httpx.AsyncClient, path: str = "w") -> str:
    response = await http.post("/v1/workspaces", json={"path": path})
    assert response.status_code in (200, 201), response.text
    ws_id: str = response.json()["id"]
    return ws_id


async def submit(http: httpx.AsyncClient, ws: str, session: str, prompt: str, **extra: Any) -> str:
    response = await http.post(
        f"/v1/workspaces/{ws}/messages", json={"session_id": session, "prompt": prompt, **extra}
    )
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def until(condition: Callable[[], bool]) -> None:
    # Waits for an effect on the other side of a socket; bounded by the test's fail_after.
    while not condition():
        await trio.sleep(0.01)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


# -- the API, route by route ----------------------------------------------------------------


def test_a_run_from_submission_to_late_waiter(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        created = await http.post("/v1/workspaces", json={"path": "proj"})
        assert created.status_code == 201
        again = await http.post("/v1/workspaces", json={"path": "./proj"})
        assert again.status_code == 200
        assert again.json()["id"] == created.json()["id"]
        ws = created.json()["id"]
        assert created.json()["path"] == str((tmp_path / "proj").resolve())
        assert (await http.get(f"/v1/workspaces/{ws}")).json() == created.json()

        run_id = await submit(http, ws, "s", "hello over http", run_id="my-run-1")
        assert run_id == "my-run-1"
        done = await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 10})
        assert done.status_code == 200
        assert without_times(done.json()) == {
            "run_id": run_id,
            "session_id": "s",
            "state": "completed",
            "terminal": {
                "session_id": "s",
                "run_id": run_id,
                "result": "hello over http",
                "error": None,
                "cancelled": False,
            },
        }
        late = await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 60})
        assert late.status_code == 200
        assert late.json() == done.json()
        assert (await http.get(f"/v1/runs/{run_id}")).json() == done.json()

        minted = await submit(http, ws, "s", "fail-early")
        failed = (await http.get(f"/v1/runs/{minted}/wait")).json()
        assert failed["state"] == "failed"
        assert "prepare" in failed["terminal"]["error"]

    serving(tmp_path, body)


def test_long_poll_sessions_cancel_and_close(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        active = await submit(http, ws, "s", "sleep 30")
        queued = [await submit(http, ws, "s", f"later {i}") for i in range(2)]
        session_url = f"/v1/workspaces/{ws}/sessions/s"

        def lane_ready() -> bool:
            return state.get("active") == active and len(state.get("queued", [])) == 2

        state: dict[str, Any] = {}
        while not lane_ready():
            state = (await http.get(session_url)).json()
        assert state == {
            "workspace_id": ws,
            "session_id": "s",
            "busy": True,
            "active": active,
            "queued": [{"run_id": r, "prompt": f"later {i}"} for i, r in enumerate(queued)],
        }
        assert (await http.get(f"/v1/runs/{active}")).json()["state"] == "active"
        assert (await http.get(f"/v1/runs/{queued[0]}")).json()["state"] == "queued"

        start = trio.current_time()
        pending = await http.get(f"/v1/runs/{active}/wait", params={"timeout": "0.3"})
        assert pending.status_code == 202
        assert pending.json()["state"] == "active"
        assert "terminal" not in pending.json()
        assert trio.current_time() - start >= 0.3

        cleared = await http.delete(f"{session_url}/queue")
        assert cleared.status_code == 200
        assert cleared.json()["queued"] == []
        for run_id in queued:
            assert (await http.get(f"/v1/runs/{run_id}")).json()["state"] == "cancelled"

        async with trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def waiter() -> None:
                answers.append(await http.get(f"/v1/runs/{active}/wait"))

            nursery.start_soon(waiter)
            assert (await http.post(f"{session_url}/cancel")).status_code == 200
        assert answers[0].status_code == 200
        assert answers[0].json()["terminal"]["cancelled"] is True

        sleeper = await submit(http, ws, "t", "sleep 30")
        listed = (await http.get("/v1/workspaces")).json()["workspaces"]
        assert [w["id"] for w in listed] == [ws]
        closed = await http.delete(f"/v1/workspaces/{ws}")
        assert closed.status_code == 200
        assert closed.json()["closing"] is True
        assert (await http.get(f"/v1/runs/{sleeper}")).json()["state"] == "cancelled"
        assert_error(await http.get(f"/v1/workspaces/{ws}"), 404, "workspace_not_found")
        assert_error(await http.delete(f"/v1/workspaces/{ws}"), 404, "workspace_not_found")

    serving(tmp_path, body)


def test_cancel_one_run_and_the_rest_of_its_session_goes_on(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        active = await submit(http, ws, "s", "sleep 30")
        queued = await submit(http, ws, "s", "after you")
        doomed = await submit(http, ws, "s", "never runs")
        elsewhere = await submit(http, ws, "t", "sleep 30")

        async def state(run_id: str) -> str:
            value: str = (await http.get(f"/v1/runs/{run_id}")).json()["state"]
            return value

        while await state(active) != "active" or await state(doomed) != "queued":
            await trio.sleep(0.01)

        # A queued run: cancelled at once, with the answer.
        dropped = await http.post(f"/v1/runs/{doomed}/cancel")
        assert dropped.status_code == 200
        assert without_times(dropped.json()) == {
            "run_id": doomed,
            "session_id": "s",
            "state": "cancelled",
            "terminal": {
                "session_id": "s",
                "run_id": doomed,
                "result": None,
                "error": None,
                "cancelled": True,
                "reason": "user",
            },
        }
        # The active run: the same shape as GET; it ends at the agent's next checkpoint.
        cancelled = await http.post(f"/v1/runs/{active}/cancel")
        assert cancelled.status_code == 200
        assert set(without_times(cancelled.json())) <= {"run_id", "session_id", "state", "terminal"}
        assert cancelled.json()["run_id"] == active
        assert cancelled.json()["state"] in {"active", "cancelled"}
        ended = await http.get(f"/v1/runs/{active}/wait", params={"timeout": 10})
        assert ended.status_code == 200
        assert ended.json()["terminal"]["cancelled"] is True
        # The next run of the same session still runs, to completion.
        done = await http.get(f"/v1/runs/{queued}/wait", params={"timeout": 10})
        assert done.status_code == 200
        assert done.json()["state"] == "completed"
        assert done.json()["terminal"]["result"] == "after you"
        assert await state(elsewhere) == "active"

        # An ended run: 200 with its terminal, unchanged (idempotent).
        for run_id, seen in ((active, ended), (queued, done)):
            again = await http.post(f"/v1/runs/{run_id}/cancel")
            assert again.status_code == 200
            assert again.json() == seen.json()
        assert_error(await http.post("/v1/runs/nope/cancel"), 404, "run_not_found")
        assert_error(await http.get(f"/v1/runs/{elsewhere}/cancel"), 405, "method_not_allowed")
        assert server.service.backend.ledger.statistics().duplicates_suppressed == 0
        assert await state(elsewhere) == "active"  # the other session was never touched

    serving(tmp_path, body)


def test_the_client_cancels_one_run(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        async with RunsClient(server.url, timeout=5) as client:
            ws = (await client.create_workspace("w")).id
            await client.submit(ws, "s", "sleep 30", "first")
            await client.submit(ws, "s", "second words", "second")
            await until(lambda: server.service.run("first").state == "active")
            view = await client.cancel_run("first")
            assert (view.run_id, view.session_id) == ("first", "s")
            assert (await client.wait_terminal("first")).cancelled
            assert (await client.wait_terminal("second")).result == "second words"
            again = await client.cancel_run("first")
            assert again.state == "cancelled"
            assert again.terminal is not None
            assert again.terminal.cancelled
            with pytest.raises(ClientError) as info:
                await client.cancel_run("nobody")
            assert (info.value.status, info.value.code) == (404, "run_not_found")

    serving(tmp_path, body)


def test_metrics_and_openapi(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        for prompt in ("a", "fail", "fail-early"):
            run_id = await submit(http, ws, "s", prompt)
            assert (await http.get(f"/v1/runs/{run_id}/wait")).status_code == 200
        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=")
        text = metrics.text
        for line in (
            "trio_runs_runs_accepted_total 3.0",
            'trio_runs_terminals_total{outcome="completed"} 1.0',
            'trio_runs_terminals_total{outcome="failed"} 2.0',
            "trio_runs_duplicate_terminals_suppressed_total 0.0",
            "trio_runs_lossy_events_dropped_total 0.0",
            "trio_runs_runs_active 0.0",
            "trio_runs_runs_queued 0.0",
            "trio_runs_subscribers 0.0",
            "# TYPE trio_runs_runs_accepted_total counter",
        ):
            assert line in text.splitlines()
        doc = (await http.get("/v1/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        assert "/v1/runs/{run_id}/wait" in doc["paths"]
        cancel = doc["paths"]["/v1/runs/{run_id}/cancel"]["post"]["responses"]
        assert cancel["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Run"
        }
        assert "404" in cancel
        assert "401" not in cancel  # this server has no token (issue 10, finding 4)

    serving(tmp_path, body)


# -- bad input never reaches a traceback ----------------------------------------------------


def test_every_error_shape_and_nothing_is_accepted(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        taken = await submit(http, ws, "s", "sleep 30", run_id="taken")
        messages = f"/v1/workspaces/{ws}/messages"
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            (
                "POST",
                messages,
                {"content": b'{"session_id": ', "headers": JSON},
                400,
                "malformed_json",
            ),
            ("POST", messages, {"content": b"\xff", "headers": JSON}, 400, "malformed_json"),
            (
                "POST",
                messages,
                {"content": b'{"session_id": "s", "prompt": "p"}'},
                415,
                "unsupported_media_type",
            ),
            ("POST", messages, {"data": {"session_id": "s"}}, 415, "unsupported_media_type"),
            ("POST", messages, {"json": []}, 422, "invalid_request"),
            ("POST", messages, {"json": {"session_id": 1, "prompt": "p"}}, 422, "invalid_request"),
            (
                "POST",
                messages,
                {"json": {"session_id": "s", "prompt": "p", "x": 1}},
                422,
                "invalid_request",
            ),
            ("POST", messages, {"json": {"session_id": "s"}}, 422, "invalid_request"),
            ("POST", messages, {"json": {"session_id": "", "prompt": "p"}}, 422, "session_missing"),
            ("POST", messages, {"json": {"session_id": "s", "prompt": " "}}, 422, "empty_prompt"),
            (
                "POST",
                messages,
                {"json": {"session_id": "s", "prompt": "p", "run_id": "a b"}},
                422,
                "invalid_run_id",
            ),
            (
                "POST",
                messages,
                {"json": {"session_id": "s", "prompt": "p", "run_id": "a/b"}},
                422,
                "invalid_run_id",
            ),
            (
                "POST",
                messages,
                {"json": {"session_id": "s", "prompt": "p", "run_id": taken}},
                409,
                "duplicate_run",
            ),
            (
                "POST",
                messages,
                {"json": {"session_id": "s", "prompt": "p"}, "params": {"x": "1"}},
                422,
                "invalid_query",
            ),
            (
                "POST",
                "/v1/workspaces/nope/messages",
                {"json": {"session_id": "s", "prompt": "p"}},
                404,
                "workspace_not_found",
            ),
            ("POST", "/v1/workspaces", {"json": {"path": "../out"}}, 422, "path_outside_root"),
            ("POST", "/v1/workspaces", {"json": {"path": 7}}, 422, "invalid_request"),
            ("GET", "/v1/runs/nope", {}, 404, "run_not_found"),
            ("GET", "/v1/runs/nope/wait", {}, 404, "run_not_found"),
            ("POST", "/v1/runs/nope/cancel", {}, 404, "run_not_found"),
            ("POST", f"/v1/runs/{taken}/cancel", {"params": {"x": "1"}}, 422, "invalid_query"),
            ("GET", f"/v1/runs/{taken}/wait", {"params": {"timeout": "61"}}, 422, "invalid_query"),
            ("GET", f"/v1/runs/{taken}/wait", {"params": {"timeout": "x"}}, 422, "invalid_query"),
            ("GET", "/v1/workspaces/nope/sessions/s", {}, 404, "workspace_not_found"),
            ("POST", "/v1/workspaces/nope/sessions/s/cancel", {}, 404, "workspace_not_found"),
            ("DELETE", "/v1/workspaces/nope/sessions/s/queue", {}, 404, "workspace_not_found"),
            ("GET", "/v1/workspaces/nope/events", {}, 404, "workspace_not_found"),
            ("GET", f"/v1/workspaces/{ws}/events", {"params": {"bad": "1"}}, 422, "invalid_query"),
            ("GET", "/v2/anything", {}, 404, "not_found"),
            ("PUT", "/v1/workspaces", {}, 405, "method_not_allowed"),
            ("POST", "/healthz", {}, 405, "method_not_allowed"),
        ]
        for method, url, kwargs, status, code in cases:
            response = await http.request(method, url, **kwargs)
            assert_error(response, status, code)
        metrics = (await http.get("/metrics")).text
        assert "trio_runs_runs_accepted_total 1.0" in metrics.splitlines()
        assert server.service.backend.ledger.pending_run_ids() == [taken]
        assert [w["id"] for w in (await http.get("/v1/workspaces")).json()["workspaces"]] == [ws]

    serving(tmp_path, body)


def test_the_one_mebibyte_limit(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        url = f"/v1/workspaces/{ws}/messages"
        head = b'{"session_id": "s", "prompt": "fits"}'
        exact = head + b" " * (MAX_BODY_BYTES - len(head))
        assert (await http.post(url, content=exact, headers=JSON)).status_code == 202
        over = exact + b" "
        assert_error(await http.post(url, content=over, headers=JSON), 413, "body_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            yield head
            for _ in range(17):
                yield b" " * 65536

        assert_error(await http.post(url, content=chunks(), headers=JSON), 413, "body_too_large")
        assert server.service.backend.ledger.statistics().accepted_total == 1

    serving(tmp_path, body)


def test_an_unexpected_failure_is_a_logged_json_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        def broken() -> Any:
            raise RuntimeError("metrics exploded")

        server.service.backend.statistics = broken  # type: ignore[method-assign]
        assert_error(await http.get("/metrics"), 500, "internal_error")
        assert "exploded" not in (await http.get("/metrics")).text

    with caplog.at_level(logging.ERROR, logger="trio_runs"):
        serving(tmp_path, body)
    assert any("metrics exploded" in str(r.exc_info) for r in caplog.records)


def test_results_that_are_not_json_fail_their_run_and_reach_the_waiter(tmp_path: Path):
    async def agent(call: RunCall, ctx: RunContext) -> object:
        await trio.lowlevel.checkpoint()
        if call.prompt == "object":
            return {"value": object()}
        return {"ratio": float("nan")}

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        # Never a repr (or "nan"): a failure everybody sees, saying what and where.
        for prompt, problem in [("nan", "float nan at $.ratio"), ("object", "object at $.value")]:
            run_id = await submit(http, ws, "s", prompt)
            done = await http.get(f"/v1/runs/{run_id}/wait")
            assert done.status_code == 200
            terminal = done.json()["terminal"]
            assert (done.json()["state"], terminal["result"]) == ("failed", None)
            assert terminal["error"] == f"result is not a JSON value: {problem}"

    serving(tmp_path, body, factory=SessionCoordinator.factory(agent))


# -- access -------------------------------------------------------------------------------


def test_token_rules(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
            assert (await anonymous.get("/healthz")).status_code == 200
            for route in ("/metrics", "/v1/workspaces", "/v1/openapi.json", "/v1/runs/x"):
                response = await anonymous.get(route)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
            for header in ("Bearer wrong", "Basic s3cret", "s3cret", "Bearer", "Bearer s3cret2"):
                response = await anonymous.get("/v1/workspaces", headers={"authorization": header})
                assert_error(response, 401, "unauthorized")
            ok = await anonymous.get("/v1/workspaces", headers={"authorization": "bearer s3cret"})
            assert ok.status_code == 200
            refused = await anonymous.post("/v1/workspaces", json={"path": "w"})
            assert_error(refused, 401, "unauthorized")
            created = await http.post("/v1/workspaces", json={"path": "w"})
            assert created.status_code == 201  # the refused request created nothing
            run_id = await submit(http, created.json()["id"], "s", "sleep 30")
            for header in ({}, {"authorization": "Bearer wrong"}):
                response = await anonymous.post(f"/v1/runs/{run_id}/cancel", headers=header)
                assert_error(response, 401, "unauthorized")
            assert server.service.run(run_id).terminal is None  # not cancelled
        cancelled = await http.post(f"/v1/runs/{run_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["run_id"] == run_id
        ended = (await http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 10})).json()
        assert ended["state"] == "cancelled"
        assert server.service.backend.ledger.statistics().accepted_total == 1

    serving(tmp_path, body, token="s3cret")


@pytest.mark.parametrize(
    ("host", "token", "allowed"),
    [
        ("127.0.0.1", None, True),
        ("127.8.9.10", None, True),
        ("::1", None, True),
        ("[::1]", None, True),
        ("localhost", None, True),
        ("0.0.0.0", None, False),
        ("::", None, False),
        ("192.168.1.20", None, False),
        ("example.com", None, False),
        ("0.0.0.0", "", False),
        ("0.0.0.0", "t", True),
    ],
)
def test_binding_beyond_loopback_needs_a_token(host: str, token: str | None, allowed: bool):
    if allowed:
        check_bind(host, token)
    else:
        with pytest.raises(BindRefused, match="without a token"):
            check_bind(host, token)


@pytest.mark.parametrize(
    "token", ["", " ", "\t", " s3cret", "s3cret ", "s3cret\n", "s3\x00", "naïve"]
)
def test_a_token_no_client_could_match_is_refused(token: str):
    # The server compares stripped credentials, and a header carries printable ASCII only:
    # such a token would start fine and then answer 401 to every client.
    with pytest.raises(ValueError, match="token"):
        ServeOptions(token=token)


@pytest.mark.parametrize("token", ["s3cret", "two words", "a-b.c_d~e+f/g="])
def test_a_token_any_client_can_send_is_accepted(token: str):
    assert ServeOptions(token=token).token == token


def test_serve_refuses_before_binding_anything():
    async def main() -> None:
        with trio.fail_after(TIMEOUT), pytest.raises(BindRefused):
            await serve(ServeOptions(host="0.0.0.0", port=0))

    trio.run(main)


# -- Server-Sent Events ---------------------------------------------------------------------


async def read_lines(
    stream: httpx.Response,
    stop: Callable[[str], bool],
    then: Callable[[], Awaitable[None]] | None = None,
) -> list[str]:
    """Lines of an open stream up to the first that satisfies ``stop``.

    Stops by cancelling the read, never by breaking out of httpx's (nested) line generator,
    which would leave it unfinished. ``then`` runs once after the first line.
    """
    lines: list[str] = []
    with trio.CancelScope() as scope:
        async for line in stream.aiter_lines():
            if scope.cancel_called:
                continue  # buffered lines after the stop: the next real wait ends this
            lines.append(line)
            if then is not None and len(lines) == 1:
                await then()
            if stop(line):
                scope.cancel()
    return lines


def test_events_stream_with_ids_and_heartbeats(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        run_ids: list[str] = []

        async def start_run() -> None:
            run_ids.append(await submit(http, ws, "s", "one two"))

        async with http.stream("GET", f"/v1/workspaces/{ws}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            # Nothing between may cache or hold back the stream; it has no length.
            assert stream.headers["cache-control"] == "no-cache"
            assert stream.headers["x-accel-buffering"] == "no"
            assert "content-length" not in stream.headers
            lines = await read_lines(stream, lambda line: line == ": heartbeat", start_run)
        assert lines[0] == ": subscribed"
        events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert events == ["progress", "progress", "run_complete"]
        ids = [int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")]
        assert ids == [1, 2, 3]
        data = [
            json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data")
        ]
        assert [d["payload"] for d in data[:2]] == ["one", "two"]
        assert without_times(data[2]) == {
            "session_id": "s",
            "run_id": run_ids[0],
            "result": "one two",
            "error": None,
            "cancelled": False,
        }

    serving(tmp_path, body, heartbeat=0.2)


def test_a_disconnected_stream_leaves_no_subscriber_behind(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        # Streams read the workspace's event journal (which alone subscribes to its brokers).
        journal = await server.service.journal(server.service.workspace(ws))
        for _ in range(3):
            async with (
                httpx.AsyncClient(base_url=server.url) as other,
                other.stream("GET", f"/v1/workspaces/{ws}/events") as stream,
            ):
                lines = await read_lines(stream, lambda line: line == ": subscribed")
                assert lines == [": subscribed"]
                assert journal.live.subscriber_count == 1
                assert server.service.stream_connections == 1
            await until(lambda: journal.live.subscriber_count == 0)
            await until(lambda: server.service.stream_connections == 0)
        assert "trio_runs_event_streams 0.0" in (await http.get("/metrics")).text

    serving(tmp_path, body)


def test_a_stream_delivers_every_terminal_then_ends_when_its_workspace_closes(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        seen: list[SseEvent] = []
        async with RunsClient(server.url) as client, trio.open_nursery() as nursery:
            await nursery.start(partial(client.stream_events, ws, seen.append))
            runs = [await submit(http, ws, f"s{i}", "sleep 30") for i in range(5)]
            runs.append(await submit(http, ws, "quick", "done"))
            await http.delete(f"/v1/workspaces/{ws}")  # the stream task returns at its end
        ended = [e.json()["run_id"] for e in seen if e.event == "run_complete"]
        assert sorted(ended) == sorted(runs)

    serving(tmp_path, body)


def test_the_stream_can_follow_one_run(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        ws = await workspace(http)
        seen: list[SseEvent] = []
        async with RunsClient(server.url) as client, trio.open_nursery() as nursery:
            await nursery.start(partial(client.stream_events, ws, seen.append, run_id="mine"))
            await submit(http, ws, "a", "other words here")
            await submit(http, ws, "b", "my words", run_id="mine")
            terminal = await client.wait_terminal("mine")
            await until(lambda: any(e.event == "run_complete" for e in seen))
            nursery.cancel_scope.cancel()
        assert {e.json()["run_id"] for e in seen} == {"mine"}
        assert terminal.result == "my words"

    serving(tmp_path, body)


# -- graceful shutdown and the client's bounds ----------------------------------------------


def test_shutdown_gives_waiting_clients_their_cancelled_terminals(tmp_path: Path):
    outcomes: list[str] = []

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                opts = ServeOptions(port=0, workspace_root=str(tmp_path), drain=5)
                server: RunningServer = await nursery.start(partial(serve, opts))
                async with RunsClient(server.url, timeout=5) as client:
                    ws = (await client.create_workspace("w")).id
                    runs = [
                        await client.submit(ws, session, "sleep 30", f"run-{i}")
                        for i, session in enumerate(["a", "a", "b"])
                    ]

                    async def waiter(run_id: str) -> None:
                        outcomes.append((await client.wait_terminal(run_id)).outcome)

                    async with trio.open_nursery() as waiters:
                        for run_id in runs:
                            waiters.start_soon(waiter, run_id)
                        await until(lambda: server.service.run("run-0").state == "active")
                        server.request_shutdown()
                    stopping = trio.current_time()
            # Every terminal was collected, so serve() returned without waiting out the drain.
            assert trio.current_time() - stopping < 5

    trio.run(main)
    assert outcomes == ["cancelled"] * 3


def test_the_client_gives_up_on_a_silent_server_within_its_bound():
    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            accepted: list[trio.SocketStream] = []

            async def hold(stream: trio.SocketStream) -> None:
                accepted.append(stream)  # accept, read nothing, answer nothing
                await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, hold, listeners)
                async with RunsClient(f"http://127.0.0.1:{port}", timeout=0.5) as client:
                    start = trio.current_time()
                    with pytest.raises(ServerLost, match=r"within 0\.5s"):
                        await client.wait_terminal("r")
                    assert 0.4 <= trio.current_time() - start < 2
                assert accepted
                nursery.cancel_scope.cancel()
            # Nothing listens here any more: refused connections are retried, then lost.
            async with RunsClient(f"http://127.0.0.1:{port}", timeout=0.3) as client:
                start = trio.current_time()
                with pytest.raises(ServerLost, match="ConnectError"):
                    await client.create_workspace("w")
                assert trio.current_time() - start < 2

    trio.run(main)


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """Delivers every request, but loses the answer to the first submission."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/messages") and not self.lost:
            self.lost += 1
            await response.aclose()
            raise httpx.ReadError("connection reset before the answer arrived")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_retried_submission_is_recognised_not_run_twice(tmp_path: Path):
    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = LoseFirstAnswer()
        async with RunsClient(server.url, transport=transport) as client:
            ws = (await client.create_workspace("w")).id
            assert await client.submit(ws, "s", "once", "rid") == "rid"
            assert transport.lost == 1
            # Not a retry: a second submission with a taken id is refused.
            with pytest.raises(ClientError, match="duplicate_run"):
                await client.submit(ws, "s", "once", "rid")
            assert (await client.wait_terminal("rid")).result == "once"
        assert server.service.backend.ledger.statistics().accepted_total == 1

    serving(tmp_path, body)
