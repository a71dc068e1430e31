"""Connecting to Redis with coredis, and what counts as Redis being unreachable (private).

coredis runs on Trio through anyio. A node uses two clients: one for commands, whose every
call is bounded by ``timeout``, and one for the blocking stream reads, whose bound is the
block time plus ``timeout``.
"""

from __future__ import annotations

import anyio
import coredis
import coredis.exceptions
from coredis.retry import NoRetryPolicy

__all__ = ["UNREACHABLE", "connect", "namespace_prefix"]

UNREACHABLE: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # refused, reset, and BusyLoadingError (AOF loading)
    TimeoutError,
    OSError,
    # A connection coredis found dead while sending on it.
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)
"""Errors meaning "Redis did not answer": retried with backoff, never a run's ending."""


def connect(url: str, *, timeout: float) -> coredis.Redis[str]:
    """A client for ``url`` (``redis://HOST:PORT/DB``); not connected until entered."""
    return coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=timeout,
        stream_timeout=timeout,
        # The store retries on its own, with backoff and its own idea of an outage.
        retry_policy=NoRetryPolicy(),
    )


def namespace_prefix(namespace: str) -> str:
    """The key prefix of a namespace: a hash tag, so every key of it lives in one slot."""
    if not namespace or any(c in namespace for c in "{}\r\n \t"):
        raise ValueError(f"namespace must be a non-empty word without braces, got {namespace!r}")
    return "{" + namespace + "}:"
