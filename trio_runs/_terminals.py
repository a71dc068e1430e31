"""Helpers the coordinator and the backend share for ending runs (private).

How an exception reads as an ending (a cancellation or an error), the terminal for a run
whose coordinator published none, and the one way a terminal is recorded and fanned out.
"""

from __future__ import annotations

from functools import partial

import trio

from .broker import Broker
from .events import EventType, RunComplete
from .ledger import OnVisible, RunStore

__all__ = [
    "announcer",
    "fallback_terminal",
    "is_cancellation",
    "non_cancelled_leaves",
    "record_terminal",
]


def non_cancelled_leaves(exc: BaseException) -> list[BaseException]:
    """An exception's leaves, walking into (nested) groups, leaving out every ``Cancelled``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in non_cancelled_leaves(inner)]
    return [] if isinstance(exc, trio.Cancelled) else [exc]


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is only cancellation: a ``Cancelled``, bare or in (nested) groups."""
    return not non_cancelled_leaves(exc)


def announcer(run_completions: Broker[RunComplete]) -> OnVisible:
    """What fans a visible terminal out on ``run_completions`` (must-deliver), once made."""
    return partial(run_completions.publish_must_deliver, EventType.UPDATED)


def record_terminal(store: RunStore, announce: OnVisible | None, rc: RunComplete) -> bool:
    """Record ``rc``; fan it out (``announce``) only if it was the run's first terminal.

    Never awaits. The store decides at once (first writer wins), so no observer ever sees a
    second terminal; the fan-out follows the store's commit (``on_visible``), so no observer
    sees a terminal the store could still lose.
    """
    return store.complete(rc, announce)


def fallback_terminal(session_id: str, run_id: str, exc: BaseException) -> RunComplete:
    """The terminal for a run whose coordinator published none, ended by ``exc``."""
    if is_cancellation(exc):
        return RunComplete(session_id, run_id, cancelled=True)
    return RunComplete(session_id, run_id, error=str(exc) or type(exc).__name__)
