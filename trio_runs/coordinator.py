"""The coordinator: from an accepted run to its one authoritative terminal.

A run is *accepted* (``begin_accepted`` reserves its place in its session's lane and stamps
a sequence number), then *entered* (``run_accepted``). On entry it is either cancelled on
entry (its session was cancelled after it was accepted), queued behind the session's active
run, or made active. The active run's agent runs inside a cancel scope the coordinator owns,
so ``cancel`` cuts it short and the run ends *cancelled*, never failed. Whatever happens, the
coordinator publishes the terminal itself, synchronously (from ``finally`` too), then flags
the run-complete marker so the dispatcher knows not to publish a fallback.

Lanes are FIFO by acceptance order, not by the order dispatch tasks happen to be scheduled
(Trio deliberately varies that): a run accepted first runs first.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, Literal, Protocol, runtime_checkable

import attrs
import trio

from ._encoding import check_progress, checked_terminal
from ._histogram import Histogram, HistogramRecorder
from ._terminals import announcer, fallback_terminal, record_terminal, stamped_terminal
from ._validation import validate_submission
from .broker import Broker
from .context import (
    RunCompleteMarker,
    current_run_complete_marker,
    current_run_id,
    with_run_complete_marker,
    with_run_id,
)
from .errors import SessionMissing
from .events import (
    Attachment,
    EndReason,
    EventType,
    RunCall,
    RunComplete,
    RunProgress,
    check_deadline,
)
from .ledger import RunStore, SupportsRunMetadata

__all__ = [
    "AcceptedRun",
    "AfterCrash",
    "Agent",
    "Coordinator",
    "CoordinatorStatistics",
    "Prepare",
    "Reservation",
    "RetryPolicy",
    "RunContext",
    "SessionCoordinator",
    "SupportsAfterCrash",
    "SupportsCancelRun",
    "SupportsDeadlines",
    "SupportsLaneQueries",
    "SupportsStatistics",
    "WorkspaceResources",
]

logger = logging.getLogger("trio_runs")


class RunContext:
    """What an agent gets besides its call: who it is running for, and a way to report.

    :meth:`emit` is lossy and never blocks: progress is for observers, never for endings.
    """

    __slots__ = ("_events", "attempt", "run_id", "session_id")

    def __init__(
        self,
        session_id: str,
        run_id: str,
        attempt: int = 1,
        events: Broker[RunProgress] | None = None,
    ) -> None:
        self.session_id = session_id
        self.run_id = run_id
        self.attempt = attempt
        self._events = events

    def emit(self, payload: object) -> None:
        """Publish ``payload`` as lossy progress of this run (dropped for full subscribers).

        ``payload`` must be a JSON value (dicts with str keys, lists, str, int, finite float,
        bool, None): anything else raises :class:`~trio_runs.UnencodableValue` before
        anything is published, and the run goes on (the agent may catch it).
        """
        check_progress(payload)
        events = self._events
        if events is not None:
            events.publish(
                EventType.CREATED, RunProgress(self.session_id, self.run_id, payload, self.attempt)
            )

    def __repr__(self) -> str:
        return (
            f"<RunContext session={self.session_id!r} run={self.run_id!r} attempt={self.attempt}>"
        )


Agent = Callable[[RunCall, RunContext], Awaitable[object]]
"""The user's work for one run: ``async def agent(call, ctx) -> result``."""

Prepare = Callable[[RunCall], Awaitable[None]]
"""An optional hook awaited with the run's call before it starts (``prepare(call)``); its
failure is a *pre-run* error."""


def _check_attempts(_: object, __: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {value!r}")


def _check_backoff(_: object, __: object, value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"backoff must be a finite number >= 0, got {value!r}")


def _check_retry_on(_: object, __: object, value: tuple[type[Exception], ...]) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(kind, type) and issubclass(kind, Exception) for kind in value
    ):
        raise ValueError(f"retry_on must be a tuple of Exception subclasses, got {value!r}")


@attrs.frozen(slots=True)
class RetryPolicy:
    """How often to retry a run whose agent raised, and how long to wait in between.

    Attempt ``n`` (from 1) that fails with one of ``retry_on`` is retried after
    ``backoff * 2 ** (n - 1)`` seconds while ``n < max_attempts``. Attempts coalesce: only the
    final attempt's outcome becomes the run's terminal. Cancellation is never retried.
    """

    max_attempts: int = attrs.field(default=3, validator=_check_attempts)
    backoff: float = attrs.field(default=0.0, validator=_check_backoff)
    retry_on: tuple[type[Exception], ...] = attrs.field(
        default=(Exception,), validator=_check_retry_on
    )

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before starting ``attempt`` (2 and up)."""
        return float(self.backoff * 2 ** (attempt - 2)) if attempt > 1 else 0.0


_RESERVED: Final = "reserved"  # accepted, its task has not entered run_accepted yet
_QUEUED: Final = "queued"  # entered, waiting for its turn in the lane
_ACTIVE: Final = "active"  # its turn: prepare + agent are running (or about to)
_DONE: Final = "done"  # ended, dropped from the queue, or abandoned before entry


class AcceptedRun:
    """A reservation of a place in a session's lane, made by ``begin_accepted``.

    ``sequence`` increases with every acceptance. :meth:`close` is idempotent and is the only
    way to release the reservation: a reservation never entered with ``run_accepted`` holds
    its session's lane until closed. Use it as a context manager to make that automatic.
    """

    __slots__ = (
        "_call",
        "_cancel_reason",
        "_cancel_requested",
        "_closed",
        "_coordinator",
        "_deadline",
        "_entered",
        "_entered_at",
        "_marker",
        "_phase",
        "_ready",
        "_scope",
        "_started_at",
        "_started_wall",
        "_terminal",
        "sequence",
        "session_id",
    )

    def __init__(
        self,
        coordinator: SessionCoordinator,
        session_id: str,
        sequence: int,
        call: RunCall | None,
    ) -> None:
        self._coordinator = coordinator
        self.session_id = session_id
        self.sequence = sequence
        self._call = call
        self._phase: str = _RESERVED
        self._entered = False
        self._entered_at = 0.0
        self._started_at: float | None = None
        # Wall clock of the same moment, for the terminal (``started_at``).
        self._started_wall: float | None = None
        self._closed = False
        self._ready: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        # Set by cancel()/cancel_run(): the scope was cancelled on request, not by its deadline.
        self._cancel_requested = False
        # Why it was cancelled on request (cancel_run, cancel, clear_queue, cancel_all).
        self._cancel_reason: EndReason | None = None
        self._deadline: float | None = None
        self._marker: RunCompleteMarker | None = None
        self._terminal: RunComplete | None = None

    @property
    def call(self) -> RunCall | None:
        """What the run is for, once known.

        Given at acceptance (``begin_accepted(session_id, call)``), the run shows in
        ``queued_prompts_list`` (and ``clear_queue`` can drop it) before its task starts;
        otherwise it is known from ``run_accepted`` on.
        """
        return self._call

    @property
    def closed(self) -> bool:
        """Whether the reservation was released."""
        return self._closed

    @property
    def state(self) -> str:
        """``"reserved"``, ``"queued"``, ``"active"`` or ``"done"``."""
        return self._phase

    def close(self) -> None:
        """Release the reservation (idempotent).

        A run not yet entered gives up its place and the lane moves on; a run already
        entered keeps running and leaves the lane when it ends.
        """
        if not self._closed:
            self._coordinator._release(self)

    def __enter__(self) -> AcceptedRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AcceptedRun session={self.session_id!r} seq={self.sequence} {self._phase}>"


@runtime_checkable
class Reservation(Protocol):
    """A run's place in its session's lane, as ``Coordinator.begin_accepted`` returns it.

    The backend uses nothing else of it: it reads ``session_id`` and ``sequence``, hands it
    back to ``run_accepted``, and calls :meth:`close` when the run's dispatch ends (also when
    it never started). A coordinator returns its own object; :class:`AcceptedRun` is
    :class:`SessionCoordinator`'s.
    """

    @property
    def session_id(self) -> str:
        """The session the run belongs to."""
        ...

    @property
    def sequence(self) -> int:
        """Acceptance order: larger for every later ``begin_accepted`` of the coordinator."""
        ...

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released the reservation."""
        ...

    def close(self) -> None:
        """Release the reservation; idempotent, never blocks, never raises."""
        ...


@runtime_checkable
class Coordinator(Protocol):
    """What the backend needs from a coordinator; :class:`SessionCoordinator` is the real one.

    Implementations publish each run's terminal themselves (record it in the store, fan it
    out on the workspace's ``run_completions``) and then call
    ``mark_run_complete_published()``; the backend publishes a fallback only when they did
    not. Optional extras are protocols of their own: :class:`SupportsCancelRun`,
    :class:`SupportsLaneQueries`.
    """

    async def run(
        self,
        session_id: str,
        prompt: str,
        *,
        run_id: str = "",
        attachments: Sequence[Attachment] = (),
    ) -> RunComplete:
        """Accept and run one prompt in-process; returns its terminal."""
        ...

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> Reservation:
        """Reserve a place for a run of ``session_id``; never blocks.

        ``call``, when given, is the run the place is for: the dispatcher hands it over at
        acceptance, so a queued run is listed (and can be dropped) before its task starts.
        """
        ...

    async def run_accepted(self, accept: Reservation, call: RunCall) -> RunComplete:
        """Run an accepted run to its end; see :class:`SessionCoordinator` for the contract."""
        ...

    def cancel(self, session_id: str) -> None:
        """Cancel the session's active run, drop its queue, cancel its accepted runs."""
        ...

    def cancel_all(self) -> None:
        """:meth:`cancel` every session."""
        ...

    def is_session_busy(self, session_id: str) -> bool:
        """Whether the session has a run active, queued or accepted."""
        ...

    def is_busy(self) -> bool:
        """Whether any session is busy."""
        ...

    def queued_prompts(self, session_id: str) -> int:
        """How many runs wait in the session's queue."""
        ...

    def queued_prompts_list(self, session_id: str) -> list[str]:
        """The prompts waiting in the session's queue, in the order they will run."""
        ...

    def clear_queue(self, session_id: str) -> None:
        """Drop the session's queued runs (each gets a cancelled terminal)."""
        ...


@runtime_checkable
class SupportsCancelRun(Protocol):
    """A coordinator that can cancel one run, leaving the rest of its session alone."""

    def cancel_run(self, session_id: str, run_id: str) -> bool:
        """Cancel one run; ``True`` if it was found and had not ended. Never blocks."""
        ...


@runtime_checkable
class SupportsLaneQueries(Protocol):
    """A coordinator that can say which run of a session is active and which are queued."""

    def active_run_id(self, session_id: str) -> str | None:
        """The run id of the session's active run, if it has one."""
        ...

    def queued_run_ids(self, session_id: str) -> list[str]:
        """The run ids of the session's queued runs, in the order they will start."""
        ...


@runtime_checkable
class SupportsDeadlines(Protocol):
    """A coordinator whose runs have a default deadline (``RunCall.deadline`` when unset).

    A service that caps deadlines reads it, so that a workspace's default is kept where it
    is within the cap.
    """

    @property
    def default_deadline(self) -> float | None:
        """Seconds a run may take from its start when its call gives none; ``None``: no limit."""
        ...


AfterCrash = Literal["abandon", "rerun"]
"""What a durable store does with a run of this coordinator still going when the process
died: end it ``abandoned`` (the default), or ``rerun`` it from the start on restart."""


@runtime_checkable
class SupportsAfterCrash(Protocol):
    """A coordinator that says what becomes of its runs after a crash (DESIGN D3)."""

    @property
    def after_crash(self) -> AfterCrash:
        """``"abandon"`` or ``"rerun"`` (at-least-once execution, still one terminal)."""
        ...


@attrs.frozen(kw_only=True)
class CoordinatorStatistics:
    """A snapshot of a :class:`SessionCoordinator`, from its ``statistics()``."""

    sessions: int
    """Sessions with state held (busy, or with a reservation open)."""
    accepted_total: int
    """Reservations ever made (``begin_accepted`` calls that returned)."""
    active: int
    """Runs running now (at most one per session)."""
    queued: int
    """Runs waiting behind their session's active or starting run."""
    reserved: int
    """Reservations whose task has not entered ``run_accepted`` yet (those behind the head
    with a known call are counted in ``queued`` too)."""
    queue_wait: Histogram
    """Seconds from a run's entry (``run_accepted``) to its start, for every run started."""
    run_duration: Histogram
    """Seconds from a run's start to its terminal, for every run started."""


@runtime_checkable
class SupportsStatistics(Protocol):
    """A coordinator that reports :class:`CoordinatorStatistics` (``Backend.statistics()``
    adds them up over workspaces)."""

    def statistics(self) -> CoordinatorStatistics:
        """A frozen snapshot of the coordinator."""
        ...


class WorkspaceResources(Protocol):
    """What a coordinator is built on: a workspace's brokers and the backend's store."""

    @property
    def run_completions(self) -> Broker[RunComplete]: ...

    @property
    def events(self) -> Broker[RunProgress]: ...

    @property
    def ledger(self) -> RunStore: ...


class _Session:
    __slots__ = ("cancel_mark", "cancel_reason", "lane", "open")

    def __init__(self) -> None:
        # Every run of the session that is reserved, queued or active, in acceptance order.
        # The head is the active run, or a reserved one the lane waits for.
        self.lane: deque[AcceptedRun] = deque()
        self.cancel_mark = 0
        # What raised the cancel mark: the reason of a run that enters under it.
        self.cancel_reason: EndReason = "session_cancel"
        # Reservations not yet closed. The session's state (and so its cancel mark) must
        # outlive every one of them, even those cancel() already took out of the lane.
        self.open = 0


def _cancelling(scope: trio.CancelScope) -> bool:
    # Whether the run is being cancelled: by its own scope (cancel()), or by an enclosing one
    # (shutdown), which shows as an effective deadline of -inf for the current task.
    return scope.cancel_called or trio.current_effective_deadline() == -math.inf


def _timed_out(accept: AcceptedRun, scope: trio.CancelScope) -> bool:
    # Cut off by its own deadline: not by cancel()/cancel_run(), nor by an enclosing scope
    # (shutdown), which both end the run cancelled. Called outside the run's scope.
    return (
        not accept._cancel_requested
        and scope.cancel_called
        and trio.current_time() >= scope.deadline
        and trio.current_effective_deadline() != -math.inf
    )


# The variant nibble of a UUID4 is 10xx: keep the two low random bits, set the high two.
_UUID4_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


_MINT_BATCH: Final = 128
"""Run ids minted per ``os.urandom`` call."""

# Ids minted ahead, taken with list.pop (atomic: safe from threads too). A forked child
# starts with none: it must never hand out the ids its parent will.
_minted: list[str] = []
os.register_at_fork(after_in_child=_minted.clear)


def new_run_id() -> str:
    """A fresh run id: a UUID4 string. Thread-safe; never the same id in a forked child."""
    # What str(uuid.uuid4()) returns (122 random bits from os.urandom, version 4, RFC 4122
    # variant), formatted directly: building a UUID object only to print it took twice as
    # long. The random bytes are read for _MINT_BATCH ids at once: one os.urandom call cost
    # about as much as the formatting, and every send_message without a run id pays for this.
    while True:
        try:
            return _minted.pop()
        except IndexError:
            h = os.urandom(16 * _MINT_BATCH).hex()
            variant = _UUID4_VARIANT
            _minted.extend(
                f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
                f"{variant[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
                for i in range(0, 32 * _MINT_BATCH, 32)
            )


class SessionCoordinator:
    """Runs each session's runs one at a time, in acceptance order, each to one terminal.

    ``agent(call, ctx)`` does the work. ``prepare()``, when given, is awaited before every
    run starts; if it raises, the run is a *pre-run* failure: nothing is published and the
    exception propagates (the dispatcher publishes the failed terminal). With ``retry``,
    failed attempts are retried and only the final outcome is published. ``after_crash``
    says what a durable store does with a run still going when the process died: end it
    abandoned (the default), or run it again from the start (``"rerun"``).

    A run's deadline is its call's ``deadline``, or ``default_deadline`` when the call has
    none, and never more than ``max_deadline`` (``None``: no limit). It counts from the run's
    start (time queued behind its session's other runs does not count), retries and backoff
    included. Past it the run's cancel scope is cancelled and the run ends *failed* with
    ``timed_out`` set (unless it completed anyway); its lane moves on and its waiters return.
    An explicit cancel (or a shutdown) that comes first still ends it cancelled.

    ``run_accepted`` returns the run's terminal when it completed or was cancelled by this
    coordinator; re-raises the agent's exception (unwrapped) after publishing the failed
    terminal; returns the failed terminal of a run that timed out; re-raises a ``prepare``
    exception having published nothing; and re-raises a
    ``trio.Cancelled`` from an enclosing scope after publishing the cancelled terminal. It
    never swallows a ``Cancelled`` and never publishes two terminals for one run.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        run_completions: Broker[RunComplete],
        ledger: RunStore,
        events: Broker[RunProgress] | None = None,
        prepare: Prepare | None = None,
        retry: RetryPolicy | None = None,
        after_crash: AfterCrash = "abandon",
        default_deadline: float | None = None,
        max_deadline: float | None = None,
    ) -> None:
        if not callable(agent):
            raise TypeError(f"agent must be an async callable, got {agent!r}")
        if prepare is not None and not callable(prepare):
            raise TypeError(f"prepare must be an async callable or None, got {prepare!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy or None, got {retry!r}")
        if after_crash not in ("abandon", "rerun"):
            raise ValueError(f"after_crash must be 'abandon' or 'rerun', got {after_crash!r}")
        self._after_crash: AfterCrash = after_crash
        self._default_deadline = check_deadline(default_deadline, "default_deadline")
        self._max_deadline = check_deadline(max_deadline, "max_deadline")
        self._agent = agent
        # Made once: every terminal this coordinator publishes is fanned out through it.
        self._announce = announcer(run_completions)
        self._ledger = ledger
        self._events = events
        self._prepare = prepare
        self._retry = retry or RetryPolicy(max_attempts=1)
        self._sequence = 0
        self._sessions: dict[str, _Session] = {}
        self._queue_wait = HistogramRecorder()
        self._run_duration = HistogramRecorder()
        # A store that lists runs learns when each one started (decided once, not per run).
        self._mark_started = (
            ledger.mark_started if isinstance(ledger, SupportsRunMetadata) else None
        )

    @classmethod
    def factory(
        cls,
        agent: Agent,
        *,
        prepare: Prepare | None = None,
        retry: RetryPolicy | None = None,
        after_crash: AfterCrash = "abandon",
        default_deadline: float | None = None,
        max_deadline: float | None = None,
    ) -> Callable[[WorkspaceResources], SessionCoordinator]:
        """A ``coordinator_factory`` for ``Backend.create_workspace`` running ``agent``."""

        def make(workspace: WorkspaceResources) -> SessionCoordinator:
            return cls(
                agent,
                run_completions=workspace.run_completions,
                ledger=workspace.ledger,
                events=workspace.events,
                prepare=prepare,
                retry=retry,
                after_crash=after_crash,
                default_deadline=default_deadline,
                max_deadline=max_deadline,
            )

        return make

    @property
    def after_crash(self) -> AfterCrash:
        """``"abandon"`` or ``"rerun"``: a run still going when the process died (with a
        durable store) ends abandoned, or runs again from the start on restart."""
        return self._after_crash

    @property
    def default_deadline(self) -> float | None:
        """Seconds a run may take from its start when its call gives no ``deadline``."""
        return self._default_deadline

    @property
    def max_deadline(self) -> float | None:
        """The most seconds any run may take from its start, whatever its call asks."""
        return self._max_deadline

    def deadline_for(self, call: RunCall) -> float | None:
        """The seconds ``call``'s run may take from its start here; ``None``: no limit."""
        deadline = call.deadline if call.deadline is not None else self._default_deadline
        if self._max_deadline is not None:
            deadline = self._max_deadline if deadline is None else min(deadline, self._max_deadline)
        return deadline

    # -- queries -----------------------------------------------------------------------

    def is_session_busy(self, session_id: str) -> bool:
        """Whether the session has a run active, queued, or accepted and about to enter."""
        session = self._sessions.get(session_id)
        return session is not None and bool(session.lane)

    def is_busy(self) -> bool:
        """Whether any session is busy."""
        return any(session.lane for session in self._sessions.values())

    def _queued(self, session_id: str) -> list[AcceptedRun]:
        # Queued: waiting behind the lane's head, whether its task has entered already or
        # not (a reservation whose call is known). The head itself is running or starting.
        session = self._sessions.get(session_id)
        if session is None:
            return []
        return [
            run
            for index, run in enumerate(session.lane)
            if run._phase is _QUEUED
            or (run._phase is _RESERVED and index > 0 and run.call is not None)
        ]

    def queued_prompts(self, session_id: str) -> int:
        """How many runs wait behind the session's active (or starting) run."""
        return len(self._queued(session_id))

    def queued_prompts_list(self, session_id: str) -> list[str]:
        """The prompts of the session's queued runs, in the order they will start."""
        return [run.call.prompt for run in self._queued(session_id) if run.call is not None]

    def active_run_id(self, session_id: str) -> str | None:
        """The run id of the session's active run, if it has one."""
        session = self._sessions.get(session_id)
        if session and session.lane:
            head = session.lane[0]
            if head._phase is _ACTIVE and head.call is not None:
                return head.call.run_id
        return None

    def queued_run_ids(self, session_id: str) -> list[str]:
        """The run ids of the session's queued runs, in the order they will start."""
        return [run.call.run_id for run in self._queued(session_id) if run.call is not None]

    @property
    def session_count(self) -> int:
        """Sessions the coordinator currently holds state for (busy or with reservations)."""
        return len(self._sessions)

    def statistics(self) -> CoordinatorStatistics:
        """A frozen snapshot: sessions held, reservations made, runs active/queued/reserved.

        Walks every lane: O(runs in flight).
        """
        active = queued = reserved = 0
        for session_id, session in self._sessions.items():
            for run in session.lane:
                if run._phase is _ACTIVE:
                    active += 1
                elif run._phase is _RESERVED:
                    reserved += 1
            queued += len(self._queued(session_id))
        return CoordinatorStatistics(
            sessions=len(self._sessions),
            accepted_total=self._sequence,
            active=active,
            queued=queued,
            reserved=reserved,
            queue_wait=self._queue_wait.snapshot(),
            run_duration=self._run_duration.snapshot(),
        )

    # -- acceptance --------------------------------------------------------------------

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> AcceptedRun:
        """Reserve the next place in ``session_id``'s lane; never blocks.

        With ``call`` (which must be for ``session_id`` and carry its run id), the run is
        known from now on: listed as queued, dropped by ``clear_queue`` and cancellable by
        ``cancel_run`` before its task enters. Raises ``SessionMissing`` for a blank session
        id and ``ValueError`` for a call that does not fit, reserving nothing.
        """
        if not isinstance(session_id, str) or not session_id.strip():
            raise SessionMissing()
        if call is not None:
            if not isinstance(call, RunCall):
                raise TypeError(f"call must be a RunCall or None, got {type(call).__name__}")
            if call.session_id != session_id:
                raise ValueError(f"call is for session {call.session_id!r}, not {session_id!r}")
            if not call.run_id:
                raise ValueError("a call given at acceptance must carry its run id")
        self._sequence += 1
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        accept = AcceptedRun(self, session_id, self._sequence, call)
        session.lane.append(accept)
        session.open += 1
        return accept

    def _release(self, accept: AcceptedRun) -> None:
        session = self._sessions[accept.session_id]
        accept._closed = True
        session.open -= 1
        if accept._phase is _RESERVED:
            # Never entered: give its place up so the runs behind it are not held back.
            accept._phase = _DONE
            self._leave_lane(session, accept)
        self._forget_if_idle(accept.session_id, session)

    def _leave_lane(self, session: _Session, accept: AcceptedRun) -> None:
        lane = session.lane
        if lane and lane[0] is accept:
            lane.popleft()
        else:
            try:
                lane.remove(accept)
            except ValueError:
                return
        self._advance(session)

    def _advance(self, session: _Session) -> None:
        # The lane moves when its head leaves. A queued head starts now; a reserved head
        # starts as soon as its task enters; an active head keeps the lane.
        if session.lane:
            head = session.lane[0]
            if head._phase is _QUEUED:
                self._activate(head)

    def _activate(self, accept: AcceptedRun, now: float | None = None) -> None:
        # Only entered runs are activated, so this runs inside Trio: the clock is there.
        # ``now``: Trio's clock read by the caller in the same step (nothing ran since).
        if now is None:
            now = trio.current_time()
        accept._started_at = now
        accept._started_wall = wall = time.time()
        self._queue_wait.observe(now - accept._entered_at)
        accept._phase = _ACTIVE
        # The deadline counts from here, the run's start: queued time does not count.
        assert accept.call is not None
        if self._mark_started is not None:
            self._mark_started(accept.call.run_id, wall)
        accept._deadline = self.deadline_for(accept.call)
        accept._scope = trio.CancelScope(
            deadline=math.inf if accept._deadline is None else now + accept._deadline
        )
        if accept._ready is not None:
            accept._ready.set()

    def _forget_if_idle(self, session_id: str, session: _Session) -> None:
        if not session.lane and session.open == 0 and self._sessions.get(session_id) is session:
            del self._sessions[session_id]

    # -- publishing --------------------------------------------------------------------

    def _publish(self, accept: AcceptedRun, rc: RunComplete) -> None:
        # Synchronous: runs from finally blocks and cancelled scopes.
        if accept._terminal is not None:
            return
        accept._terminal = rc
        if accept._started_at is not None:
            self._run_duration.observe(trio.current_time() - accept._started_at)
        try:
            record_terminal(self._ledger, self._announce, rc)
        except Exception:
            # The store failed to record it. Leave the marker down, so the dispatcher's
            # fallback (or its last resort) records the terminal again, and keep going: this
            # runs inside cancel()/clear_queue() loops and finally blocks that must finish.
            logger.exception("could not record the terminal of run %s", rc.run_id)
            return
        marker = accept._marker
        if marker is not None:
            # The marker captured when the run entered: it is the dispatcher's, even when
            # this publish happens in another task (cancel() dropping a queued run).
            marker.mark()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("run %s (session %s) ended: %s", rc.run_id, rc.session_id, rc.outcome)

    def _drop(self, session: _Session, accept: AcceptedRun, reason: EndReason) -> None:
        # A queued run (entered, or reserved with its call attached) leaves without running:
        # it ends cancelled, now. A reserved one finds its terminal when its task enters.
        accept._phase = _DONE
        session.lane.remove(accept)
        if accept._ready is not None:
            accept._ready.set()
        call = accept.call
        assert call is not None
        self._publish(
            accept,
            stamped_terminal(
                call, accept.session_id, call.run_id, started_at=None, reason=reason, cancelled=True
            ),
        )

    # -- control -----------------------------------------------------------------------

    def cancel(self, session_id: str) -> None:
        """Cancel the session's active run, drop its queue, cancel its accepted runs.

        Every run of the session accepted before this call ends cancelled: the active one as
        soon as its agent reaches a checkpoint, queued ones now (also those whose task has not
        started yet but whose call is known), and any other accepted one when it enters (the
        session's cancel mark is raised to the newest accepted sequence). Runs accepted after
        this call are untouched. Never blocks. Their terminals say ``reason="session_cancel"``.
        """
        self._cancel(session_id, "session_cancel")

    def _cancel(self, session_id: str, reason: EndReason) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.cancel_mark = self._sequence
        session.cancel_reason = reason
        for accept in list(session.lane):
            if accept._phase is _ACTIVE:
                assert accept._scope is not None
                accept._cancel_requested = True
                accept._cancel_reason = reason
                accept._scope.cancel()
            elif accept._phase is _QUEUED or accept.call is not None:
                self._drop(session, accept, reason)
            else:
                # Reserved, call unknown: its task will find itself under the mark on entry.
                session.lane.remove(accept)
        self._forget_if_idle(session_id, session)

    def cancel_run(self, session_id: str, run_id: str, *, reason: EndReason = "user") -> bool:
        """Cancel one run of the session; ``True`` if it was found and had not ended yet.

        An active run ends cancelled as soon as its agent reaches a checkpoint; a queued one
        (also one whose task has not started yet but whose call is known) ends cancelled now.
        The session's other runs are untouched. ``False`` for a run that already ended, is
        unknown, or whose call is not known yet. Never blocks. Its terminal says ``reason``
        (``"user"`` unless told: a cluster relays a session's cancellation this way).
        """
        session = self._sessions.get(session_id)
        if session is None:
            return False
        for accept in session.lane:
            if accept.call is None or accept.call.run_id != run_id or accept._terminal is not None:
                continue
            if accept._phase is _ACTIVE:
                assert accept._scope is not None
                accept._cancel_requested = True
                accept._cancel_reason = reason
                accept._scope.cancel()
            else:
                self._drop(session, accept, reason)
                self._advance(session)
            return True
        return False

    def cancel_all(self) -> None:
        """:meth:`cancel` every session the coordinator knows: how its workspace shuts down,
        so the terminals say ``reason="shutdown"``."""
        for session_id in list(self._sessions):
            self._cancel(session_id, "shutdown")

    def clear_queue(self, session_id: str) -> None:
        """Drop the session's queued runs (each ends cancelled, ``reason="clear_queue"``);
        its active run goes on."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        for accept in self._queued(session_id):
            self._drop(session, accept, "clear_queue")
        self._advance(session)

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        session_id: str,
        prompt: str,
        *,
        run_id: str = "",
        attachments: Sequence[Attachment] = (),
        deadline: float | None = None,
    ) -> RunComplete:
        """Accept and run one prompt here, without a dispatcher; returns its terminal.

        Mints a run id when none is given and registers it in the ledger. Like
        ``run_accepted``, re-raises an agent exception after publishing the failed terminal;
        a ``prepare`` failure is published as the failed terminal here (there is no
        dispatcher to do it) before it is re-raised.
        """
        validate_submission(session_id, prompt, run_id, attachments)
        run_id = run_id or new_run_id()
        call = RunCall(
            session_id,
            prompt,
            run_id,
            tuple(attachments),
            deadline=deadline,
            accepted_at=time.time(),
        )
        if isinstance(self._ledger, SupportsRunMetadata):
            self._ledger.accept_call(call, None)  # no workspace: run here, not in one
        else:
            self._ledger.accept(run_id, session_id)
        try:
            accept = self.begin_accepted(session_id)
        except BaseException:
            self._ledger.withdraw(run_id)
            raise
        with accept, with_run_id(run_id), with_run_complete_marker() as marker:
            try:
                return await self.run_accepted(accept, call)
            except BaseException as exc:
                if not marker.published:
                    record_terminal(
                        self._ledger,
                        self._announce,
                        fallback_terminal(session_id, run_id, exc, call=call),
                    )
                raise

    async def run_accepted(self, accept: Reservation, call: RunCall) -> RunComplete:
        """Run an accepted run to its end and publish its one terminal.

        See the class docstring for what it returns and raises. The reservation is released
        when this returns, whichever way. ``accept`` must be an :class:`AcceptedRun` this
        coordinator made (``ValueError`` otherwise, with nothing published).
        """
        if not isinstance(accept, AcceptedRun) or accept._coordinator is not self:
            raise ValueError(f"{accept!r} was made by another coordinator, not this one")
        if accept._entered or (accept._phase is _DONE and accept._terminal is None):
            # Entered by another task, or released unused: it is not ours to finish.
            raise RuntimeError(f"{accept!r} was already entered or closed")
        accept._entered = True
        accept._entered_at = now = trio.current_time()
        try:
            if call.session_id != accept.session_id:
                raise ValueError(
                    f"call is for session {call.session_id!r} but the reservation is for "
                    f"{accept.session_id!r}"
                )
            run_id = call.run_id or current_run_id()
            if not run_id:
                raise ValueError("the run has no id: set RunCall.run_id or use with_run_id()")
            if call.run_id != run_id:
                call = attrs.evolve(call, run_id=run_id)
            if accept.call is not None and accept.call.run_id != run_id:
                raise ValueError(
                    f"run id {run_id!r} does not match the call attached at acceptance "
                    f"({accept.call.run_id!r})"
                )
            accept._call = call
            accept._marker = current_run_complete_marker()
            if accept._terminal is not None:
                # Dropped by cancel() or clear_queue() before its task got here.
                if accept._marker is not None:
                    accept._marker.mark()
                await trio.lowlevel.checkpoint()
                return accept._terminal
            session = self._sessions[accept.session_id]
            if accept.sequence > session.cancel_mark and session.lane[0] is accept:
                # The usual case, _enter's first branch inlined: the head of its lane, not
                # under a cancel mark, starts now (one coroutine frame and clock read less).
                self._activate(accept, now)
                return await self._run_active(accept, call)
            return await self._enter(accept, call)
        finally:
            self._finish(accept)

    async def _enter(self, accept: AcceptedRun, call: RunCall) -> RunComplete:
        session = self._sessions[accept.session_id]
        if accept.sequence <= session.cancel_mark:
            rc = stamped_terminal(
                call,
                accept.session_id,
                call.run_id,
                started_at=None,
                reason=session.cancel_reason,
                cancelled=True,
            )
            self._publish(accept, rc)
            await trio.lowlevel.checkpoint()
            return rc
        lane = session.lane
        if lane[0] is accept:
            self._activate(accept)
        else:
            accept._phase = _QUEUED
            accept._ready = trio.Event()
            try:
                await accept._ready.wait()
            except BaseException as exc:
                # Shut down while queued, or activated by the lane just as the cancellation
                # arrived (its wake-up lost to the Cancelled): either way it never ran.
                if accept._phase is _QUEUED:
                    accept._phase = _DONE
                    lane.remove(accept)
                self._publish(
                    accept,
                    fallback_terminal(
                        accept.session_id,
                        call.run_id,
                        exc,
                        call=call,
                        started_at=accept._started_wall,
                        cancel_reason="shutdown",
                    ),
                )
                raise
            if accept._phase is _DONE:
                # Dropped by cancel() or clear_queue(), which published our terminal.
                assert accept._terminal is not None
                return accept._terminal
        return await self._run_active(accept, call)

    async def _run_active(self, accept: AcceptedRun, call: RunCall) -> RunComplete:
        scope = accept._scope
        assert scope is not None
        session_id, run_id = accept.session_id, call.run_id
        failure: Exception | None = None
        result: object = None
        completed = False
        try:
            with scope:
                # A cancel() that landed between activation and now ends the run cancelled
                # even if the agent would never reach a checkpoint.
                await trio.lowlevel.checkpoint_if_cancelled()
                if self._prepare is not None:
                    try:
                        await self._prepare(call)
                    except Exception as exc:
                        if not _cancelling(scope):
                            # A pre-run error: nothing is published here; the dispatcher's
                            # fallback publishes the failed terminal.
                            raise
                        failure = exc  # prepare() turned our cancel() into an error
                if failure is None and self._retry.max_attempts == 1:
                    # No retries (the default): the agent is awaited right here, sparing
                    # every run the retry loop's coroutine.
                    try:
                        result = await self._agent(
                            call, RunContext(session_id, run_id, 1, self._events)
                        )
                        completed = True
                    except Exception as exc:
                        failure = exc
                elif failure is None:
                    failure, result, completed = await self._attempts(accept, call)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # Cancelled by an enclosing scope (shutdown), or KeyboardInterrupt & co.
                self._publish(
                    accept,
                    fallback_terminal(
                        session_id,
                        run_id,
                        exc,
                        call=call,
                        started_at=accept._started_wall,
                        cancel_reason="shutdown",
                    ),
                )
            raise
        started_at = accept._started_wall
        if completed:
            # Checked here too (record_terminal checks every terminal), so that what this
            # returns is what the store records: a result that is not JSON fails the run.
            rc = checked_terminal(
                stamped_terminal(call, session_id, run_id, started_at=started_at, result=result)
            )
        elif failure is not None and not _cancelling(scope):
            rc = stamped_terminal(
                call,
                session_id,
                run_id,
                started_at=started_at,
                error=str(failure) or type(failure).__name__,
            )
            self._publish(accept, rc)
            raise failure
        elif _timed_out(accept, scope):
            if failure is not None:
                logger.warning(
                    "run %s (session %s) raised while being cut off by its deadline",
                    run_id,
                    session_id,
                    exc_info=failure,
                )
            error = f"timed out: the run did not end within its deadline of {accept._deadline:g} s"
            rc = stamped_terminal(
                call,
                session_id,
                run_id,
                started_at=started_at,
                reason="deadline",
                error=error,
                timed_out=True,
            )
        else:
            if failure is not None:
                # Cancellation is never reported as an error, even when the agent (or
                # prepare) raised something else while unwinding from it.
                logger.warning(
                    "run %s (session %s) raised while being cancelled; it ends cancelled",
                    run_id,
                    session_id,
                    exc_info=failure,
                )
            reason = accept._cancel_reason
            if reason is None and trio.current_effective_deadline() == -math.inf:
                reason = "shutdown"  # an enclosing scope: the workspace or backend closing
            rc = stamped_terminal(
                call, session_id, run_id, started_at=started_at, reason=reason, cancelled=True
            )
        self._publish(accept, rc)
        # If an enclosing scope is what cancelled the run, its Cancelled was turned into the
        # failure above: raise a Cancelled again rather than swallow the cancellation.
        await trio.lowlevel.checkpoint_if_cancelled()
        return rc

    async def _attempts(
        self, accept: AcceptedRun, call: RunCall
    ) -> tuple[Exception | None, object, bool]:
        retry = self._retry
        attempt = 1
        while True:
            if attempt > 1:
                await trio.sleep(retry.delay_before(attempt))
                call = attrs.evolve(call, attempt=attempt)
            ctx = RunContext(accept.session_id, call.run_id, attempt, self._events)
            try:
                result = await self._agent(call, ctx)
            except Exception as exc:
                if attempt < retry.max_attempts and isinstance(exc, retry.retry_on):
                    logger.info(
                        "run %s attempt %d failed (%s); retrying", call.run_id, attempt, exc
                    )
                    attempt += 1
                    continue
                return exc, None, False
            return None, result, True

    def _finish(self, accept: AcceptedRun) -> None:
        # The run is over (or never got going): free its place and its reservation.
        session = self._sessions.get(accept.session_id)
        if session is None:
            return
        accept._phase = _DONE
        self._leave_lane(session, accept)
        if not accept._closed:
            accept._closed = True
            session.open -= 1
        self._forget_if_idle(accept.session_id, session)

    def __repr__(self) -> str:
        return f"<SessionCoordinator sessions={len(self._sessions)} accepted={self._sequence}>"
