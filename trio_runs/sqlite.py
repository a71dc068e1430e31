"""``SqliteLedger``: the durable run store, on one SQLite file (stdlib ``sqlite3``, WAL).

What it promises (DESIGN "Durability"):

- **D1** an acceptance is on disk before ``flush()`` returns, so ``Backend.submit`` (and an
  HTTP ``202``) acknowledges only durable runs;
- **D2** a terminal is decided at once (a second one is refused in memory, synchronously)
  and shown to nobody — ``get``, ``wait``, ``on_visible`` — before the commit that holds it;
- **D3** on open, before anything is served, every run accepted and not ended gets one
  terminal: *abandoned* (``RunComplete.abandoned``), since whether its work happened is
  unknown;
- **D4** a run id stays taken for as long as its terminal is retained, across restarts;
- **D5** retention is bounded by count, bytes and age; terminals live on disk, with a
  bounded in-memory cache.

It lists its runs (``SupportsRunListing``) with their metadata: labels, acceptance time and
workspace path are written with the acceptance, so they survive a restart and recovery;
a run rerun after a crash counts its execution (``attempt``) on disk.

Blocking I/O never runs on the event loop: one writer thread takes every write from a
queue and commits them in batches (group commit: one fsync for all the acceptances and
terminals that arrived while the previous batch was being written), then hands the batch
back to the Trio thread, which makes its terminals visible. A terminal that is not in the
cache is read from disk in a worker thread by ``wait``; ``get`` — synchronous by contract —
reads it inline with one primary-key lookup (it is in the cache for recent runs).

Two processes never share a file: an exclusive ``flock`` on ``PATH.lock`` is taken on open
and released by the kernel when the process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import math
import operator
import os
import queue
import sqlite3
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Final, Literal, cast

import attrs
import trio
import trio.testing

from ._encoding import checked_terminal
from ._histogram import HistogramRecorder
from .errors import DuplicateRun, StoreError, UnknownRun
from .events import RunCall, RunComplete
from .ledger import (
    LedgerStatistics,
    OnVisible,
    RunInfo,
    RunPage,
    RunQuery,
    RunState,
    decode_cursor,
    page_of,
    terminal_info,
)

__all__ = ["SCHEMA_VERSION", "SqliteLedger", "SqliteRetention", "open_sqlite_ledger"]

logger = logging.getLogger("trio_runs.sqlite")

SCHEMA_VERSION: Final = 3
"""The database's ``PRAGMA user_version``; a newer file is refused, an older one migrated."""

ABANDONED_ERROR: Final = "abandoned: the server stopped before the run ended"
"""The ``error`` of the terminal recovery gives a run that was accepted and never ended."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    ended_at    REAL,
    terminal    TEXT,
    size        INTEGER NOT NULL DEFAULT 0,
    workspace   TEXT,
    call        TEXT,
    labels      TEXT
);
CREATE INDEX IF NOT EXISTS runs_pending ON runs(accepted_at) WHERE ended_at IS NULL;
"""
# The listing's tables and indexes (version 3), for a new file and for a migrated one alike.
# Labels are rows of their own, so that a label filter is an index lookup; they go when
# their run's row goes (withdrawn or evicted), by the trigger, without a statement per run.
_LISTING: Final = """
CREATE TABLE IF NOT EXISTS run_labels (
    run_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_labels_match ON run_labels(key, value);
CREATE TRIGGER IF NOT EXISTS runs_labels_go AFTER DELETE ON runs
    BEGIN DELETE FROM run_labels WHERE run_id = old.run_id; END;
CREATE INDEX IF NOT EXISTS runs_newest ON runs(accepted_at, run_id);
CREATE INDEX IF NOT EXISTS runs_workspace ON runs(workspace, accepted_at, run_id);
CREATE INDEX IF NOT EXISTS runs_session ON runs(session_id, accepted_at, run_id);
"""
_MIGRATIONS: Final = {
    # 1 -> 2: a run accepted to be run again after a crash keeps its workspace and call.
    1: "ALTER TABLE runs ADD COLUMN workspace TEXT; ALTER TABLE runs ADD COLUMN call TEXT;",
    # 2 -> 3: every run keeps its labels (and its workspace, from now on) for the listing.
    2: "ALTER TABLE runs ADD COLUMN labels TEXT;",
}


@attrs.frozen(kw_only=True)
class SqliteRetention:
    """How many terminals are kept, and for how long; the oldest go first past any bound.

    A run id stays taken (``DuplicateRun``) while its terminal is retained, so a client
    that mints its own ids can retry safely within this window.
    """

    count: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    """At most this many terminals."""
    bytes: int = attrs.field(default=1 << 30, validator=attrs.validators.ge(1))
    """At most this many bytes of encoded terminals (results included)."""
    seconds: float = attrs.field(default=7 * 24 * 3600.0, validator=attrs.validators.gt(0))
    """No terminal older than this (by the wall clock of when it was recorded)."""


def _waiting_matches(waiting: _Waiting, query: RunQuery) -> bool:
    if query.session_id is not None and waiting.session_id != query.session_id:
        return False
    if query.workspace_path is not None and waiting.workspace != query.workspace_path:
        return False
    if query.label is not None:
        call = waiting.call
        if call is None or call.labels.get(query.label[0]) != query.label[1]:
            return False
    return True


class _Waiting:
    # A run not yet visible: pending, or ending (decided, not yet committed), with what the
    # listing shows of it.
    __slots__ = (
        "accepted_at",
        "call",
        "completed_at",
        "done",
        "session_id",
        "started_at",
        "terminal",
        "withdrawn",
        "workspace",
    )

    def __init__(
        self,
        session_id: str,
        accepted_at: float | None = None,
        call: RunCall | None = None,
        workspace: str | None = None,
    ) -> None:
        self.session_id = session_id
        self.accepted_at = accepted_at
        self.call = call
        self.workspace = workspace
        self.started_at: float | None = None
        self.done: trio.Event | None = None
        self.terminal: RunComplete | None = None
        self.completed_at = 0.0
        self.withdrawn = False

    def info(self, run_id: str, state: RunState) -> RunInfo:
        call = self.call
        return RunInfo(
            run_id=run_id,
            session_id=self.session_id,
            workspace_path=self.workspace,
            state=state,
            accepted_at=self.accepted_at,
            started_at=self.started_at,
            attempt=1 if call is None else call.execution,
            labels=_NO_LABELS if call is None else call.labels,
            terminal=None,
        )


_Retained = tuple[str, int, float]
# A retained terminal's (session id, size, ended_at): a plain tuple of atoms, which the garbage
# collector stops tracking, so a full store adds nothing to every full collection's walk.
_SESSION: Final = 0
_SIZE: Final = 1
_ENDED_AT: Final = 2


# Writes, in the order the Trio thread made them.
_Accept = tuple[Literal["accept"], str, str, float, str | None, str | None, str | None]
_End = tuple[Literal["end"], str, str, float, str, int]
_Withdraw = tuple[Literal["withdraw"], str]
_Evict = tuple[Literal["evict"], tuple[str, ...]]
_Write = _Accept | _End | _Withdraw | _Evict

_STOP: Final = object()
_NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})
_BATCH_MAX: Final = 4096


class SqliteLedger:
    """A durable ``RunStore`` on one SQLite file; made by :func:`open_sqlite_ledger`.

    Everything decided is decided in memory at once (duplicates refused, first terminal
    wins), and becomes visible after the writer thread committed it. While the disk fails,
    ``accept`` raises ``StoreError`` (nothing is accepted) and ``flush`` raises it too; the
    writer keeps retrying what was already decided, in order.
    """

    def __init__(
        self,
        path: str,
        retention: SqliteRetention,
        cache_bytes: int,
        token: trio.lowlevel.TrioToken,
        reader: sqlite3.Connection,
    ) -> None:
        self._path = path
        self._retention = retention
        self._cache_limit = cache_bytes
        self._token = token
        self._reader = reader
        self._reader_lock = threading.Lock()
        self._writes: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._pending: dict[str, _Waiting] = {}
        self._ending: dict[str, tuple[_Waiting, RunComplete, OnVisible | None]] = {}
        self._retained: dict[str, _Retained] = {}
        self._order: deque[str] = deque()
        self._retained_bytes = 0
        self._cache: OrderedDict[str, RunComplete] = OrderedDict()
        self._cache_bytes = 0
        # Write sequence numbers: how many writes were queued / are on disk.
        self._queued = 0
        self._durable = 0
        self._flushers: list[tuple[int, trio.Event]] = []
        self._failure: BaseException | None = None
        self._accepted_total = 0
        self._duplicates = 0
        self._evicted = 0
        self._outcomes = {"completed": 0, "failed": 0, "cancelled": 0}
        self._recovered = 0
        self._commits = 0
        self._delivery = HistogramRecorder()
        self._closed = False
        self._writer_exited = trio.Event()
        self._rerun: dict[str, list[RunCall]] = {}

    # -- introspection -------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def retention(self) -> SqliteRetention:
        """The retention bounds (a construction-time setting)."""
        return self._retention

    @property
    def recovered(self) -> int:
        """Runs found accepted and not ended on open, each given its abandoned terminal."""
        return self._recovered

    @property
    def commits(self) -> int:
        """Transactions committed by the writer (each one fsync for a whole batch)."""
        return self._commits

    def statistics(self) -> LedgerStatistics:
        """A frozen snapshot of the store's counters."""
        return LedgerStatistics(
            accepted_total=self._accepted_total,
            pending=len(self._pending) + len(self._ending),
            retained=len(self._retained),
            completed_total=self._outcomes["completed"],
            failed_total=self._outcomes["failed"],
            cancelled_total=self._outcomes["cancelled"],
            duplicates_suppressed=self._duplicates,
            evicted_total=self._evicted,
            delivery_latency=self._delivery.snapshot(),
        )

    # -- the RunStore protocol -----------------------------------------------------------

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` as pending; durable once a later ``flush()`` returns.

        Raises ``DuplicateRun`` if the id is pending, ending or retained (also from before a
        restart), and ``StoreError`` while the disk fails or after the store was closed;
        either way nothing is recorded.
        """
        if run_id in self._pending or run_id in self._ending or run_id in self._retained:
            raise DuplicateRun(run_id)
        self._check_usable()
        now = time.time()
        self._pending[run_id] = _Waiting(session_id, now)
        self._accepted_total += 1
        self._write(("accept", run_id, session_id, now, None, None, None))

    def accept_call(self, call: RunCall, workspace_path: str | None) -> None:
        """:meth:`accept` of ``call.run_id``, writing its labels, acceptance time and
        workspace path with it (for the listing, across restarts). Raises what ``accept``
        raises."""
        run_id = call.run_id
        if run_id in self._pending or run_id in self._ending or run_id in self._retained:
            raise DuplicateRun(run_id)
        self._check_usable()
        at = call.accepted_at if call.accepted_at is not None else time.time()
        labels = json.dumps(dict(call.labels)) if call.labels else None
        self._pending[run_id] = _Waiting(call.session_id, at, call, workspace_path)
        self._accepted_total += 1
        self._write(("accept", run_id, call.session_id, at, workspace_path, None, labels))

    def mark_started(self, run_id: str, started_at: float) -> None:
        """Note when the pending run's agent began executing (in memory: its terminal
        carries it to disk); a no-op for any other id."""
        waiting = self._pending.get(run_id)
        if waiting is not None:
            waiting.started_at = started_at

    def accept_rerunnable(
        self, run_id: str, session_id: str, workspace_path: str, call: RunCall
    ) -> None:
        """:meth:`accept`, keeping the call and workspace path so a crash reruns it (D3).

        Raises what ``accept`` raises, and ``ValueError`` for a call whose attachments
        cannot be stored as JSON; nothing is recorded then.
        """
        if run_id in self._pending or run_id in self._ending or run_id in self._retained:
            raise DuplicateRun(run_id)
        self._check_usable()
        encoded = json.dumps(call.to_dict())
        at = call.accepted_at if call.accepted_at is not None else time.time()
        labels = json.dumps(dict(call.labels)) if call.labels else None
        self._pending[run_id] = _Waiting(session_id, at, call, workspace_path)
        self._accepted_total += 1
        self._write(("accept", run_id, session_id, at, workspace_path, encoded, labels))

    def rerunnable_paths(self) -> list[str]:
        """The workspace paths with recovered runs still to be run again."""
        return [path for path, calls in self._rerun.items() if calls]

    def take_rerunnable(self, workspace_path: str) -> list[RunCall]:
        """The recovered runs of that workspace, oldest first; each is handed out once."""
        return self._rerun.pop(workspace_path, [])

    def withdraw(self, run_id: str) -> None:
        """Undo the ``accept`` of a run never started; a no-op unless it is pending."""
        waiting = self._pending.pop(run_id, None)
        if waiting is None:
            return
        self._accepted_total -= 1
        if waiting.done is not None:
            waiting.withdrawn = True
            waiting.done.set()
        if not self._closed:
            self._write(("withdraw", run_id))

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        """Decide ``rc`` as its run's terminal now; make it visible after its commit.

        ``True`` for the first terminal of a run id; a later one is refused at once
        (``False``, counted). A terminal whose result is not a JSON value (a set, a tuple,
        NaN...: see ``UnencodableValue``) is recorded as a *failed* terminal saying so, never
        converted: what is stored is what everybody is shown. Never blocks, never raises for
        a failing disk (the writer retries; see the class).
        """
        run_id = rc.run_id
        if run_id in self._ending or run_id in self._retained:
            self._duplicates += 1
            return False
        # record_terminal checked it already; checked again for a direct caller, so that
        # json.dumps (which would turn a tuple into a list, or write NaN) never decides.
        rc = checked_terminal(rc)
        encoded = rc.to_json()
        waiting = self._pending.pop(run_id, None) or _Waiting(rc.session_id, rc.accepted_at)
        waiting.terminal = rc
        self._ending[run_id] = (waiting, rc, on_visible)
        self._outcomes[rc.outcome] += 1
        if self._closed:
            logger.error("terminal of run %s recorded after the store closed: lost", run_id)
            return True
        self._write(("end", run_id, rc.session_id, time.time(), encoded, len(encoded)))
        return True

    async def flush(self) -> None:
        """Return once every write queued before the call is committed.

        Raises ``StoreError`` if the disk is failing (the writes stay queued and are retried).
        Cancelling the wait changes nothing that was recorded.
        """
        target = self._queued
        if self._durable >= target:
            await trio.lowlevel.checkpoint()
            self._check_usable()
            return
        self._check_usable()
        event = trio.Event()
        self._flushers.append((target, event))
        await event.wait()
        if self._durable < target:
            self._check_usable()
            raise StoreError(f"{self._path}: closed before the write was committed")

    def get(self, run_id: str) -> RunComplete | None:
        """The run's visible terminal (from the cache, or one primary-key read), else ``None``."""
        cached = self._cache.get(run_id)
        if cached is not None:
            self._cache.move_to_end(run_id)
            return cached
        if run_id not in self._retained:
            return None
        return self._remember(run_id, self._read(run_id))

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal once it is visible; ``UnknownRun`` for an unknown id.

        A retained terminal not in the cache is read in a worker thread.
        """
        cached = self._cache.get(run_id)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        waiting = self._pending.get(run_id)
        if waiting is None:
            ending = self._ending.get(run_id)
            waiting = ending[0] if ending is not None else None
        if waiting is None:
            if run_id not in self._retained:
                await trio.lowlevel.checkpoint()
                raise UnknownRun(run_id)
            rc = await trio.to_thread.run_sync(self._read, run_id)
            return self._remember(run_id, rc)
        if waiting.done is None:
            waiting.done = trio.Event()
        await waiting.done.wait()
        if waiting.withdrawn:
            raise UnknownRun(run_id)
        self._delivery.observe(trio.current_time() - waiting.completed_at)
        assert waiting.terminal is not None
        return waiting.terminal

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``, ``"ending"`` (decided, not yet durable), ``"terminal"`` or ``None``."""
        if run_id in self._pending:
            return "pending"
        if run_id in self._ending:
            return "ending"
        if run_id in self._retained:
            return "terminal"
        return None

    def session_of(self, run_id: str) -> str | None:
        """The session of a known run, or ``None``."""
        waiting = self._pending.get(run_id)
        if waiting is not None:
            return waiting.session_id
        ending = self._ending.get(run_id)
        if ending is not None:
            return ending[1].session_id
        retained = self._retained.get(run_id)
        return retained[_SESSION] if retained is not None else None

    def pending_run_ids(self) -> list[str]:
        """Runs accepted whose terminal is not visible yet, oldest first."""
        return [*self._pending, *self._ending]

    async def run_info(self, run_id: str) -> RunInfo | None:
        """The run as the store knows it, or ``None`` for an unknown (or evicted) id.

        A pending run is answered from memory; a retained terminal is read from the file by
        its primary key in a worker thread (never on the event loop).
        """
        await trio.lowlevel.checkpoint()
        waiting = self._pending.get(run_id)
        if waiting is not None:
            return waiting.info(run_id, "pending")
        ending = self._ending.get(run_id)
        if ending is not None:
            return ending[0].info(run_id, "ending")
        if run_id not in self._retained:
            return None
        return await trio.to_thread.run_sync(self._read_info, run_id)

    def _read_info(self, run_id: str) -> RunInfo | None:
        # In a worker thread: the reader connection is this store's, behind its lock.
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT terminal, workspace, accepted_at FROM runs"
                " WHERE run_id = ? AND ended_at IS NOT NULL",
                (run_id,),
            ).fetchone()
        if row is None:
            return None  # evicted meanwhile
        return terminal_info(RunComplete.from_json(row[0]), row[1], row[2])

    async def list_runs(self, query: RunQuery) -> RunPage:
        """One page of the runs matching ``query``, newest accepted first.

        Runs not yet visible come from memory; retained terminals from one indexed range
        read of the file (``accepted_at, run_id`` order, narrowed by the workspace, session
        or label index), stopping after ``limit + 1`` rows, in a worker thread (never on the
        event loop). A row the Trio side does not show yet (committed, not yet handed over)
        or no longer (evicted) is skipped. ``ValueError`` for a malformed cursor, before
        any read.
        """
        if query.cursor is not None:
            decode_cursor(query.cursor)
        return await trio.to_thread.run_sync(self._list_now, query)

    def _list_now(self, query: RunQuery) -> RunPage:
        after = decode_cursor(query.cursor) if query.cursor is not None else None
        candidates: list[tuple[float, str, object]] = []
        if query.state != "terminal":
            # Copied first (each copy is one step under the GIL): the Trio thread may change
            # these tables while a worker thread lists.
            unseen: list[tuple[str, _Waiting, RunState]] = [
                (r, w, "pending") for r, w in list(self._pending.items())
            ]
            unseen += [(r, e[0], "ending") for r, e in list(self._ending.items())]
            for run_id, waiting, state in unseen:
                if _waiting_matches(waiting, query):
                    at = waiting.accepted_at or 0.0
                    candidates.append((at, run_id, waiting.info(run_id, state)))
        if query.state != "pending":
            candidates.extend(self._retained_candidates(query, after))
        return page_of(candidates, query, lambda info: info)

    def _retained_candidates(
        self, query: RunQuery, after: tuple[float, str] | None
    ) -> list[tuple[float, str, object]]:
        where = ["ended_at IS NOT NULL"]
        params: list[object] = []
        if query.workspace_path is not None:
            where.append("workspace = ?")
            params.append(query.workspace_path)
        if query.session_id is not None:
            where.append("session_id = ?")
            params.append(query.session_id)
        if query.label is not None:
            where.append("run_id IN (SELECT run_id FROM run_labels WHERE key = ? AND value = ?)")
            params.extend(query.label)
        if after is not None:
            where.append("(accepted_at, run_id) < (?, ?)")
            params.extend(after)
        sql = (
            "SELECT accepted_at, run_id, workspace, terminal FROM runs WHERE "
            + " AND ".join(where)
            + " ORDER BY accepted_at DESC, run_id DESC"
        )
        found: list[tuple[float, str, object]] = []
        want = query.limit + 1
        with self._reader_lock:
            rows = self._reader.execute(sql, params)
            while len(found) < want:
                batch = rows.fetchmany(want)
                if not batch:
                    break
                for at, run_id, workspace, terminal in batch:
                    if run_id in self._retained:
                        rc = RunComplete.from_json(terminal)
                        info = terminal_info(rc, workspace, at)
                        found.append((float(at), run_id, info))
            rows.close()
        return found

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._pending or run_id in self._ending or run_id in self._retained

    def __repr__(self) -> str:
        return (
            f"<SqliteLedger {self._path!r} pending={len(self._pending)} "
            f"ending={len(self._ending)} retained={len(self._retained)}>"
        )

    # -- the Trio side ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"{self._path}: the store is closed")
        if self._failure is not None:
            raise StoreError(f"{self._path}: the disk is failing: {self._failure}")

    def _write(self, write: _Write) -> None:
        self._queued += 1
        self._writes.put(write)

    def _read(self, run_id: str) -> RunComplete:
        # One primary-key lookup; runs inline (get) or in a worker thread (wait).
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT terminal FROM runs WHERE run_id = ? AND ended_at IS NOT NULL", (run_id,)
            ).fetchone()
        if row is None:
            raise UnknownRun(run_id)  # evicted meanwhile
        return RunComplete.from_json(row[0])

    def _remember(self, run_id: str, rc: RunComplete) -> RunComplete:
        retained = self._retained.get(run_id)
        if retained is None or retained[_SIZE] > self._cache_limit:
            return rc
        self._cache[run_id] = rc
        self._cache_bytes += retained[_SIZE]
        while self._cache_bytes > self._cache_limit:
            # Every cached terminal is retained (eviction drops it from the cache too).
            oldest, _ = self._cache.popitem(last=False)
            self._cache_bytes -= self._retained[oldest][_SIZE]
        return rc

    def _committed(self, count: int, ended: Sequence[tuple[str, int, float]]) -> None:
        # In the Trio thread, in commit order: the batch is on disk, show its terminals.
        self._commits += 1
        self._durable += count
        self._failure = None
        now = trio.current_time()
        for run_id, size, ended_at in ended:
            entry = self._ending.pop(run_id, None)
            if entry is None:
                continue
            waiting, rc, on_visible = entry
            self._retained[run_id] = (rc.session_id, size, ended_at)
            self._order.append(run_id)
            self._retained_bytes += size
            self._remember(run_id, rc)
            if waiting.done is not None:
                waiting.completed_at = now
                waiting.done.set()
            if on_visible is not None:
                try:
                    on_visible(rc)
                except Exception:
                    logger.exception("on_visible failed for run %s", run_id)
        self._evict(time.time())
        self._wake_flushers()

    def _wake_flushers(self) -> None:
        if not self._flushers:
            return
        still = []
        for target, event in self._flushers:
            if self._durable >= target or self._failure is not None or self._closed:
                event.set()
            else:
                still.append((target, event))
        self._flushers = still

    def _write_failed(self, exc: BaseException) -> None:
        if self._failure is None:
            logger.error("%s: writes are failing (retrying): %s", self._path, exc)
        self._failure = exc
        self._wake_flushers()

    def _evict(self, now: float) -> None:
        bounds = self._retention
        oldest_allowed = now - bounds.seconds
        evicted: list[str] = []
        order = self._order
        while order:
            retained = self._retained.get(order[0])
            if retained is None:
                order.popleft()
                continue
            if (
                len(self._retained) <= bounds.count
                and self._retained_bytes <= bounds.bytes
                and retained[_ENDED_AT] >= oldest_allowed
            ):
                break
            run_id = order.popleft()
            del self._retained[run_id]
            self._retained_bytes -= retained[_SIZE]
            if self._cache.pop(run_id, None) is not None:
                self._cache_bytes -= retained[_SIZE]
            evicted.append(run_id)
        if evicted:
            self._evicted += len(evicted)
            if not self._closed:
                self._write(("evict", tuple(evicted)))

    async def _expire_by_age(self) -> None:
        # Age is a bound even when nothing is being written.
        period = min(max(self._retention.seconds / 10, 0.05), 60.0)
        while True:
            await trio.sleep(period)
            self._evict(time.time())

    # -- the writer thread -------------------------------------------------------------------

    def _writer(self, connection: sqlite3.Connection) -> None:
        try:
            self._write_batches(connection)
        finally:
            self._token.run_sync_soon(self._writer_exited.set)

    def _write_batches(self, connection: sqlite3.Connection) -> None:
        backoff = 0.05
        batch: list[_Write] = []
        stopping = False
        failures_while_stopping = 0
        while True:
            if not batch:
                first = self._writes.get()
                if first is _STOP:
                    return
                batch.append(first)  # type: ignore[arg-type]
                while len(batch) < _BATCH_MAX:
                    try:
                        more = self._writes.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stopping = True
                        break
                    batch.append(more)  # type: ignore[arg-type]
            try:
                ended = _apply(connection, batch)
            except sqlite3.Error as exc:
                connection.rollback()
                self._token.run_sync_soon(self._write_failed, exc)
                if stopping:
                    failures_while_stopping += 1
                    if failures_while_stopping >= 5:
                        logger.error(
                            "%s: %d write(s) lost at close: %s", self._path, len(batch), exc
                        )
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._token.run_sync_soon(self._committed, len(batch), ended)
            batch = []
            if stopping:
                return


_ACCEPT_SQL: Final = (
    "INSERT INTO runs (run_id, session_id, accepted_at, workspace, call, labels)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_LABEL_SQL: Final = "INSERT INTO run_labels (run_id, key, value) VALUES (?, ?, ?)"
_END_SQL: Final = (
    "INSERT INTO runs (run_id, session_id, accepted_at, ended_at, terminal, size)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET"
    " ended_at = excluded.ended_at, terminal = excluded.terminal, size = excluded.size"
)
_WITHDRAW_SQL: Final = "DELETE FROM runs WHERE run_id = ? AND ended_at IS NULL"
_EVICT_SQL: Final = "DELETE FROM runs WHERE run_id = ? AND ended_at IS NOT NULL"


def _apply(connection: sqlite3.Connection, batch: list[_Write]) -> list[tuple[str, int, float]]:
    # One transaction, one fsync, for the whole batch. Consecutive writes of one kind go to
    # SQLite in one executemany: the same statements in the same order, without a Python
    # round trip per row.
    ended: list[tuple[str, int, float]] = []
    with connection:
        for kind, group in itertools.groupby(batch, key=operator.itemgetter(0)):
            if kind == "accept":
                accepts = [cast(_Accept, write)[1:] for write in group]
                connection.executemany(_ACCEPT_SQL, accepts)
                labelled = [
                    (row[0], key, value)
                    for row in accepts
                    if row[5] is not None
                    for key, value in json.loads(row[5]).items()
                ]
                if labelled:
                    connection.executemany(_LABEL_SQL, labelled)
            elif kind == "end":
                rows = []
                for write in group:
                    _, run_id, session_id, at, encoded, size = cast(_End, write)
                    rows.append((run_id, session_id, at, at, encoded, size))
                    ended.append((run_id, size, at))
                connection.executemany(_END_SQL, rows)
            elif kind == "withdraw":
                connection.executemany(_WITHDRAW_SQL, [(write[1],) for write in group])
            else:
                connection.executemany(
                    _EVICT_SQL,
                    [(run_id,) for write in group for run_id in cast(_Evict, write)[1]],
                )
    return ended


# -- opening -------------------------------------------------------------------------------


def _lock(path: str) -> int:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"{path} is in use by another process (it holds {path}.lock): one server per "
            "database file"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _connect(
    path: str, synchronous: str, busy_timeout: float, *, check_same_thread: bool
) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path,
        isolation_level="DEFERRED",
        check_same_thread=check_same_thread,
        timeout=busy_timeout,
    )
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    return connection


_Unended = tuple[str, str, "str | None", "str | None", float, "str | None"]


def _prepare(
    path: str, synchronous: str, busy_timeout: float
) -> tuple[sqlite3.Connection, list[_Unended]]:
    # Blocking: runs in a worker thread. Opens (or creates) the file, checks (and migrates)
    # its schema, and returns the writer's connection and the runs accepted and never ended:
    # (run id, session id, workspace path and call JSON when it is to be run again,
    # acceptance time, labels JSON).
    try:
        connection = _connect(path, synchronous, busy_timeout, check_same_thread=False)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            connection.close()
            raise StoreError(
                f"{path} has schema version {version}; this trio-runs knows up to "
                f"{SCHEMA_VERSION}: upgrade trio-runs, or use another --db"
            )
        if version < SCHEMA_VERSION:
            # One transaction (executescript runs outside the implicit ones, so it is
            # spelled out): a process killed, or a statement failing, halfway through a
            # migration leaves the file as it was, to be migrated again on the next open.
            steps = (
                [_SCHEMA]
                if version == 0
                else [_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)]
            )
            script = "\n".join(
                ["BEGIN IMMEDIATE;", *steps, _LISTING, f"PRAGMA user_version = {SCHEMA_VERSION};"]
            )
            try:
                connection.executescript(script + "\nCOMMIT;")
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
        unended = connection.execute(
            "SELECT run_id, session_id, workspace, call, accepted_at, labels FROM runs"
            " WHERE ended_at IS NULL ORDER BY accepted_at, rowid"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} cannot be used as a run database: {exc}") from None
    return connection, [(str(r), str(s), w, c, float(a), lb) for r, s, w, c, a, lb in unended]


def _load_retained(
    connection: sqlite3.Connection,
) -> list[tuple[str, str, int, float]]:
    return [
        (str(r), str(s), int(n), float(t))
        for r, s, n, t in connection.execute(
            "SELECT run_id, session_id, size, ended_at FROM runs WHERE ended_at IS NOT NULL "
            "ORDER BY ended_at, rowid"
        )
    ]


def _warn_if_autojumping() -> None:
    clock = trio.lowlevel.current_clock()
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold != math.inf:
        warnings.warn(
            "SqliteLedger opened under an autojumping MockClock: virtual time jumps while "
            "its writer thread commits, so timeouts around a commit expire at once; use the "
            "real clock (every wait bounded) for a durable store",
            RuntimeWarning,
            stacklevel=4,
        )


@asynccontextmanager
async def open_sqlite_ledger(
    path: str | os.PathLike[str],
    *,
    retention: SqliteRetention | None = None,
    cache_bytes: int = 32 << 20,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    busy_timeout: float = 5.0,
) -> AsyncIterator[SqliteLedger]:
    """Open (or create) the run database at ``path``; recover it; close it on exit.

    Before this yields, every run the file holds as accepted and not ended has been given
    its abandoned terminal, durably (D3): serve only after it. Raises ``StoreError`` for a
    file that is not a run database, has a newer schema, or is in use by another process.
    ``synchronous="FULL"`` (the default) fsyncs every commit; ``"NORMAL"`` survives a crash
    of the process but not of the machine. A write that finds the file locked for
    ``busy_timeout`` seconds counts as a failing disk (retried; see :class:`SqliteLedger`).
    On exit, every write already decided is committed before the block is left (the
    writer is joined, shielded).

    Warns (``RuntimeWarning``) when opened under an autojumping ``MockClock``: virtual time
    jumps while the writer thread commits, so a ``fail_after`` around a wait for a commit
    expires at once. Test a durable store on the real clock, every wait bounded.
    """
    _warn_if_autojumping()
    path = await trio.to_thread.run_sync(os.path.abspath, os.fspath(path))
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
    if not (isinstance(cache_bytes, int) and cache_bytes >= 0 and math.isfinite(cache_bytes)):
        raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    retention = retention if retention is not None else SqliteRetention()
    lock_fd = await trio.to_thread.run_sync(_lock, path)
    try:
        writer, unended = await trio.to_thread.run_sync(_prepare, path, synchronous, busy_timeout)
        try:
            reader = await trio.to_thread.run_sync(
                lambda: _connect(path, synchronous, busy_timeout, check_same_thread=False)
            )
            ledger = SqliteLedger(
                path, retention, cache_bytes, trio.lowlevel.current_trio_token(), reader
            )
            abandoned = [(r, sid, at, lb) for r, sid, _, call, at, lb in unended if call is None]
            # A run to be run again is its next execution: counted on disk before it runs,
            # so a crash during the rerun makes the one after it the third, and so on.
            reruns = [
                (r, workspace, _next_execution(RunCall.from_dict(json.loads(call))))
                for r, _, workspace, call, _, _ in unended
                if call is not None and workspace is not None
            ]
            await trio.to_thread.run_sync(_recover, writer, abandoned, reruns)
            for run_id, session_id, size, ended_at in await trio.to_thread.run_sync(
                _load_retained, writer
            ):
                ledger._retained[run_id] = (session_id, size, ended_at)
                ledger._order.append(run_id)
                ledger._retained_bytes += size
            for run_id, workspace, rerun in reruns:
                # Run again from the start: pending until its new terminal.
                ledger._pending[run_id] = _Waiting(
                    rerun.session_id, rerun.accepted_at, rerun, workspace
                )
                ledger._rerun.setdefault(workspace, []).append(rerun)
            ledger._recovered = len(unended)
            if abandoned:
                logger.warning(
                    "%s: %d run(s) were accepted and never ended (the server stopped): "
                    "each ended abandoned",
                    path,
                    len(abandoned),
                )
            if len(unended) > len(abandoned):
                logger.warning(
                    "%s: %d run(s) were accepted and never ended: each runs again when its "
                    "workspace opens",
                    path,
                    len(unended) - len(abandoned),
                )
            ledger._evict(time.time())
            thread = threading.Thread(
                target=ledger._writer, args=(writer,), name="trio-runs sqlite writer", daemon=True
            )
            thread.start()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ledger._expire_by_age)
                    try:
                        yield ledger
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                ledger._writes.put(_STOP)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join)
                    # The writer's hand-overs reach this thread in order, its exit last.
                    await ledger._writer_exited.wait()
                ledger._closed = True
                ledger._wake_flushers()
                reader.close()
        finally:
            writer.close()
    finally:
        os.close(lock_fd)


def _next_execution(call: RunCall) -> RunCall:
    return attrs.evolve(call, execution=call.execution + 1)


def _recover(
    connection: sqlite3.Connection,
    unended: list[tuple[str, str, float, str | None]],
    reruns: list[tuple[str, str, RunCall]],
) -> None:
    # Blocking. Ends each run abandoned (with the metadata its row holds), and counts the
    # next execution of each run to be run again, durably, before the store is handed out.
    if not unended and not reruns:
        return
    now = time.time()
    with connection:
        for run_id, session_id, accepted_at, labels in unended:
            encoded = RunComplete(
                session_id,
                run_id,
                error=ABANDONED_ERROR,
                abandoned=True,
                reason="abandoned",
                accepted_at=accepted_at,
                ended_at=now,
                labels=json.loads(labels) if labels is not None else {},
            ).to_json()
            connection.execute(
                "UPDATE runs SET ended_at = ?, terminal = ?, size = ? WHERE run_id = ?",
                (now, encoded, len(encoded), run_id),
            )
        connection.executemany(
            "UPDATE runs SET call = ? WHERE run_id = ?",
            [(json.dumps(call.to_dict()), run_id) for run_id, _, call in reruns],
        )
