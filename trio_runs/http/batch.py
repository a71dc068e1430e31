"""A batch's answer: its acceptances, then its runs' terminals as they end, as NDJSON.

``POST /v1/workspaces/{id}/batches`` answers ``200`` with ``application/x-ndjson`` only
once every accepted message is durable (:meth:`RunService.submit_batch`). The body is one
JSON object per line (:data:`~trio_runs.http.schema.BatchLine`):

- first one line per message, in order: ``accepted`` (with its run id) or ``refused`` (the
  typed error a single submission would have had);
- then one ``ended`` line per accepted run, with its run view and terminal, in the order the
  runs end, each exactly once; the body ends after the last one.

A blank line is a heartbeat, sent every ``heartbeat`` seconds while nothing else is, so that
a client can tell a long run from a dead connection. How a batch stream ends otherwise:

- the client disconnects: the stream stops (its runs go on; their terminals stay available
  from ``/v1/runs/{id}/wait``);
- the client stops reading: a write it does not take within the connection's write timeout
  closes the connection (see :class:`~trio_runs.http.sse.ClientConnection`), so it never
  holds the server, nor its shutdown, which ends every run and so every batch stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import UnknownRun
from ._stream import prepare_stream
from .schema import ApiError
from .service import RunService

__all__ = ["NDJSON", "BatchStream"]

NDJSON: Final = "application/x-ndjson"


class BatchStream(Response):
    """The streaming NDJSON answer to a batch whose messages ``results`` says were accepted
    (run ids) or refused (errors), in order. ``dumps`` encodes one line's JSON."""

    media_type = NDJSON

    def __init__(
        self,
        service: RunService,
        results: list[str | ApiError],
        run_ids: list[str | None],
        *,
        heartbeat: float,
        dumps: Callable[[object], bytes],
    ) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        prepare_stream(self, heartbeat)
        self.service = service
        self.results = results
        self.run_ids = run_ids
        self.heartbeat = heartbeat
        self._dumps = dumps

    def _line(self, body: dict[str, Any]) -> bytes:
        return self._dumps(body) + b"\n"

    def _first_lines(self) -> bytes:
        lines = []
        for index, result in enumerate(self.results):
            if isinstance(result, str):
                lines.append(self._line({"kind": "accepted", "index": index, "run_id": result}))
            else:
                lines.append(self._line(_refused(index, self.run_ids[index], result)))
        return b"".join(lines)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the acceptances, then each terminal as it comes, then end the body."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self._first_lines(), "more_body": True})
        accepted = [(i, r) for i, r in enumerate(self.results) if isinstance(r, str)]
        send_lines, receive_lines = trio.open_memory_channel[bytes](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            async with send_lines:
                for index, run_id in accepted:
                    nursery.start_soon(self._ended, index, run_id, send_lines.clone())
            ended = False
            async with receive_lines:
                while not ended:
                    lines = [b"\n"]
                    # Only the wait is bounded by the heartbeat, never a send (cancelling one
                    # half-way would corrupt the body; the connection bounds the send).
                    with trio.move_on_after(self.heartbeat):
                        try:
                            lines = [await receive_lines.receive()]
                        except trio.EndOfChannel:
                            lines, ended = [], True
                    # Every line already waiting goes in the same message: runs of a batch
                    # tend to end together (one durable flush), and each message is a socket
                    # write of its own (the writes are most of the server's cost per batch).
                    while not ended:
                        try:
                            lines.append(receive_lines.receive_nowait())
                        except trio.WouldBlock:
                            break
                        except trio.EndOfChannel:
                            ended = True
                    body = b"".join(lines)
                    if body or ended:
                        await send(
                            {"type": "http.response.body", "body": body, "more_body": not ended}
                        )
            nursery.cancel_scope.cancel()

    async def _ended(self, index: int, run_id: str, out: trio.MemorySendChannel[bytes]) -> None:
        async with out:
            # UnknownRun: evicted meanwhile; the view below says 404.
            with contextlib.suppress(UnknownRun):
                await self.service.backend.wait_run(run_id)
            try:
                view = await self.service.view(run_id)
            except ApiError as exc:
                line = _refused(index, run_id, exc)
            else:
                line = {"kind": "ended", "index": index, "run": view.to_dict()}
            await out.send(self._line(line))


def _refused(index: int, run_id: str | None, error: ApiError) -> dict[str, Any]:
    return {
        "kind": "refused",
        "index": index,
        "run_id": run_id,
        "status": error.status,
        **error.body(),
    }


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
