"""A batch's answer: its acceptances, then its runs' terminals as they end, as NDJSON.

``POST /v1/workspaces/{id}/batches`` answers ``200`` with ``application/x-ndjson`` only
once every accepted message is durable (:meth:`RunService.submit_batch`). The body is one
JSON object per line (:data:`~trio_runs.http.schema.BatchLine`):

- first one line per message, in order: ``accepted`` (with its run id) or ``refused`` (the
  typed error a single submission would have had);
- then one ``ended`` line per accepted run, with its run view and terminal, in the order the
  runs end, each exactly once; the body ends after the last one. Lines of runs ending within
  :data:`GATHER_SECONDS` (1 ms) of one another leave together, in one write.

A blank line is a heartbeat, sent every ``heartbeat`` seconds while nothing else is, so that
a client can tell a long run from a dead connection. How a batch stream ends otherwise:

- the client disconnects: the stream stops (its runs go on; their terminals stay available
  from ``/v1/runs/{id}/wait``);
- the client stops reading: a write it does not take within the connection's write timeout
  closes the connection (see :class:`~trio_runs.http.sse.ClientConnection`), so it never
  holds the server, nor its shutdown, which ends every run and so every batch stream.

What a run costs the stream is kept small, because a batch exists to make runs cheap: a run
already ended when the acceptances are written gets its ``ended`` line in the same write and
no task; every other run gets one small task that waits for its terminal in the store (the
store's own wait, which works whichever node ran it) and appends its line to the batch's list.
A line made of plain values (every acceptance and refusal, a terminal with a scalar or flat
result) is encoded with msgspec, the rest with strict ``json`` (see :func:`encode_line`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import UnknownRun
from ..events import RunComplete
from ._stream import prepare_stream
from .schema import ApiError
from .service import RunService

__all__ = ["GATHER_SECONDS", "NDJSON", "BatchStream", "encode_line", "is_plain"]

NDJSON: Final = "application/x-ndjson"

GATHER_SECONDS: Final = 0.001
"""How long an ``ended`` line may wait for the lines of runs ending right after it, so they
leave in one write (the last line of a batch never waits)."""

_encode: Final = msgspec.json.Encoder().encode
_SCALARS: Final = frozenset((str, int, bool, type(None)))
_SHALLOW: Final = 32  # items of a one-level dict or list result that the fast path checks


def encode_line(
    body: dict[str, Any], dumps: Callable[[object], bytes] | None = None, *, plain: bool = False
) -> bytes:
    """One NDJSON line (with its ``\\n``) for ``body``: ``dumps(body)`` (strict ``json`` by
    default), which raises for anything that is not JSON rather than convert it.

    ``plain=True`` is the caller's word that every value in ``body`` is a ``str``, ``int``,
    ``bool``, ``None`` or finite ``float`` (or a dict or list of them): then msgspec encodes
    it, several times cheaper. msgspec would turn a set, bytes or NaN into something else
    instead of refusing them, which is why it is used only on that word. Where its bytes
    could differ from what ``json.dumps`` writes (anything outside ASCII: msgspec writes
    UTF-8 where ``json`` writes ``\\uXXXX`` escapes, and a reader splitting lines as
    ``str.splitlines`` does would cut a line at a raw U+2028) or where it cannot encode (a
    lone surrogate), the line is ``dumps(body)`` after all: every line is ASCII.
    """
    data = b""
    if plain:
        try:
            data = _encode(body)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
            data = b""
    if not data or not data.isascii():
        data = (dumps or _strict)(body)
    return data + b"\n"


def _strict(body: object) -> bytes:
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def is_plain(rc: RunComplete) -> bool:
    """Whether :func:`encode_line` may take the ``ended`` line of ``rc`` as ``plain``."""
    # Whether the terminal's free-form parts are plain JSON at a glance (its other fields
    # are typed): a scalar result, or a flat dict (str keys) or list of scalars, finite
    # times and str labels. Anything else (deeper, larger) is left to the strict encoder.
    for time in (rc.accepted_at, rc.started_at, rc.ended_at):
        if time is not None and not (type(time) is float and math.isfinite(time)):
            return False
    labels = rc.labels
    if labels and not all(type(k) is str and type(v) is str for k, v in labels.items()):
        return False
    return _is_scalar(rc.result) or _is_flat(rc.result)


def _is_scalar(value: object) -> bool:
    kind = type(value)
    return kind in _SCALARS or (kind is float and math.isfinite(value))  # type: ignore[arg-type]


def _is_flat(value: object) -> bool:
    kind = type(value)
    if kind is dict:
        items: dict[object, object] = value  # type: ignore[assignment]
        return len(items) <= _SHALLOW and all(
            type(k) is str and _is_scalar(v) for k, v in items.items()
        )
    if kind is list:
        values: list[object] = value  # type: ignore[assignment]
        return len(values) <= _SHALLOW and all(_is_scalar(v) for v in values)
    return False


class BatchStream(Response):
    """The streaming NDJSON answer to a batch whose messages ``results`` says were accepted
    (run ids) or refused (errors), in order. ``dumps`` encodes a line's JSON where msgspec
    does not (see :func:`encode_line`)."""

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

    def _line(self, body: dict[str, Any], *, plain: bool = False) -> bytes:
        return encode_line(body, self._dumps, plain=plain)

    def _ended_line(self, index: int, run_id: str) -> bytes:
        # The run's view as GET /v1/runs/{id} shows it once its terminal is visible; a run
        # evicted meanwhile (retention) is a refused line with the 404 that view says.
        try:
            view = self.service.run(run_id)
        except ApiError as exc:
            return self._line(_refused(index, run_id, exc), plain=True)
        body = {"kind": "ended", "index": index, "run": view.to_dict()}
        return self._line(body, plain=view.terminal is not None and is_plain(view.terminal))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the acceptances, then each terminal as it comes, then end the body.

        Cancelled (the client went away, the server's shutdown), it stops where it is: the
        runs go on. It never sends a line twice, nor an ``ended`` line before the terminal is
        visible in the store.
        """
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        store = self.service.backend.ledger
        lines: list[bytes] = []
        waiting: list[tuple[int, str]] = []
        for index, result in enumerate(self.results):
            if isinstance(result, str):
                accepted = {"kind": "accepted", "index": index, "run_id": result}
                lines.append(self._line(accepted, plain=True))
                waiting.append((index, result))
            else:
                lines.append(self._line(_refused(index, self.run_ids[index], result), plain=True))
        # The runs that already ended go out with the acceptances, in one write, with no task
        # to wait for them: with a quick agent and a durable store, that is most of them.
        ended = [(i, r) for i, r in waiting if store.get(r) is not None]
        if ended:
            lines += [self._ended_line(i, r) for i, r in ended]
            done = {i for i, _ in ended}
            waiting = [(i, r) for i, r in waiting if i not in done]
        left = len(waiting)
        await send({"type": "http.response.body", "body": b"".join(lines), "more_body": left > 0})
        if not left:
            return
        # The waiters append their lines here and wake the sender; the list is only ever
        # touched between checkpoints, so nothing is lost or sent twice.
        ready: list[bytes] = []
        wake = trio.lowlevel.ParkingLot()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            for index, run_id in waiting:
                nursery.start_soon(self._wait_one, index, run_id, ready, wake)
            while left:
                if not ready:
                    # Only the waits are bounded (by the heartbeat, the gathering window),
                    # never a send (cancelling one half-way would corrupt the body; the
                    # connection bounds the send).
                    with trio.move_on_after(self.heartbeat):
                        await wake.park()
                if ready and len(ready) < left:
                    # Runs of a batch tend to end close together (one durable commit, one
                    # session's lane running them back to back) and each message is a socket
                    # write of its own, the biggest cost a batch has per message: the lines
                    # ending within GATHER_SECONDS of the first go in one message. The last
                    # line never waits.
                    with trio.move_on_after(GATHER_SECONDS):
                        while len(ready) < left:
                            await wake.park()
                body = b"".join(ready) if ready else b"\n"
                left -= len(ready)
                ready.clear()
                await send({"type": "http.response.body", "body": body, "more_body": left > 0})
            nursery.cancel_scope.cancel()

    async def _wait_one(
        self, index: int, run_id: str, ready: list[bytes], wake: trio.lowlevel.ParkingLot
    ) -> None:
        # UnknownRun: evicted meanwhile; the line says 404 (see _ended_line).
        with contextlib.suppress(UnknownRun):
            await self.service.backend.wait_run(run_id)
        ready.append(self._ended_line(index, run_id))
        wake.unpark_all()


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
