"""Helpers the coordinator and the backend share for ending runs (private).

How an exception reads as an ending (a cancellation or an error), the terminal for a run
whose coordinator published none, a terminal stamped with its run's metadata, and the one
way a terminal is recorded and fanned out.
"""

from __future__ import annotations

import time
from functools import partial

import attrs
import trio

from ._encoding import checked_terminal
from .broker import Broker
from .events import EndReason, EventType, RunCall, RunComplete
from .ledger import OnVisible, RunStore

__all__ = [
    "announcer",
    "fallback_terminal",
    "is_cancellation",
    "non_cancelled_leaves",
    "record_terminal",
    "stamped_terminal",
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

    A terminal without ``ended_at`` gets it here (now, wall clock), so every visible
    terminal says when it ended; the usual ones (:func:`stamped_terminal`) carry it already.
    """
    rc = checked_terminal(rc)  # a result that is not a JSON value fails the run, everywhere
    if rc.ended_at is None:
        rc = attrs.evolve(rc, ended_at=time.time())
    return store.complete(rc, announce)


def stamped_terminal(
    call: RunCall | None,
    session_id: str,
    run_id: str,
    *,
    started_at: float | None,
    reason: EndReason | None = None,
    result: object = None,
    error: str | None = None,
    cancelled: bool = False,
    timed_out: bool = False,
) -> RunComplete:
    """A terminal carrying its run's metadata: labels, acceptance time and execution from
    ``call`` (none when the call is unknown), ``started_at`` as given, ``ended_at`` now."""
    return RunComplete(
        session_id,
        run_id,
        result,
        error,
        cancelled,
        False,
        timed_out,
        reason=reason,
        accepted_at=None if call is None else call.accepted_at,
        started_at=started_at,
        ended_at=time.time(),
        attempt=1 if call is None else call.execution,
        labels={} if call is None else call.labels,
    )


def fallback_terminal(
    session_id: str,
    run_id: str,
    exc: BaseException,
    *,
    call: RunCall | None = None,
    started_at: float | None = None,
    cancel_reason: EndReason | None = None,
) -> RunComplete:
    """The terminal for a run whose coordinator published none, ended by ``exc``.

    With ``call`` and ``started_at`` it carries the run's metadata; a cancellation says
    ``cancel_reason`` (what cancelled it, when the caller knows).
    """
    if is_cancellation(exc):
        return stamped_terminal(
            call, session_id, run_id, started_at=started_at, reason=cancel_reason, cancelled=True
        )
    return stamped_terminal(
        call, session_id, run_id, started_at=started_at, error=str(exc) or type(exc).__name__
    )
