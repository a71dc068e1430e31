"""The workspace event stream as Server-Sent Events.

One response merges a workspace's three brokers: lossy ``progress`` and ``notification``
events and must-deliver ``run_complete`` events, each with an ``id:``. A comment line is sent
every ``heartbeat`` seconds so that a dead connection is noticed by both ends. The stream
ends when the workspace closes (after every terminal queued for it was sent), when the
client disconnects, or with an ``error`` event if the client fell so far behind that the
broker disconnected it. Every subscription is released however the response ends.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any, Final

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..backend import Workspace
from ..broker import Subscription
from ..errors import SubscriberOverflow
from .schema import ApiError

__all__ = ["DEFAULT_HEARTBEAT", "EventStream", "encode_event"]

logger = logging.getLogger("trio_runs.http")

DEFAULT_HEARTBEAT: Final = 15.0
"""Seconds between two heartbeat comments on an idle event stream."""

_Item = tuple[str, dict[str, Any]]


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
    ``on_close`` are called once each, around the life of the stream (for metrics).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        workspace: Workspace,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        run_id: str | None = None,
        session_id: str | None = None,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            status_code=200,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        # A stream has no length: drop the content-length Response computed for no body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        if not (heartbeat > 0 and math.isfinite(heartbeat)):
            raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat}")
        self.workspace = workspace
        self.heartbeat = heartbeat
        self.run_id = run_id
        self.session_id = session_id
        self._on_open = on_open
        self._on_close = on_close

    def _wanted(self, payload: object) -> bool:
        if self.run_id is not None and getattr(payload, "run_id", None) != self.run_id:
            return False
        return self.session_id is None or getattr(payload, "session_id", None) == self.session_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the workspace closes or the client goes; always unsubscribes."""
        workspace = self.workspace
        if self._on_open is not None:
            self._on_open()
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
            if self._on_close is not None:
                self._on_close()

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
            async with receive_items:
                while True:
                    item: _Item | None = None
                    # Only the wait is bounded by the heartbeat, never a send: cancelling a
                    # send half-way would corrupt the stream.
                    with trio.move_on_after(self.heartbeat):
                        try:
                            item = await receive_items.receive()
                        except trio.EndOfChannel:
                            break
                    if item is None:
                        frame = b": heartbeat\n\n"
                    else:
                        event_id += 1
                        frame = encode_event(event_id, *item)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    if item is not None and item[0] == "error":
                        break
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
                # Ends the whole stream once sent: the client must reconnect and reconcile
                # from /v1/runs/{id}/wait.
                await out.send(("error", error.body()))


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
