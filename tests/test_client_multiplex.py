"""``RunsClient(multiplex=True)``: many tasks' ``run_prompt`` calls go out as a few batch
requests, with every promise of the one-caller client kept.

In-process servers on a free loopback port (``test_http_server.serving``: real sockets, so
real time, each test bounded by ``trio.fail_after``), and real ``trio-runs serve`` processes
(``test_e2e``'s helpers: every wait bounded in real time, every process killed in teardown)
for a server that is SIGKILLed, and restarted on the same port with the same ``--db``.
Requests are counted by a transport the client is given (``Counting``).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from ports import free_port
from test_e2e import START_BOUND, Server, serve, spawn
from test_http_server import serving, submit

from trio_runs import RunComplete
from trio_runs.http import ClientError, ClientNotOpen, RunningServer, RunsClient, ServerLost

__all__ = ["spawn"]  # the fixture, used by name


class Counting(httpx.AsyncBaseTransport):
    """httpx's network transport, recording each request's method and path; loses the whole
    answer of the first ``lose`` batch requests (delivered, then the connection breaks)."""

    def __init__(self, lose: int = 0) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[str, str]] = []
        self.lose = lose

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/batches") and self.lose:
            self.lose -= 1
            await response.aclose()
            raise httpx.ReadError("connection reset before the answer arrived")
        return response

    def count(self, suffix: str, method: str = "POST") -> int:
        return sum(m == method and path.endswith(suffix) for m, path in self.sent)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def cancel_on_server(http: httpx.AsyncClient, run_id: str) -> None:
    """Cancel the run through another client, once the server knows it (the test's bound)."""
    while (await http.post(f"/v1/runs/{run_id}/cancel")).status_code == 404:
        await trio.sleep(0.01)


async def until_state(http: httpx.AsyncClient, run_id: str, state: str) -> None:
    while True:
        response = await http.get(f"/v1/runs/{run_id}")
        if response.status_code == 200 and response.json()["state"] == state:
            return
        await trio.sleep(0.01)


def test_64_callers_cost_a_handful_of_requests_each_getting_its_own_terminal_once(
    tmp_path: Path,
):
    """Promise: 64 tasks calling ``run_prompt`` at once on one multiplexed client cost a
    handful of requests, not 128, and each gets its own run's terminal, exactly once, with
    its own outcome: completed, failed and cancelled mixed in the same batch."""

    def prompt(i: int) -> str:
        return ("fail", "sleep 30")[i % 4 - 1] if i % 4 in (1, 2) else f"hello {i}"

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting()
        async with RunsClient(server.url, transport=transport, multiplex=True) as client:
            ws = (await client.create_workspace("w")).id
            transport.sent.clear()
            got: dict[int, list[RunComplete]] = {i: [] for i in range(64)}

            async def caller(i: int) -> None:
                got[i].append(await client.run_prompt(ws, f"s{i}", prompt(i), f"mux-{i}"))

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(caller, i)
                for i in range(2, 64, 4):
                    nursery.start_soon(cancel_on_server, http, f"mux-{i}")
        for i, terminals in got.items():
            assert len(terminals) == 1, (i, terminals)
            terminal = terminals[0]
            assert (terminal.run_id, terminal.session_id) == (f"mux-{i}", f"s{i}")
            expected = ("completed", "failed", "cancelled", "completed")[i % 4]
            assert terminal.outcome == expected, (i, terminal)
            if expected == "completed":
                assert terminal.result == prompt(i)
        assert transport.count("/batches") <= 4, transport.sent
        assert len(transport.sent) <= 8, transport.sent
        assert server.service.backend.ledger.statistics().accepted_total == 64

    serving(tmp_path, body)


def test_a_lone_caller_costs_one_request(tmp_path: Path):
    """Promise: no timer: a caller alone is sent at once, in one request (a batch of one)."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting()
        async with RunsClient(server.url, transport=transport, multiplex=True) as client:
            ws = (await client.create_workspace("w")).id
            for k in range(3):
                transport.sent.clear()
                terminal = await client.run_prompt(ws, "s", f"alone {k}")
                assert (terminal.outcome, terminal.result) == ("completed", f"alone {k}")
                assert transport.sent == [("POST", f"/v1/workspaces/{ws}/batches")]

    serving(tmp_path, body)


def test_a_cancelled_caller_cancels_only_its_own_run(tmp_path: Path):
    """Promise: a caller cancelled while its run is active cancels that run on the server
    (one ``POST /v1/runs/{id}/cancel``) and no other: the run queued behind it in its session
    and the other callers' runs complete. A caller cancelled before its prompt was sent
    drops the prompt: the server never sees it."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting()
        async with RunsClient(server.url, transport=transport, multiplex=True) as client:
            ws = (await client.create_workspace("w")).id
            got: dict[str, RunComplete] = {}
            victim = trio.CancelScope()

            async def caller(session: str, prompt: str, run_id: str) -> None:
                got[run_id] = await client.run_prompt(ws, session, prompt, run_id)

            async def doomed() -> None:
                with victim:
                    await caller("v", "sleep 30", "victim")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(doomed)
                nursery.start_soon(caller, "v", "after the victim", "behind")
                for i in range(6):
                    nursery.start_soon(caller, f"s{i}", "sleep 0.3", f"other-{i}")
                await until_state(http, "victim", "active")
                victim.cancel()
            with trio.CancelScope() as unsent:
                unsent.cancel()
                await client.run_prompt(ws, "u", "never sent", "unsent")
            # A batch leaves after it: the dropped prompt would have gone in it.
            assert (await client.run_prompt(ws, "u", "sent", "after-unsent")).result == "sent"
        assert "victim" not in got
        assert got["behind"].outcome == "completed"
        assert all(got[f"other-{i}"].outcome == "completed" for i in range(6))
        assert transport.count("/cancel") == 1, transport.sent
        assert ("POST", "/v1/runs/victim/cancel") in transport.sent
        view = (await http.get("/v1/runs/victim/wait", params={"timeout": "5"})).json()
        assert view["state"] == "cancelled"
        assert (await http.get("/v1/runs/unsent")).status_code == 404

    serving(tmp_path, body)


def test_a_refused_message_fails_only_its_own_caller(tmp_path: Path):
    """Promise: a message the server refuses (a duplicate run id: refused alone in the batch;
    a bad session id: refusing the whole request) raises, in its own caller only, the typed
    error a single submission would have had; the others' runs complete."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting()
        async with (
            RunsClient(server.url, transport=transport, multiplex=True) as client,
            RunsClient(server.url) as single,
        ):
            ws = (await client.create_workspace("w")).id
            await submit(http, ws, "x", "first", run_id="taken")
            outcome: dict[str, RunComplete | ClientError] = {}

            async def caller(session: str, run_id: str) -> None:
                try:
                    outcome[run_id] = await client.run_prompt(ws, session, "go", run_id)
                except ClientError as exc:
                    outcome[run_id] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller, "s-dup", "taken")
                nursery.start_soon(caller, "bad id!", "bad")
                for i in range(6):
                    nursery.start_soon(caller, f"s{i}", f"good-{i}")
            for run_id, expected_session in (("taken", "s-dup"), ("bad", "bad id!")):
                with pytest.raises(ClientError) as alone:
                    await single.submit(ws, expected_session, "go", run_id)
                refusal = outcome[run_id]
                assert isinstance(refusal, ClientError)
                assert (refusal.status, refusal.code, refusal.message) == (
                    alone.value.status,
                    alone.value.code,
                    alone.value.message,
                )
            assert (outcome["taken"].status, outcome["bad"].status) == (409, 422)
        for i in range(6):
            good = outcome[f"good-{i}"]
            assert isinstance(good, RunComplete)
            assert (good.run_id, good.outcome) == (f"good-{i}", "completed")
        assert transport.count("/batches") <= 3, transport.sent

    serving(tmp_path, body)


def test_a_lost_batch_answer_is_sent_again_and_never_runs_twice(tmp_path: Path):
    """Promise: the answer to a batch lost in transit, the batch is sent again; the server's
    ``duplicate_run`` for the runs it accepted the first time is recognised as ours, and each
    caller gets its terminal: every run accepted once."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting(lose=1)
        async with RunsClient(server.url, transport=transport, multiplex=True) as client:
            ws = (await client.create_workspace("w")).id
            got: dict[int, RunComplete] = {}

            async def caller(i: int) -> None:
                got[i] = await client.run_prompt(ws, f"s{i}", f"once {i}", f"lost-{i}")

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(caller, i)
        assert transport.lose == 0
        assert {i: (t.run_id, t.result) for i, t in got.items()} == {
            i: (f"lost-{i}", f"once {i}") for i in range(8)
        }
        assert server.service.backend.ledger.statistics().accepted_total == 8

    serving(tmp_path, body)


def test_the_multiplexing_path_outside_async_with_is_a_typed_error(tmp_path: Path):
    """Promise: ``run_prompt`` of a multiplexed client not entered (or already left) raises
    ``ClientNotOpen``; nothing is sent."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = Counting()
        client = RunsClient(server.url, transport=transport, multiplex=True)
        with pytest.raises(ClientNotOpen):
            await client.run_prompt("ws", "s", "go")
        async with client:
            ws = (await client.create_workspace("w")).id
            assert (await client.run_prompt(ws, "s", "inside")).result == "inside"
        with pytest.raises(ClientNotOpen):
            await client.run_prompt(ws, "s", "after")
        assert transport.count("/batches") == 1

    serving(tmp_path, body)


# -- a real server process, killed and restarted -------------------------------------------

CALLERS = 16


async def _active(url: str, run_ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        for run_id in run_ids:
            await until_state(http, run_id, "active")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_every_caller_gets_server_lost_within_the_bound_when_the_server_is_killed(
    spawn, tmp_path: Path
):
    """Promise: the server SIGKILLed while 16 multiplexed runs are active, every caller gets
    ``ServerLost`` within the liveness bound (plus scheduling slack), none hangs."""
    server = serve(spawn, tmp_path)
    timeout = 3.0
    lost_after: dict[int, float] = {}

    async def main() -> None:
        killed_at = 0.0
        async with RunsClient(server.url, timeout=timeout, multiplex=True) as client:
            ws = (await client.create_workspace("w")).id

            async def caller(i: int) -> None:
                with pytest.raises(ServerLost):
                    await client.run_prompt(ws, f"s{i}", "sleep 30", f"k-{i}")
                lost_after[i] = time.monotonic() - killed_at

            with trio.fail_after(START_BOUND + 2 * timeout):
                async with trio.open_nursery() as nursery:
                    for i in range(CALLERS):
                        nursery.start_soon(caller, i)
                    await _active(server.url, [f"k-{i}" for i in range(CALLERS)])
                    killed_at = time.monotonic()
                    server.proc.send_signal(signal.SIGKILL)

    trio.run(main)
    assert sorted(lost_after) == list(range(CALLERS))
    assert max(lost_after.values()) < timeout + 2.0, lost_after


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_callers_reattach_across_a_server_restart_on_the_same_port_and_store(spawn, tmp_path: Path):
    """Promise: the server SIGKILLed and restarted (same port, same ``--db``), the callers
    whose runs it had accepted re-attach by id and get their runs' endings from the store
    (here ``abandoned``: they were active at the crash), each its own, once. Callers who
    queued during the outage are sent once it is back, and refused as a single submission
    would be: the restarted server has not reopened the workspace (404)."""
    port = str(free_port())
    db = str(tmp_path / "runs.db")
    server = serve(spawn, tmp_path, "--port", port, "--db", db)
    timeout = 20.0  # room for the restart of a server on a busy machine
    got: dict[str, list[RunComplete | ClientError]] = {}

    async def main() -> None:
        async with RunsClient(server.url, timeout=timeout, multiplex=True) as client:
            ws = (await client.create_workspace(str(tmp_path / "w"))).id

            async def caller(run_id: str, prompt: str) -> None:
                try:
                    outcome: RunComplete | ClientError = await client.run_prompt(
                        ws, run_id, prompt, run_id
                    )
                except ClientError as exc:
                    outcome = exc
                got.setdefault(run_id, []).append(outcome)

            with trio.fail_after(3 * START_BOUND + 2 * timeout):
                async with trio.open_nursery() as nursery:
                    for i in range(CALLERS):
                        nursery.start_soon(caller, f"crash-{i}", "sleep 30")
                    await _active(server.url, [f"crash-{i}" for i in range(CALLERS)])
                    server.proc.send_signal(signal.SIGKILL)
                    await trio.to_thread.run_sync(server.proc.wait, 10)
                    for i in range(4):
                        nursery.start_soon(caller, f"later-{i}", f"after {i}")
                    await trio.to_thread.run_sync(
                        lambda: spawn.append(Server(tmp_path, "--port", port, "--db", db))
                    )
                    await trio.to_thread.run_sync(spawn[-1].wait_url)  # type: ignore[union-attr]

    trio.run(main)
    for i in range(CALLERS):
        (terminal,) = got[f"crash-{i}"]
        assert isinstance(terminal, RunComplete), terminal
        assert (terminal.run_id, terminal.outcome) == (f"crash-{i}", "failed"), terminal
        assert terminal.reason == "abandoned", terminal
    for i in range(4):
        (refusal,) = got[f"later-{i}"]
        assert isinstance(refusal, ClientError), refusal
        assert (refusal.status, refusal.code) == (404, "workspace_not_found")
