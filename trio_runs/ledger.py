"""``RunLedger``: the source of truth for how each run ended.

The broker fans terminals out to whoever happens to be listening; the ledger remembers them.
A waiter that arrives after the run ended is answered from here at once, and a second
terminal for the same run id (a fallback racing the coordinator's own) is refused here, so
it is never fanned out either.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal, Protocol, runtime_checkable

import attrs
import trio

from ._histogram import Histogram, HistogramRecorder
from .errors import DuplicateRun, UnknownRun
from .events import RunCall, RunComplete

__all__ = [
    "LedgerStatistics",
    "OnVisible",
    "RunLedger",
    "RunState",
    "RunStore",
    "SupportsRerun",
]

RunState = Literal["pending", "ending", "terminal"]
"""``pending``: accepted, no terminal yet; ``ending``: its terminal is decided (a second one
would be refused) but not yet durable, so nobody is shown it; ``terminal``: visible."""

OnVisible = Callable[[RunComplete], object]
"""Called with a terminal once it is visible (durable); see :meth:`RunStore.complete`."""

_SHARDS = 64
_SHARD_MASK = _SHARDS - 1  # _SHARDS is a power of two


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


class _Pending:
    __slots__ = ("completed_at", "done", "session_id", "terminal", "withdrawn")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.withdrawn = False
        self.completed_at = 0.0
        # Created only when somebody waits: most runs are never waited on individually.
        self.done: trio.Event | None = None
        self.terminal: RunComplete | None = None


class RunLedger:
    """In-memory record of every run: pending, or ended with its one terminal.

    The first terminal recorded for a run id wins; later ones are refused and counted in
    :attr:`duplicates_suppressed`, never overwrite it. Waiters on a pending run are woken
    when it ends; waiters on an ended run are answered at once. Memory is bounded: the
    oldest terminals beyond ``retain`` are forgotten (waiting on them raises ``UnknownRun``).
    Pending runs are never evicted.
    """

    def __init__(self, retain: int = 100_000) -> None:
        if not isinstance(retain, int) or isinstance(retain, bool) or retain < 1:
            raise ValueError(f"retain must be a positive int, got {retain!r}")
        self._retain = retain
        self._pending: dict[str, _Pending] = {}
        # Terminals by run id, spread over _SHARDS small dicts by hash. One dict of `retain`
        # entries under steady churn (the newest in, the oldest out) is rebuilt every so
        # often, its old and new tables side by side for a moment: at the default retention
        # that made peak RSS after 1M runs ~20% higher than after 100k. Small dicts rebuild a
        # little at a time, so the peak stays flat.
        self._shards: tuple[dict[str, RunComplete], ...] = tuple({} for _ in range(_SHARDS))
        # Eviction order. A deque, not the dict's own order: popping the oldest key of a
        # dict with many deleted leading slots is not O(1) in CPython.
        self._order: deque[str] = deque()
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
            retained=len(self._order),
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
        return len(self._order)

    def _table(self, run_id: str) -> dict[str, RunComplete]:
        return self._shards[hash(run_id) & _SHARD_MASK]

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._pending or run_id in self._shards[hash(run_id) & _SHARD_MASK]

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``, ``"terminal"``, or ``None`` for an unknown (or evicted) run id."""
        if run_id in self._pending:
            return "pending"
        if run_id in self._table(run_id):
            return "terminal"
        return None

    def session_of(self, run_id: str) -> str | None:
        """The session a known run belongs to, or ``None``."""
        pending = self._pending.get(run_id)
        if pending is not None:
            return pending.session_id
        rc = self._table(run_id).get(run_id)
        return rc.session_id if rc is not None else None

    def pending_run_ids(self) -> list[str]:
        """The ids of every run accepted and not yet ended, oldest first."""
        return list(self._pending)

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` (of ``session_id``) as pending.

        Raises ``DuplicateRun`` if the id is already pending or ended: run ids are unique.
        """
        if run_id in self._pending or run_id in self._table(run_id):
            raise DuplicateRun(run_id)
        self._pending[run_id] = _Pending(session_id)
        self._accepted_total += 1

    def withdraw(self, run_id: str) -> None:
        """Undo the ``accept`` of a run that was never started; a no-op unless it is pending.

        A refused submission (its caller got an error) leaves nothing registered.
        """
        pending = self._pending.pop(run_id, None)
        if pending is not None:
            self._accepted_total -= 1
            if pending.done is not None:
                # Nobody should wait on a run that was never acknowledged; if somebody does,
                # wake them into UnknownRun rather than leave them parked for good.
                pending.withdrawn = True
                pending.done.set()

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        """Record ``rc`` as its run's terminal. ``True`` if it is the first; never blocks.

        In memory, a terminal is visible as soon as it is recorded: ``on_visible(rc)`` is
        called before this returns. A later terminal for the same id returns ``False`` and
        increments :attr:`duplicates_suppressed`. A terminal for an id that was never
        accepted is recorded too: a terminal is never refused for being unexpected.
        """
        run_id = rc.run_id
        table = self._table(run_id)
        if run_id in table:
            self._duplicates_suppressed += 1
            return False
        pending = self._pending.pop(run_id, None)
        table[run_id] = rc
        self._order.append(run_id)
        self._outcomes[rc.outcome] += 1
        if len(self._order) > self._retain:
            oldest = self._order.popleft()
            del self._table(oldest)[oldest]
            self._evicted_total += 1
        if pending is not None:
            pending.terminal = rc
            if pending.done is not None:
                # Somebody waits, so Trio is running: time the hand-over.
                pending.completed_at = trio.current_time()
                pending.done.set()
        if on_visible is not None:
            on_visible(rc)
        return True

    async def flush(self) -> None:
        """Nothing to wait for in memory: a checkpoint, so it can be cancelled like any wait."""
        await trio.lowlevel.checkpoint()

    def get(self, run_id: str) -> RunComplete | None:
        """The run's terminal; ``None`` while it is pending, or when the id is unknown."""
        return self._table(run_id).get(run_id)

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal: at once if it ended, else as soon as it ends.

        Raises ``UnknownRun`` for an id never accepted (or evicted past ``retain``). Many
        tasks may wait on the same run; each gets the same terminal exactly once.
        """
        rc = self._table(run_id).get(run_id)
        if rc is not None:
            await trio.lowlevel.checkpoint()
            return rc
        pending = self._pending.get(run_id)
        if pending is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            raise UnknownRun(run_id)
        if pending.done is None:
            pending.done = trio.Event()
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
