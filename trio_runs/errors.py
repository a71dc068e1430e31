"""The exception hierarchy: every error trio-runs raises on purpose is a ``TrioRunsError``.

Errors raised for bad input also subclass the matching builtin (``LookupError`` for unknown
ids, ``ValueError`` for malformed values) so callers can catch them either way. When one of
these is raised synchronously by ``Backend.send_message``, nothing was reserved, registered
or started.
"""

from __future__ import annotations

__all__ = [
    "AgentNotInitialized",
    "BackendClosed",
    "DuplicateRun",
    "EmptyPrompt",
    "InvalidLabels",
    "InvalidRunId",
    "InvalidSessionId",
    "NotSupported",
    "RedisUnavailable",
    "RunHandedOff",
    "SessionMissing",
    "StoreError",
    "SubscriberOverflow",
    "TrioRunsError",
    "UnencodableValue",
    "UnknownRun",
    "WorkspaceClosing",
    "WorkspaceNotFound",
]


class TrioRunsError(Exception):
    """Base class of every error trio-runs raises deliberately."""


class WorkspaceNotFound(TrioRunsError, LookupError):
    """No open workspace has this id."""

    def __init__(self, workspace_id: str) -> None:
        super().__init__(f"no workspace with id {workspace_id!r}")
        self.workspace_id = workspace_id


class WorkspaceClosing(TrioRunsError):
    """The workspace is closing (or closed) and accepts no new runs."""

    def __init__(self, workspace_id: str) -> None:
        super().__init__(f"workspace {workspace_id!r} is closing and accepts no new runs")
        self.workspace_id = workspace_id


class BackendClosed(TrioRunsError):
    """The backend is closing or closed: it creates no workspaces and accepts no runs."""

    def __init__(self) -> None:
        super().__init__("the backend is closing or closed")


class AgentNotInitialized(TrioRunsError):
    """The workspace was created without a coordinator, so it cannot run anything."""

    def __init__(self, workspace_id: str) -> None:
        super().__init__(f"workspace {workspace_id!r} has no agent (its factory returned None)")
        self.workspace_id = workspace_id


class EmptyPrompt(TrioRunsError, ValueError):
    """The message has a blank prompt and no non-blank text attachment: nothing to run."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty and there is no text attachment")


class SessionMissing(TrioRunsError, ValueError):
    """The message names no session (empty or whitespace-only ``session_id``)."""

    def __init__(self) -> None:
        super().__init__("the message has no session_id")


class InvalidRunId(TrioRunsError, ValueError):
    """A caller-supplied run id breaks the identifier rule (or is not a string): whitespace,
    a control character, a lone surrogate or ``/`` in it, ``.`` or ``..``, empty, or over
    256 characters. Such an id could not be addressed in a URL path."""

    def __init__(self, run_id: object, reason: str) -> None:
        super().__init__(f"invalid run id {run_id!r}: {reason}")
        self.run_id = run_id


class InvalidSessionId(TrioRunsError, ValueError):
    """A session id breaks the identifier rule: whitespace, a control character, a lone
    surrogate or ``/`` in it, ``.`` or ``..``, or over 256 characters (a blank one is
    :class:`SessionMissing`). Such an id could not be addressed in a URL path."""

    def __init__(self, session_id: object, reason: str) -> None:
        super().__init__(f"invalid session id {session_id!r}: {reason}")
        self.session_id = session_id


class DuplicateRun(TrioRunsError, ValueError):
    """A run with this id was already accepted: run ids are unique."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run id {run_id!r} was already accepted")
        self.run_id = run_id


class InvalidLabels(TrioRunsError, ValueError):
    """A run's labels break the label rule: at most 16; keys 1 to 64 characters of
    ``[A-Za-z0-9_.-]``; str values of at most 256 characters, without NUL or lone
    surrogates. Raised with nothing reserved or registered."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"invalid labels: {problem}")
        self.problem = problem


class UnencodableValue(TrioRunsError, TypeError):
    """A result or progress payload is not a JSON value, so it could not cross the store or
    the wire unchanged: only ``dict`` with ``str`` keys, ``list``, ``str``, ``int``, finite
    ``float``, ``bool`` and ``None`` (nested) are. Tuples, sets, bytes, datetimes, other
    objects, non-``str`` keys, NaN and the infinities are refused, never converted.

    ``RunContext.emit`` raises it before anything is published (the run goes on). A result
    breaking the rule is not raised to anyone: the run fails, its ``error`` carrying this
    message. ``problem`` says what was refused and where (``"set at $.items[2]"``).
    """

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"{what} is not a JSON value: {problem}")
        self.what = what
        self.problem = problem


class UnknownRun(TrioRunsError, LookupError):
    """No run with this id was ever accepted (or its terminal was evicted past retention)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r} is known (never accepted, or evicted)")
        self.run_id = run_id


class RunHandedOff(TrioRunsError):
    """A coordinator's ``run_accepted`` gave the run to others who will end it (a cluster:
    the run waits in its lane in Redis for another node), so this process records nothing.

    Raised only while the coordinator's workspace is closing. The backend then publishes
    no fallback terminal and no notification: the run is not over, and is not this
    process's to end.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} was handed to another node, which will end it")
        self.run_id = run_id


class NotSupported(TrioRunsError):
    """The workspace's coordinator lacks an optional capability the call needs.

    For example ``Backend.cancel_run`` on a coordinator that does not implement
    ``SupportsCancelRun``. Nothing was changed.
    """

    def __init__(self, workspace_id: str, capability: str) -> None:
        super().__init__(
            f"the coordinator of workspace {workspace_id!r} does not support {capability}"
        )
        self.workspace_id = workspace_id
        self.capability = capability


class StoreError(TrioRunsError):
    """The run store cannot do what was asked: its file is unusable, in use by another
    process, closed, or its disk is failing. Nothing was recorded by the call that raised."""


class RedisUnavailable(StoreError):
    """Redis cannot be reached (or did not answer in time): the Redis-backed store refuses new
    runs, and a wait that cannot be answered fails instead of hanging. Nothing was accepted
    by the call that raised; writes already accepted stay queued and go through when Redis
    is back."""


class SubscriberOverflow(TrioRunsError):
    """A subscriber fell more than ``max_backlog`` events behind and was disconnected.

    Raised by the subscription's next receive: the broker never drops a must-deliver event
    silently, so a consumer too slow to keep up is told, not quietly starved.
    """

    def __init__(self, backlog: int, max_backlog: int) -> None:
        super().__init__(
            f"subscriber disconnected: its backlog reached {backlog} events "
            f"(max_backlog={max_backlog}); {backlog} undelivered events were discarded"
        )
        self.backlog = backlog
        self.max_backlog = max_backlog
