"""``RunLedger``: the source of truth for how each run ended.

The broker fans terminals out to whoever happens to be listening; the ledger remembers them.
A waiter that arrives after the run ended is answered from here at once, and a second
terminal for the same run id (a fallback racing the coordinator's own) is refused here, so
it is never fanned out either.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeAlias, cast, runtime_checkable

import attrs
import trio

from ._encoding import checked_terminal
from ._histogram import Histogram, HistogramRecorder
from .errors import DuplicateRun, UnknownRun
from .events import RunCall, RunComplete

_NO_LABELS: Mapping[str, str] = MappingProxyType({})

__all__ = [
    "LedgerStatistics",
    "OnVisible",
    "RunInfo",
    "RunLedger",
    "RunPage",
    "RunQuery",
    "RunState",
    "RunStore",
    "SupportsRerun",
    "SupportsRunListing",
    "SupportsRunMetadata",
]

RunState = Literal["pending", "ending", "terminal"]
"""``pending``: accepted, no terminal yet; ``ending``: its terminal is decided (a second one
would be refused) but not yet durable, so nobody is shown it; ``terminal``: visible."""

OnVisible = Callable[[RunComplete], object]
"""Called with a terminal once it is visible (durable); see :meth:`RunStore.complete`."""

_SHARDS = 64
_SHARD_MASK = _SHARDS - 1  # _SHARDS is a power of two
_RECENT = 1024
"""The newest terminals (at least this many, more than a typical batch of in-flight runs) are
held as the very objects recorded; older ones compactly."""
_CHUNK = 256
"""How many of the oldest recent terminals move to the older tier at a time."""
_ATOMIC: frozenset[type] = frozenset((type(None), str, int, float, bool, bytes))
"""Result types a terminal can be kept compactly with: the garbage collector untracks a
tuple holding only atomic values."""

# The compact form of a terminal is the tuple of its fields' values, in attrs' order, read
# and rebuilt generically so that a field added to RunComplete is kept like the others.
# The labels, a mapping (which the collector tracks), are kept apart: see `_kept_form`.
_FIELDS = tuple(
    field for field in attrs.fields(RunComplete) if field.init and field.name != "labels"
)
_FIELD_NAMES: tuple[str, ...] = tuple(field.name for field in _FIELDS)
_INIT_NAMES: tuple[str, ...] = tuple(field.alias or field.name for field in _FIELDS)
_fields_of: Callable[[RunComplete], tuple[Any, ...]] = operator.attrgetter(*_FIELD_NAMES)
_RUN_ID_AT = _FIELD_NAMES.index("run_id")
_SESSION_ID_AT = _FIELD_NAMES.index("session_id")

_ACCEPTED_AT_AT = _FIELD_NAMES.index("accepted_at")
_STARTED_AT_AT = _FIELD_NAMES.index("started_at")
_ATTEMPT_AT = _FIELD_NAMES.index("attempt")
_WORKSPACE_AT = len(_FIELD_NAMES)
_LABELS_AT = _WORKSPACE_AT + 1
_WHOLE = 2

_Kept: TypeAlias = "tuple[Any, ...]"
"""A retained terminal with its run's workspace path. Compact: its fields' values (labels
aside), the path, and its labels as a tuple of ``(key, value)`` pairs (``()`` for none), all
atoms or tuples of atoms, which the collector untracks. Whole (``len == _WHOLE``): the
``RunComplete`` itself and the path, for a terminal that cannot be kept compactly (a
subclass, or a result holding other objects)."""

_PendingMeta: TypeAlias = "tuple[RunCall, str | None, float | None]"
"""A pending run accepted with its metadata: its call, workspace path, and start time."""


def _kept_form(rc: RunComplete, workspace: str | None) -> _Kept:
    if type(rc) is RunComplete and type(rc.result) in _ATOMIC:
        labels = rc.labels
        return (*_fields_of(rc), workspace, tuple(labels.items()) if labels else ())
    return (rc, workspace)


def _expanded(kept: _Kept) -> RunComplete:
    if len(kept) == _WHOLE:
        return cast(RunComplete, kept[0])
    fields = dict(zip(_INIT_NAMES, kept[:_WORKSPACE_AT], strict=True))
    labels = kept[_LABELS_AT]
    if labels:
        fields["labels"] = dict(labels)
    return RunComplete(**fields)


def _run_id_of(kept: _Kept) -> str:
    return cast(RunComplete, kept[0]).run_id if len(kept) == _WHOLE else kept[_RUN_ID_AT]


def _session_of(kept: _Kept) -> str:
    return cast(RunComplete, kept[0]).session_id if len(kept) == _WHOLE else kept[_SESSION_ID_AT]


@attrs.frozen(kw_only=True)
class LedgerStatistics:
    """A snapshot of a run store, from ``statistics()``: every store reports the same fields."""

    accepted_total: int
    """Runs ever accepted (a withdrawn acceptance is not counted)."""
    pending: int
    """Runs accepted and not yet ended."""
    retained: int
    """Terminals currently held (a late waiter is answered from these)."""
    completed_total: int
    """Terminals recorded with outcome ``completed``."""
    failed_total: int
    """Terminals recorded with outcome ``failed``."""
    cancelled_total: int
    """Terminals recorded with outcome ``cancelled``."""
    duplicates_suppressed: int
    """Second terminals for a run, refused."""
    evicted_total: int
    """Terminals forgotten to keep within the retention bound."""
    delivery_latency: Histogram | None = None
    """Seconds from a terminal being recorded (for a durable store: committed) to each
    blocked waiter resuming with it; ``None`` for a store that does not measure it."""


@runtime_checkable
class RunStore(Protocol):
    """The ledger seam: everything the backend, coordinators and the service use of a ledger.

    :class:`RunLedger` is the in-memory store; durable ones (on disk, in Redis) implement the
    same methods. ``accept``, ``withdraw`` and ``complete`` are synchronous because terminals
    are recorded from ``finally`` blocks and cancelled scopes, where nothing may be awaited.

    The promises every store keeps (each is a test in the shared battery): run ids are unique
    while known; the first terminal of a run id wins at once and is never replaced; nobody is
    shown a terminal before it is durable (``get``, ``wait`` and ``on_visible`` all follow the
    commit); every waiter on a run gets its one terminal, at once when the run already ended;
    pending runs are never forgotten; a withdrawn acceptance leaves no trace.
    """

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` (of ``session_id``) as pending.

        Raises ``DuplicateRun`` if the id is pending or has a retained terminal.
        """
        ...

    def withdraw(self, run_id: str) -> None:
        """Undo the ``accept`` of a run that was never started; a no-op unless it is pending.

        For a submission that failed after ``accept`` (its caller got an error): the run was
        never acknowledged, so it must leave no trace and get no terminal.
        """
        ...

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        """Record a terminal; ``True`` for the first one of a run id, ``False`` afterwards.

        Decided at once, never blocks, never awaits: a second terminal is refused even before
        the first is durable. The terminal becomes visible (``get``, ``wait``, state
        ``"terminal"``) once it is durable, and then ``on_visible(rc)`` is called once, in the
        Trio thread: at once for an in-memory store, after the commit that holds it for a
        durable one. Never called for a refused terminal. A terminal for an id never accepted
        is recorded too.
        """
        ...

    async def flush(self) -> None:
        """Return once everything recorded before this call is durable (at once in memory).

        A durable submit is ``accept`` then ``await flush()``. Cancelling the wait does not
        undo anything that was recorded.
        """
        ...

    def get(self, run_id: str) -> RunComplete | None:
        """The run's visible terminal, or ``None`` while it is pending, ending or unknown."""
        ...

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal, once there is one; raises ``UnknownRun`` for unknown ids."""
        ...

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``, ``"ending"``, ``"terminal"``, or ``None`` for an unknown run id."""
        ...

    def session_of(self, run_id: str) -> str | None:
        """The session of a pending run or of a retained terminal; ``None`` if unknown."""
        ...

    def pending_run_ids(self) -> list[str]:
        """The ids of every run accepted whose terminal is not visible yet, oldest first."""
        ...

    def statistics(self) -> LedgerStatistics:
        """A frozen snapshot of the store's counters."""
        ...


@runtime_checkable
class SupportsRerun(Protocol):
    """A durable store that can run a crashed run again instead of abandoning it (DESIGN D3).

    A run accepted with :meth:`accept_rerunnable` keeps its call and its workspace's path on
    disk. If the process dies before it ends, the store's recovery keeps it *pending* (not
    abandoned) and lists it by :meth:`rerunnable_paths`; the backend takes it with
    :meth:`take_rerunnable` when that workspace is opened again and runs it from the start:
    at-least-once execution, still exactly one terminal.
    """

    def accept_rerunnable(
        self, run_id: str, session_id: str, workspace_path: str, call: RunCall
    ) -> None:
        """:meth:`RunStore.accept`, keeping what it takes to run the run again after a crash."""
        ...

    def rerunnable_paths(self) -> list[str]:
        """The workspace paths with recovered runs still to be run again."""
        ...

    def take_rerunnable(self, workspace_path: str) -> list[RunCall]:
        """The recovered runs of that workspace, oldest first, each handed out once."""
        ...


@attrs.frozen(kw_only=True)
class RunInfo:
    """A run as its store knows it, pending or ended (from ``run_info`` / ``list_runs``)."""

    run_id: str
    session_id: str
    workspace_path: str | None
    """The path of the workspace it was accepted in; ``None`` if the store was not told."""
    state: RunState
    accepted_at: float | None
    """Wall clock UNIX seconds of its acceptance; ``None`` if the store was not told."""
    started_at: float | None
    """When its agent began executing (after its queue wait); ``None``: not (yet) started."""
    attempt: int
    """Which execution of the run this is: ``2`` for its first rerun after a crash."""
    labels: Mapping[str, str]
    terminal: RunComplete | None
    """The visible terminal (which carries ``ended_at`` and ``reason``); ``None`` until then."""


def _check_limit(_: object, __: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise ValueError(f"limit must be an int from 1 to 1000, got {value!r}")


def _check_state(_: object, __: object, value: str | None) -> None:
    if value not in (None, "pending", "terminal"):
        raise ValueError(f"state must be 'pending', 'terminal' or None, got {value!r}")


def _check_label(_: object, __: object, value: tuple[str, str] | None) -> None:
    if value is None:
        return
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], str)
    ):
        raise ValueError(f"label must be a (key, value) tuple of two str, got {value!r}")


@attrs.frozen(kw_only=True)
class RunQuery:
    """Which runs ``list_runs`` returns: every filter given must match (``None``: any).

    ``state="pending"`` is every run without a visible terminal (an ``ending`` one too).
    ``label`` is a ``(key, value)`` pair matched exactly. ``cursor`` is a page's
    ``next_cursor``, opaque, valid with the same filters. ``limit`` is 1 to 1000
    (``ValueError`` otherwise, at construction).
    """

    workspace_path: str | None = None
    session_id: str | None = None
    state: Literal["pending", "terminal"] | None = attrs.field(default=None, validator=_check_state)
    label: tuple[str, str] | None = attrs.field(default=None, validator=_check_label)
    cursor: str | None = None
    limit: int = attrs.field(default=100, validator=_check_limit)


@attrs.frozen(kw_only=True)
class RunPage:
    """One page of ``list_runs``: newest accepted first."""

    runs: tuple[RunInfo, ...]
    next_cursor: str | None
    """Pass it as ``RunQuery.cursor`` for the next page; ``None``: there are no more runs."""


@runtime_checkable
class SupportsRunListing(Protocol):
    """A store that lists its runs, pending and retained, with their metadata.

    Runs are ordered newest accepted first, by ``(accepted_at, run_id)``; a run whose
    acceptance time is unknown sorts as accepted at 0. A cursor names the last run of a
    page, so runs accepted meanwhile never shift the next page (they sort before it), and
    no run still held is skipped or shown twice across pages.

    Both are ``async`` because a durable store reads its file or its server to answer, and
    blocking I/O never runs on the event loop: such a store reads in a worker thread (or
    over its async client). Cancelled, they return nothing and change nothing.
    """

    async def run_info(self, run_id: str) -> RunInfo | None:
        """The run as the store knows it, or ``None`` for an unknown (or evicted) id."""
        ...

    async def list_runs(self, query: RunQuery) -> RunPage:
        """One page of the runs matching ``query``; ``ValueError`` for a malformed cursor."""
        ...


@runtime_checkable
class SupportsRunMetadata(Protocol):
    """A store that keeps what a listing shows of a pending run; the backend feeds it.

    Both are synchronous and never block: ``accept_call`` is ``RunStore.accept`` (same
    errors, same durability) that also records the call's labels, acceptance time and
    execution, and the workspace path; ``mark_started`` notes when the run's agent began
    executing (in memory: a terminal carries it durably).
    """

    def accept_call(self, call: RunCall, workspace_path: str | None) -> None:
        """:meth:`RunStore.accept` of ``call.run_id``, keeping its metadata."""
        ...

    def mark_started(self, run_id: str, started_at: float) -> None:
        """Note that the pending run's agent began executing; a no-op for any other id."""
        ...


_CURSOR_PREFIX = "c1|"


def encode_cursor(accepted_at: float | None, run_id: str) -> str:
    """The opaque cursor naming the run at ``(accepted_at, run_id)`` in listing order."""
    text = f"{_CURSOR_PREFIX}{float(accepted_at or 0.0)!r}|{run_id}"
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The ``(accepted_at, run_id)`` a cursor names; ``ValueError`` if it is not a cursor."""
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8")
        if not text.startswith(_CURSOR_PREFIX):
            raise ValueError("unknown cursor version")
        at, run_id = text[len(_CURSOR_PREFIX) :].split("|", 1)
        value = float(at)
    except (UnicodeError, ValueError, binascii.Error, AttributeError):
        raise ValueError(f"malformed cursor {cursor!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"malformed cursor {cursor!r}")
    return value, run_id


_Candidate: TypeAlias = "tuple[float, str, Any]"
"""A run a listing may show: its sort key (acceptance time, run id) and what it is built from."""


def page_of(
    candidates: Iterable[_Candidate], query: RunQuery, build: Callable[[Any], RunInfo]
) -> RunPage:
    """The page ``query`` asks for out of ``candidates`` (already filtered), newest first.

    The newest ``limit + 1`` candidates ordered before the cursor: O(n log limit) for n
    candidates, and ``build`` is called once per run shown, never for the others.
    Raises ``ValueError`` for a malformed cursor.
    """
    if query.cursor is not None:
        after = decode_cursor(query.cursor)
        candidates = (c for c in candidates if (c[0], c[1]) < after)
    # Compared as tuples: run ids are unique, so the payloads are never compared.
    newest = heapq.nlargest(query.limit + 1, candidates)
    shown = newest[: query.limit]
    last = shown[-1] if len(newest) > query.limit else None
    return RunPage(
        runs=tuple(build(payload) for _, _, payload in shown),
        next_cursor=None if last is None else encode_cursor(last[0], last[1]),
    )


class _Waited:
    # A pending run somebody waits on. Most runs are never waited on while pending, so a
    # pending run is just its session id until the first waiter comes: one object less to
    # allocate (and for the garbage collector to track) per run.
    __slots__ = ("completed_at", "done", "meta", "session_id", "terminal", "withdrawn")

    def __init__(self, session_id: str, meta: _PendingMeta | None = None) -> None:
        self.session_id = session_id
        self.meta = meta
        self.withdrawn = False
        self.completed_at = 0.0
        self.done = trio.Event()
        self.terminal: RunComplete | None = None


def _pending_session(pending: str | _PendingMeta | _Waited) -> str:
    if type(pending) is str:
        return pending
    if type(pending) is tuple:
        return pending[0].session_id
    return cast(_Waited, pending).session_id


def _pending_meta(pending: str | _PendingMeta | _Waited) -> _PendingMeta | None:
    if type(pending) is tuple:
        return pending
    return pending.meta if isinstance(pending, _Waited) else None


def _pending_info(run_id: str, pending: str | _PendingMeta | _Waited) -> RunInfo:
    meta = _pending_meta(pending)
    if meta is None:
        return RunInfo(
            run_id=run_id,
            session_id=_pending_session(pending),
            workspace_path=None,
            state="pending",
            accepted_at=None,
            started_at=None,
            attempt=1,
            labels=_NO_LABELS,
            terminal=None,
        )
    call, workspace, started_at = meta
    return RunInfo(
        run_id=run_id,
        session_id=call.session_id,
        workspace_path=workspace,
        state="pending",
        accepted_at=call.accepted_at,
        started_at=started_at,
        attempt=call.execution,
        labels=call.labels,
        terminal=None,
    )


def terminal_info(
    rc: RunComplete, workspace_path: str | None, accepted_at: float | None = None
) -> RunInfo:
    """The :class:`RunInfo` of a run whose terminal ``rc`` is visible; ``accepted_at`` is
    the store's own record of the acceptance, for a terminal that does not carry one."""
    return RunInfo(
        run_id=rc.run_id,
        session_id=rc.session_id,
        workspace_path=workspace_path,
        state="terminal",
        accepted_at=rc.accepted_at if rc.accepted_at is not None else accepted_at,
        started_at=rc.started_at,
        attempt=rc.attempt,
        labels=rc.labels,
        terminal=rc,
    )


def _kept_info(kept: _Kept) -> RunInfo:
    return terminal_info(_expanded(kept), kept[1] if len(kept) == _WHOLE else kept[_WORKSPACE_AT])


def _kept_matches(kept: _Kept, query: RunQuery) -> bool:
    if len(kept) == _WHOLE:
        rc: RunComplete = kept[0]
        if query.label is not None and rc.labels.get(query.label[0]) != query.label[1]:
            return False
        session, workspace = rc.session_id, kept[1]
    else:
        if query.label is not None and query.label not in kept[_LABELS_AT]:
            return False
        session, workspace = kept[_SESSION_ID_AT], kept[_WORKSPACE_AT]
    return (query.session_id is None or session == query.session_id) and (
        query.workspace_path is None or workspace == query.workspace_path
    )


def _kept_key(kept: _Kept) -> tuple[float, str]:
    if len(kept) == _WHOLE:
        rc: RunComplete = kept[0]
        return rc.accepted_at or 0.0, rc.run_id
    return kept[_ACCEPTED_AT_AT] or 0.0, kept[_RUN_ID_AT]


class RunLedger:
    """In-memory record of every run: pending, or ended with its one terminal.

    The first terminal recorded for a run id wins; later ones are refused and counted in
    :attr:`duplicates_suppressed`, never overwrite it. Waiters on a pending run are woken
    when it ends; waiters on an ended run are answered at once. Memory is bounded: the
    oldest terminals beyond ``retain`` are forgotten (waiting on them raises ``UnknownRun``).
    Pending runs are never evicted.

    Held terminals cost the garbage collector nothing past the newest thousand or so: older
    ones are kept as plain values, and ``get`` and ``wait`` read one back as an equal
    ``RunComplete`` (not the very object recorded, unless its result holds other objects),
    metadata included.

    It lists its runs (:class:`SupportsRunListing`) with the metadata the backend gives it
    (:class:`SupportsRunMetadata`). In memory there is no index: ``list_runs`` scans every
    pending and retained run once per page, O(pending + retained) plus O(log limit) per
    match (about 1 us per run held: 0.1 s for 100,000), and builds a :class:`RunInfo` only for the
    runs it returns; ``run_info`` is O(1), but for a run among the newest thousand or so
    terminals, which it finds by a scan of those.
    """

    def __init__(self, retain: int = 100_000) -> None:
        if not isinstance(retain, int) or isinstance(retain, bool) or retain < 1:
            raise ValueError(f"retain must be a positive int, got {retain!r}")
        self._retain = retain
        # Pending runs: the session id (`accept`), the call, workspace path and start time
        # (`accept_call`), or a `_Waited` once somebody waits on the run.
        self._pending: dict[str, str | _PendingMeta | _Waited] = {}
        # Retained terminals live in two tiers, so that the cyclic garbage collector, whose
        # every full collection walks every tracked object, does not walk them: with a
        # thousand runs in flight a full collection comes every few thousand runs, and
        # walking the 100,000 terminals of the default retention made the cost per run grow
        # with N (GC 1.9 -> 10.6 us per run from 10k to 1M runs).
        #
        # Recent: the newest terminals (_RECENT to _RECENT + _CHUNK of them), as the very
        # objects recorded: a late waiter, usually a recent one, gets the object itself.
        # Beside each, in order of recording, its `_Kept` form, made when it was recorded:
        # by the time it moves on, a collection has untracked that tuple.
        self._recent: dict[str, RunComplete] = {}
        self._recent_order: deque[_Kept] = deque()
        # Older: the `_Kept` forms by run id, spread over _SHARDS small dicts by hash. A dict
        # holding only untracked values stays untracked itself, so the collector never
        # visits them (a `get` of an older terminal builds an equal RunComplete anew). Small
        # dicts, because one dict of `retain` entries under steady churn is rebuilt every so
        # often, its old and new tables side by side for a moment: at the default retention
        # that made peak RSS after 1M runs ~20% higher than after 100k. They take the oldest
        # recent terminals _CHUNK at a time.
        self._older: tuple[dict[str, _Kept], ...] = tuple({} for _ in range(_SHARDS))
        # Their eviction order, oldest first: one tuple of _CHUNK run ids per move (which the
        # collector untracks too); `_older_head` indexes the oldest run id still held in the
        # first one. Not the dicts' own order: popping the oldest key of a dict with many
        # deleted leading slots is not O(1) in CPython.
        self._older_chunks: deque[tuple[str, ...]] = deque()
        self._older_head = 0
        self._older_count = 0
        self._duplicates_suppressed = 0
        self._accepted_total = 0
        self._outcomes: Counter[str] = Counter()
        self._evicted_total = 0
        self._delivery = HistogramRecorder()

    @property
    def retain(self) -> int:
        """How many terminals are held at most (a construction-time setting)."""
        return self._retain

    @property
    def duplicates_suppressed(self) -> int:
        """Terminals refused because the run already had one."""
        return self._duplicates_suppressed

    @property
    def accepted_total(self) -> int:
        """Runs ever accepted (a withdrawn acceptance is not counted)."""
        return self._accepted_total

    @property
    def outcomes(self) -> Mapping[str, int]:
        """Terminals recorded, by outcome (``completed``, ``failed``, ``cancelled``); read-only."""
        return MappingProxyType(self._outcomes)

    @property
    def evicted_total(self) -> int:
        """Terminals forgotten because more than ``retain`` were held."""
        return self._evicted_total

    def statistics(self) -> LedgerStatistics:
        """A frozen snapshot of the ledger's counters."""
        outcomes = self._outcomes
        return LedgerStatistics(
            accepted_total=self._accepted_total,
            pending=len(self._pending),
            retained=len(self._recent) + self._older_count,
            completed_total=outcomes["completed"],
            failed_total=outcomes["failed"],
            cancelled_total=outcomes["cancelled"],
            duplicates_suppressed=self._duplicates_suppressed,
            evicted_total=self._evicted_total,
            delivery_latency=self._delivery.snapshot(),
        )

    @property
    def pending_count(self) -> int:
        """Runs accepted and not yet ended."""
        return len(self._pending)

    @property
    def terminal_count(self) -> int:
        """Terminals currently retained."""
        return len(self._recent) + self._older_count

    def _has_terminal(self, run_id: object) -> bool:
        return run_id in self._recent or run_id in self._older[hash(run_id) & _SHARD_MASK]

    def _terminal(self, run_id: str) -> RunComplete | None:
        rc = self._recent.get(run_id)
        if rc is not None:
            return rc
        kept = self._older[hash(run_id) & _SHARD_MASK].get(run_id)
        return None if kept is None else _expanded(kept)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._pending or self._has_terminal(run_id)

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``, ``"terminal"``, or ``None`` for an unknown (or evicted) run id."""
        if run_id in self._pending:
            return "pending"
        if run_id in self._recent or run_id in self._older[hash(run_id) & _SHARD_MASK]:
            return "terminal"
        return None

    def session_of(self, run_id: str) -> str | None:
        """The session a known run belongs to, or ``None``."""
        pending = self._pending.get(run_id)
        if pending is not None:
            return _pending_session(pending)
        rc = self._recent.get(run_id)
        if rc is not None:
            return rc.session_id
        kept = self._older[hash(run_id) & _SHARD_MASK].get(run_id)
        return None if kept is None else _session_of(kept)

    def pending_run_ids(self) -> list[str]:
        """The ids of every run accepted and not yet ended, oldest first."""
        return list(self._pending)

    async def run_info(self, run_id: str) -> RunInfo | None:
        """The run as the ledger knows it, or ``None`` for an unknown (or evicted) id.

        Answered from memory, in the Trio thread (a checkpoint, then no await).
        """
        await trio.lowlevel.checkpoint()
        pending = self._pending.get(run_id)
        if pending is not None:
            return _pending_info(run_id, pending)
        if run_id in self._recent:
            # The newest terminals are keyed to the objects recorded; their workspace path
            # is beside them in recording order.
            for kept in self._recent_order:
                if _run_id_of(kept) == run_id:
                    return terminal_info(
                        self._recent[run_id],
                        kept[1] if len(kept) == _WHOLE else kept[_WORKSPACE_AT],
                    )
        older = self._older[hash(run_id) & _SHARD_MASK].get(run_id)
        return None if older is None else _kept_info(older)

    async def list_runs(self, query: RunQuery) -> RunPage:
        """One page of the runs matching ``query``, newest accepted first (see the class for
        the cost); ``ValueError`` for a malformed cursor.

        Computed in the Trio thread after one checkpoint: the tables it walks are the ones
        this thread changes, so no worker thread may read them.
        """
        await trio.lowlevel.checkpoint()
        if query.cursor is not None:
            decode_cursor(query.cursor)  # refused before any work
        candidates: list[_Candidate] = []
        if query.state != "terminal":
            for run_id, pending in self._pending.items():
                if self._pending_matches(pending, query):
                    meta = _pending_meta(pending)
                    at = meta[0].accepted_at if meta is not None else None
                    candidates.append((at or 0.0, run_id, (run_id, pending)))
        if query.state != "pending":
            session, workspace, label = query.session_id, query.workspace_path, query.label
            # Locals, not globals, in the loops below: they run once per retained terminal.
            at_i, id_i, session_i, workspace_i, labels_i, whole = (
                _ACCEPTED_AT_AT,
                _RUN_ID_AT,
                _SESSION_ID_AT,
                _WORKSPACE_AT,
                _LABELS_AT,
                _WHOLE,
            )
            for held in (self._recent_order, *(shard.values() for shard in self._older)):
                # The compact ones (nearly all) filtered and keyed inline: a function call per
                # retained terminal would be most of a page's cost.
                candidates.extend(
                    (kept[at_i] or 0.0, kept[id_i], kept)
                    for kept in held
                    if len(kept) != whole
                    and (session is None or kept[session_i] == session)
                    and (workspace is None or kept[workspace_i] == workspace)
                    and (label is None or label in kept[labels_i])
                )
                candidates.extend(
                    (*_kept_key(kept), kept)
                    for kept in held
                    if len(kept) == _WHOLE and _kept_matches(kept, query)
                )
        return page_of(candidates, query, self._info_of)

    def _info_of(self, payload: Any) -> RunInfo:
        if type(payload) is tuple and len(payload) == _WHOLE and type(payload[0]) is str:
            # (run id, pending entry)
            return _pending_info(payload[0], payload[1])
        return _kept_info(payload)

    @staticmethod
    def _pending_matches(pending: str | _PendingMeta | _Waited, query: RunQuery) -> bool:
        meta = _pending_meta(pending)
        if query.session_id is not None and _pending_session(pending) != query.session_id:
            return False
        if query.workspace_path is not None and (meta is None or meta[1] != query.workspace_path):
            return False
        if query.label is not None:
            key, value = query.label
            if meta is None or meta[0].labels.get(key) != value:
                return False
        return True

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` (of ``session_id``) as pending.

        Raises ``DuplicateRun`` if the id is already pending or ended: run ids are unique.
        """
        if run_id in self._pending or self._has_terminal(run_id):
            raise DuplicateRun(run_id)
        self._pending[run_id] = session_id
        self._accepted_total += 1

    def accept_call(self, call: RunCall, workspace_path: str | None) -> None:
        """:meth:`accept` of ``call.run_id``, keeping the call's metadata and the workspace
        path for :meth:`run_info` and :meth:`list_runs`. Raises ``DuplicateRun`` like it."""
        run_id = call.run_id
        # Through `accept`, so that a subclass refusing acceptances refuses these too.
        self.accept(run_id, call.session_id)
        self._pending[run_id] = (call, workspace_path, None)

    def mark_started(self, run_id: str, started_at: float) -> None:
        """Note when the pending run's agent began executing; a no-op for any other id."""
        pending = self._pending.get(run_id)
        if type(pending) is tuple:
            self._pending[run_id] = (pending[0], pending[1], started_at)
        elif isinstance(pending, _Waited) and pending.meta is not None:
            pending.meta = (pending.meta[0], pending.meta[1], started_at)

    def withdraw(self, run_id: str) -> None:
        """Undo the ``accept`` of a run that was never started; a no-op unless it is pending.

        A refused submission (its caller got an error) leaves nothing registered.
        """
        pending = self._pending.pop(run_id, None)
        if pending is not None:
            self._accepted_total -= 1
            if isinstance(pending, _Waited):
                # Nobody should wait on a run that was never acknowledged; if somebody does,
                # wake them into UnknownRun rather than leave them parked for good.
                pending.withdrawn = True
                pending.done.set()

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        """Record ``rc`` as its run's terminal. ``True`` if it is the first; never blocks.

        In memory, a terminal is visible as soon as it is recorded: ``on_visible(rc)`` is
        called before this returns. A later terminal for the same id returns ``False`` and
        increments :attr:`duplicates_suppressed`. A terminal for an id that was never
        accepted is recorded too: a terminal is never refused for being unexpected. One whose
        result is not a JSON value is recorded as a failed terminal saying so (as every store
        of the package does, for a coordinator that records terminals itself).
        """
        rc = checked_terminal(rc)
        run_id = rc.run_id
        pending = self._pending.pop(run_id, None)
        recent = self._recent
        # A pending run has no terminal yet (accept refuses a known id): only a run that was
        # not pending can be a duplicate.
        if pending is None and (
            run_id in recent or run_id in self._older[hash(run_id) & _SHARD_MASK]
        ):
            self._duplicates_suppressed += 1
            return False
        recent[run_id] = rc
        recent_order = self._recent_order
        # Its `_Kept` form, with its workspace path (known from `accept_call`): a plain
        # terminal whose result is atomic becomes a tuple of atoms, which the collector stops
        # tracking at its next pass; anything else is kept as itself.
        if type(pending) is tuple:
            workspace: str | None = pending[1]
        elif isinstance(pending, _Waited) and pending.meta is not None:
            workspace = pending.meta[1]
        else:
            workspace = None
        recent_order.append(_kept_form(rc, workspace))
        self._outcomes[rc.outcome] += 1
        if len(recent_order) >= _RECENT + _CHUNK and self._retain >= _RECENT + _CHUNK:
            self._age_oldest_recent()
        if len(recent_order) + self._older_count > self._retain:
            if self._older_count:
                chunks = self._older_chunks
                head = self._older_head
                oldest = chunks[0][head]
                head += 1
                if head == _CHUNK:
                    chunks.popleft()
                    head = 0
                self._older_head = head
                del self._older[hash(oldest) & _SHARD_MASK][oldest]
                self._older_count -= 1
            else:
                # Fewer than _RECENT + _CHUNK retained: the oldest is a recent one.
                del recent[_run_id_of(recent_order.popleft())]
            self._evicted_total += 1
        if isinstance(pending, _Waited):
            # Somebody waits, so Trio is running: time the hand-over.
            pending.terminal = rc
            pending.completed_at = trio.current_time()
            pending.done.set()
        if on_visible is not None:
            on_visible(rc)
        return True

    def _age_oldest_recent(self) -> None:
        # The oldest _CHUNK recent terminals move to the older tier, in their `_Kept` form.
        recent_order, recent, older = self._recent_order, self._recent, self._older
        run_ids = []
        for _ in range(_CHUNK):
            kept = recent_order.popleft()
            run_id = _run_id_of(kept)
            del recent[run_id]
            older[hash(run_id) & _SHARD_MASK][run_id] = kept
            run_ids.append(run_id)
        self._older_chunks.append(tuple(run_ids))
        self._older_count += _CHUNK

    async def flush(self) -> None:
        """Nothing to wait for in memory: a checkpoint, so it can be cancelled like any wait."""
        await trio.lowlevel.checkpoint()

    def get(self, run_id: str) -> RunComplete | None:
        """The run's terminal; ``None`` while it is pending, or when the id is unknown."""
        return self._terminal(run_id)

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal: at once if it ended, else as soon as it ends.

        Raises ``UnknownRun`` for an id never accepted (or evicted past ``retain``). Many
        tasks may wait on the same run; each gets the same terminal exactly once.
        """
        rc = self._recent.get(run_id)
        if rc is not None:
            await trio.lowlevel.checkpoint()
            return rc
        pending = self._pending.get(run_id)
        if pending is None:
            kept = self._older[hash(run_id) & _SHARD_MASK].get(run_id)
            if kept is None:
                await trio.lowlevel.checkpoint_if_cancelled()
                raise UnknownRun(run_id)
            await trio.lowlevel.checkpoint()
            return _expanded(kept)
        if type(pending) is str:
            pending = self._pending[run_id] = _Waited(pending)
        elif type(pending) is tuple:
            pending = self._pending[run_id] = _Waited(pending[0].session_id, pending)
        assert isinstance(pending, _Waited)
        await pending.done.wait()
        if pending.withdrawn:
            raise UnknownRun(run_id)
        self._delivery.observe(trio.current_time() - pending.completed_at)
        # Read from the pending record, not the table: the terminal may already have been
        # evicted by the time this task runs again.
        assert pending.terminal is not None
        return pending.terminal

    def __repr__(self) -> str:
        return (
            f"<RunLedger pending={self.pending_count} terminals={self.terminal_count} "
            f"duplicates_suppressed={self.duplicates_suppressed}>"
        )
