"""``RunsClient``'s typed, documented surface: run ids minted by the client, typed events.

An in-process server on a free loopback port (``test_http_server.serving``), bounded in time.
"""

from __future__ import annotations

import re
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_http_server import LoseFirstAnswer, serving

from trio_runs import RunComplete, RunProgress
from trio_runs.http import ClientError, RunningServer, RunsClient, StreamItem

README = Path(__file__).resolve().parent.parent / "README.md"


def test_submit_mints_the_run_id_so_a_retry_is_recognised_not_run_twice(tmp_path: Path):
    """Promise: without a run id, ``submit`` mints one (a UUID4) before the request, so the
    retry after a lost answer carries the same id and is recognised as ours."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        transport = LoseFirstAnswer()
        async with RunsClient(server.url, transport=transport) as client:
            ws = (await client.create_workspace("w")).id
            run_id = await client.submit(ws, "s", "once")
            assert transport.lost == 1
            assert uuid.UUID(run_id).version == 4
            assert (await client.wait_terminal(run_id)).result == "once"
            view = await client.submit_and_wait(ws, "s", "twice")
            assert view.terminal is not None
            assert view.terminal.result == "twice"
            terminal = await client.run_prompt(ws, "s", "thrice")
            assert terminal.result == "thrice"
            assert len({run_id, view.run_id, terminal.run_id}) == 3
        assert server.service.backend.ledger.statistics().accepted_total == 3

    serving(tmp_path, body)


def test_follow_yields_typed_progress_then_the_terminal_late_or_live(tmp_path: Path):
    """Promise: ``follow`` yields the run's ``RunProgress`` values and ends with its
    ``RunComplete``, for a run that ended before it was called; an unknown run is a
    ``ClientError`` 404."""

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        async with RunsClient(server.url) as client:
            ws = (await client.create_workspace("w")).id
            terminal = await client.run_prompt(ws, "s", "one two")
            seen: list[StreamItem] = []
            async with aclosing(client.follow(terminal.run_id)) as items:
                async for item in items:
                    seen.append(item)
            assert seen == [
                RunProgress("s", terminal.run_id, "one"),
                RunProgress("s", terminal.run_id, "two"),
                terminal,
            ]
            assert isinstance(seen[-1], RunComplete)
            async with aclosing(client.follow("no-such-run")) as items:
                with pytest.raises(ClientError) as info:
                    await items.__anext__()
            assert (info.value.status, info.value.code) == (404, "run_not_found")

    serving(tmp_path, body)


def python_client_example() -> tuple[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Python client\n.*?```python\n(.*?)```\n\n```text\n(.*?)```", text, re.S)
    assert match, "the README lost its Python client example"
    return match.group(1), match.group(2).splitlines()


def test_the_readmes_python_client_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The README's "Python client" example, against a live server, prints what it shows."""
    code, shown = python_client_example()
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("trio.run(main)", ""), str(README), "exec"), namespace)

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        await namespace["main"](server.url)

    serving(tmp_path, body)
    assert capsys.readouterr().out.splitlines() == shown


def test_a_follower_gets_the_ending_of_a_run_cut_by_shutdown(tmp_path: Path):
    """Promise: a run still going when the server shuts down ends cancelled, and whoever
    follows it gets that terminal before the stream ends (not a broken connection)."""
    seen: list[StreamItem] = []

    async def body(server: RunningServer, http: httpx.AsyncClient) -> None:
        async with RunsClient(server.url) as client:
            ws = (await client.create_workspace("w")).id
            run_id = await client.submit(ws, "s", "sleep 30")
            async with aclosing(client.follow(run_id)) as items:
                async for item in items:
                    seen.append(item)
                    if len(seen) == 1:  # its first tick: it is running
                        server.request_shutdown()

    serving(tmp_path, body)
    assert isinstance(seen[0], RunProgress)
    assert isinstance(seen[-1], RunComplete)
    assert seen[-1].cancelled


def test_an_https_server_is_verified_and_a_plain_http_one_costs_no_ca_bundle():
    """Promise: certificate verification stays on for https; only a plain-http client skips
    building a verifying TLS context (loading the CA bundle, about 30 ms a client), which it
    can never use (redirects are not followed). Reads httpx's transport: there is no public
    accessor for the context it built."""
    import ssl

    from trio_runs.http import RunsClient

    def mode(url: str) -> ssl.VerifyMode:
        transport = RunsClient(url)._http._transport
        return transport._pool._ssl_context.verify_mode  # type: ignore[attr-defined,no-any-return]

    assert mode("https://runs.example.com") == ssl.CERT_REQUIRED
    assert mode("HTTPS://runs.example.com") == ssl.CERT_REQUIRED
    assert mode("http://127.0.0.1:8765") == ssl.CERT_NONE
