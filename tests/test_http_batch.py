"""One request per run (``POST .../messages?wait=S``) and batches (``POST .../batches``).

In-process on the virtual clock (the app through httpx's ASGI transport, which hands back a
response once its body is complete): submit-and-wait answers with the terminal or, after S,
the run; a batch answers one line per message, then one per terminal, each exactly once, and
only once every accepted message is durable; bad input is a typed JSON error that accepts
nothing. The real-socket tests (a client that stops reading a batch never holds shutdown;
``RunsClient``'s one-request and batch calls) bound every wait in real time.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import test_e2e as e2e
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from shapes import without_times

from trio_runs import (
    RunCall,
    RunComplete,
    RunContext,
    SessionCoordinator,
    StoreError,
    open_backend,
)
from trio_runs.agents import demo
from trio_runs.events import END_REASONS
from trio_runs.http import ClientError, RunningServer, RunsClient, ServeOptions, serve
from trio_runs.http.app import create_app
from trio_runs.http.batch import GATHER_SECONDS, BatchStream, encode_line
from trio_runs.http.batch import is_plain as batch_is_plain
from trio_runs.http.client import decode_batch_line
from trio_runs.http.openapi import openapi_document
from trio_runs.http.schema import (
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    ApiError,
    CreateWorkspace,
    SubmitBatch,
    SubmitMessage,
    decode_batch,
)
from trio_runs.http.service import RunService

TIMEOUT = 60  # virtual seconds
spawned = e2e.spawn  # the process tests' fixture, as ``spawned``: teardown kills them all


@asynccontextmanager
async def app_client(root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, RunService]]:
    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            service = RunService(backend, demo.coordinator_factory, workspace_root=root)
            transport = httpx.ASGITransport(app=create_app(service))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                yield http, service
            await service.shutdown(0)


async def workspace(http: httpx.AsyncClient) -> str:
    ws_id: str = (await http.post("/v1/workspaces", json={"path": "w"})).json()["id"]
    return ws_id


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def message(session: str, prompt: str, run_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"session_id": session, "prompt": prompt}
    if run_id is not None:
        body["run_id"] = run_id
    return body


# -- one request per run ----------------------------------------------------------------------


async def test_submit_and_wait_answers_with_the_terminal(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        response = await http.post(
            f"/v1/workspaces/{ws}/messages", params={"wait": "5"}, json=message("s", "hi", "r1")
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["run_id"], body["session_id"], body["state"]) == ("r1", "s", "completed")
        assert body["terminal"]["result"] == "hi"


async def test_submit_and_wait_gives_the_run_after_wait_seconds(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        start = trio.current_time()
        response = await http.post(
            f"/v1/workspaces/{ws}/messages",
            params={"wait": "2.5"},
            json=message("s", "sleep 10", "long"),
        )
        assert trio.current_time() - start == pytest.approx(2.5, abs=0.1)
        assert response.status_code == 202, response.text
        assert without_times(response.json()) == {
            "run_id": "long",
            "session_id": "s",
            "state": "active",
        }
        done = await http.get("/v1/runs/long/wait", params={"timeout": "30"})
        assert done.status_code == 200
        assert done.json()["state"] == "completed"


async def test_without_wait_a_submission_answers_as_before(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        response = await http.post(f"/v1/workspaces/{ws}/messages", json=message("s", "x", "a"))
        assert (response.status_code, response.json()) == (202, {"run_id": "a"})
        zero = await http.post(
            f"/v1/workspaces/{ws}/messages", params={"wait": "0"}, json=message("s", "y", "b")
        )
        assert zero.status_code in (200, 202)
        assert zero.json()["run_id"] == "b"


@pytest.mark.parametrize(
    "query",
    [
        "wait=1_0",
        "wait=61",
        "wait=-1",
        "wait=nan",
        "wait=inf",
        "wait=",
        "wait=+5",
        "wait=%205",
        "wait=5&x=1",
        "timeout=5",
    ],
)
async def test_a_bad_wait_is_refused_and_accepts_nothing(
    autojump_clock, tmp_path: Path, query: str
):
    async with app_client(tmp_path) as (http, service):
        ws = await workspace(http)
        response = await http.post(
            f"/v1/workspaces/{ws}/messages?{query}", json=message("s", "x", "r")
        )
        assert_error(response, 422, "invalid_query")
        assert_error(await http.get("/v1/runs/r"), 404, "run_not_found")
        assert service.backend.ledger.statistics().accepted_total == 0


async def test_submit_and_wait_refuses_like_a_submission(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        url = f"/v1/workspaces/{ws}/messages?wait=1"
        assert (await http.post(url, json=message("s", "x", "r"))).status_code == 200
        assert_error(await http.post(url, json=message("s", "x", "r")), 409, "duplicate_run")
        assert_error(await http.post(url, json=message("s", " ")), 422, "empty_prompt")
        missing = "/v1/workspaces/00000000-0000-0000-0000-000000000000/messages?wait=1"
        assert_error(await http.post(missing, json=message("s", "x")), 404, "workspace_not_found")


# -- batches ------------------------------------------------------------------------------------


async def test_a_batch_streams_acceptances_then_each_terminal_once(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        taken = await http.post(f"/v1/workspaces/{ws}/messages", json=message("s", "x", "old"))
        assert taken.status_code == 202
        batch = [
            message("a", "sleep 3", "slow"),
            message("b", "fast", "quick"),
            message("c", "dup", "old"),
            message("d", "minted"),
            message("e", "again", "quick"),
        ]
        response = await http.post(f"/v1/workspaces/{ws}/batches", json={"messages": batch})
        got = lines(response)
        head, tail = got[: len(batch)], got[len(batch) :]
        assert [line["index"] for line in head] == [0, 1, 2, 3, 4]
        assert [line["kind"] for line in head] == [
            "accepted",
            "accepted",
            "refused",
            "accepted",
            "refused",
        ]
        assert head[0]["run_id"] == "slow"
        assert head[1]["run_id"] == "quick"
        assert head[2] == {
            "kind": "refused",
            "index": 2,
            "run_id": "old",
            "status": 409,
            "error": head[2]["error"],
        }
        assert head[2]["error"]["code"] == "duplicate_run"
        assert head[4]["error"]["code"] == "duplicate_run"
        minted = head[3]["run_id"]
        assert minted
        assert all(line["kind"] == "ended" for line in tail)
        # One terminal per accepted run, exactly once, in the order they ended (slow last).
        assert sorted(line["index"] for line in tail) == [0, 1, 3]
        assert tail[-1]["index"] == 0
        runs = {line["run"]["run_id"]: line["run"] for line in tail}
        assert set(runs) == {"slow", "quick", minted}
        assert runs["slow"]["state"] == "completed"
        assert runs[minted]["session_id"] == "d"
        assert runs[minted]["terminal"]["result"] == "minted"


async def test_a_malformed_item_refuses_the_whole_batch(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, service):
        ws = await workspace(http)
        url = f"/v1/workspaces/{ws}/batches"
        cases = [
            ([message("s", "ok", "r1"), message("s", "", "r2")], "empty_prompt", "messages[1]"),
            ([message("s", "ok", "r1"), message("s", "x", "a/b")], "invalid_run_id", "messages[1]"),
            ([message(" ", "ok", "r1")], "session_missing", "messages[0]"),
            ([message("s", "ok", "r1"), {"session_id": "s"}], "invalid_request", ""),
            ([message("s", "ok", "r1"), {**message("s", "x"), "z": 1}], "invalid_request", ""),
            ([], "invalid_request", ""),
            ([message("s", "x")] * (MAX_BATCH_ITEMS + 1), "invalid_request", ""),
        ]
        for items, code, where in cases:
            text = assert_error(await http.post(url, json={"messages": items}), 422, code)
            assert where in text
        assert_error(await http.post(url, json=[message("s", "x")]), 422, "invalid_request")
        assert_error(await http.post(url, json={"messages": [], "x": 1}), 422, "invalid_request")
        assert_error(await http.post(url, content=b"{", headers=JSON), 400, "malformed_json")
        assert_error(await http.post(url, content=b"{}"), 415, "unsupported_media_type")
        big = {"messages": [message("s", "x" * MAX_BODY_BYTES)]}
        assert_error(await http.post(url, json=big), 413, "body_too_large")
        assert_error(await http.post(url + "?wait=1", json={"messages": []}), 422, "invalid_query")
        missing = "/v1/workspaces/00000000-0000-0000-0000-000000000000/batches"
        assert_error(
            await http.post(missing, json={"messages": [message("s", "x")]}),
            404,
            "workspace_not_found",
        )
        assert service.backend.ledger.statistics().accepted_total == 0
        assert_error(await http.get("/v1/runs/r1"), 404, "run_not_found")


async def test_a_batch_answer_is_ascii_and_reads_back_exactly(autojump_clock, tmp_path: Path):
    # Lines are encoded with msgspec where that gives what json writes (ASCII): a result
    # outside ASCII falls back to json's escapes, so no raw U+2028 or NEL cuts a line for a
    # reader that splits lines as str.splitlines does (httpx's aiter_lines among them).
    prompts = ["plain", "caf\u00e9", "line\u2028sep", "nel\u0085", "\U0001f600 emoji"]
    async with app_client(tmp_path) as (http, _):
        ws = await workspace(http)
        batch = [message(f"s{i}", prompt) for i, prompt in enumerate(prompts)]
        response = await http.post(f"/v1/workspaces/{ws}/batches", json={"messages": batch})
        assert response.status_code == 200
        assert response.content.isascii()
        got = [decode_batch_line(line) for line in response.text.splitlines() if line.strip()]
        assert len(got) == 2 * len(prompts)
        ended = {line.index: line.terminal for line in got if line.kind == "ended"}
        assert {i: t.result for i, t in ended.items() if t is not None} == dict(enumerate(prompts))


async def test_runs_already_ended_go_out_with_the_acceptances(autojump_clock, tmp_path: Path):
    # A run whose terminal is visible when the answer starts costs no task and no write of
    # its own: its ended line leaves with the acceptances, and a batch of such runs is one
    # body message. Runs still going follow, each exactly once.
    async with app_client(tmp_path) as (_, service):
        ws_id = (await service.create_workspace(CreateWorkspace("w")))[0].id
        done = SubmitBatch([SubmitMessage(f"s{i}", "x", f"d{i}") for i in range(3)])
        assert await service.submit_batch(ws_id, done) == ["d0", "d1", "d2"]
        for i in range(3):
            await service.backend.wait_run(f"d{i}")
        mixed = SubmitBatch(
            [
                SubmitMessage("t", "sleep 2", "slow"),
                SubmitMessage("s0", "x", "d0"),  # taken: refused
                SubmitMessage("u", "y", "quick"),
            ]
        )
        mixed_results = await service.submit_batch(ws_id, mixed)
        with trio.fail_after(TIMEOUT):
            await service.backend.wait_run("quick")

        async def answer(
            results: list[str | ApiError], run_ids: list[str | None]
        ) -> list[tuple[list[dict[str, Any]], bool]]:
            sent: list[tuple[list[dict[str, Any]], bool]] = []

            async def receive() -> dict[str, Any]:
                await trio.sleep_forever()
                raise AssertionError  # pragma: no cover

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body":
                    body = message["body"].decode()
                    items = [json.loads(line) for line in body.splitlines() if line.strip()]
                    sent.append((items, message["more_body"]))

            stream = BatchStream(service, results, run_ids, heartbeat=30.0, dumps=_dumps)
            with trio.fail_after(TIMEOUT):
                await stream(scope={}, receive=receive, send=send)  # type: ignore[arg-type]
            return sent

        one = await answer(["d0", "d1", "d2"], ["d0", "d1", "d2"])
        assert len(one) == 1
        assert one[0][1] is False
        kinds = [(item["kind"], item["index"]) for item in one[0][0]]
        assert kinds == [(kind, i) for kind in ("accepted", "ended") for i in range(3)]

        two = await answer(mixed_results, ["slow", "d0", "quick"])
        first, last = two[0], two[-1]
        assert [(i["kind"], i["index"]) for i in first[0]] == [
            ("accepted", 0),
            ("refused", 1),
            ("accepted", 2),
            ("ended", 2),
        ]
        assert first[1] is True
        assert last[1] is False
        later = [item for items, _ in two[1:] for item in items]
        assert [(i["kind"], i["index"]) for i in later] == [("ended", 0)]
        assert later[0]["run"]["terminal"]["result"] == "sleep 2"


async def test_lines_ending_close_together_leave_in_one_message(autojump_clock, tmp_path: Path):
    # Runs ending within GATHER_SECONDS of one another share a write; a run ending later
    # still gets its line as it ends (streamed, not held for the batch), and the last line
    # ends the body at once.
    async with app_client(tmp_path) as (_, service):
        ws_id = (await service.create_workspace(CreateWorkspace("w")))[0].id
        gap = GATHER_SECONDS / 2
        batch = SubmitBatch(
            [
                SubmitMessage("a", "sleep 1", "r0"),
                SubmitMessage("b", f"sleep {1 + gap}", "r1"),
                SubmitMessage("c", "sleep 3", "r2"),
            ]
        )
        results = await service.submit_batch(ws_id, batch)
        start = trio.current_time()
        sent: list[tuple[float, list[int], bool]] = []

        async def receive() -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                body = message["body"].decode()
                ended = [json.loads(x)["index"] for x in body.splitlines() if '"ended"' in x]
                sent.append((trio.current_time() - start, ended, message["more_body"]))

        stream = BatchStream(service, results, ["r0", "r1", "r2"], heartbeat=30.0, dumps=_dumps)
        with trio.fail_after(TIMEOUT):
            await stream(scope={}, receive=receive, send=send)  # type: ignore[arg-type]
        assert [(ended, more) for _, ended, more in sent] == [
            ([], True),
            ([0, 1], True),
            ([2], False),
        ]
        assert 1 <= sent[1][0] <= 1 + 2 * GATHER_SECONDS
        assert 3 <= sent[2][0] < 3 + GATHER_SECONDS


def _dumps(body: object) -> bytes:
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def test_a_line_is_what_json_writes_whichever_encoder_wrote_it():
    plain = {"kind": "ended", "index": 1, "run": {"result": [1, 2.5, -0.0, 10**30, None, True]}}
    for fast in (True, False):
        line = encode_line(plain, plain=fast)
        assert json.loads(line) == plain
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        for text in ["caf\u00e9", "a\u2028b", "\ud800 lone surrogate"]:
            body = {"kind": "ended", "index": 0, "run": {"result": text}}
            line = encode_line(body, plain=fast)
            assert line == _dumps(body) + b"\n"
            assert line.isascii()
            assert json.loads(line)["run"]["result"] == text
    # Not JSON, and not declared plain: refused by the strict encoder, never converted.
    for bad in [{1, 2}, b"x", float("nan")]:
        with pytest.raises((TypeError, ValueError)):
            encode_line({"kind": "ended", "index": 0, "run": {"result": bad}})


def test_a_terminal_is_encoded_fast_only_when_plain():
    # What the batch sends for a terminal is json's text whichever way it was encoded, and
    # only a terminal whose result is a scalar or a flat container goes the fast way.
    results: list[object] = [
        "s",
        7,
        10**40,
        2.5,
        None,
        True,
        {"a": 1, "b": "x"},
        [1, "two", 3.0],
        {"deep": {"er": [1]}},
        list(range(100)),
    ]
    fast = []
    for i, result in enumerate(results):
        rc = RunComplete("s", f"r{i}", result=result, ended_at=1.5, labels={"k": "v"})
        fast.append(batch_is_plain(rc))
        body = {"kind": "ended", "index": i, "run": {"terminal": rc.to_dict()}}
        assert encode_line(body, plain=fast[-1]) == _dumps(body) + b"\n"
    assert fast == [True] * 8 + [False, False]
    assert not batch_is_plain(RunComplete("s", "r", result=1, ended_at=float("nan")))
    assert not batch_is_plain(RunComplete("s", "r", result=1, labels={"k": 1}))  # type: ignore[dict-item]


JSON = {"content-type": "application/json"}


async def test_a_batch_is_answered_only_once_durable(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (_, service):
        ws_id = (await service.create_workspace(CreateWorkspace("w")))[0].id
        ledger = service.backend.ledger
        flushed = trio.Event()
        real_flush = ledger.flush

        async def gated_flush() -> None:
            await flushed.wait()
            await real_flush()

        ledger.flush = gated_flush  # type: ignore[method-assign]
        answered = False

        async def submit() -> None:
            nonlocal answered
            batch = SubmitBatch([SubmitMessage("s", "x", "r1"), SubmitMessage("s", "y", "r2")])
            assert await service.submit_batch(ws_id, batch) == ["r1", "r2"]
            answered = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            await trio.sleep(5)
            assert not answered
            flushed.set()
        assert answered


async def test_a_batch_the_store_cannot_make_durable_is_a_503(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (_, service):
        ws_id = (await service.create_workspace(CreateWorkspace("w")))[0].id

        async def failing_flush() -> None:
            raise StoreError("disk full")

        service.backend.ledger.flush = failing_flush  # type: ignore[method-assign]
        batch = SubmitBatch([SubmitMessage("s", "x", "r1")])
        with pytest.raises(ApiError) as info:
            await service.submit_batch(ws_id, batch)
        assert (info.value.status, info.value.code) == (503, "store_unavailable")


async def test_a_batch_during_shutdown_is_refused_whole(autojump_clock, tmp_path: Path):
    async with app_client(tmp_path) as (http, service):
        ws = await workspace(http)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.shutdown, 0.0)
            while not service.draining:
                await trio.sleep(0)
            response = await http.post(
                f"/v1/workspaces/{ws}/batches", json={"messages": [message("s", "x", "r")]}
            )
            assert_error(response, 503, "shutting_down")


# -- over real sockets: RunsClient, and a reader that stops ------------------------------------

REAL_TIMEOUT = 60.0  # real seconds, per test
WRITE_TIMEOUT = 1.0
SLACK = 5.0
BIG = 2_000_000  # characters of one "big" result: a few overflow any socket buffering


async def big_agent(call: RunCall, ctx: RunContext) -> object:
    word, _, seconds = call.prompt.partition(" ")
    await trio.sleep(float(seconds) if word == "sleep" else 0.01)
    return "x" * BIG if call.prompt == "big" else call.prompt


def serving(tmp_path: Path, body: Any, **options: Any) -> float:
    """Run ``body(server)`` against a fresh server; the real seconds its shutdown took."""
    took = 0.0

    async def main() -> None:
        nonlocal took
        with trio.fail_after(REAL_TIMEOUT):
            async with trio.open_nursery() as nursery:
                opts = ServeOptions(
                    port=0, workspace_root=str(tmp_path), drain=0.2, close_grace=1.0, **options
                )
                factory = SessionCoordinator.factory(big_agent)
                server: RunningServer = await nursery.start(
                    partial(serve, opts, coordinator_factory=factory)
                )
                try:
                    await body(server)
                finally:
                    server.request_shutdown()
                    start = trio.current_time()
            took = trio.current_time() - start

    trio.run(main)
    return took


class Counting(httpx.AsyncBaseTransport):
    """Counts requests by path; loses the answer to the first request to ``lose`` (if any)."""

    def __init__(self, lose: str = "") -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []
        self.lose = lose

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        response = await self.inner.handle_async_request(request)
        if self.lose and request.url.path.endswith(self.lose):
            self.lose = ""
            await response.aclose()
            raise httpx.ReadError("connection reset before the answer arrived")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_run_prompt_is_one_request_when_the_run_ends_in_time(tmp_path: Path):
    async def body(server: RunningServer) -> None:
        transport = Counting()
        async with RunsClient(server.url, transport=transport, timeout=4.0) as client:
            ws = (await client.create_workspace("w")).id
            transport.paths.clear()
            terminal = await client.run_prompt(ws, "s", "hello", "r1")
            assert (terminal.outcome, terminal.result) == ("completed", "hello")
            assert transport.paths == [f"/v1/workspaces/{ws}/messages"]
            # A run longer than a poll (2 s here): the one request, then /wait.
            terminal = await client.run_prompt(ws, "s", "sleep 2.5", "r2")
            assert terminal.outcome == "completed"
            assert transport.paths[1] == f"/v1/workspaces/{ws}/messages"
            assert set(transport.paths[2:]) == {"/v1/runs/r2/wait"}

    serving(tmp_path, body)


def test_run_prompt_reattaches_after_a_lost_answer(tmp_path: Path):
    async def body(server: RunningServer) -> None:
        transport = Counting(lose="/messages")
        async with RunsClient(server.url, transport=transport) as client:
            ws = (await client.create_workspace("w")).id
            terminal = await client.run_prompt(ws, "s", "once", "rid")
            assert terminal.result == "once"
            assert transport.paths.count(f"/v1/workspaces/{ws}/messages") == 2
            # Not a retry: a second submission with a taken id is refused.
            with pytest.raises(ClientError, match="duplicate_run"):
                await client.run_prompt(ws, "s", "once", "rid")
        assert server.service.backend.ledger.statistics().accepted_total == 1

    serving(tmp_path, body)


def test_run_batch_collects_every_terminal_once(tmp_path: Path):
    async def body(server: RunningServer) -> None:
        async with RunsClient(server.url) as client:
            ws = (await client.create_workspace("w")).id
            await client.submit(ws, "s", "taken", "old")
            seen: list[int] = []
            messages = [(f"s{i % 3}", f"p{i}", f"b{i}") for i in range(20)]
            messages.append(("s", "dup", "old"))
            results = await client.run_batch(ws, messages, on_terminal=lambda i, _: seen.append(i))
            assert sorted(seen) == list(range(20))
            for i in range(20):
                result = results[i]
                assert isinstance(result, RunComplete)
                assert (result.run_id, result.result) == (f"b{i}", f"p{i}")
            refused = results[20]
            assert isinstance(refused, ClientError)
            assert (refused.status, refused.code) == (409, "duplicate_run")
        assert server.service.backend.ledger.statistics().accepted_total == 21

    serving(tmp_path, body)


def test_run_batch_sends_again_when_its_acceptances_were_lost(tmp_path: Path):
    async def body(server: RunningServer) -> None:
        transport = Counting(lose="/batches")
        async with RunsClient(server.url, transport=transport) as client:
            ws = (await client.create_workspace("w")).id
            messages = [("s", f"p{i}", f"r{i}") for i in range(5)]
            results = await client.run_batch(ws, messages)
            assert [r.result for r in results if isinstance(r, RunComplete)] == [
                f"p{i}" for i in range(5)
            ]
            assert transport.paths.count(f"/v1/workspaces/{ws}/batches") == 2
        assert server.service.backend.ledger.statistics().accepted_total == 5

    serving(tmp_path, body)


async def stalled_batch(url: str, ws: str, messages: list[dict[str, Any]]) -> Any:
    """A socket that posts a batch and then never reads."""
    parsed = httpx.URL(url)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    await sock.connect((parsed.host, parsed.port))
    await sock.send(batch_request(parsed.host, ws, messages))
    return sock


def batch_request(host: str, ws: str, messages: list[dict[str, Any]]) -> bytes:
    payload = json.dumps({"messages": messages}).encode()
    head = (
        f"POST /v1/workspaces/{ws}/batches HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def test_a_batch_reader_that_stops_never_holds_the_server_or_its_shutdown(tmp_path: Path):
    got = 0
    opened: list[Any] = []

    async def body(server: RunningServer) -> None:
        nonlocal got
        async with RunsClient(server.url) as client:
            ws = (await client.create_workspace("w")).id
            parsed = httpx.URL(server.url)
            big = [{"session_id": f"s{i}", "prompt": "big", "run_id": f"b{i}"} for i in range(6)]
            with await stalled_batch(server.url, ws, big) as sock:
                ledger = server.service.backend.ledger
                while ledger.session_of("b5") is None and ledger.get("b5") is None:
                    await trio.sleep(0.01)  # until accepted (bounded by REAL_TIMEOUT)
                for i in range(6):
                    assert (await client.wait_terminal(f"b{i}")).outcome == "completed"
                # The stalled write is cut within the write timeout: the connection ends
                # (a stream still open would hold it, kept alive, once drained).
                await trio.sleep(WRITE_TIMEOUT + 1)
                with trio.fail_after(SLACK):
                    try:
                        while chunk := await sock.recv(1 << 20):
                            got += len(chunk)
                    except ConnectionResetError:
                        pass
            # A long batch, never read, open through shutdown: it does not hold shutdown.
            long = [{"session_id": "z", "prompt": "sleep 30", "run_id": "long"}]
            # A plain socket (closed after trio.run), connecting and sending at once.
            plain = socket.create_connection((parsed.host, parsed.port), timeout=SLACK)
            opened.append(plain)
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            plain.sendall(batch_request(parsed.host, ws, long))
            while ledger.session_of("long") is None:
                await trio.sleep(0.01)
            assert (await client.wait("long", 0.5)).state == "active"

    try:
        took = serving(tmp_path, body, write_timeout=WRITE_TIMEOUT)
    finally:
        for sock in opened:
            sock.close()
    assert got < 6 * BIG  # cut off, not delivered
    assert took < 1.0 + 0.2 + ServeOptions().graceful_timeout + SLACK


# -- trio-runs run: Ctrl-C while its one request is still out ----------------------------------


def test_ctrl_c_during_the_one_request_cancels_only_that_run(spawned, tmp_path: Path):
    spawn = spawned
    # --timeout 20: the one request waits up to 10 s, so the interrupt surely comes while it
    # is out (the client has not been told the run was accepted yet).
    server = e2e.serve(spawn, tmp_path)
    args = ["run", "--server", server.url, "--session", "a", "--timeout", "20"]
    running = e2e.client(spawn, *args, "--run-id", "mine", "sleep 30")
    server.wait_state("mine", "active")
    behind = e2e.client(spawn, *args, "--run-id", "next", "-q", "queued behind")
    server.wait_state("next", "queued")
    running.proc.send_signal(signal.SIGINT)
    assert running.finish(bound=e2e.EXIT_BOUND).code == 3, running.err
    assert "cancelling run mine" in running.err
    assert server.http.get("/v1/runs/mine").json()["state"] == "cancelled"
    assert behind.finish(bound=e2e.EXIT_BOUND).code == 0, behind.err
    assert behind.out == "queued behind\n"


# -- the published schema and the server agree ------------------------------------------------

DOC = openapi_document()
BATCH_SCHEMA = jsonschema_rs.validator_for(
    {
        **DOC["paths"]["/v1/workspaces/{workspace_id}/batches"]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"],
        "components": DOC["components"],
    }
)
_values = st.text(max_size=6) | st.sampled_from(["", " ", "a/b", ".."]) | st.none() | st.integers()
_good = st.fixed_dictionaries(
    {"session_id": st.sampled_from(["s", "t"]), "prompt": st.sampled_from(["p", "q r"])},
    optional={"run_id": st.sampled_from(["r1", "r2", None])},
)
_messages = _good | st.fixed_dictionaries(
    {}, optional={"run_id": _values, "session_id": _values, "prompt": _values, "extra": _values}
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "messages": st.lists(_messages, max_size=4) | _values,
            "other": _values,
        },
    )
)
def test_a_batch_is_schema_valid_exactly_when_the_server_decodes_it(body: dict[str, Any]):
    status = 200
    try:
        decode_batch(json.dumps(body).encode(), "application/json")
    except ApiError as error:
        status = error.status
    assert status in {200, 422}
    assert BATCH_SCHEMA.is_valid(body) == (status == 200), body


# -- the client's decoding of a batch's lines ------------------------------------------------


def legacy_line(text: str) -> tuple[str, int, RunComplete | ClientError | None]:
    """What the client did before its msgspec fast path: the reference it must agree with."""
    line = json.loads(text)
    kind, index = line["kind"], int(line["index"])
    if kind == "ended":
        return kind, index, RunComplete.from_dict(line["run"]["terminal"])
    if kind == "refused":
        error = line["error"]
        return (
            kind,
            index,
            ClientError(int(line["status"]), str(error["code"]), str(error["message"])),
        )
    return kind, index, None


def outcome(decode: Any, text: str) -> tuple[str, ...]:
    # Type-exact: json's text of the terminal tells 1 from 1.0 from true.
    try:
        kind, index, item = decode(text)
    except (ValueError, KeyError, TypeError) as exc:
        return ("raised", "ValueError" if isinstance(exc, ValueError) else type(exc).__name__)
    if isinstance(item, RunComplete):
        return (kind, str(index), json.dumps(item.to_dict()))
    if isinstance(item, ClientError):
        return (kind, str(index), repr((item.status, item.code, item.message)))
    return (kind, str(index))


def fast_line(text: str) -> tuple[str, int, RunComplete | ClientError | None]:
    line = decode_batch_line(text)
    return line.kind, line.index, line.terminal if line.kind == "ended" else line.refusal


_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
_time = st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40)
_terminal = st.fixed_dictionaries(
    {"session_id": st.text(max_size=3) | _json, "run_id": st.text(max_size=3) | _json},
    optional={
        "result": _json,
        "error": st.none() | st.text(max_size=3) | _json,
        "cancelled": st.booleans() | _json,
        "abandoned": st.booleans() | _json,
        "timed_out": st.booleans() | _json,
        "reason": st.none() | st.sampled_from(sorted(END_REASONS)) | _json,
        "accepted_at": _time | _json,
        "started_at": _time,
        "ended_at": _time,
        "attempt": st.integers(-1, 3) | _json,
        "labels": st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2) | _json,
        "unknown": _json,
    },
)
_line = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["ended", "accepted", "refused", "future"]),
        "index": st.integers(0, 3),
    },
    optional={
        "run": st.fixed_dictionaries(
            {"run_id": st.text(max_size=2)}, optional={"terminal": _terminal}
        )
        | _json,
        "run_id": st.text(max_size=2),
        "status": st.integers(400, 599) | st.sampled_from(["409"]) | _json,
        "error": st.fixed_dictionaries(
            {"code": st.text(max_size=3), "message": st.text(max_size=3)}
        )
        | _json,
    },
)


@settings(max_examples=500, deadline=None)
@given(line=_line, special=st.sampled_from(["", "\u2028", "\ud800", "1e999", "NaN"]))
def test_the_client_decodes_a_batch_line_exactly_as_it_always_did(
    line: dict[str, Any], special: str
):
    # The msgspec fast path accepts and refuses exactly what json.loads + from_dict did, and
    # decodes to the same values, whatever the line (odd types, unknown fields and kinds, an
    # escaped lone surrogate, numbers JSON cannot hold exactly).
    text = json.dumps(line)
    if special in ("1e999", "NaN") and "run" in line and isinstance(line["run"], dict):
        text = text.replace('"run_id"', f'"x": {special}, "run_id"', 1)
    elif special:
        text = text.replace('"kind"', f'"note": "{special}", "kind"', 1)
    assert outcome(fast_line, text) == outcome(legacy_line, text), text


def test_a_well_formed_line_decodes_straight_into_its_terminal():
    rc = RunComplete(
        "s", "r", result={"a": [1, 2.5]}, error=None, ended_at=3.0, attempt=2, labels={"k": "v"}
    )
    text = json.dumps({"kind": "ended", "index": 4, "run": {"terminal": rc.to_dict(), "x": 1}})
    line = decode_batch_line(text)
    assert (line.kind, line.index) == ("ended", 4)
    assert line.terminal is not None
    assert line.terminal.to_dict() == rc.to_dict()
    refused = decode_batch_line(
        '{"kind":"refused","index":1,"run_id":"r","status":409,'
        '"error":{"code":"duplicate_run","message":"taken"}}'
    )
    assert refused.refusal is not None
    assert (refused.refusal.status, refused.refusal.code) == (409, "duplicate_run")
    with pytest.raises(ValueError, match="unknown end reason"):
        decode_batch_line(text.replace('"attempt"', '"reason": "bogus", "attempt"'))
