"""The workspace event stream as Server-Sent Events.

One response merges a workspace's three brokers: lossy ``progress`` and ``notification``
events and must-deliver ``run_complete`` events, each with an ``id:``. A comment line is sent
every ``heartbeat`` seconds so that a dead connection is noticed by both ends.

How a stream ends, and what the client is told (it reconciles from ``/v1/runs/{id}/wait``):

- the workspace closes (``DELETE``) or the server shuts down: every terminal queued for the
  stream is sent, then a last ``end`` event whose ``reason`` is ``workspace_closed`` or
  ``shutdown``. From that moment the stream has the connection's write timeout to get it
  all out; past it the connection is closed.
- the client fell so far behind that the broker disconnected it: an ``error`` event
  (``subscriber_overflow``), then ``end`` with reason ``slow_consumer``.
- the client stops reading: a write it does not take within the write timeout closes the
  connection (no event can reach it any more). See :class:`ClientConnection`.
- the client disconnects.

Every subscription is released however the response ends.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final, Protocol

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..backend import Workspace
from ..broker import Subscription
from ..errors import SubscriberOverflow
from ._stream import prepare_stream
from .schema import ApiError

__all__ = [
    "CLIENT_CONNECTION",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_WRITE_TIMEOUT",
    "END_REASONS",
    "ClientConnection",
    "EventStream",
    "encode_event",
]

logger = logging.getLogger("trio_runs.http")

DEFAULT_HEARTBEAT: Final = 15.0
"""Seconds between two heartbeat comments on an idle event stream."""

DEFAULT_WRITE_TIMEOUT: Final = 10.0
"""Seconds a client gets to take a write (and an ending event stream to finish) before its
connection is closed."""

END_REASONS: Final = ("workspace_closed", "shutdown", "slow_consumer")
"""The ``reason`` of a stream's last event, ``end``."""

_Item = tuple[str, dict[str, Any]]


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


CLIENT_CONNECTION: ContextVar[ClientConnection] = ContextVar("trio_runs_client_connection")
"""The connection of the request being served; set by ``serve`` for each connection."""


def encode_event(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    """One SSE frame: ``id:``, ``event:`` and a single-line JSON ``data:``."""
    text = json.dumps(data, separators=(",", ":"), default=repr)
    return f"id: {event_id}\nevent: {kind}\ndata: {text}\n\n".encode()


def _payload_dict(payload: object) -> dict[str, Any]:
    to_dict: Callable[[], dict[str, Any]] | None = getattr(payload, "to_dict", None)
    return to_dict() if to_dict is not None else {"payload": payload}


class EventStream(Response):
    """A streaming ``text/event-stream`` response for one workspace.

    ``run_id`` / ``session_id`` keep only the events of that run / session. ``on_open`` and
    ``on_close`` are called once each with the stream, around its life (for bookkeeping).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        workspace: Workspace,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        run_id: str | None = None,
        session_id: str | None = None,
        on_open: Callable[[EventStream], None] | None = None,
        on_close: Callable[[EventStream], None] | None = None,
    ) -> None:
        super().__init__(
            status_code=200,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        prepare_stream(self, heartbeat)
        self.workspace = workspace
        self.heartbeat = heartbeat
        self.run_id = run_id
        self.session_id = session_id
        self.end_reason = "workspace_closed"
        """The ``reason`` the ``end`` event gives when the workspace's brokers end the stream."""
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

    def _wanted(self, payload: object) -> bool:
        if self.run_id is not None and getattr(payload, "run_id", None) != self.run_id:
            return False
        return self.session_id is None or getattr(payload, "session_id", None) == self.session_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the workspace closes or the client goes; always unsubscribes."""
        workspace = self.workspace
        self._connection = CLIENT_CONNECTION.get(None)
        if self._on_open is not None:
            self._on_open(self)
        try:
            async with (
                workspace.run_completions.subscribe() as completions,
                workspace.notifications.subscribe() as notifications,
                workspace.events.subscribe() as progress,
            ):
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
                await self._pump(receive, send, completions, notifications, progress)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self._connection is not None:
                # The next response on this (kept-alive) connection starts unbounded.
                self._connection.set_write_deadline(math.inf)
            if self._on_close is not None:
                self._on_close(self)

    async def _pump(
        self,
        receive: Receive,
        send: Send,
        completions: Subscription[Any],
        notifications: Subscription[Any],
        progress: Subscription[Any],
    ) -> None:
        # Each subscription is forwarded by its own task into one unbuffered channel, so a
        # slow client backs up into the broker's per-subscriber queue, whose policy (drop
        # lossy, never drop must-deliver) then applies.
        send_items, receive_items = trio.open_memory_channel[_Item](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            sources = (
                (completions, "run_complete"),
                (notifications, "notification"),
                (progress, "progress"),
            )
            async with send_items:
                for subscription, kind in sources:
                    nursery.start_soon(self._forward, subscription, kind, send_items.clone())
            event_id = 0
            reason = "slow_consumer"
            async with receive_items:
                while True:
                    item: _Item | None = None
                    # Only the wait is bounded by the heartbeat, never a send: cancelling a
                    # send half-way would corrupt the stream. (A send the client does not
                    # take is bounded by the connection: see ClientConnection.)
                    with trio.move_on_after(self.heartbeat):
                        try:
                            item = await receive_items.receive()
                        except trio.EndOfChannel:
                            reason = self.end_reason
                            break
                    if item is None:
                        frame = b": heartbeat\n\n"
                    else:
                        event_id += 1
                        frame = encode_event(event_id, *item)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    if item is not None and item[0] == "error":
                        break
            # Reached only if the client is still there: tell it why the stream ends.
            frame = encode_event(event_id + 1, "end", {"reason": reason})
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            nursery.cancel_scope.cancel()

    async def _forward(
        self, subscription: Subscription[Any], kind: str, out: trio.MemorySendChannel[_Item]
    ) -> None:
        async with out:
            try:
                async for event in subscription:
                    if self._wanted(event.payload):
                        await out.send((kind, _payload_dict(event.payload)))
            except SubscriberOverflow as exc:
                logger.warning("event stream of workspace %s: %s", self.workspace.id, exc)
                error = ApiError(503, "subscriber_overflow", str(exc))
                # Ends the whole stream once sent (with ``end``, reason slow_consumer): the
                # client must reconnect and reconcile from /v1/runs/{id}/wait.
                await out.send(("error", error.body()))


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
