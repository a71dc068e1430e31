"""One identifier rule for the library and the service (DESIGN.md, "Service limits").

Every run and session id the API accepts is addressable by every route that takes it, or it
is refused at submission: by the library with a typed error, over HTTP with a typed 422.
Control characters and lone surrogates are refused in ids, prompts and workspace paths.

The HTTP tests drive the ASGI app in-process (httpx's ASGI transport) on virtual time; the
property test walks every route that takes an id with hypothesis-generated ids, through
:class:`RunsClient`, whose percent-encoding of path segments is part of what is tested.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    InvalidRunId,
    InvalidSessionId,
    RunLedger,
    SessionCoordinator,
    SessionMissing,
    open_backend,
)
from trio_runs._validation import is_valid_id
from trio_runs.agents import demo
from trio_runs.http.app import create_app
from trio_runs.http.client import ClientError, RunsClient
from trio_runs.http.service import RunService

TIMEOUT = 60  # virtual seconds

# Ids that broke routing or were let through before the rule: dot segments (clients
# normalise them away), '/' (no route matches an encoded slash), control characters.
UNROUTABLE = [".", "..", "a/b", "/", "../x", "a/..", "\x00", "a\r\nb", "tab\t", "\x7f", "\x85"]
NOT_TEXT = ["\ud800", "a\udfffb"]  # lone surrogates: not Unicode text
WHITESPACE = [" ", "a b", "\u00a0", "\u2028", "\u3000x", ""]
# Awkward but fine: every route reaches them once the client percent-encodes its segments.
AWKWARD = [
    "...",
    ".a",
    "a.",
    "%2F",
    "%",
    "a%20b",
    "?",
    "a?b=c",
    "#frag",
    "\\",
    "+",
    "é",
    "😀",
    "\ufeff",
    "\u200b",
    "a;b",
    "~",
    "x" * 256,
]


# -- the library ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", UNROUTABLE + NOT_TEXT + WHITESPACE[:-1] + ["x" * 257])
async def test_the_library_refuses_run_ids_no_route_could_reach(
    backend: Backend, tmp_path: Path, autojump_clock: object, run_id: str
):
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    with pytest.raises(InvalidRunId):
        backend.send_message(ws.id, AgentMessage("s", "hello", run_id))
    assert backend.ledger.pending_run_ids() == []


@pytest.mark.parametrize("session_id", UNROUTABLE + NOT_TEXT + WHITESPACE[1:-1] + ["x" * 257])
async def test_the_library_refuses_session_ids_no_route_could_reach(
    backend: Backend, tmp_path: Path, autojump_clock: object, session_id: str
):
    # A whitespace-only one ('\x85', '\u2028') is blank: SessionMissing, as ever.
    expected = InvalidSessionId if session_id.strip() else SessionMissing
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    with pytest.raises(expected) as info:
        backend.send_message(ws.id, AgentMessage(session_id, "hello"))
    assert isinstance(info.value, ValueError)
    if isinstance(info.value, InvalidSessionId):
        assert info.value.session_id == session_id
    assert backend.ledger.pending_run_ids() == []


@pytest.mark.parametrize("session_id", ["", " ", "\t\n"])
async def test_a_blank_session_is_still_session_missing(
    backend: Backend, tmp_path: Path, autojump_clock: object, session_id: str
):
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    with pytest.raises(SessionMissing):
        backend.send_message(ws.id, AgentMessage(session_id, "hello"))


@pytest.mark.parametrize("an_id", AWKWARD)
async def test_awkward_ids_are_accepted(
    backend: Backend, tmp_path: Path, autojump_clock: object, an_id: str
):
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    assert backend.send_message(ws.id, AgentMessage(an_id, "hello", an_id)) == an_id
    with trio.fail_after(TIMEOUT):
        assert (await backend.wait_run(an_id)).session_id == an_id


@pytest.mark.parametrize("prompt", ["a\x00b", "\x00", "a\ud800", "\udc00 b"])
async def test_prompts_with_nul_or_lone_surrogates_are_refused(
    backend: Backend, tmp_path: Path, autojump_clock: object, prompt: str
):
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    with pytest.raises(ValueError, match="prompt"):
        backend.send_message(ws.id, AgentMessage("s", prompt))
    assert backend.ledger.pending_run_ids() == []


@pytest.mark.parametrize("prompt", ["two\nlines", "tab\tand\r\nCRLF", "bell\x07", "é 😀"])
async def test_prompts_are_text_other_control_characters_are_fine(
    backend: Backend, tmp_path: Path, autojump_clock: object, prompt: str
):
    ws = await backend.create_workspace(tmp_path, demo.coordinator_factory)
    run_id = backend.send_message(ws.id, AgentMessage("s", prompt))
    with trio.fail_after(TIMEOUT):
        assert (await backend.wait_run(run_id)).outcome == "completed"


@pytest.mark.parametrize("session_id", ["a/b", "..", "\x00"])
async def test_the_in_process_coordinator_shares_the_rule(autojump_clock: object, session_id: str):
    coordinator = SessionCoordinator(demo, run_completions=Broker(), ledger=RunLedger())
    with pytest.raises(InvalidSessionId):
        await coordinator.run(session_id, "hello")
    with pytest.raises(InvalidRunId):
        await coordinator.run("s", "hello", run_id=session_id)


@pytest.mark.parametrize("path", ["a\x00b", "a\nb", "dir\x1b[31m", "\x85", "a\ud800"])
async def test_workspace_paths_with_control_characters_or_surrogates_are_refused(
    backend: Backend, tmp_path: Path, autojump_clock: object, path: str
):
    with pytest.raises(ValueError, match="path"):
        await backend.create_workspace(tmp_path / path, demo.coordinator_factory)
    assert backend.workspaces == []


# -- over HTTP, in-process ------------------------------------------------------------------


@asynccontextmanager
async def api(root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, RunsClient, str]]:
    """The app on a fresh backend: a raw httpx client, a RunsClient and a workspace id."""
    async with open_backend() as backend:
        service = RunService(backend, demo.coordinator_factory, workspace_root=root)
        transport = httpx.ASGITransport(app=create_app(service))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
            RunsClient("http://test", transport=transport, timeout=30) as client,
        ):
            ws = (await client.create_workspace("w")).id
            yield http, client, ws
        await service.shutdown(0)


async def post_json(http: httpx.AsyncClient, url: str, body: object) -> httpx.Response:
    # json.dumps escapes lone surrogates (httpx's own encoder would fail on them).
    content = json.dumps(body).encode()
    return await http.post(url, content=content, headers={"content-type": "application/json"})


def on_virtual_time(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` under ``trio.run`` on an autojumping clock, bounded."""

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        *[("run_id", v, "invalid_run_id") for v in UNROUTABLE + NOT_TEXT + WHITESPACE],
        *[
            ("session_id", v, "invalid_session_id" if v.strip() else "session_missing")
            for v in UNROUTABLE + NOT_TEXT
        ],
        ("session_id", "a b", "invalid_session_id"),
        ("session_id", " ", "session_missing"),
        ("session_id", "", "session_missing"),
        ("prompt", "a\x00b", "invalid_prompt"),
        ("prompt", "a\ud800", "invalid_prompt"),
        ("prompt", " \n", "empty_prompt"),
    ],
)
def test_a_submission_with_an_unusable_value_is_a_typed_422(
    tmp_path: Path, field: str, value: str, code: str
):
    async def main() -> None:
        async with api(tmp_path) as (http, _, ws):
            body = {"session_id": "s", "prompt": "hello", "run_id": "r", field: value}
            response = await post_json(http, f"/v1/workspaces/{ws}/messages", body)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == code
            assert (await http.get("/v1/runs/r")).status_code == 404

    on_virtual_time(main)


@pytest.mark.parametrize("path", ["a\x00b", "a\nb", "dir\x1b[31m", "\x85", "a\ud800", " "])
def test_a_workspace_path_with_control_characters_is_a_422(tmp_path: Path, path: str):
    async def main() -> None:
        async with api(tmp_path) as (http, _, _ws):
            response = await post_json(http, "/v1/workspaces", {"path": path})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "invalid_request"
            assert len((await http.get("/v1/workspaces")).json()["workspaces"]) == 1

    on_virtual_time(main)


@pytest.mark.parametrize(
    "timeout", ["1_0", "+5", " 5", "5 ", "nan", "inf", "-inf", "1e999", "0x10", "\u0661", "5s", ""]
)
def test_wait_timeouts_are_parsed_strictly(tmp_path: Path, timeout: str):
    async def main() -> None:
        async with api(tmp_path) as (http, client, ws):
            await client.submit(ws, "s", "hello", "r")
            response = await http.get("/v1/runs/r/wait", params={"timeout": timeout})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "invalid_query"

    on_virtual_time(main)


@pytest.mark.parametrize(("path", "code"), [("/v1/runs/a%20b", "invalid_run_id")])
def test_a_path_id_that_breaks_the_rule_is_a_422(tmp_path: Path, path: str, code: str):
    async def main() -> None:
        async with api(tmp_path) as (http, _, ws):
            for url in (path, f"{path}/wait", f"{path}/cancel"):
                method = "POST" if url.endswith("cancel") else "GET"
                response = await http.request(method, url)
                assert response.status_code == 422, response.text
                assert response.json()["error"]["code"] == code
            session = f"/v1/workspaces/{ws}/sessions/a%0Ab"
            for method, url in (
                ("GET", session),
                ("POST", f"{session}/cancel"),
                ("DELETE", f"{session}/queue"),
            ):
                response = await http.request(method, url)
                assert response.status_code == 422, response.text
                assert response.json()["error"]["code"] == "invalid_session_id"

    on_virtual_time(main)


async def walk(client: RunsClient, ws: str, an_id: str) -> None:
    """Every route that takes a run or session id reaches the run ``an_id`` of session
    ``an_id``, through the client's percent-encoding."""
    view = await client.run(an_id)
    assert (view.run_id, view.session_id) == (an_id, an_id)
    ended = await client.wait(an_id, 5)
    assert ended.terminal is not None
    assert ended.terminal.run_id == an_id
    assert (await client.cancel_run(an_id)).terminal == ended.terminal
    for lane in (
        await client.session(ws, an_id),
        await client.cancel_session(ws, an_id),
        await client.clear_queue(ws, an_id),
    ):
        assert (lane.session_id, lane.busy, lane.queued) == (an_id, False, ())


ids = st.one_of(
    st.sampled_from(UNROUTABLE + NOT_TEXT + WHITESPACE + AWKWARD),
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from("./%?#\\ +;=&:@~é😀\x00\n\ud800"), min_size=1, max_size=6),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(an_id=ids)
@example(an_id="..")
@example(an_id="a/b")
@example(an_id="%2F")
def test_every_accepted_id_is_reachable_by_every_route(tmp_path: Path, an_id: str):
    async def main() -> None:
        async with api(tmp_path) as (http, client, ws):
            body: dict[str, Any] = {"session_id": an_id, "prompt": "hello", "run_id": an_id}
            response = await post_json(http, f"/v1/workspaces/{ws}/messages", body)
            if response.status_code == 422:
                event("refused at submission")
                assert not is_valid_id(an_id)
                assert response.json()["error"]["code"] in {
                    "invalid_run_id",
                    "invalid_session_id",
                    "session_missing",
                }
                return
            assert response.status_code == 202, response.text
            assert is_valid_id(an_id)
            event("accepted, and every route reached it")
            await walk(client, ws, an_id)

    on_virtual_time(main)


def test_the_client_refuses_nothing_the_server_accepts(tmp_path: Path):
    # Submissions through RunsClient: an unusable id comes back as the server's typed 422.
    async def main() -> None:
        async with api(tmp_path) as (_, client, ws):
            for bad in ("..", ".", "a/b"):
                with pytest.raises(ClientError) as info:
                    await client.submit(ws, "s1", "hello", bad)
                assert (info.value.status, info.value.code) == (422, "invalid_run_id")
            with pytest.raises(ClientError) as info:
                await client.submit(ws, "a/b", "hello", "r1")
            assert (info.value.status, info.value.code) == (422, "invalid_session_id")

    on_virtual_time(main)


@pytest.mark.parametrize("an_id", [".", "..", "\udc80"])
def test_the_client_sends_unusable_ids_where_the_server_can_refuse_them(tmp_path: Path, an_id: str):
    # Dot segments used to be dropped by the URL builder (`cancel --run .` reached another
    # route and got a 405; `run --run-id ..` waited on /v1/wait); a lone surrogate crashed
    # the encoder with a UnicodeEncodeError. Each is now a typed 422 about the id.
    surrogate = an_id == "\udc80"

    async def main() -> None:
        async with api(tmp_path) as (_, client, ws):
            run_calls = (client.run, client.cancel_run, client.wait)
            session_calls = (client.session, client.cancel_session, client.clear_queue)
            for call in run_calls:
                with pytest.raises(ClientError) as info:
                    await call(an_id)
                assert info.value.status == 422
                assert info.value.code == ("invalid_request" if surrogate else "invalid_run_id")
            for lane in session_calls:
                with pytest.raises(ClientError) as info:
                    await lane(ws, an_id)
                assert info.value.status == 422
                expected = "invalid_request" if surrogate else "invalid_session_id"
                assert info.value.code == expected

    on_virtual_time(main)
