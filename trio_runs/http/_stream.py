"""What the streaming responses (SSE events, NDJSON batches) share (private)."""

from __future__ import annotations

import math

from starlette.responses import Response

__all__ = ["prepare_stream"]


def prepare_stream(response: Response, heartbeat: float) -> None:
    """Make ``response`` an unbuffered stream with no length; check its heartbeat period.

    Raises ``ValueError`` for a heartbeat that is not a positive, finite number of seconds.
    """
    # A stream has no length: drop the content-length Response computed for no body. Nothing
    # on the way may cache it or hold it back (a proxy's buffering would delay every event).
    response.raw_headers = [
        *((k, v) for k, v in response.raw_headers if k != b"content-length"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    if not (heartbeat > 0 and math.isfinite(heartbeat)):
        raise ValueError(f"heartbeat must be a positive number of seconds, got {heartbeat}")
