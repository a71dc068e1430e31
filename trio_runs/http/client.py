"""``RunsClient``: the async client of the ``/v1`` API (httpx on Trio) that never hangs.

Every call is bounded by the client's liveness ``timeout``: a request that gets no answer
from the server within ``timeout`` seconds (the server died, the connection stalled,
nothing listens) raises :class:`ServerLost`. Transport errors are retried with backoff
inside that bound, which is safe because every call is idempotent: run ids are minted by
the client, so a submission retried after a lost answer is recognised (409
``duplicate_run``) instead of being run twice. A request the server refused raises
:class:`ClientError` with the server's error code.

Waiting for a run's end polls ``/wait`` with a server-side timeout shorter than the
liveness bound, so a healthy server always answers in time and a silent one is noticed.

``RunsClient(..., multiplex=True)`` coalesces the :meth:`RunsClient.run_prompt` calls of many
tasks into batch requests (``POST .../batches``) with the same promises: see
:meth:`RunsClient.run_prompt`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Annotated, Any, Final, Literal, cast
from urllib.parse import quote

import attrs
import httpx
import msgspec
import trio

from ..coordinator import new_run_id
from ..events import END_REASONS, Notification, RunComplete, RunProgress
from .schema import (
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    MAX_WAIT_SECONDS,
    RunList,
    RunView,
    SessionView,
    WorkspaceView,
)

__all__ = [
    "DEFAULT_SERVER",
    "ClientError",
    "ClientNotOpen",
    "EventGap",
    "RunsClient",
    "ServerLost",
    "SseEvent",
    "StreamItem",
]

logger = logging.getLogger("trio_runs.http")

DEFAULT_SERVER: Final = "http://127.0.0.1:8765"
"""Where clients look for a server unless told otherwise."""

DEFAULT_TIMEOUT: Final = 10.0
_BOUND_SHARE: Final = 0.9


class ServerLost(Exception):
    """The server is unreachable, stopped answering, or no longer knows the run."""


class ClientError(Exception):
    """The server refused a request: its HTTP status and ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message


class ClientNotOpen(RuntimeError):
    """The multiplexing path was used outside ``async with RunsClient(..., multiplex=True)``
    (before it was entered, or after it was left): it has no task to send batches from."""


@attrs.frozen(slots=True)
class SseEvent:
    """One Server-Sent Event: its ``id``, ``event`` name and ``data`` (JSON text)."""

    id: str
    event: str
    data: str

    def json(self) -> Any:
        """``data`` parsed as JSON (``None`` if it is not JSON)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None


@attrs.frozen(slots=True)
class EventGap:
    """Events were missed: the server no longer holds the ones after ``last_event_id`` (they
    left its window); ``first_id`` is the first it still held. Reconcile what matters from
    :meth:`RunsClient.run` or :meth:`RunsClient.wait_terminal`."""

    last_event_id: int
    first_id: int


StreamItem = RunProgress | Notification | RunComplete | EventGap
"""What :meth:`RunsClient.events` and :meth:`RunsClient.follow` yield."""


def _stream_item(event: SseEvent) -> StreamItem | None:
    # The typed value of an event frame; None for a kind this client does not know.
    data = event.json()
    if event.event == "progress":
        return RunProgress.from_dict(data)
    if event.event == "run_complete":
        return RunComplete.from_dict(data)
    if event.event == "notification":
        return Notification.from_dict(data)
    if event.event == "gap":
        return EventGap(int(data["last_event_id"]), int(data["first_id"]))
    return None


class _SseParser:
    # Server-Sent Events framing, a line at a time (the server sends one data line per event).
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        if line.startswith(":"):
            return None
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self.data.append(value)
            else:
                self.fields[name] = value
            return None
        event = None
        if self.data or self.fields:
            event = SseEvent(
                self.fields.get("id", ""), self.fields.get("event", "message"), "\n".join(self.data)
            )
        self.fields, self.data = {}, []
        return event


def _submit_body(
    session_id: str,
    prompt: str,
    run_id: str,
    deadline: float | None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, object]:
    body: dict[str, object] = {"session_id": session_id, "prompt": prompt, "run_id": run_id}
    if deadline is not None:
        body["deadline"] = deadline
    if labels:
        body["labels"] = dict(labels)
    return body


def _quote(segment: str) -> str:
    # One path segment, every byte but the unreserved ones percent-encoded ('/' included).
    # A segment of dots is encoded too: clients (httpx included) drop "." and ".." segments
    # as they build a URL, and the request would reach another route instead of being
    # refused for its id. A lone surrogate has no UTF-8 form (and is never in a valid id):
    # refused here, the way the server refuses it in a body.
    if segment in {".", ".."}:
        return segment.replace(".", "%2E")
    try:
        return quote(segment, safe="")
    except UnicodeEncodeError:
        raise ClientError(
            422, "invalid_request", f"{segment!r} holds lone surrogates: it is not an id"
        ) from None


def _error_of(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        error = body["error"]
        return ClientError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ClientError(response.status_code, "http_error", text)


class RunsClient:
    """A client of one trio-runs server; use as ``async with RunsClient(url) as client:``.

    ``timeout`` is the liveness bound: no call waits longer than that for the server to
    answer (``ServerLost`` instead). ``token`` is sent as ``Authorization: Bearer``;
    ``transport`` replaces httpx's network transport (tests inject faults with it).

    ``multiplex=True`` (opt-in) sends the :meth:`run_prompt` calls of every task sharing the
    client as batches (see :meth:`run_prompt`). The batches are sent from tasks of a nursery
    the client opens on ``async with`` and closes on the way out, which changes the contract
    of ``async with`` in three ways: it must be entered and left in the same task, nested
    like any nursery (not kept open across tasks in an ``AsyncExitStack``, say); leaving it
    waits (at most the liveness bound) for the cancellations of abandoned runs to reach the
    server; and a :meth:`run_prompt` still waiting when it is left (from another task) raises
    :class:`ClientNotOpen`. Without ``multiplex`` the client opens no task and
    :meth:`run_prompt` sends its own requests, as it always did.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int | None = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        multiplex: bool = False,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
            trust_env=False,
            transport=transport,
            # A plain-http server never needs a TLS context, and building one (loading the CA
            # bundle) costs about 30 ms a client: every `trio-runs run` paid it. Redirects
            # are not followed, so no request can reach https with this client.
            verify=not self.base_url.lower().startswith("http://"),
        )
        self.multiplex = multiplex
        self._mux: _Multiplexer | None = None

    async def __aenter__(self) -> RunsClient:
        await self._http.__aenter__()
        if self.multiplex:
            manager: contextlib.AbstractAsyncContextManager[trio.Nursery] = trio.open_nursery()
            nursery = await manager.__aenter__()
            self._mux = _Multiplexer(self, manager, nursery)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        mux, self._mux = self._mux, None
        try:
            if mux is not None:
                await mux.close()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await self._http.__aexit__(exc_type, exc, tb)

    @property
    def poll_seconds(self) -> float:
        """The server-side timeout of each ``/wait`` poll: half the liveness bound."""
        return min(MAX_WAIT_SECONDS, self.timeout / 2)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        params: Mapping[str, str] | None = None,
        bound: float | None = None,
    ) -> httpx.Response:
        """Send a request, retrying transport errors, and return the server's answer.

        Raises ``ServerLost`` if no answer came within ``bound`` (default: the liveness
        timeout) and ``ClientError`` for any 4xx/5xx answer.
        """
        response, _ = await self._send(method, path, json_body, params, bound)
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    async def _send(
        self,
        method: str,
        path: str,
        json_body: object,
        params: Mapping[str, str] | None,
        bound: float | None,
    ) -> tuple[httpx.Response, int]:
        # The server's answer, whatever its status, and how many attempts it took. The
        # liveness bound keeps a tenth in hand, so the whole process (closing the client,
        # exiting) is gone within --timeout of the server going silent.
        shown = self.timeout if bound is None else bound
        limit = self.timeout * _BOUND_SHARE if bound is None else bound
        last_error: BaseException | None = None
        attempt = 0
        with trio.move_on_after(limit):
            while True:
                attempt += 1
                try:
                    response = await self._http.request(
                        method,
                        path,
                        json=json_body,
                        params=params,
                        timeout=httpx.Timeout(limit),
                    )
                except httpx.TransportError as exc:
                    last_error = exc
                    logger.debug("%s %s failed (%r); retrying", method, path, exc)
                    # Jittered, so clients of a restarted server do not come back in step.
                    await trio.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
                    continue
                return response, attempt
        reason = f": {type(last_error).__name__}: {last_error}" if last_error else ""
        raise ServerLost(f"no answer from the server at {self.base_url} within {shown:g}s{reason}")

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        body: dict[str, Any] = (await self.request("GET", "/healthz")).json()
        return body

    async def create_workspace(self, path: str) -> WorkspaceView:
        """Open (or find) the workspace for ``path`` on the server."""
        response = await self.request("POST", "/v1/workspaces", json_body={"path": path})
        return WorkspaceView.from_dict(response.json())

    async def close_workspace(self, workspace_id: str, *, grace: float = 15.0) -> WorkspaceView:
        """Close a workspace; returns once every one of its runs has its terminal.

        Allowed ``grace`` seconds beyond the liveness bound (closing waits for the runs).
        """
        response = await self.request(
            "DELETE", f"/v1/workspaces/{_quote(workspace_id)}", bound=self.timeout + grace
        )
        return WorkspaceView.from_dict(response.json())

    async def submit(
        self,
        workspace_id: str,
        session_id: str,
        prompt: str,
        run_id: str | None = None,
        *,
        resubmitting: bool = False,
        deadline: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a prompt under ``run_id``; returns it once accepted. Without one, the id
        is minted here (a UUID4), before the request: a retry reuses it, so is never run twice.

        ``deadline``: seconds the run may take from its start (``None``: the workspace's
        default, within the server's maximum); past it the run ends failed, ``timed_out``.
        ``labels``: up to 16 key/value strings kept with the run (its view, its terminal,
        and ``list_runs``'s ``label`` filter).

        Transport errors are retried: when an earlier attempt was accepted but its answer
        lost, the retry's ``duplicate_run`` is recognised as that acceptance. Pass
        ``resubmitting=True`` when an earlier call may have been accepted (its answer lost
        to a server restart), for the same recognition.
        """
        run_id = run_id or new_run_id()
        body = _submit_body(session_id, prompt, run_id, deadline, labels)
        response = await self._post_message(
            workspace_id, session_id, run_id, body, None, None, resubmitting
        )
        if response is None:
            return run_id  # our own earlier attempt was accepted; its answer was lost
        accepted: str = response.json()["run_id"]
        return accepted

    async def submit_and_wait(
        self,
        workspace_id: str,
        session_id: str,
        prompt: str,
        run_id: str | None = None,
        *,
        resubmitting: bool = False,
        deadline: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> RunView:
        """Submit a prompt and wait for its end in one request (``?wait=``).

        Returns the run once accepted: with its terminal if it ended within
        :attr:`poll_seconds`, else as it is (go on with :meth:`wait_terminal`). Retries and
        ``resubmitting`` as :meth:`submit`: an earlier attempt accepted but whose answer was
        lost (the connection broke during the wait, say) is recognised, and the run is
        re-attached to instead of run twice. Bounded by ``poll_seconds + timeout``.
        """
        run_id = run_id or new_run_id()  # minted here, as submit() does
        seconds = self.poll_seconds
        body = _submit_body(session_id, prompt, run_id, deadline, labels)
        params = {"wait": f"{seconds:g}"}
        response = await self._post_message(
            workspace_id, session_id, run_id, body, params, seconds + self.timeout, resubmitting
        )
        if response is None:
            return await self.run(run_id)  # ours, accepted; its answer was lost
        return RunView.from_dict(response.json())

    async def _post_message(
        self,
        workspace_id: str,
        session_id: str,
        run_id: str,
        body: dict[str, object],
        params: Mapping[str, str] | None,
        bound: float | None,
        resubmitting: bool,
    ) -> httpx.Response | None:
        # POST a message; None when the server refused it as a duplicate of our own earlier
        # attempt, accepted but unanswered (a retry, or a resubmission after a restart).
        path = f"/v1/workspaces/{_quote(workspace_id)}/messages"
        response, attempts = await self._send("POST", path, body, params, bound)
        if response.status_code < 400:
            return response
        error = _error_of(response)
        if (
            (attempts > 1 or resubmitting)
            and error.code == "duplicate_run"
            and await self._is_ours(run_id, session_id)
        ):
            return None
        raise error

    async def run_prompt(
        self,
        workspace_id: str,
        session_id: str,
        prompt: str,
        run_id: str | None = None,
        *,
        resubmitting: bool = False,
        deadline: float | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> RunComplete:
        """Submit a prompt and return its terminal: one request for a run that ends within
        :attr:`poll_seconds` (:meth:`submit_and_wait`), then ``/wait`` polls as
        :meth:`wait_terminal`. Raises as those do. ``deadline`` and ``labels`` as
        :meth:`submit`.

        With ``multiplex=True`` the prompt is queued instead, and the calls of every task
        sharing the client go out together: a batch (``POST .../batches``) is sent as soon as
        the previous one of the same workspace was accepted, holding everything queued
        meanwhile (at most :data:`~trio_runs.http.schema.MAX_BATCH_ITEMS` messages and a body
        under :data:`~trio_runs.http.schema.MAX_BODY_BYTES`; the rest waits for the next).
        No timer: a lone caller's batch of one leaves at once, and 64 concurrent callers cost
        a handful of requests. Each caller gets its own terminal, once, from the batch's
        streamed answer; a message the server refuses raises that message's
        :class:`ClientError` in its caller only (the others are sent again without it). The
        acceptance, queueing included, is bounded by the liveness timeout (``ServerLost``);
        if the answer then breaks off or stays silent that long, each caller waits for its
        own run by id (:meth:`wait_terminal`: bounded the same way, and re-attached after a
        server restart with a durable store). A retried batch recognises its own earlier
        acceptances, as :meth:`submit` does. Cancelled, the call cancels its own run on the
        server (``POST /v1/runs/{id}/cancel``, from the client's nursery: never any other
        caller's), or, not sent yet, just drops the prompt. Outside ``async with``: raises
        :class:`ClientNotOpen`.
        """
        run_id = run_id or new_run_id()  # minted here, as submit() does
        if self.multiplex:
            mux = self._mux
            if mux is None:
                raise ClientNotOpen(
                    "RunsClient(multiplex=True).run_prompt needs `async with RunsClient(...)`"
                )
            body = _submit_body(session_id, prompt, run_id, deadline, labels)
            return await mux.run(workspace_id, session_id, run_id, body, resubmitting)
        view = await self.submit_and_wait(
            workspace_id,
            session_id,
            prompt,
            run_id,
            resubmitting=resubmitting,
            deadline=deadline,
            labels=labels,
        )
        if view.terminal is not None:
            return view.terminal
        return await self.wait_terminal(run_id)

    async def run_batch(
        self,
        workspace_id: str,
        messages: Sequence[tuple[str, str, str]],
        *,
        on_terminal: Callable[[int, RunComplete], None] | None = None,
    ) -> list[RunComplete | ClientError]:
        """Submit ``(session_id, prompt, run_id)`` messages in one request and collect every
        terminal from its streamed answer (``POST .../batches``).

        Returns, per message in order, its run's terminal or the :class:`ClientError` that
        refused it; ``on_terminal(index, terminal)`` is called as each run ends. A request
        refused whole raises :class:`ClientError`. If the answer breaks off (the connection
        drops, or nothing, not even a heartbeat, arrives for 30 s plus the liveness bound),
        the runs it accepted are waited for by id (:meth:`wait_terminal`), and a batch whose
        acceptances were lost is sent again (run ids are the client's, so a message accepted
        the first time is recognised, not run twice). ``ServerLost`` as :meth:`request`.
        """
        body = {"messages": [{"session_id": s, "prompt": p, "run_id": r} for s, p, r in messages]}
        results: list[RunComplete | ClientError | None] = [None] * len(messages)
        accepted: set[int] = set()
        path = f"/v1/workspaces/{_quote(workspace_id)}/batches"
        timeout = httpx.Timeout(self.timeout, read=30.0 + self.timeout)
        attempt = 0
        with trio.move_on_after(self.timeout * _BOUND_SHARE) as head_bound:
            while True:
                attempt += 1
                heard = 0
                try:
                    async with self._http.stream(
                        "POST", path, json=body, timeout=timeout
                    ) as response:
                        if response.status_code >= 400:
                            await response.aread()
                            raise _error_of(response)
                        lines_iter = cast("AsyncGenerator[str, None]", response.aiter_lines())
                        async with contextlib.aclosing(lines_iter) as lines:
                            async for line in lines:
                                if not line.strip():
                                    continue  # a heartbeat
                                heard += 1
                                if heard == len(messages):
                                    head_bound.deadline = math.inf
                                await self._batch_line(
                                    decode_batch_line(line),
                                    messages,
                                    results,
                                    accepted,
                                    attempt,
                                    on_terminal,
                                )
                    break
                except httpx.TransportError as exc:
                    logger.debug("batch answer broke off (%r)", exc)
                    if heard >= len(messages):
                        break  # every acceptance is known: wait for the rest by id
                    await trio.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
        if head_bound.cancelled_caught:
            raise ServerLost(
                f"no answer to a batch from the server at {self.base_url} within {self.timeout:g}s"
            )
        missing = [i for i in sorted(accepted) if results[i] is None]
        if missing:
            async with trio.open_nursery() as nursery:
                for index in missing:
                    nursery.start_soon(
                        self._collect, index, messages[index][2], results, on_terminal
                    )
        return [r if r is not None else ClientError(0, "lost", "no answer") for r in results]

    async def _batch_line(
        self,
        line: DecodedBatchLine,
        messages: Sequence[tuple[str, str, str]],
        results: list[RunComplete | ClientError | None],
        accepted: set[int],
        attempt: int,
        on_terminal: Callable[[int, RunComplete], None] | None,
    ) -> None:
        kind, index = line.kind, line.index
        if kind == "accepted":
            accepted.add(index)
        elif kind == "ended":
            if results[index] is None:
                terminal = line.terminal
                assert terminal is not None
                results[index] = terminal
                if on_terminal is not None:
                    on_terminal(index, terminal)
        elif kind == "refused":
            refusal = line.refusal
            assert refusal is not None
            session_id, _, run_id = messages[index]
            if index in accepted:
                return  # accepted, but its terminal is gone from the server: wait says why
            if (
                attempt > 1
                and refusal.code == "duplicate_run"
                and await self._is_ours(run_id, session_id)
            ):
                accepted.add(index)  # our earlier attempt accepted it; its answer was lost
            else:
                results[index] = refusal

    async def _collect(
        self,
        index: int,
        run_id: str,
        results: list[RunComplete | ClientError | None],
        on_terminal: Callable[[int, RunComplete], None] | None,
    ) -> None:
        terminal = await self.wait_terminal(run_id)
        results[index] = terminal
        if on_terminal is not None:
            on_terminal(index, terminal)

    async def _is_ours(self, run_id: str, session_id: str) -> bool:
        try:
            return (await self.run(run_id)).session_id == session_id
        except ClientError:
            return False

    async def run(self, run_id: str) -> RunView:
        """``GET /v1/runs/{run_id}``: the run's state, and its terminal once it ended."""
        response = await self.request("GET", f"/v1/runs/{_quote(run_id)}")
        return RunView.from_dict(response.json())

    async def list_runs(
        self,
        *,
        workspace_id: str | None = None,
        path: str | None = None,
        session_id: str | None = None,
        state: Literal["running", "ended"] | None = None,
        label: tuple[str, str] | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> RunList:
        """``GET /v1/runs``: one page of runs, newest accepted first (see :meth:`iter_runs`).

        Filters: an open workspace (``workspace_id``) or a workspace ``path`` (open or not),
        a session, ``state`` (``"running"`` or ``"ended"``) and one ``label`` (key, value).
        ``cursor`` is the previous page's ``next_cursor``. ``ClientError`` 501
        ``not_supported`` when the server's store cannot list runs.
        """
        given = {
            "workspace": workspace_id,
            "path": path,
            "session": session_id,
            "state": state,
            "label": None if label is None else f"{label[0]}={label[1]}",
            "cursor": cursor,
            "limit": None if limit is None else str(limit),
        }
        params = {key: value for key, value in given.items() if value is not None}
        response = await self.request("GET", "/v1/runs", params=params)
        return RunList.from_dict(response.json())

    async def iter_runs(
        self,
        *,
        workspace_id: str | None = None,
        path: str | None = None,
        session_id: str | None = None,
        state: Literal["running", "ended"] | None = None,
        label: tuple[str, str] | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[RunView, None]:
        """Every run matching the filters, newest accepted first, page after page.

        Runs accepted after the first page was read are not included; none appears twice.
        """
        cursor: str | None = None
        while True:
            page = await self.list_runs(
                workspace_id=workspace_id,
                path=path,
                session_id=session_id,
                state=state,
                label=label,
                cursor=cursor,
                limit=page_size,
            )
            for run in page.runs:
                yield run
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel_run(self, run_id: str) -> RunView:
        """``POST /v1/runs/{run_id}/cancel``: cancel this run only; the run after.

        A queued run comes back cancelled; an active one may still say ``active`` (it ends at
        its agent's next checkpoint: :meth:`wait_terminal` for the terminal). Cancelling an
        ended run reports its terminal, so a retry is harmless.
        """
        response = await self.request("POST", f"/v1/runs/{_quote(run_id)}/cancel")
        return RunView.from_dict(response.json())

    async def wait(self, run_id: str, seconds: float | None = None) -> RunView:
        """One long poll: the run once it ended, or its state after ``seconds`` (default:
        :attr:`poll_seconds`)."""
        seconds = self.poll_seconds if seconds is None else seconds
        response = await self.request(
            "GET",
            f"/v1/runs/{_quote(run_id)}/wait",
            params={"timeout": f"{seconds:g}"},
            bound=seconds + self.timeout,
        )
        return RunView.from_dict(response.json())

    async def wait_terminal(self, run_id: str) -> RunComplete:
        """The run's terminal, from the authoritative ``/wait`` endpoint.

        Polls for as long as the server keeps answering; ``ServerLost`` as soon as it does
        not (within the liveness bound) or no longer knows the run.
        """
        while True:
            try:
                response = await self.request(
                    "GET",
                    f"/v1/runs/{_quote(run_id)}/wait",
                    params={"timeout": f"{self.poll_seconds:g}"},
                )
            except ClientError as exc:
                if exc.code == "run_not_found":
                    raise ServerLost(
                        f"the server no longer knows run {run_id} (was it restarted?)"
                    ) from None
                raise
            view = RunView.from_dict(response.json())
            if view.terminal is not None:
                return view.terminal

    async def session(self, workspace_id: str, session_id: str) -> SessionView:
        """The session's lane: busy, active run, queued runs."""
        path = f"/v1/workspaces/{_quote(workspace_id)}/sessions/{_quote(session_id)}"
        return SessionView.from_dict((await self.request("GET", path)).json())

    async def cancel_session(self, workspace_id: str, session_id: str) -> SessionView:
        """Cancel the session's active run and drop its queue."""
        path = f"/v1/workspaces/{_quote(workspace_id)}/sessions/{_quote(session_id)}/cancel"
        return SessionView.from_dict((await self.request("POST", path)).json())

    async def clear_queue(self, workspace_id: str, session_id: str) -> SessionView:
        """Drop the session's queued runs; its active run goes on."""
        path = f"/v1/workspaces/{_quote(workspace_id)}/sessions/{_quote(session_id)}/queue"
        return SessionView.from_dict((await self.request("DELETE", path)).json())

    def events(
        self,
        workspace_id: str,
        *,
        run_id: str | None = None,
        session_id: str | None = None,
        last_event_id: int | None = None,
    ) -> AsyncGenerator[StreamItem, None]:
        """The workspace's events as typed values: ``RunProgress``, ``Notification``,
        ``RunComplete``, and an :class:`EventGap` when the server no longer held some.

        ``run_id`` / ``session_id`` keep only that run's / session's. ``last_event_id``
        resumes after that event id (``0``: from the oldest event the server still holds).
        A dropped connection (or one the server ended because this reader fell behind) is
        resumed with ``Last-Event-ID``: nothing the server still held is missed, nothing is
        yielded twice. Ends when the workspace closes or the server shuts down. Raises
        ``ServerLost`` when no connection could be made again within the liveness bound,
        ``ClientError`` when the server refuses the stream (404: the workspace is gone).
        Use as ``async with contextlib.aclosing(client.events(ws)) as events:``; leaving
        early (or cancelled) closes the connection.
        """
        params = {k: v for k, v in (("run_id", run_id), ("session_id", session_id)) if v}
        path = f"/v1/workspaces/{_quote(workspace_id)}/events"
        return self._typed_events(path, params, last_event_id, until_terminal=False)

    def follow(
        self, run_id: str, *, last_event_id: int | None = None
    ) -> AsyncGenerator[StreamItem, None]:
        """One run's events as typed values: its progress the server still holds, then live,
        and last its ``RunComplete`` (then the iteration ends), whether the run is running,
        queued, or ended long ago (its terminal then comes from the store).

        Resumed after a dropped connection as :meth:`events` is. Raises ``ClientError``
        404 ``run_not_found`` for a run the server does not know, ``ServerLost`` as
        :meth:`events`.
        """
        path = f"/v1/runs/{_quote(run_id)}/events"
        return self._typed_events(path, {}, last_event_id, until_terminal=True)

    async def _typed_events(
        self,
        path: str,
        params: Mapping[str, str],
        last_event_id: int | None,
        *,
        until_terminal: bool,
    ) -> AsyncGenerator[StreamItem, None]:
        # One connection after another, each resuming after the last id seen, until the
        # stream ends on purpose. Never yields from inside a cancel scope (an async
        # generator must not): the liveness bounds are httpx's timeouts and a deadline.
        timeout = httpx.Timeout(self.timeout, read=30.0 + self.timeout)
        last = last_event_id
        lost_since: float | None = None
        attempt = 0
        while True:
            headers = {} if last is None else {"last-event-id": str(last)}
            failure: BaseException | None = None
            try:
                async with self._http.stream(
                    "GET", path, params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error_of(response)
                    lost_since, attempt = None, 0
                    parser = _SseParser()
                    # aclosing: a cancelled reader must not leave the generator to the GC.
                    lines_iter = cast("AsyncGenerator[str, None]", response.aiter_lines())
                    ended = False
                    async with contextlib.aclosing(lines_iter) as lines:
                        # Read to the body's end (it follows the end event at once): httpx's
                        # generators underneath are then exhausted, not left to the GC.
                        async for line in lines:
                            if last is None and not until_terminal and line == ": subscribed":
                                # Fresh, on a workspace with no event yet (else an id-only
                                # frame follows): a reconnect resumes from its start.
                                last = 0
                            event = parser.feed(line)
                            if event is None or ended:
                                continue
                            if event.id:
                                last = int(event.id)
                            if event.event == "end":
                                ended = event.json() != {"reason": "slow_consumer"}
                                # slow_consumer: not ended, resumed after the last event.
                                continue
                            item = _stream_item(event)
                            if item is not None:
                                yield item
                                ended = until_terminal and isinstance(item, RunComplete)
                    if ended:
                        return
            except httpx.TransportError as exc:
                failure = exc
            # The connection dropped: connect again, for as long as the liveness bound.
            now = trio.current_time()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since >= self.timeout * _BOUND_SHARE:
                reason = f": {type(failure).__name__}: {failure}" if failure else ""
                raise ServerLost(
                    f"the event stream from {self.base_url} broke and could not be resumed "
                    f"within {self.timeout:g}s{reason}"
                )
            attempt += 1
            logger.debug("event stream %s dropped (%r); resuming after %s", path, failure, last)
            await trio.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))

    async def stream_events(
        self,
        workspace_id: str,
        on_event: Callable[[SseEvent], None],
        *,
        run_id: str | None = None,
        session_id: str | None = None,
        idle_timeout: float | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the workspace's event stream, calling ``on_event`` for each event.

        Prefer :meth:`events` (typed values, resumed after a dropped connection); this one
        hands over the raw frames and ends with the connection.

        Reports started (for ``nursery.start``) once the server confirmed the subscription,
        so nothing published afterwards is missed. Returns when the stream ends (the
        workspace closed). Raises ``ServerLost`` when nothing, not even a heartbeat, arrived
        for ``idle_timeout`` seconds (default: 2 heartbeats plus the liveness bound), and
        ``ClientError`` if the server refused the stream.
        """
        idle = idle_timeout if idle_timeout is not None else 30.0 + self.timeout
        params = {k: v for k, v in (("run_id", run_id), ("session_id", session_id)) if v}
        path = f"/v1/workspaces/{_quote(workspace_id)}/events"
        timeout = httpx.Timeout(self.timeout, read=idle)
        try:
            async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_of(response)
                started = False
                fields: dict[str, str] = {}
                data: list[str] = []
                # aclosing: a cancelled reader must not leave the generator to the GC.
                lines_iter = cast("AsyncGenerator[str, None]", response.aiter_lines())
                async with contextlib.aclosing(lines_iter) as lines:
                    async for line in lines:
                        if line.startswith(":"):
                            if not started and line.startswith(": subscribed"):
                                started = True
                                task_status.started()
                            continue
                        if line:
                            name, _, value = line.partition(":")
                            value = value[1:] if value.startswith(" ") else value
                            if name == "data":
                                data.append(value)
                            else:
                                fields[name] = value
                            continue
                        # A frame without data dispatches nothing (the SSE rule): an id-only
                        # frame (where a fresh stream begins) only moves the last id.
                        if data:
                            on_event(
                                SseEvent(
                                    fields.get("id", ""),
                                    fields.get("event", "message"),
                                    "\n".join(data),
                                )
                            )
                        fields, data = {}, []
        except httpx.TransportError as exc:
            raise ServerLost(f"the event stream from {self.base_url} broke: {exc!r}") from None


# -- multiplexing: many callers' run_prompt, few batch requests ------------------------------

_JSON_HEADERS: Final = {"content-type": "application/json"}
_BATCH_BODY_LIMIT: Final = MAX_BODY_BYTES - 64
"""A batch's body stays under this (room left for ``{"messages":[...]}`` around the items)."""
_NAMED_MESSAGE: Final = re.compile(r"messages\[(\d+)\]: (.*)", re.S)
"""How a whole-batch 422 names the message it refuses (``messages[3]: ...``)."""


@attrs.define(eq=False)
class _Pending:
    # One multiplexed run_prompt call: its message, where it stands, and its outcome.
    # state: queued (not sent), sent (acceptance unknown), accepted, over (refused or lost).
    workspace_id: str
    session_id: str
    run_id: str
    message: bytes
    resubmitting: bool
    enqueued_at: float
    state: Literal["queued", "sent", "accepted", "over"] = "queued"
    abandoned: bool = False
    # Set once, with done: the terminal, the error for its caller, or None: accepted, but the
    # batch's answer broke off before its terminal, so its caller waits for it by id.
    outcome: RunComplete | Exception | None = None
    done: bool = False
    waiter: trio.lowlevel.Task | None = None


class _Multiplexer:
    # The batching half of RunsClient(multiplex=True): per workspace a queue of calls and one
    # sender task, which has at most one batch awaiting its acceptances at a time; every task
    # lives in the nursery the client opened on `async with`.

    def __init__(
        self,
        client: RunsClient,
        manager: contextlib.AbstractAsyncContextManager[trio.Nursery],
        nursery: trio.Nursery,
    ) -> None:
        self.client = client
        self.manager = manager
        self.nursery = nursery
        self.queues: dict[str, list[_Pending]] = {}
        self.live: set[_Pending] = set()
        self.closing = False

    async def run(
        self,
        workspace_id: str,
        session_id: str,
        run_id: str,
        body: dict[str, object],
        resubmitting: bool,
    ) -> RunComplete:
        message = json.dumps(body, separators=(",", ":")).encode()
        pending = _Pending(
            workspace_id, session_id, run_id, message, resubmitting, trio.current_time()
        )
        queue = self.queues.get(workspace_id)
        if queue is None:
            queue = self.queues[workspace_id] = []
            self.nursery.start_soon(self._sender, workspace_id, queue)
        queue.append(pending)
        self.live.add(pending)
        try:
            await self._outcome(pending)
            outcome = pending.outcome
            if isinstance(outcome, RunComplete):
                return outcome
            if isinstance(outcome, Exception):
                raise outcome
            return await self.client.wait_terminal(run_id)
        except (trio.Cancelled, KeyboardInterrupt):
            self._abandon(pending)
            raise
        finally:
            self.live.discard(pending)

    async def _outcome(self, pending: _Pending) -> None:
        # Wait for the pending call's outcome (_finish wakes us). Not an Event: a cancellation
        # must drop a queued prompt at once, in the abort hook, before a batch can take it
        # (with Event.wait the sender could run between the cancel and our waking up).
        pending.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            pending.waiter = None
            self._drop_if_queued(pending)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _drop_if_queued(self, pending: _Pending) -> None:
        if pending.state == "queued":
            queue = self.queues.get(pending.workspace_id, [])
            if pending in queue:
                queue.remove(pending)
            pending.state = "over"
            pending.abandoned = True

    async def close(self) -> None:
        # Nothing queued is sent any more; the batches in flight stop (their runs go on); the
        # cancellations of abandoned runs finish (shielded, bounded); then the nursery is gone.
        self.closing = True
        for queue in self.queues.values():
            for pending in queue:
                pending.state = "over"
                self._finish(pending, _closed())
            queue.clear()
        self.nursery.cancel_scope.cancel()
        try:
            # Never the body's exception: a nursery would wrap it in an ExceptionGroup.
            await self.manager.__aexit__(None, None, None)
        finally:
            for pending in list(self.live):
                self._finish(pending, _closed())

    def _abandon(self, pending: _Pending) -> None:
        # Its caller was cancelled (a prompt still queued was dropped by _outcome's abort
        # hook): cancel its run, this run only, once the server accepted it; a run that ended
        # or was refused needs nothing.
        if pending.abandoned or (pending.done and pending.outcome is not None):
            return  # dropped unsent, already being cancelled, or ended or refused
        pending.abandoned = True
        if pending.state == "accepted" and not self.closing:
            self.nursery.start_soon(self._cancel, pending.run_id)
        # "sent": _accept() starts the cancellation when the server says it accepted it.

    async def _cancel(self, run_id: str) -> None:
        # Shielded: the run must not outlive its abandoned caller because the client closed.
        with trio.CancelScope(shield=True), trio.move_on_after(self.client.timeout):
            try:
                await self.client.cancel_run(run_id)
            except (ClientError, ServerLost) as exc:
                logger.warning("could not cancel the abandoned run %s: %s", run_id, exc)

    def _accept(self, pending: _Pending) -> None:
        pending.state = "accepted"
        if pending.abandoned and not self.closing:
            self.nursery.start_soon(self._cancel, pending.run_id)

    @staticmethod
    def _finish(pending: _Pending, outcome: RunComplete | Exception | None) -> None:
        # The caller's outcome, once: a second one (a retried batch's) is ignored.
        if not pending.done:
            pending.outcome = outcome
            pending.done = True
            if pending.waiter is not None:
                trio.lowlevel.reschedule(pending.waiter)
                pending.waiter = None

    async def _sender(self, workspace_id: str, queue: list[_Pending]) -> None:
        # One batch after another while calls are queued: each holds what queued up while the
        # previous one awaited its acceptances, so the batch size follows the load, no timer.
        try:
            while queue:
                count = size = 0
                for pending in queue:
                    size += len(pending.message) + 1
                    if count == MAX_BATCH_ITEMS or (count and size > _BATCH_BODY_LIMIT):
                        break
                    count += 1
                batch = queue[:count]
                del queue[:count]
                for pending in batch:
                    pending.state = "sent"
                accepted = trio.Event()
                self.nursery.start_soon(self._batch, workspace_id, queue, batch, accepted)
                await accepted.wait()
        finally:
            if self.queues.get(workspace_id) is queue:
                del self.queues[workspace_id]

    async def _batch(
        self,
        workspace_id: str,
        queue: list[_Pending],
        batch: list[_Pending],
        accepted: trio.Event,
    ) -> None:
        # Send the batch (again after a transport error, within the bound), hand each caller
        # its outcome from the streamed answer; sets `accepted` once every acceptance is known
        # (or never will be). The head is bounded by the liveness timeout counted from the
        # oldest call's queueing; the answer's silence by the same timeout (a read timeout).
        client = self.client
        path = f"/v1/workspaces/{_quote(workspace_id)}/batches"
        timeout = httpx.Timeout(client.timeout, read=client.timeout * _BOUND_SHARE)
        since = min(pending.enqueued_at for pending in batch)
        sent = batch
        attempt = 1
        failure: Exception | None = None
        try:
            with trio.move_on_at(since + client.timeout * _BOUND_SHARE) as head:
                while sent:
                    heard = 0
                    content = b'{"messages":[' + b",".join(p.message for p in sent) + b"]}"
                    try:
                        async with client._http.stream(
                            "POST", path, content=content, headers=_JSON_HEADERS, timeout=timeout
                        ) as response:
                            if response.status_code >= 400:
                                await response.aread()
                                sent = self._refused(queue, sent, _error_of(response))
                                continue
                            lines_iter = cast("AsyncGenerator[str, None]", response.aiter_lines())
                            async with contextlib.aclosing(lines_iter) as lines:
                                async for line in lines:
                                    if not line.strip():
                                        continue  # a heartbeat
                                    await self._line(decode_batch_line(line), sent, attempt)
                                    heard += 1
                                    if heard == len(sent):
                                        head.deadline = math.inf
                                        accepted.set()
                        sent = []
                    except httpx.TransportError as exc:
                        logger.debug("batch answer broke off (%r)", exc)
                        if heard >= len(sent):
                            break  # every acceptance is known: the callers wait by id
                        sent = [pending for pending in sent if pending.state == "sent"]
                        attempt += 1  # a retry: a duplicate_run may be our own acceptance
                        await trio.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
        except Exception as exc:  # a malformed answer: never the nursery's (the client's) end
            logger.warning("batch answer not understood: %r", exc)
            failure = ClientError(
                502, "bad_answer", f"the batch's answer was not understood: {exc}"
            )
        finally:
            accepted.set()
            for pending in batch:
                if self.closing:
                    self._finish(pending, _closed())
                elif pending.state == "sent":
                    pending.state = "over"
                    self._finish(
                        pending,
                        failure
                        or ServerLost(
                            f"no answer to a batch from the server at {client.base_url} "
                            f"within {client.timeout:g}s"
                        ),
                    )
                elif pending.state == "accepted":
                    self._finish(pending, None)  # its terminal is waited for by id

    async def _line(self, line: DecodedBatchLine, sent: list[_Pending], attempt: int) -> None:
        kind, pending = line.kind, sent[line.index]
        if kind == "accepted":
            self._accept(pending)
        elif kind == "ended":
            assert line.terminal is not None
            self._finish(pending, line.terminal)
        elif kind == "refused":
            refusal = line.refusal
            assert refusal is not None
            if pending.state == "accepted":
                self._finish(pending, None)  # its terminal is gone from the server: wait says why
            elif (
                (attempt > 1 or pending.resubmitting)
                and refusal.code == "duplicate_run"
                and await self.client._is_ours(pending.run_id, pending.session_id)
            ):
                self._accept(pending)  # our earlier attempt accepted it; its answer was lost
            else:
                pending.state = "over"
                self._finish(pending, refusal)

    def _refused(
        self, queue: list[_Pending], sent: list[_Pending], error: ClientError
    ) -> list[_Pending]:
        # The whole request was refused; returns what to send again. A 422 naming a message
        # refuses that message's caller only (with the error a single submission would have
        # had); a refusal naming none, of several messages, is untangled by sending them one
        # at a time (the rest go back to the front of the queue); any other (404, 503, ...)
        # would have refused each of them alone: every caller gets it.
        named = _NAMED_MESSAGE.fullmatch(error.message) if error.status == 422 else None
        if named is not None and int(named[1]) < len(sent):
            index = int(named[1])
            bad = sent[index]
            bad.state = "over"
            self._finish(bad, ClientError(error.status, error.code, named[2]))
            return sent[:index] + sent[index + 1 :]
        if len(sent) > 1 and error.status in (413, 422):
            for pending in sent[1:]:
                pending.state = "queued"
            queue[:0] = sent[1:]
            return sent[:1]
        for pending in sent:
            pending.state = "over"
            self._finish(pending, ClientError(error.status, error.code, error.message))
        return []


def _closed() -> ClientNotOpen:
    return ClientNotOpen("the RunsClient was closed before this run_prompt's answer came")


# -- a batch answer's lines -------------------------------------------------------------------


@attrs.frozen
class DecodedBatchLine:
    """One line of a batch's answer (``POST .../batches``), decoded: its ``kind``
    (``accepted``, ``ended``, ``refused``, or a kind this client does not know) and message
    ``index``; an ``ended`` line's ``terminal``; a ``refused`` line's ``refusal``."""

    kind: str
    index: int
    terminal: RunComplete | None = None
    refusal: ClientError | None = None


class _WireTerminal(msgspec.Struct, forbid_unknown_fields=True):
    # RunComplete.to_dict()'s shape, field for field, with RunComplete.from_dict's types:
    # msgspec refuses what from_dict refuses (an unknown field, 1 for a bool, true for an
    # int, a null where no null is allowed); the end reason is checked after.
    session_id: str
    run_id: str
    result: Any = None
    error: str | None = None
    cancelled: bool = False
    abandoned: bool = False
    timed_out: bool = False
    reason: str | None = None
    accepted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1
    labels: dict[str, str] = {}


class _WireRun(msgspec.Struct):
    terminal: _WireTerminal | None = None  # the rest of the run's view is not read


class _WireError(msgspec.Struct):
    code: str
    message: str


class _WireLine(msgspec.Struct):
    kind: str
    index: int
    run: _WireRun | None = None
    status: int | None = None
    error: _WireError | None = None


_decode_wire_line: Final = msgspec.json.Decoder(_WireLine).decode


def decode_batch_line(text: str) -> DecodedBatchLine:
    """Decode one non-blank line of a batch's answer; raises ``ValueError`` (or ``KeyError``,
    ``TypeError``) for a malformed one, as ``json.loads`` and ``RunComplete.from_dict`` do.

    A well-formed line is decoded by msgspec straight into its terminal, without the
    intermediate dicts (the client's main cost per run of a batch). Anything msgspec does
    not take as is (a field of another type, a number JSON cannot hold exactly, an escaped
    lone surrogate, an end reason this client does not know) is decoded the general way,
    ``json.loads`` then ``RunComplete.from_dict``, which accepts and refuses exactly what it
    always did.
    """
    try:
        wire = _decode_wire_line(text)
    except ValueError:  # msgspec.DecodeError, or a str holding a lone surrogate
        return _batch_line_of(json.loads(text))
    kind = wire.kind
    if kind == "ended":
        t = wire.run.terminal if wire.run is not None else None
        if t is None or (t.reason is not None and t.reason not in END_REASONS):
            return _batch_line_of(json.loads(text))
        terminal = RunComplete(
            t.session_id,
            t.run_id,
            t.result,
            t.error,
            t.cancelled,
            t.abandoned,
            t.timed_out,
            reason=t.reason,  # type: ignore[arg-type]  # checked against END_REASONS above
            accepted_at=t.accepted_at,
            started_at=t.started_at,
            ended_at=t.ended_at,
            attempt=t.attempt,
            labels=t.labels,
        )
        return DecodedBatchLine(kind, wire.index, terminal=terminal)
    if kind == "refused":
        if wire.status is None or wire.error is None:
            return _batch_line_of(json.loads(text))
        refusal = ClientError(wire.status, wire.error.code, wire.error.message)
        return DecodedBatchLine(kind, wire.index, refusal=refusal)
    return DecodedBatchLine(kind, wire.index)


def _batch_line_of(line: Any) -> DecodedBatchLine:
    # The general way, from json.loads's output.
    kind, index = line["kind"], int(line["index"])
    if kind == "ended":
        return DecodedBatchLine(
            kind, index, terminal=RunComplete.from_dict(line["run"]["terminal"])
        )
    if kind == "refused":
        error = line["error"]
        refusal = ClientError(int(line["status"]), str(error["code"]), str(error["message"]))
        return DecodedBatchLine(kind, index, refusal=refusal)
    return DecodedBatchLine(kind, index)
