"""``RunLedger``: the source of truth for how each run ended.

The broker fans terminals out to whoever happens to be listening; the ledger remembers them.
A waiter that arrives after the run ended is answered from here at once, and a second
terminal for the same run id (a fallback racing the coordinator's own) is refused here, so
it is never fanned out either.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Literal, Protocol, runtime_checkable

import trio

from .errors import DuplicateRun, UnknownRun
from .events import RunComplete

__all__ = ["RunLedger", "RunState", "RunStore"]

RunState = Literal["pending", "terminal"]

_SHARDS = 64
_SHARD_MASK = _SHARDS - 1  # _SHARDS is a power of two


@runtime_checkable
class RunStore(Protocol):
    """What a ledger implements; durable ledgers (later: on disk, in Redis) implement it too.

    ``accept`` and ``complete`` are synchronous because terminals are recorded from
    ``finally`` blocks and cancelled scopes, where nothing may be awaited. A durable store
    records synchronously in memory and persists behind that.
    """

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` as pending; raises ``DuplicateRun`` if it is known already."""
        ...

    def complete(self, rc: RunComplete) -> bool:
        """Record a terminal; ``True`` for the first one of a run id, ``False`` afterwards."""
        ...

    def get(self, run_id: str) -> RunComplete | None:
        """The run's terminal, or ``None`` while it is pending or unknown."""
        ...

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal, once there is one; raises ``UnknownRun`` for unknown ids."""
        ...

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``, ``"terminal"``, or ``None`` for an unknown run id."""
        ...


class _Pending:
    __slots__ = ("done", "session_id", "terminal")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
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
        self.retain = retain
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
        self.duplicates_suppressed = 0
        """Terminals refused because the run already had one."""
        self.accepted_total = 0
        """Runs ever accepted."""
        self.outcomes: Counter[str] = Counter()
        """Terminals recorded, by outcome (``completed``, ``failed``, ``cancelled``)."""
        self.evicted_total = 0
        """Terminals forgotten because more than ``retain`` were held."""

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
        self.accepted_total += 1

    def _discard(self, run_id: str) -> None:
        # Undo an ``accept`` whose dispatch never started (the caller got an error), so a
        # refused submission leaves nothing registered. Only valid for a pending run.
        pending = self._pending.pop(run_id, None)
        if pending is not None:
            self.accepted_total -= 1

    def complete(self, rc: RunComplete) -> bool:
        """Record ``rc`` as its run's terminal. ``True`` if it is the first; never blocks.

        A later terminal for the same id returns ``False`` and increments
        :attr:`duplicates_suppressed`. A terminal for an id that was never accepted is
        recorded too: a terminal is never refused for being unexpected.
        """
        run_id = rc.run_id
        table = self._table(run_id)
        if run_id in table:
            self.duplicates_suppressed += 1
            return False
        pending = self._pending.pop(run_id, None)
        table[run_id] = rc
        self._order.append(run_id)
        self.outcomes[rc.outcome] += 1
        if len(self._order) > self.retain:
            oldest = self._order.popleft()
            del self._table(oldest)[oldest]
            self.evicted_total += 1
        if pending is not None:
            pending.terminal = rc
            if pending.done is not None:
                pending.done.set()
        return True

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
        # Read from the pending record, not the table: the terminal may already have been
        # evicted by the time this task runs again.
        assert pending.terminal is not None
        return pending.terminal

    def __repr__(self) -> str:
        return (
            f"<RunLedger pending={self.pending_count} terminals={self.terminal_count} "
            f"duplicates_suppressed={self.duplicates_suppressed}>"
        )
