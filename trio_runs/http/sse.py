"""Event streams as Server-Sent Events: a workspace's, and one run's.

Both read the workspace's :class:`~trio_runs.http.journal.Journal`, so every event has the
workspace's own ``id:`` (1, 2, 3, ... for the workspace's whole life). A client that
reconnects with ``Last-Event-ID`` (or ``?last_event_id=``) first gets what the journal still
holds after that id, then the live events, with no event missing in between and none twice.
If events after that id already left the journal's window, the stream opens with an
``event: gap`` whose data says which id the journal still holds first: those events are gone
(reconcile from ``/v1/runs/{id}`` or ``/wait``). Events without an id (``gap``, ``error``,
``end``, and a run's terminal read from the store) leave the client's last id as it was.
A comment line is sent every ``heartbeat`` seconds so that a dead connection is noticed by
both ends.

How a workspace stream ends, and what the client is told:

- the workspace closes (``DELETE``) or the server shuts down: every terminal queued for the
  stream is sent, then a last ``end`` event whose ``reason`` is ``workspace_closed`` or
  ``shutdown``. From that moment the stream has the connection's write timeout to get it
  all out; past it the connection is closed.
- the client fell so far behind that the broker disconnected it: an ``error`` event
  (``subscriber_overflow``), then ``end`` with reason ``slow_consumer`` (resume with
  ``Last-Event-ID``).
- the client stops reading: a write it does not take within the write timeout closes the
  connection (no event can reach it any more). See :class:`ClientConnection`.
- the client disconnects.

A run's stream (:class:`RunEventStream`) sends the run's progress still held, then live, then
its terminal (read from the store when the run already ended or the journal cannot give it),
then ``end`` with reason ``run_ended``: a late follower always gets the ending.

Every subscription is released however the response ends.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from contextvars import ContextVar
from typing import Any, Final, Protocol

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..broker import Subscription
from ..errors import StoreError, SubscriberOverflow
from ..events import RunComplete
from ._stream import prepare_stream
from .journal import Journal, JournalEntry, Replay
from .schema import ApiError

__all__ = [
    "CLIENT_CONNECTION",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_WRITE_TIMEOUT",
    "END_REASONS",
    "ClientConnection",
    "EventStream",
    "RunEventStream",
    "encode_event",
    "parse_last_event_id",
]

logger = logging.getLogger("trio_runs.http")

DEFAULT_HEARTBEAT: Final = 15.0
"""Seconds between two heartbeat comments on an idle event stream."""

DEFAULT_WRITE_TIMEOUT: Final = 10.0
"""Seconds a client gets to take a write (and an ending event stream to finish) before its
connection is closed."""

END_REASONS: Final = ("workspace_closed", "shutdown", "slow_consumer", "run_ended")
"""The ``reason`` of a stream's last event, ``end``."""

_LAST_EVENT_ID = re.compile(r"[0-9]{1,18}")


class ClientConnection(Protocol):
    """What ``serve`` lets a response do about its client's connection."""

    @property
    def write_timeout(self) -> float:
        """Seconds a write may stall before the connection is closed."""
        ...

    def set_write_deadline(self, deadline: float) -> None:
        """Close the connection if a write is still unfinished at ``deadline`` (Trio time);
        ``math.inf`` lifts it."""
        ...

    def hold_writes(self) -> None:
        """Keep what is written in memory until :meth:`release_writes` (holds nest)."""
        ...

    async def release_writes(self) -> None:
        """End a hold; the last one writes all that was held in one write, shielded and
        bounded by the write timeout, closing the connection if that fails. Never raises."""
        ...


CLIENT_CONNECTION: ContextVar[ClientConnection] = ContextVar("trio_runs_client_connection")
"""The connection of the request being served; set by ``serve`` for each connection."""


def encode_event(event_id: int | None, kind: str, data: dict[str, Any]) -> bytes:
    """One SSE frame: ``id:`` (unless ``None``), ``event:`` and a single-line JSON ``data:``."""
    # Strict: these are the server's own values (and a terminal, already checked), never
    # converted; one that is not JSON is a bug to surface, not a value to change.
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {kind}\ndata: {text}\n\n".encode()


def _entry_frame(entry: JournalEntry) -> bytes:
    # The journal encoded the data once, for every reader.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (entry.id, entry.kind.encode(), entry.data)


def _gap_frame(last_event_id: int, first_id: int) -> bytes:
    return encode_event(None, "gap", {"last_event_id": last_event_id, "first_id": first_id})


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    """The id a client resumes after: the ``Last-Event-ID`` header, else ``?last_event_id=``.

    The header wins: a browser's ``EventSource`` reconnects to the same URL (query included)
    with the id it last saw in the header. ``None`` when neither is given. Raises
    :class:`ApiError` 422 ``invalid_last_event_id`` for anything but a decimal event id.
    """
    resume: int | None = None
    for given in (query, header):  # both checked, even when the header wins
        if given is None:
            continue
        text = given.strip()
        if not _LAST_EVENT_ID.fullmatch(text):
            raise ApiError(
                422,
                "invalid_last_event_id",
                f"Last-Event-ID must be an event id this server sent (decimal digits), "
                f"got {given!r}",
            )
        resume = int(text)
    return resume


class _SseResponse(Response):
    # What both streams share: the response head, the connection's write deadline, the
    # end reason, the disconnect watch, and bookkeeping around the stream's life.

    media_type = "text/event-stream"

    def __init__(
        self,
        workspace_id: str | None,
        *,
        heartbeat: float,
        last_event_id: int | None,
        on_open: Callable[[Any], None] | None,
        on_close: Callable[[Any], None] | None,
    ) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        prepare_stream(self, heartbeat)
        self.workspace_id = workspace_id
        """The workspace whose events are streamed (``None``: a run no workspace holds)."""
        self.heartbeat = heartbeat
        self.last_event_id = last_event_id
        """The id the client resumes after (``None``: it starts live)."""
        self.end_reason = "workspace_closed"
        """The ``reason`` the ``end`` event gives when the workspace's events end the stream."""
        self._on_open = on_open
        self._on_close = on_close
        self._connection: ClientConnection | None = None

    def end(self, reason: str) -> None:
        """The workspace has closed: finish within the connection's write timeout.

        What is queued and the ``end`` event (with ``reason``) are sent if the client takes
        them in time; otherwise its connection is closed. Call it once the workspace's
        brokers have shut down (before that, set :attr:`end_reason` alone).
        """
        self.end_reason = reason
        connection = self._connection
        if connection is not None:
            connection.set_write_deadline(trio.current_time() + connection.write_timeout)

    def _live(self) -> AbstractAsyncContextManager[Subscription[JournalEntry] | None]:
        raise NotImplementedError

    def _replay(self) -> Replay:
        raise NotImplementedError

    async def _body(
        self, send: Send, live: Subscription[JournalEntry] | None, replay: Replay
    ) -> str:
        # Streams the events; returns the end reason.
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the events end or the client goes; always unsubscribes."""
        self._connection = CLIENT_CONNECTION.get(None)
        if self._on_open is not None:
            self._on_open(self)
        try:
            async with self._live() as live:
                # Subscribed to the live events before the replay is read, with no
                # checkpoint in between: they meet without a gap (an overlap is skipped
                # by id).
                replay = self._replay()
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                # Subscribed before this is sent: whatever happens afterwards is streamed.
                await send(
                    {"type": "http.response.body", "body": b": subscribed\n\n", "more_body": True}
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
                    reason = await self._body(send, live, replay)
                    # Reached only if the client is still there: tell it why the stream ends.
                    await self._send(send, encode_event(None, "end", {"reason": reason}))
                    nursery.cancel_scope.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self._connection is not None:
                # The next response on this (kept-alive) connection starts unbounded.
                self._connection.set_write_deadline(math.inf)
            if self._on_close is not None:
                self._on_close(self)

    async def _send(self, send: Send, frame: bytes) -> None:
        await send({"type": "http.response.body", "body": frame, "more_body": True})

    async def _next(self, live: Subscription[JournalEntry]) -> JournalEntry | None:
        # The next live entry, or None after a heartbeat's worth of silence (a heartbeat is
        # sent). Only the wait is bounded by the heartbeat, never a send: cancelling a send
        # half-way would corrupt the stream (a send the client does not take is bounded by
        # the connection: see ClientConnection). EndOfChannel and SubscriberOverflow pass.
        with trio.move_on_after(self.heartbeat):
            event = await live.receive()
            return event.payload
        return None

    async def _overflowed(self, send: Send, exc: SubscriberOverflow) -> str:
        logger.warning("event stream of workspace %s: %s", self.workspace_id, exc)
        error = ApiError(503, "subscriber_overflow", str(exc))
        # Ends the stream (with ``end``, reason slow_consumer): the client resumes with
        # Last-Event-ID, or reconciles from /v1/runs/{id}/wait.
        await self._send(send, encode_event(None, "error", error.body()))
        return "slow_consumer"


class EventStream(_SseResponse):
    """A streaming ``text/event-stream`` response for one workspace, read from its journal.

    ``run_id`` / ``session_id`` keep only the events of that run / session.
    ``last_event_id`` resumes after that id (see the module docstring). ``on_open`` and
    ``on_close`` are called once each with the stream, around its life (for bookkeeping).
    """

    def __init__(
        self,
        journal: Journal,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        run_id: str | None = None,
        session_id: str | None = None,
        last_event_id: int | None = None,
        on_open: Callable[[EventStream], None] | None = None,
        on_close: Callable[[EventStream], None] | None = None,
    ) -> None:
        super().__init__(
            journal.workspace_id,
            heartbeat=heartbeat,
            last_event_id=last_event_id,
            on_open=on_open,
            on_close=on_close,
        )
        self.journal = journal
        self.run_id = run_id
        self.session_id = session_id

    def _wanted(self, entry: JournalEntry) -> bool:
        if self.run_id is not None and entry.run_id != self.run_id:
            return False
        return self.session_id is None or entry.session_id == self.session_id

    def _live(self) -> AbstractAsyncContextManager[Subscription[JournalEntry] | None]:
        return self.journal.live.subscribe()

    def _replay(self) -> Replay:
        if self.last_event_id is None:
            return Replay((), None, self.journal.last_id)
        return self.journal.replay(self.last_event_id)

    async def _body(
        self, send: Send, live: Subscription[JournalEntry] | None, replay: Replay
    ) -> str:
        assert live is not None
        sent = replay.after
        if replay.first_id is not None and self.last_event_id is not None:
            await self._send(send, _gap_frame(self.last_event_id, replay.first_id))
        if self.last_event_id is None and sent > 0:
            # A fresh stream says where it starts: an id-only frame dispatches nothing but
            # moves the client's last id, so a client that reconnects before any event
            # arrived resumes from here instead of missing what happened meanwhile.
            await self._send(send, b"id: %d\n\n" % sent)
        for held in replay.entries:
            if self._wanted(held):
                await self._send(send, _entry_frame(held))
            sent = held.id
        while True:
            entry: JournalEntry | None
            try:
                entry = await self._next(live)
            except trio.EndOfChannel:
                return self.end_reason
            except SubscriberOverflow as exc:
                return await self._overflowed(send, exc)
            if entry is None:
                await self._send(send, b": heartbeat\n\n")
            elif entry.kind == "error":
                await self._send(send, b"event: error\ndata: %s\n\n" % entry.data)
                return "slow_consumer"
            elif entry.id > sent:  # an entry already replayed is not sent twice
                sent = entry.id
                if self._wanted(entry):
                    await self._send(send, _entry_frame(entry))


class RunEventStream(_SseResponse):
    """One run's events: its progress the journal still holds, then live, then its
    terminal, then ``end`` (reason ``run_ended``), late or live.

    ``journal`` is its workspace's (``None`` when no open workspace holds the run: then only
    the terminal, from the store). ``ended(run_id)`` is the run's terminal if the store has
    it; ``wait_ended(run_id)`` waits for it (what a run left with no journal ends on).
    """

    def __init__(
        self,
        run_id: str,
        journal: Journal | None,
        *,
        ended: Callable[[str], RunComplete | None],
        wait_ended: Callable[[str], Awaitable[RunComplete]],
        heartbeat: float = DEFAULT_HEARTBEAT,
        last_event_id: int | None = None,
        on_open: Callable[[RunEventStream], None] | None = None,
        on_close: Callable[[RunEventStream], None] | None = None,
    ) -> None:
        super().__init__(
            None if journal is None else journal.workspace_id,
            heartbeat=heartbeat,
            last_event_id=last_event_id,
            on_open=on_open,
            on_close=on_close,
        )
        self.run_id = run_id
        self.journal = journal
        self._ended = ended
        self._wait_ended = wait_ended

    def _live(self) -> AbstractAsyncContextManager[Subscription[JournalEntry] | None]:
        if self.journal is None:
            return nullcontext(None)
        return self.journal.live.subscribe()

    def _replay(self) -> Replay:
        if self.journal is None:
            return Replay((), None, 0)
        return self.journal.replay(0 if self.last_event_id is None else self.last_event_id)

    async def _body(
        self, send: Send, live: Subscription[JournalEntry] | None, replay: Replay
    ) -> str:
        run_id = self.run_id
        sent = replay.after
        if replay.first_id is not None and self.last_event_id is not None:
            await self._send(send, _gap_frame(self.last_event_id, replay.first_id))
        for held in replay.entries:
            sent = held.id
            if held.run_id == run_id:
                await self._send(send, _entry_frame(held))
                if held.kind == "run_complete":
                    return "run_ended"
        if live is not None:
            ended = self._ended(run_id)
            while True:
                entry: JournalEntry | None
                if ended is not None:
                    # Ended before the journal could show it to us: what it already passed
                    # on, then the store's terminal.
                    try:
                        entry = live.receive_nowait().payload
                    except (trio.WouldBlock, trio.EndOfChannel, SubscriberOverflow):
                        break
                else:
                    try:
                        entry = await self._next(live)
                    except trio.EndOfChannel:
                        break  # the workspace closed: the store has the terminal
                    except SubscriberOverflow as exc:
                        return await self._overflowed(send, exc)
                if entry is None:
                    await self._send(send, b": heartbeat\n\n")
                    continue
                if entry.kind == "error":
                    await self._send(send, b"event: error\ndata: %s\n\n" % entry.data)
                    return "slow_consumer"
                if entry.id <= sent or entry.run_id != run_id:
                    continue
                sent = entry.id
                await self._send(send, _entry_frame(entry))
                if entry.kind == "run_complete":
                    return "run_ended"
        terminal = self._ended(run_id)
        while terminal is None:
            try:
                with trio.move_on_after(self.heartbeat):
                    terminal = await self._wait_ended(run_id)
            except StoreError as exc:
                # The store cannot answer (Redis unreachable): say so and end the stream;
                # the client follows again (or waits) once the store is back.
                error = ApiError(503, "store_unavailable", str(exc))
                await self._send(send, encode_event(None, "error", error.body()))
                return "store_unavailable"
            if terminal is None:
                await self._send(send, b": heartbeat\n\n")
        await self._send(send, encode_event(None, "run_complete", terminal.to_dict()))
        return "run_ended"


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
