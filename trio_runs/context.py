"""Per-run context: the current run id and the run-complete marker.

Both live in ``contextvars.ContextVar``\\ s. Trio copies the current context into every task
it spawns, so code running inside a run (and any child task it starts) sees the run id. The
marker is a *mutable object shared by reference*: the copy a child task gets points at the
same marker, so a mark made deep inside the coordinator, even in a child task, is visible to
the dispatcher that attached it once the call returns. That is how the dispatcher learns
whether the authoritative terminal was already published and must not publish a fallback.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextvars import ContextVar, Token

__all__ = [
    "RunCompleteMarker",
    "current_run_complete_marker",
    "current_run_id",
    "enter_run_for_task",
    "mark_run_complete_published",
    "run_complete_published",
    "with_run_complete_marker",
    "with_run_id",
]


class RunCompleteMarker:
    """Records whether a run's terminal ``RunComplete`` has been published.

    Only ever goes from unpublished to published; there is no way to unmark.
    """

    __slots__ = ("_published",)

    def __init__(self) -> None:
        self._published = False

    @property
    def published(self) -> bool:
        """Whether the terminal was published."""
        return self._published

    def mark(self) -> None:
        """Record that the terminal was published (idempotent)."""
        self._published = True

    def __repr__(self) -> str:
        return f"<RunCompleteMarker published={self._published}>"


_run_id: ContextVar[str] = ContextVar("trio_runs.run_id", default="")
_marker: ContextVar[RunCompleteMarker | None] = ContextVar("trio_runs.marker", default=None)


class _RunIdScope:
    # A class, not a @contextmanager generator: every dispatched run enters one, and the
    # generator machinery made it cost three times as much.
    __slots__ = ("_entered", "_run_id", "_token")

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self._token: Token[str] | None = None
        self._entered = False

    def __enter__(self) -> str:
        if self._entered:
            raise RuntimeError("with_run_id(...) can be entered only once")
        self._entered = True
        self._token = _run_id.set(self._run_id)
        return self._run_id

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _run_id.reset(self._token)
            self._token = None


def with_run_id(run_id: str) -> AbstractContextManager[str]:
    """Make ``run_id`` the current run id inside the block (and tasks started in it).

    Restores the previous value on exit, whatever happened inside.
    """
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str, got {type(run_id).__name__}")
    return _RunIdScope(run_id)


def current_run_id() -> str:
    """The run id set by the innermost :func:`with_run_id`, or ``""`` when none is set."""
    return _run_id.get()


class _MarkerScope:
    # A class for the same reason as _RunIdScope: one is entered per dispatched run.
    __slots__ = ("_entered", "_token")

    def __init__(self) -> None:
        self._token: Token[RunCompleteMarker | None] | None = None
        self._entered = False

    def __enter__(self) -> RunCompleteMarker:
        if self._entered:
            raise RuntimeError("with_run_complete_marker() can be entered only once")
        self._entered = True
        marker = RunCompleteMarker()
        self._token = _marker.set(marker)
        return marker

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _marker.reset(self._token)
            self._token = None


def with_run_complete_marker() -> AbstractContextManager[RunCompleteMarker]:
    """Attach a *fresh*, unpublished marker to the current context and yield it.

    Never inherits an outer marker's state: each dispatch gets its own.
    """
    return _MarkerScope()


def enter_run_for_task(run_id: str) -> RunCompleteMarker:
    """Make ``run_id`` the current run id and attach a fresh marker, for the rest of the
    current task; returns the marker. Never restores anything.

    For a task that exists only to run one run (the backend's dispatch task): Trio gives every
    task its own copy of the context, so both values end with the task and never reach its
    spawner, without the tokens and the reset that :func:`with_run_id` and
    :func:`with_run_complete_marker` pay for on every run. Anywhere else, use those.
    """
    _run_id.set(run_id)
    marker = RunCompleteMarker()
    _marker.set(marker)
    return marker


def mark_run_complete_published() -> None:
    """Flag the current marker as published; a no-op when no marker is attached."""
    marker = _marker.get()
    if marker is not None:
        marker.mark()


def run_complete_published() -> bool:
    """Whether the current marker was flagged; ``False`` when no marker is attached."""
    marker = _marker.get()
    return marker is not None and marker.published


def current_run_complete_marker() -> RunCompleteMarker | None:
    """The marker attached to the current context, or ``None`` when there is none.

    A coordinator captures it when a run enters so that it can flag it from another task
    (``cancel()`` dropping a queued run publishes that run's terminal from the caller's task).
    """
    return _marker.get()
