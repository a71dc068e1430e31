"""No silent conversions: a result or progress payload is a JSON value, or it is refused.

The rule (``trio_runs._encoding``): dicts with str keys, lists, str, int, finite float, bool,
None, nested. A result breaking it makes the run *fail* with an error saying what and where
— the same terminal in-process on every store and over HTTP; a progress payload breaking it
makes ``emit`` raise ``UnencodableValue`` before anything is published. Nothing is ever
converted (a tuple into a list, a set or bytes into their repr).
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import enum
import json
import math
import os
import sys
import textwrap
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from outside_coordinator import LockLaneCoordinator
from test_e2e import START_BOUND, Server, serve, spawn

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    RunStore,
    SessionCoordinator,
    TrioRunsError,
    UnencodableValue,
    Workspace,
    open_backend,
)
from trio_runs._encoding import MAX_DEPTH, check_progress, checked_terminal, json_problem
from trio_runs.http.app import json_response
from trio_runs.redis import open_redis_store
from trio_runs.sqlite import open_sqlite_ledger

__all__ = ["spawn"]  # the fixture, used by name

TIMEOUT = 10
BOUND = 10.0  # real seconds, for the tests on real I/O


class Color(enum.IntEnum):
    RED = 1


class Opaque:
    pass


def nested(depth: int) -> list[Any]:
    """``depth + 1`` lists, each inside the one before (``nested(0) == []``)."""
    top: list[Any] = []
    inner = top
    for _ in range(depth):
        deeper: list[Any] = []
        inner.append(deeper)
        inner = deeper
    return top


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


# -- the rule --------------------------------------------------------------------------------

ACCEPTED = [
    None,
    True,
    False,
    0,
    -7,
    10**40,
    0.0,
    -0.0,
    1.5,
    "",
    'text with "quotes" and \u00e9 and \U0001f600',
    "a lone surrogate \udc80 travels escaped, as is",
    [],
    {},
    [1, "two", 3.0, None, True, [], {}],
    {"a": {"b": [1, {"c": None}]}, "": 0, "key with spaces": [0.25]},
    nested(MAX_DEPTH - 1),
]


@pytest.mark.parametrize("value", ACCEPTED, ids=lambda v: type(v).__name__)
def test_json_values_are_accepted(value: object):
    """Promise: every JSON value passes, and survives a JSON round trip unchanged."""
    assert json_problem(value) is None
    check_progress(value)
    assert json.loads(json.dumps(value, allow_nan=False)) == value


REFUSED = [
    ({1, 2}, "set at $"),
    (frozenset(), "frozenset at $"),
    ((1, 2), "tuple at $"),
    (b"raw", "bytes at $"),
    (bytearray(b"raw"), "bytearray at $"),
    (datetime.datetime(2024, 1, 1), "datetime.datetime at $"),
    (datetime.date(2024, 1, 1), "datetime.date at $"),
    (decimal.Decimal("1.5"), "decimal.Decimal at $"),
    (Color.RED, "test_encoding.Color at $"),
    (OrderedDict(a=1), "collections.OrderedDict at $"),
    (Opaque(), "test_encoding.Opaque at $"),
    (float("nan"), "float nan at $"),
    (float("inf"), "float inf at $"),
    ([float("-inf")], "float -inf at $[0]"),
    ({1: "a"}, "int key 1 at $"),
    ({"by_id": {None: 1}}, "NoneType key None at $.by_id"),
    ({("a", "b"): 1}, "tuple key ('a', 'b') at $"),
    ({"items": [1, 2, {3}]}, "set at $.items[2]"),
    ({"a b": [0, [(1,)]]}, 'tuple at $["a b"][1][0]'),
    ({'q"uote': b""}, 'bytes at $["q\\"uote"]'),
    ([[], {"ok": 1, "when": datetime.date(2024, 1, 1)}], "datetime.date at $[1].when"),
]


@pytest.mark.parametrize(("value", "problem"), REFUSED, ids=lambda v: repr(v)[:30])
def test_other_values_are_refused_with_what_and_where(value: object, problem: str):
    """Promise: anything else is refused, naming the offending value's kind and location."""
    assert json_problem(value) == problem
    with pytest.raises(UnencodableValue) as caught:
        check_progress(value)
    assert str(caught.value) == f"progress payload is not a JSON value: {problem}"
    assert caught.value.problem == problem
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, TrioRunsError)


def test_nesting_past_the_bound_is_refused_without_recursion_error():
    """Promise: a value nested deeper than MAX_DEPTH (however deep) is refused, never a
    RecursionError — also when the caller is itself deep in the stack."""
    problem = json_problem(nested(MAX_DEPTH))
    assert problem is not None
    assert problem.startswith(f"nesting deeper than {MAX_DEPTH} at $[0][0]")
    assert json_problem(nested(100_000)) is not None

    def deep_in_the_stack() -> str | None:
        if stack_depth() < sys.getrecursionlimit() - MAX_DEPTH // 2:
            return deep_in_the_stack()
        return json_problem(nested(MAX_DEPTH - 1))

    problem = deep_in_the_stack()
    assert problem == "nesting too deep to check at $"


def test_a_cycle_is_refused_and_named():
    """Promise: a container holding itself is refused (not followed until the bound)."""
    loop: list[Any] = []
    loop.append(loop)
    assert json_problem(loop) == "a container inside itself (a cycle) at $"
    inner: dict[str, Any] = {}
    inner["back"] = [inner]
    assert json_problem({"a": inner}) == "a container inside itself (a cycle) at $.a"
    shared = [1]
    assert json_problem([shared, shared, {"x": shared}]) is None  # shared is not a cycle


def test_a_key_whose_repr_fails_still_gives_the_problem():
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no")

        def __hash__(self) -> int:
            return 1

    assert json_problem({Unprintable(): 1}) == "test_encoding.Unprintable key (unprintable) at $"


# -- terminals -------------------------------------------------------------------------------


def test_checked_terminal_passes_a_json_result_through_as_the_same_object():
    for rc in [
        RunComplete("s", "r", result={"a": [1, 2.5, None]}),
        RunComplete("s", "r", error="boom"),
        RunComplete("s", "r", cancelled=True),
    ]:
        assert checked_terminal(rc) is rc


def test_checked_terminal_fails_a_run_whose_result_breaks_the_rule_keeping_the_rest():
    """Promise: the failed terminal says what and where, and keeps every other field."""
    rc = RunComplete("s", "r", result={"items": [{1, 2}]})
    failed = checked_terminal(rc)
    assert failed.outcome == "failed"
    assert failed.result is None
    assert failed.error == "result is not a JSON value: set at $.items[0]"
    unchanged = {"result", "error", "cancelled"}
    for field in attrs.fields(RunComplete):
        if field.name not in unchanged:
            assert getattr(failed, field.name) == getattr(rc, field.name), field.name
    timed_out = RunComplete("s", "r", result=b"x", error="timed out", timed_out=True)
    assert checked_terminal(timed_out).error == (
        "result is not a JSON value: bytes at $ (the run's error: timed out)"
    )
    assert checked_terminal(timed_out).timed_out


def test_an_error_that_is_not_a_str_fails_the_run_saying_so():
    rc = RunComplete("s", "r", error=ValueError("x"))  # type: ignore[arg-type]
    assert checked_terminal(rc).error == "error is not a str: ValueError"


# -- in-process: the run fails, on every store ----------------------------------------------

BAD_RESULTS: dict[str, tuple[object, str]] = {
    "set": ({1, 2}, "set at $"),
    "datetime": (datetime.datetime(2024, 1, 1), "datetime.datetime at $"),
    "tuple": ((1, 2), "tuple at $"),
    "bytes": (b"raw", "bytes at $"),
    "nan": (float("nan"), "float nan at $"),
    "int-keys": ({1: "a"}, "int key 1 at $"),
    "nested": (
        {"items": [1, {"when": datetime.date(2024, 1, 1)}]},
        "datetime.date at $.items[1].when",
    ),
}
EXACT = {"a": [1, 2.5, None, True, "é"], "b": {"c": -0.0, "big": 10**30}}


async def returning_agent(call: RunCall, ctx: RunContext) -> object:
    if call.prompt == "exact":
        return EXACT
    return BAD_RESULTS[call.prompt][0]


async def check_every_bad_result_fails_the_run(backend: Backend, path: Path) -> None:
    ws = await backend.create_workspace(path, SessionCoordinator.factory(returning_agent))
    async with ws.run_completions.subscribe() as completions:
        for name, (_, problem) in BAD_RESULTS.items():
            run_id = f"run-{name}"
            backend.send_message(ws.id, AgentMessage(name, name, run_id))
            with trio.fail_after(TIMEOUT):
                rc = await backend.wait_run(run_id)
            assert rc == RunComplete(
                name, run_id, error=f"result is not a JSON value: {problem}"
            ), name
        backend.send_message(ws.id, AgentMessage("exact", "exact", "run-exact"))
        with trio.fail_after(TIMEOUT):
            exact = await backend.wait_run("run-exact")
        assert exact.result == EXACT
        # Exactly once on the fan-out, and that once is the failed terminal.
        seen: list[RunComplete] = []
        with trio.fail_after(TIMEOUT):
            while len(seen) < len(BAD_RESULTS) + 1:
                seen.append((await completions.receive()).payload)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            completions.receive_nowait()
    assert sorted(rc.run_id for rc in seen) == sorted(
        [f"run-{name}" for name in BAD_RESULTS] + ["run-exact"]
    )
    for rc in seen:
        assert rc == await backend.wait_run(rc.run_id)
    assert backend.ledger.statistics().duplicates_suppressed == 0


async def test_a_result_that_is_not_json_fails_the_run(backend, tmp_path, autojump_clock):
    """Promise: {1, 2}, a datetime, a tuple, bytes, NaN, int keys: the run fails with
    ``result is not a JSON value: <what> at <where>``, its terminal delivered once; a JSON
    result arrives exactly as returned (on RunLedger and the protocol-only DictStore)."""
    await check_every_bad_result_fails_the_run(backend, tmp_path)


async def test_a_result_that_is_not_json_fails_the_run_on_sqlite(tmp_path: Path, real_clock):
    """Promise: the same failed terminals on the durable store, also after a reopen."""
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store, open_backend(store) as backend:
        await check_every_bad_result_fails_the_run(backend, tmp_path / "ws")
        with trio.fail_after(BOUND):
            await backend.aclose()
    async with open_sqlite_ledger(db) as store:
        for name, (_, problem) in BAD_RESULTS.items():
            assert store.get(f"run-{name}") == RunComplete(
                name, f"run-{name}", error=f"result is not a JSON value: {problem}"
            )
        exact = store.get("run-exact")
        assert exact is not None
        assert exact.result == EXACT


async def test_sqlite_refuses_rather_than_converts_a_direct_terminal(tmp_path: Path, real_clock):
    """Promise: even a terminal handed to the store directly is never converted (json would
    store a tuple as a list and NaN as a non-JSON literal)."""
    async with open_sqlite_ledger(tmp_path / "runs.db") as store:
        store.accept("t", "s")
        assert store.complete(RunComplete("s", "t", result=[(1, 2)]))
        with trio.fail_after(BOUND):
            rc = await store.wait("t")
    assert rc == RunComplete("s", "t", error="result is not a JSON value: tuple at $[0]")


async def test_coordinator_run_returns_the_failed_terminal_it_recorded(autojump_clock):
    """Promise: what ``SessionCoordinator.run`` returns is what the store holds."""
    ledger = RunLedger()
    coordinator = SessionCoordinator(returning_agent, run_completions=Broker(), ledger=ledger)
    with trio.fail_after(TIMEOUT):
        rc = await coordinator.run("s", "set", run_id="r")
    assert rc.error == "result is not a JSON value: set at $"
    assert ledger.get("r") == rc


class SilentCoordinator(SessionCoordinator):
    """Returns a terminal without recording it: the backend's fallback records it."""

    async def run_accepted(self, accept: Any, call: RunCall) -> RunComplete:
        await trio.lowlevel.checkpoint()
        return RunComplete(call.session_id, call.run_id, result={"when": datetime.date.today()})


async def test_the_backend_fallback_terminal_is_checked_too(backend, tmp_path, autojump_clock):
    """Promise: a terminal the backend records for a coordinator that recorded none goes
    through the same rule."""
    ws = await backend.create_workspace(tmp_path, SilentCoordinator.factory(returning_agent))
    backend.send_message(ws.id, AgentMessage("s", "x", "r"))
    with trio.fail_after(TIMEOUT):
        rc = await backend.wait_run("r")
    assert rc.error == "result is not a JSON value: datetime.date at $.when"


async def tuple_agent(call: RunCall) -> object:
    await trio.lowlevel.checkpoint()
    return (1, 2)


async def test_a_coordinator_recording_terminals_itself_gets_the_same_failure(
    tmp_path: Path, real_clock
):
    """Promise: the package's stores apply the rule themselves, so a coordinator that
    records its terminals directly (``outside_coordinator``) fails the run the same way, in
    memory and on SQLite."""
    for kind in ("memory", "sqlite"):
        async with contextlib.AsyncExitStack() as stack:
            store: RunStore = (
                RunLedger()
                if kind == "memory"
                else await stack.enter_async_context(open_sqlite_ledger(tmp_path / "runs.db"))
            )
            backend = await stack.enter_async_context(open_backend(store))

            def factory(workspace: Workspace) -> LockLaneCoordinator:
                return LockLaneCoordinator(tuple_agent, workspace.ledger, workspace.run_completions)

            ws = await backend.create_workspace(tmp_path / kind, factory)
            backend.send_message(ws.id, AgentMessage("s", "tuple", "r"))
            with trio.fail_after(BOUND):
                rc = await backend.wait_run("r")
                await backend.aclose()
            assert rc == RunComplete("s", "r", error="result is not a JSON value: tuple at $")


async def test_the_redis_store_fails_the_run_rather_than_its_writer(
    redis_url: str, namespace: str, real_clock
):
    """Promise: a terminal handed to the Redis store with a result that is not JSON is
    recorded failed (its writer would otherwise choke on it)."""
    with trio.fail_after(BOUND):
        async with open_redis_store(redis_url, namespace=namespace) as store:
            store.accept("r", "s")
            seen: list[RunComplete] = []
            assert store.complete(RunComplete("s", "r", result={"at": {1.5}}), seen.append)
            rc = await store.wait("r")
    assert rc == RunComplete("s", "r", error="result is not a JSON value: set at $.at")
    assert seen == [rc]


# -- progress ---------------------------------------------------------------------------------


async def test_emit_refuses_a_payload_that_is_not_json_and_the_run_goes_on(
    backend, tmp_path, autojump_clock
):
    """Promise: ``emit(b"raw")`` raises UnencodableValue synchronously, publishes nothing,
    and the run (which caught it) goes on to complete; JSON progress is published as is."""
    refusals: list[str] = []

    async def agent(call: RunCall, ctx: RunContext) -> str:
        for payload in (b"raw", {"n": (1,)}, float("nan")):
            try:
                ctx.emit(payload)
            except UnencodableValue as exc:
                refusals.append(str(exc))
        ctx.emit({"step": [1, 2]})
        return "went on"

    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    async with ws.events.subscribe() as progress:
        backend.send_message(ws.id, AgentMessage("s", "go", "r"))
        with trio.fail_after(TIMEOUT):
            rc = await backend.wait_run("r")
            first = await progress.receive()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            progress.receive_nowait()
    assert rc.result == "went on"
    assert first.payload.payload == {"step": [1, 2]}
    assert refusals == [
        "progress payload is not a JSON value: bytes at $",
        "progress payload is not a JSON value: tuple at $.n",
        "progress payload is not a JSON value: float nan at $",
    ]


async def test_an_uncaught_refusal_fails_the_run_like_any_exception(
    backend, tmp_path, autojump_clock
):
    async def agent(call: RunCall, ctx: RunContext) -> str:
        ctx.emit({1, 2})
        return "unreachable"

    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
    backend.send_message(ws.id, AgentMessage("s", "go", "r"))
    with trio.fail_after(TIMEOUT):
        rc = await backend.wait_run("r")
    assert rc.error == "progress payload is not a JSON value: set at $"


# -- the wire encoders convert nothing --------------------------------------------------------


@pytest.mark.parametrize("value", [{1}, b"raw", float("nan"), datetime.date(2024, 1, 1)])
def test_http_bodies_raise_rather_than_convert(value: object):
    """Promise: no repr/str fallback is left in the HTTP JSON bodies."""
    with pytest.raises((TypeError, ValueError)):
        json_response({"result": value})


# -- over HTTP, as processes ------------------------------------------------------------------

AGENT_MODULE = textwrap.dedent(
    """
    import datetime, math
    from trio_runs import UnencodableValue

    BAD = {
        "set": {1, 2},
        "datetime": datetime.datetime(2024, 1, 1),
        "tuple": (1, 2),
        "bytes": b"raw",
        "nan": math.nan,
        "int-keys": {1: "a"},
    }
    EXACT = {"a": [1, 2.5, None, True, "\\u00e9"], "b": {"c": -0.0, "big": 10**30}}

    async def agent(call, ctx):
        if call.prompt == "emit-bytes":
            try:
                ctx.emit(b"raw")
            except UnencodableValue as exc:
                ctx.emit({"refused": str(exc)})
            return "went on"
        if call.prompt == "exact":
            return EXACT
        if call.prompt == "ping":
            return "pong"
        return BAD[call.prompt]
    """
)
HTTP_BAD = {
    "set": "set at $",
    "datetime": "datetime.datetime at $",
    "tuple": "tuple at $",
    "bytes": "bytes at $",
    "nan": "float nan at $",
    "int-keys": "int key 1 at $",
}


@pytest.fixture
def agent_server(spawn, tmp_path: Path, request: pytest.FixtureRequest) -> Server:
    (tmp_path / "encoding_agent.py").write_text(AGENT_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    extra = ["--db", str(tmp_path / "runs.db")] if request.param == "sqlite" else []
    root = tmp_path / "root"
    root.mkdir()
    return serve(spawn, root, "--agent", "encoding_agent:agent", *extra, env=env)


def submit_and_wait(http: httpx.Client, ws: str, session: str, prompt: str) -> dict[str, Any]:
    response = http.post(
        f"/v1/workspaces/{ws}/messages", json={"session_id": session, "prompt": prompt}
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    waited = http.get(f"/v1/runs/{run_id}/wait", params={"timeout": 10}, timeout=15)
    assert waited.status_code == 200, waited.text
    terminal: dict[str, Any] = waited.json()["terminal"]
    return terminal


@pytest.mark.parametrize("agent_server", ["memory", "sqlite"], indirect=True)
def test_over_http_the_run_fails_the_same_way(agent_server: Server):
    """Promise: over HTTP (in-memory and SQLite store) a result that is not JSON is the same
    failed terminal as in-process — never its repr — and a JSON result arrives exactly."""
    http = agent_server.http
    ws = http.post("/v1/workspaces", json={"path": "w"}).json()["id"]
    for prompt, problem in HTTP_BAD.items():
        terminal = submit_and_wait(http, ws, prompt, prompt)
        assert terminal["result"] is None, prompt
        assert terminal["error"] == f"result is not a JSON value: {problem}"
        assert terminal["cancelled"] is False
    exact = submit_and_wait(http, ws, "exact", "exact")
    assert exact["error"] is None
    assert exact["result"] == {"a": [1, 2.5, None, True, "é"], "b": {"c": -0.0, "big": 10**30}}
    assert math.copysign(1.0, exact["result"]["b"]["c"]) == -1.0


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` for each SSE event in ``lines`` (comments and ids skipped)."""
    kind = ""
    for line in lines:
        if line.startswith("event:"):
            kind = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            yield kind, json.loads(line.partition(":")[2])


@pytest.mark.parametrize("agent_server", ["memory"], indirect=True)
def test_over_http_emit_bytes_raises_and_no_bogus_progress_arrives(agent_server: Server):
    """Promise: ``emit(b"raw")`` raised in the agent (which went on): the event stream shows
    only the progress the agent then emitted, never ``"b'raw'"``."""
    http = agent_server.http
    ws = http.post("/v1/workspaces", json={"path": "w"}).json()["id"]
    deadline = time.monotonic() + START_BOUND
    timeout = httpx.Timeout(5.0, read=START_BOUND)
    with http.stream("GET", f"/v1/workspaces/{ws}/events", timeout=timeout) as stream:
        events = sse_events(stream.iter_lines())
        # A run ended on the stream proves it is live before the run under test starts.
        ping = http.post(
            f"/v1/workspaces/{ws}/messages", json={"session_id": "p", "prompt": "ping"}
        )
        ping_id = ping.json()["run_id"]
        for kind, data in events:
            assert time.monotonic() < deadline
            if kind == "run_complete" and data["run_id"] == ping_id:
                break
        response = http.post(
            f"/v1/workspaces/{ws}/messages", json={"session_id": "s", "prompt": "emit-bytes"}
        )
        run_id = response.json()["run_id"]
        progress: list[object] = []
        for kind, data in events:
            assert time.monotonic() < deadline
            if data.get("run_id") != run_id:
                continue
            if kind == "progress":
                progress.append(data["payload"])
            elif kind == "run_complete":
                assert data["result"] == "went on"
                break
    assert progress == [{"refused": "progress payload is not a JSON value: bytes at $"}]
