"""``RedisStore``: the run store of a cluster of nodes sharing one Redis.

Every node keeps the ``RunStore`` promises for the whole cluster:

- **Decided at once, here; settled in Redis.** ``accept``, ``withdraw`` and ``complete`` are
  synchronous: they decide against what this node knows and queue a write. One writer task
  sends the queued writes in order, many per round trip, as one Lua script (``BATCH``) that
  takes run ids once cluster-wide and lets the first terminal of a run win, appending it to
  the terminal stream in the same atomic step.
- **Visibility follows the commit.** A terminal is shown (``get``, ``wait``, ``on_visible``)
  only once Redis holds it: when the script that recorded it returned, or when it arrived on
  the terminal stream (a terminal written by another node). Each node reads the stream with
  blocking reads resumable by entry id — not pub/sub, which drops what a disconnected
  reader missed — and reconciles its waiting runs against Redis after every reconnection.
- **Exactly once per node.** However a terminal reaches this node (its own write's reply,
  the stream, a reconciliation), it is shown once: ``on_visible`` is called once and every
  waiter is woken once. When Redis refuses this node's terminal (another one won, or this
  node was fenced), ``on_visible`` is called with the terminal that won, once it is known.
- **Node death is an ending** (:mod:`trio_runs.redis.lease`): runs are owned by the node
  incarnation that accepted them; when its lease expires a surviving node gives each one an
  abandoned terminal, and the writes of a node that comes back are fenced.
- **Redis trouble is loud.** While a write has just failed, ``accept`` raises
  ``RedisUnavailable`` (nothing accepted). Once Redis has been unreachable for
  ``unavailable_after`` seconds, ``flush`` and every ``wait`` that Redis would have to
  answer raise ``RedisUnavailable`` instead of hanging. Queued writes are kept and retried
  (with backoff) until Redis answers again.

What a node knows synchronously (``get``, ``state``, ``session_of``) is what it has seen:
the runs it accepted, and the terminals it was shown (the last ``retain`` of them). ``wait``
asks Redis, so a run accepted on any node can be waited on from every node.

Open it with :func:`open_redis_store`; it owns the tasks that write, follow the stream and
keep the lease.
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Final, TypeVar, cast

import attrs
import coredis
import trio

from .._encoding import checked_terminal
from .._histogram import HistogramRecorder
from .._terminals import non_cancelled_leaves
from ..errors import DuplicateRun, RedisUnavailable, UnknownRun
from ..events import EndReason, RunCall, RunComplete, RunProgress
from ..ledger import (
    LedgerStatistics,
    OnVisible,
    RunInfo,
    RunPage,
    RunQuery,
    RunState,
    decode_cursor,
    encode_cursor,
)
from . import _scripts
from ._client import UNREACHABLE, connect, namespace_prefix
from .lease import DEFAULT_LEASE_TTL, NodeLease, RetentionLimits

__all__ = ["ClaimedRun", "RedisStore", "RedisStoreStatistics", "open_redis_store"]

logger = logging.getLogger("trio_runs.redis")

_T = TypeVar("_T")

_MAX_BATCH: Final = 512
_BLOCK_MS: Final = 1000
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 1.0
_LIST_SCAN: Final = 2000  # index entries one listing call reads at most (Redis is single-threaded)
_MAX_PROGRESS: Final = 10_000  # progress items waiting for Redis, at most (then dropped)
_LIST_CALLS: Final = 10  # calls one page takes at most before it is returned short
_FAILED: Final[tuple[type[BaseException], ...]] = (*UNREACHABLE, trio.TooSlowError)


@attrs.frozen(kw_only=True)
class RedisStoreStatistics:
    """A snapshot of one node's Redis store, from :meth:`RedisStore.redis_statistics`."""

    node_id: str
    """The node's current incarnation."""
    connected: bool
    """Whether the last call to Redis succeeded."""
    outage: bool
    """Whether Redis has been unreachable for longer than ``unavailable_after``."""
    writes_queued: int
    """Writes decided here and not yet acknowledged by Redis."""
    round_trips: int
    """Write batches Redis acknowledged (each holds one or more writes)."""
    fenced_total: int
    """This node's writes Redis refused because the incarnation that made them had lost its
    lease (a zombie's terminals): never recorded, never shown."""
    refused_total: int
    """This node's terminals Redis refused because the run already had one."""
    incarnations: int
    """Leases this process has held: one more each time it was fenced."""
    recovered_total: int
    """Runs of dead nodes this node recovered: ended abandoned, or put back in their lanes
    to run again (a workspace that reruns what a crash interrupted)."""
    lost_total: int
    """Runs this node accepted and lost to fencing (recovery ends them, not this node)."""
    stream_entries: int
    """Terminals read from the terminal stream."""
    claimed_total: int = 0
    """Routed runs this node claimed from their lanes to run here."""
    control_total: int = 0
    """Cancellations of runs active here that other nodes asked for (control stream)."""
    progress_forwarded: int = 0
    """Progress items of runs running here written for the other nodes' subscribers."""
    progress_dropped: int = 0
    """Progress items not forwarded: too many were waiting for Redis already."""


class _Run:
    """What this node knows of one run whose terminal it has not shown yet."""

    __slots__ = (
        "accepted",
        "borrowed",
        "call",
        "claimed",
        "completed_at",
        "decided",
        "done",
        "lost",
        "member",
        "meta",
        "node",
        "on_visible",
        "path",
        "refused",
        "rerun",
        "routed",
        "run_id",
        "session_id",
        "terminal",
        "waiters",
        "withdrawn",
        "written",
    )

    def __init__(self, run_id: str, session_id: str | None, node: str, *, accepted: bool) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.node = node  # the incarnation that owns it (for runs accepted here)
        self.accepted = accepted  # accepted here; False: only waited on here
        self.written = False  # the acceptance is in Redis
        self.lost = False  # accepted by an incarnation that was fenced since
        self.withdrawn = False
        self.refused = False  # Redis refused the acceptance: another node holds the id
        self.decided: RunComplete | None = None  # this node's terminal, not yet settled
        self.on_visible: OnVisible | None = None
        self.terminal: RunComplete | None = None  # the visible terminal
        self.done: trio.Event | None = None
        self.waiters = 0
        self.completed_at = 0.0
        self.path: str | None = None  # the workspace it was accepted in, if told
        self.routed = False  # in its session's lane in Redis: any node may run it
        self.rerun = False  # routed, and run again (not abandoned) if its node dies
        self.call: str | None = None  # routed: its call, as JSON, until Redis has it
        self.meta: str | None = None  # what a listing shows: accepted_at, labels (JSON)
        self.member = ""  # its place in the listing index
        self.claimed = False  # routed, and claimed by this node to run here
        self.borrowed = False  # accepted here only by that claim (another node accepted it)


_PROGRESS_RUN: Final = _Run("", None, "", accepted=False)
"""What a progress op names as its run: none of this node's (its item is all it writes)."""


class _Op:
    __slots__ = ("dropped", "kind", "rc", "run", "run_id", "seq", "wire")

    def __init__(self, kind: str, run_id: str, run: _Run, seq: int) -> None:
        self.kind = kind
        self.run_id = run_id
        self.run = run
        self.seq = seq
        self.rc: RunComplete | None = None
        # The wire form of an op that carries it whole (a lane op, a start time, progress).
        self.wire: list[object] | None = None
        self.dropped = False


@attrs.frozen
class ClaimedRun:
    """A routed run this node claimed from its session's lane in Redis, to run here."""

    call: RunCall
    """What the agent receives (the call accepted on whichever node)."""
    workspace_path: str
    """The workspace it was accepted in (the same path on every node)."""


class RedisStore:
    """The ``RunStore`` of one node of a Redis cluster; made by :func:`open_redis_store`.

    See the module docstring for the promises. Synchronous calls never block and never
    touch the network; ``flush`` and ``wait`` do, bounded as described there.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        blocking: coredis.Redis[str],
        prefix: str,
        *,
        lease_ttl: float,
        limits: RetentionLimits,
        retain: int,
        unavailable_after: float,
        timeout: float,
    ) -> None:
        self._client = client
        self._blocking = blocking
        self._prefix = prefix
        self._lease = NodeLease(client, prefix, lease_ttl)
        self._limits = limits
        self._limits_wire = limits.wire()
        self._retain = retain
        self._unavailable_after = unavailable_after
        self._timeout = timeout
        self._batch = client.register_script(_scripts.BATCH)
        self._read = client.register_script(_scripts.READ)
        self._stream_key = prefix + "terminals"
        self._accepted_key = prefix + "accepted"
        self._pending = client.register_script(_scripts.PENDING)
        self._claim = client.register_script(_scripts.CLAIM)
        self._info = client.register_script(_scripts.INFO)
        self._progress_key = prefix + "progress"
        self._list = client.register_script(_scripts.LIST)
        self._control_key = prefix + "control"
        # Local knowledge.
        self._runs: dict[str, _Run] = {}
        self._terminals: dict[str, RunComplete] = {}
        self._order: deque[str] = deque()
        # Runs pending on other nodes (from the acceptance stream): run id -> session.
        self._remote: dict[str, str] = {}
        # Writes.
        self._ops: deque[_Op] = deque()
        self._seq = 0
        self._acked = 0
        self._in_flight = 0  # ops up to this sequence number are being written
        self._ops_ready = trio.Event()
        self._acked_changed = trio.Event()
        self._last_accept: weakref.WeakKeyDictionary[trio.lowlevel.Task, _Run] = (
            weakref.WeakKeyDictionary()
        )
        # Health.
        self._connected = True
        self._down_since: float | None = None
        self._outage = False
        self._down = trio.Event()
        self._health_changed = trio.Event()
        # Stream.
        self._last_id = "0-0"
        self._last_accepted_id = "0-0"
        self._last_control_id = "0-0"
        self._last_progress_id = "0-0"
        self._resync = trio.Event()
        # Counters.
        self._accepted_total = 0
        self._duplicates = 0
        self._outcomes: Counter[str] = Counter()
        self._evicted = 0
        self._round_trips = 0
        self._fenced = 0
        self._refused = 0
        self._recovered = 0
        self._lost = 0
        self._stream_entries = 0
        self._delivery = HistogramRecorder()
        self._terminal_listeners: list[Callable[[RunComplete], object]] = []
        self._lost_listeners: list[Callable[[list[str]], object]] = []
        # Routing (trio_runs.redis.cluster): paths whose runs go into lanes, the workspace
        # of each routed run pending elsewhere, and who hears of work, terminals, controls.
        self._routed: dict[str, bool] = {}  # path -> whether a crash reruns its runs
        self._remote_paths: dict[str, str] = {}
        self._active: dict[str, str] = {}  # session -> its active routed run, as last heard
        self._path_listeners: dict[str, list[Callable[[RunComplete], object]]] = {}
        self._progress_listeners: dict[str, list[Callable[[RunProgress], object]]] = {}
        self._work_listeners: list[Callable[[], object]] = []
        self._control_listeners: list[Callable[[str, str, str], object]] = []
        self._claimed_total = 0
        self._control_total = 0
        self._claim_uncertain = False  # a claim's answer was lost: ask for our own runs
        self._progress_queued = 0
        self._progress_forwarded = 0
        self._progress_dropped = 0

    # -- introspection -----------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's current incarnation id (it changes when the node is fenced)."""
        return self._lease.node_id

    @property
    def lease_ttl(self) -> float:
        """Seconds a node's lease lives without a heartbeat."""
        return self._lease.ttl

    @property
    def limits(self) -> RetentionLimits:
        """How long Redis keeps terminals (count, bytes, age)."""
        return self._limits

    def statistics(self) -> LedgerStatistics:
        """This node's view: runs it accepted, terminals it holds, refusals it counted."""
        pending = sum(1 for run in self._runs.values() if run.accepted)
        return LedgerStatistics(
            accepted_total=self._accepted_total,
            pending=pending,
            retained=len(self._order),
            completed_total=self._outcomes["completed"],
            failed_total=self._outcomes["failed"],
            cancelled_total=self._outcomes["cancelled"],
            duplicates_suppressed=self._duplicates,
            evicted_total=self._evicted,
            delivery_latency=self._delivery.snapshot(),
        )

    def redis_statistics(self) -> RedisStoreStatistics:
        """This node's Redis side: connection, queued writes, fencing and recovery counts."""
        return RedisStoreStatistics(
            node_id=self._lease.node_id,
            connected=self._connected,
            outage=self._outage,
            writes_queued=len(self._ops),
            round_trips=self._round_trips,
            fenced_total=self._fenced,
            refused_total=self._refused,
            incarnations=self._lease.incarnations,
            recovered_total=self._recovered,
            lost_total=self._lost,
            stream_entries=self._stream_entries,
            claimed_total=self._claimed_total,
            control_total=self._control_total,
            progress_forwarded=self._progress_forwarded,
            progress_dropped=self._progress_dropped,
        )

    async def cluster_statistics(self) -> dict[str, int]:
        """Cluster-wide counters kept in Redis (``accepted``, outcomes, ``duplicates``,
        ``fenced``, ``abandoned``, ``evicted``); raises ``RedisUnavailable``."""
        raw = await self._call(self._client.hgetall(self._prefix + "stats"))
        return {str(key): int(value) for key, value in cast(dict[str, str], raw).items()}

    def on_terminal(self, callback: Callable[[RunComplete], object]) -> None:
        """Call ``callback(rc)`` for every terminal this node is shown, whichever node ended
        the run (once per run; in the Trio thread; it must not block)."""
        self._terminal_listeners.append(callback)

    def on_lost(self, callback: Callable[[list[str]], object]) -> None:
        """Call ``callback(run_ids)`` when this node learns it was fenced: those runs, which
        it accepted, are no longer its own (recovery ends them); it should stop them."""
        self._lost_listeners.append(callback)

    # -- RunStore: synchronous decisions -----------------------------------------------

    def accept(self, run_id: str, session_id: str) -> None:
        """Register ``run_id`` as pending here and queue its acceptance for Redis.

        Raises ``DuplicateRun`` if this node knows the id (also as pending on another node);
        Redis refuses an id another node holds that this node did not know of yet, which
        ``flush`` then reports. Raises ``RedisUnavailable`` (accepting nothing)
        while Redis is not answering.
        """
        self._accept(run_id, session_id)

    def accept_call(self, call: RunCall, workspace_path: str | None) -> None:
        """:meth:`accept` of ``call.run_id``; in a routed workspace (:meth:`route_workspace`)
        the run goes into its session's lane in Redis, with its call, for any node to run.

        Same errors as :meth:`accept`, and ``UnencodableValue``-free: a call is JSON by
        construction. Never blocks.
        """
        run = self._accept(call.run_id, call.session_id)
        run.path = workspace_path
        run.member = _index_member(call.accepted_at, call.run_id)
        meta: dict[str, object] = {}
        if call.accepted_at is not None:
            meta["accepted_at"] = call.accepted_at
        if call.labels:
            meta["labels"] = dict(call.labels)
        run.meta = json.dumps(meta) if meta else None
        rerun = self._routed.get(workspace_path) if workspace_path is not None else None
        if rerun is not None:
            run.routed = True
            run.rerun = rerun
            run.call = json.dumps(call.to_dict())

    def mark_started(self, run_id: str, started_at: float) -> None:
        """Note in Redis (with the next write batch) when the run's agent began, for
        listings on every node; a no-op for a run this node did not accept or claim."""
        run = self._runs.get(run_id)
        if run is None or not run.accepted or run.decided is not None:
            return
        self._enqueue("started", run_id, run).wire = ["started", run_id, repr(started_at)]

    # -- SupportsRunListing: what Redis holds, from any node ---------------------------

    async def run_info(self, run_id: str) -> RunInfo | None:
        """The run as Redis holds it (pending on any node, or ended and retained), or
        ``None``. One bounded Redis call; raises ``RedisUnavailable``."""
        raw = await self._call(self._info(args=[self._prefix, run_id]))
        if not raw:
            return None
        state = self.state(run_id)
        return _run_info(run_id, cast(list[object], raw), pending=state or "pending")

    async def list_runs(self, query: RunQuery) -> RunPage:
        """One page of the runs Redis holds matching ``query``, newest accepted first.

        Reads the cluster's index in bounded steps (each one Redis call of at most
        ``_LIST_SCAN`` entries; ``RedisUnavailable`` if Redis does not answer). A filter
        that matches rarely may give a short page with a ``next_cursor``: go on from it.
        ``ValueError`` for a malformed cursor.
        """
        before = ""
        if query.cursor is not None:
            at, run_id = decode_cursor(query.cursor)
            before = _index_member(at, run_id)
        label_key, label_value = query.label or ("", "")
        want = query.limit + 1
        found: list[RunInfo] = []
        members: list[str] = []
        scanned_calls = 0
        while True:
            request = {
                "before": before,
                "path": query.workspace_path or "",
                "session": query.session_id or "",
                "state": query.state or "",
                "lk": label_key,
                "lv": label_value,
                "want": want - len(found),
                "scan": _LIST_SCAN,
            }
            flat = cast(
                list[object],
                await self._call(self._list(args=[self._prefix, json.dumps(request)])),
            )
            scanned_calls += 1
            for index in range(1, len(flat) - 6, 7):
                run_id = str(flat[index])
                found.append(_run_info(run_id, flat[index + 1 : index + 6]))
                members.append(str(flat[index + 6]))
            before = str(flat[0])
            if len(found) >= want or not before or scanned_calls >= _LIST_CALLS:
                break
        if len(found) >= want:
            last = found[query.limit - 1]
            return RunPage(
                runs=tuple(found[: query.limit]),
                next_cursor=encode_cursor(last.accepted_at, last.run_id),
            )
        if not before:
            return RunPage(runs=tuple(found), next_cursor=None)
        # The scan budget ran out: a short page, and where the next one goes on from.
        at_text, _, run_id = before.partition("|")
        return RunPage(runs=tuple(found), next_cursor=encode_cursor(float(at_text), run_id))

    def _accept(self, run_id: str, session_id: str) -> _Run:
        if not self._connected:
            raise RedisUnavailable("Redis is not answering: the run was not accepted")
        known = self._runs.get(run_id)
        if (
            run_id in self._terminals
            or run_id in self._remote
            or (known is not None and known.accepted)
        ):
            raise DuplicateRun(run_id)
        if known is not None:
            # Waiters here were already asking about this id: they wait for this run now.
            run = known
            run.session_id, run.node, run.accepted = session_id, self._lease.node_id, True
        else:
            run = self._runs[run_id] = _Run(run_id, session_id, self._lease.node_id, accepted=True)
        run.member = _index_member(None, run_id)
        self._accepted_total += 1
        self._enqueue("accept", run_id, run)
        with suppress(RuntimeError):  # outside Trio: nobody will flush from this task
            self._last_accept[trio.lowlevel.current_task()] = run
        return run

    def withdraw(self, run_id: str) -> None:
        """Undo an acceptance never acknowledged; a no-op unless the run is pending here."""
        run = self._runs.get(run_id)
        if run is None or not run.accepted or run.decided is not None or run.withdrawn:
            return
        run.withdrawn = True
        del self._runs[run_id]
        self._accepted_total -= 1
        unsent = [
            op
            for op in self._ops
            if op.run is run and op.kind == "accept" and op.seq > self._in_flight
        ]
        if unsent:
            for op in unsent:
                op.dropped = True
        else:
            self._enqueue("withdraw", run_id, run)
        if run.done is not None:
            run.done.set()  # its waiters find it gone: UnknownRun

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        """Decide ``rc`` as its run's terminal here (``True`` if first here); queue it.

        It is shown (and ``on_visible`` called) once Redis recorded it. If Redis refuses it
        (another node's terminal won, or this node was fenced), ``on_visible`` is called with
        the terminal that did win, once this node is shown it. Never blocks. A result that is
        not a JSON value is recorded as a failed terminal saying so, never converted.
        """
        rc = checked_terminal(rc)
        run_id = rc.run_id
        run = self._runs.get(run_id)
        if run_id in self._terminals or (run is not None and run.decided is not None):
            self._duplicates += 1
            return False
        if run is None:
            # Never accepted here: recorded all the same (a terminal is never refused for
            # being unexpected), under this node's incarnation.
            run = self._runs[run_id] = _Run(
                run_id, rc.session_id, self._lease.node_id, accepted=False
            )
        run.decided = rc
        run.on_visible = on_visible
        self._enqueue("complete", run_id, run).rc = rc
        return True

    def _enqueue(self, kind: str, run_id: str, run: _Run) -> _Op:
        self._seq += 1
        op = _Op(kind, run_id, run, self._seq)
        self._ops.append(op)
        self._ops_ready.set()
        return op

    # -- routing: cluster-wide session lanes (trio_runs.redis.cluster) -------------------

    def route_workspace(self, path: str, *, rerun: bool = False) -> None:
        """Route the runs accepted from now on in the workspace at ``path`` through Redis:
        each goes into its session's lane, and the node that claims it runs it. With
        ``rerun``, a run whose node dies goes back to the head of its lane to run again
        (at most ``lease.MAX_EXECUTIONS`` executions in all) instead of ending abandoned."""
        self._routed[path] = rerun

    def on_workspace_terminal(
        self, path: str, callback: Callable[[RunComplete], object]
    ) -> Callable[[], None]:
        """Call ``callback(rc)`` for every terminal of a routed run of the workspace at
        ``path`` this node is shown, but for one decided here with an ``on_visible`` (which
        announced it): once per run, in the Trio thread; it must not block. Returns the call
        that stops it."""
        return _listen(self._path_listeners, path, callback)

    def on_workspace_progress(
        self, path: str, callback: Callable[[RunProgress], object]
    ) -> Callable[[], None]:
        """Call ``callback(progress)`` for the progress that routed runs of the workspace at
        ``path`` emit on *other* nodes (lossy: what the stream still held when this node
        read it; never after the run's terminal was shown here). Returns the call that stops
        it."""
        return _listen(self._progress_listeners, path, callback)

    def forward_progress(self, path: str, progress: RunProgress) -> None:
        """Queue ``progress`` of a routed run running here for the other nodes' subscribers
        of the workspace at ``path``: written with this node's next batch, so before the
        run's terminal. Lossy: dropped (and counted) while ``_MAX_PROGRESS`` items wait for
        Redis already; the stream keeps about ``limits.count`` entries. Never blocks."""
        if self._progress_queued >= _MAX_PROGRESS:
            self._progress_dropped += 1
            return
        self._progress_queued += 1
        wire: list[object] = ["progress", path, json.dumps(progress.to_dict())]
        self._enqueue("progress", progress.run_id, _PROGRESS_RUN).wire = wire

    def on_work(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever a lane may have a run to claim: a routed run was
        accepted, a terminal freed a lane, or Redis answers again (and once a heartbeat)."""
        self._work_listeners.append(callback)

    def on_control(self, callback: Callable[[str, str, str], object]) -> None:
        """Call ``callback(run_id, session_id, reason)`` when another node (or this one)
        cancels a routed run this node's current incarnation claimed."""
        self._control_listeners.append(callback)

    def cancel_session(self, session_id: str, reason: EndReason = "session_cancel") -> None:
        """Cluster-wide: end the session's queued runs cancelled (``reason``) and ask the
        node running its active run to cancel it: the runs accepted before this call, on
        this node or (by Redis's clock against this node's) on any other; a run another
        node accepts meanwhile is untouched. Queued for Redis in order after every
        acceptance this node made before; never blocks (``flush`` to know it is done)."""
        self._lane_op(session_id, "cancel", "", reason)

    def clear_session(self, session_id: str) -> None:
        """Cluster-wide: end the session's queued runs cancelled (``clear_queue``), those
        accepted before this call as :meth:`cancel_session` says; its active run goes on.
        Never blocks."""
        self._lane_op(session_id, "clear", "", "clear_queue")

    def cancel_run(self, session_id: str, run_id: str) -> bool:
        """Cluster-wide: cancel one routed run, queued (it ends now) or active (its node is
        asked to cancel it); the session's other runs go on. ``True`` if this node knows it
        as pending. Never blocks."""
        if self.state(run_id) != "pending":
            return False
        self._lane_op(session_id, "cancel_run", run_id, "user")
        return True

    def active_run_id(self, session_id: str) -> str | None:
        """The session's active routed run, on whichever node, as this node last heard of it
        (from the acceptance stream: a heartbeat's delay at most behind Redis)."""
        return self._active.get(session_id)

    def _lane_op(self, session_id: str, action: str, run_id: str, reason: str) -> None:
        if not self._connected:
            raise RedisUnavailable("Redis is not answering: nothing was cancelled")
        node = self._lease.node_id
        run = _Run(run_id, session_id, node, accepted=False)
        # The fence of a session's cancellation: runs accepted after the call are not its.
        fence = int(time.time() * 1_000_000)
        wire: list[object] = ["lane", session_id, action, run_id, reason, fence, node]
        self._enqueue("lane", run_id, run).wire = wire

    async def claim(self, max_runs: int) -> list[ClaimedRun]:
        """Claim up to ``max_runs`` routed runs to run here: the head of each ready session's
        lane, which becomes that session's one active run, owned by this node (if it dies,
        recovery ends the run abandoned and the lane goes on).

        One bounded Redis call; raises ``RedisUnavailable``. Cancelled while Redis answers,
        the claims stand with nobody to run them: recovery ends them when this node's lease
        expires, so cancel it only with the node.
        """
        node = self._lease.node_id
        if not self._lease.registered:
            return []
        # After a claim whose answer never came, Redis may hold runs claimed for this node
        # that it never heard of: ask for them too, or their lanes would wait forever.
        mine = "1" if self._claim_uncertain else "0"
        self._claim_uncertain = True  # until this answer is in hand
        flat = cast(
            list[object],
            await self._call(
                self._claim(
                    args=[
                        self._prefix,
                        node,
                        max_runs,
                        self._limits_wire["stream"],
                        self._lease.ttl_ms,
                        mine,
                    ]
                )
            ),
        )
        self._claim_uncertain = False
        if not flat or flat[0] != "ok":
            if node == self._lease.node_id:
                self._fenced_now()
            return []
        claimed: list[ClaimedRun] = []
        for index in range(1, len(flat) - 4, 5):
            run_id, session_id, path, call_json, reruns = (
                str(item) for item in flat[index : index + 5]
            )
            call = RunCall.from_dict(json.loads(call_json))
            if reruns != "0":  # run again after its node died (its workspace reruns)
                call = attrs.evolve(call, execution=call.execution + int(reruns))
            run = self._runs.get(run_id)
            if run is not None and run.claimed:
                continue  # one this node runs already (asked again after a lost answer)
            if run is None:
                run = self._runs[run_id] = _Run(run_id, session_id, node, accepted=True)
                run.written = run.borrowed = True
            elif not run.accepted:
                # Waited on here already: the same record, so its waiters see the ending.
                run.accepted = run.written = run.borrowed = True
            run.node, run.path, run.claimed, run.session_id = node, path, True, session_id
            run.routed = True
            self._remote.pop(run_id, None)
            self._remote_paths.pop(run_id, None)
            self._active[session_id] = run_id
            claimed.append(ClaimedRun(call, path))
        self._claimed_total += len(claimed)
        return claimed

    def release_claim(self, claimed: ClaimedRun) -> None:
        """Give a claimed run that could not start here back to the head of its lane, for
        any node to claim again (its session's order kept). Never blocks."""
        run_id = claimed.call.run_id
        run = self._runs.get(run_id)
        if run is None or not run.claimed:
            return
        self._lane_op(claimed.call.session_id, "release", run_id, run.node)
        run.claimed = False
        if self._active.get(claimed.call.session_id) == run_id:
            del self._active[claimed.call.session_id]
        if run.borrowed:
            run.accepted = run.borrowed = False
            self._remote[run_id] = claimed.call.session_id
            self._remote_paths[run_id] = claimed.workspace_path
            if run.waiters == 0:
                del self._runs[run_id]

    def _work(self) -> None:
        for listener in self._work_listeners:
            try:
                listener()
            except Exception:
                logger.exception("a work listener failed")

    # -- RunStore: reads ---------------------------------------------------------------

    def get(self, run_id: str) -> RunComplete | None:
        """The run's terminal if this node was shown it (and still holds it), else ``None``."""
        return self._terminals.get(run_id)

    def state(self, run_id: str) -> RunState | None:
        """``"pending"``/``"ending"`` for runs accepted here, ``"pending"`` for runs pending on
        other nodes (known from the acceptance stream), ``"terminal"`` for terminals held
        here, ``None`` otherwise."""
        if run_id in self._terminals:
            return "terminal"
        run = self._runs.get(run_id)
        if run is None or not (run.accepted or run.decided is not None):
            return "pending" if run_id in self._remote else None
        return "pending" if run.decided is None else "ending"

    def session_of(self, run_id: str) -> str | None:
        """The session of a pending run (of any node) or of a terminal held here."""
        rc = self._terminals.get(run_id)
        if rc is not None:
            return rc.session_id
        run = self._runs.get(run_id)
        if run is not None and run.accepted:
            return run.session_id
        return self._remote.get(run_id)

    def pending_run_ids(self) -> list[str]:
        """Runs accepted here whose terminal is not shown yet, oldest first."""
        return [run_id for run_id, run in self._runs.items() if run.accepted]

    async def flush(self) -> None:
        """Return once every write queued before this call is in Redis.

        Raises ``DuplicateRun`` if the last run this task accepted was refused by Redis
        (another node holds that id), and ``RedisUnavailable`` once Redis has been
        unreachable for ``unavailable_after`` seconds (the writes stay queued and go
        through later). Cancelling the wait undoes nothing.
        """
        target = self._seq
        mine = self._last_accept.pop(trio.lowlevel.current_task(), None)
        while self._acked < target:
            if self._outage:
                raise RedisUnavailable("Redis is unreachable: the write is not durable yet")
            await self._wait_for(self._acked_changed)
        await trio.lowlevel.checkpoint_if_cancelled()
        if mine is not None and mine.refused:
            raise DuplicateRun(mine.run_id)

    async def wait(self, run_id: str) -> RunComplete:
        """The run's terminal, once there is one, whichever node accepted and ran it.

        Answered at once from this node's memory, else from Redis. Raises ``UnknownRun``
        for an id Redis does not know (never accepted, or past retention), and
        ``RedisUnavailable`` if Redis cannot answer: during an outage (after asking once,
        in bound), or when an outage starts while waiting. Cancelling it leaves nothing
        behind.
        """
        rc = self._terminals.get(run_id)
        if rc is not None:
            await trio.lowlevel.checkpoint()
            return rc
        run = self._runs.get(run_id)
        if run is None:
            # Not known here: watch it, then ask Redis, so that a terminal streamed in
            # between is not missed.
            run = self._runs[run_id] = _Run(run_id, None, "", accepted=False)
        run.waiters += 1
        try:
            if self._outage:
                # Redis may be back before this node noticed: ask once, in bound.
                await self._call(self._client.ping())
            if not run.accepted and run.decided is None and run.session_id is None:
                found = await self._lookup(run_id)
                if run.terminal is not None:
                    return run.terminal
                if found is None:
                    raise UnknownRun(run_id)
                session_id, recorded = found
                run.session_id = session_id
                if recorded is not None:
                    self._show(recorded)
                    return recorded
            while run.terminal is None:
                if run.withdrawn:
                    raise UnknownRun(run_id)
                if self._outage:
                    raise RedisUnavailable(
                        f"Redis is unreachable: run {run_id!r} cannot be waited on"
                    )
                if run.done is None:
                    run.done = trio.Event()
                await self._wait_for(run.done)
            if run.completed_at:
                self._delivery.observe(max(0.0, trio.current_time() - run.completed_at))
            return run.terminal
        finally:
            run.waiters -= 1
            if (
                run.waiters == 0
                and not run.accepted
                and run.decided is None
                and self._runs.get(run_id) is run
            ):
                del self._runs[run_id]

    async def _wait_for(self, event: trio.Event) -> None:
        # Wake on the event, or when the store's health changes (an outage starts).
        health = self._health_changed
        async with trio.open_nursery() as nursery:

            async def on(ev: trio.Event) -> None:
                await ev.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on, event)
            nursery.start_soon(on, health)

    async def _lookup(self, run_id: str) -> tuple[str, RunComplete | None] | None:
        raw = await self._call(self._client.hmget(self._prefix + "run:" + run_id, ["s", "rc"]))
        session_id, rc_json = cast(tuple[str | None, str | None], tuple(cast(list[object], raw)))
        if session_id is None:
            return None
        return session_id, (RunComplete.from_json(rc_json) if rc_json is not None else None)

    async def _call(self, request: object) -> object:
        # One bounded call for a caller (not the writer): unreachable Redis is typed.
        try:
            with trio.fail_after(self._timeout):
                answer = await cast("coredis.commands.CommandRequest[object]", request)
        except _FAILED as exc:
            self._failed()
            raise RedisUnavailable(f"Redis did not answer: {exc}") from exc
        self._succeeded()
        return answer

    # -- showing terminals -------------------------------------------------------------

    def _show(self, rc: RunComplete, path: str | None = None) -> None:
        # The one way a terminal becomes visible on this node: exactly once per run.
        run_id = rc.run_id
        if run_id in self._terminals:
            return
        self._terminals[run_id] = rc
        self._remote.pop(run_id, None)
        remote_path = self._remote_paths.pop(run_id, None)
        if self._active.get(rc.session_id) == run_id:
            del self._active[rc.session_id]
        self._order.append(run_id)
        if len(self._order) > self._retain:
            oldest = self._order.popleft()
            self._terminals.pop(oldest, None)
            self._evicted += 1
        run = self._runs.pop(run_id, None)
        path = path or (run.path if run is not None else None) or remote_path
        if (
            run is not None
            and run.accepted
            and run.decided is None
            and (run.claimed or not run.routed)
            and not run.lost
        ):
            # Ended for this node while it still runs it (recovery ended it after this node's
            # lease expired: a zombie's): it stops the run it no longer owns (R4).
            run.lost = True
            self._lose([run_id])
        if run is not None:
            if run.accepted or run.decided is not None:
                self._outcomes[rc.outcome] += 1
            run.terminal = rc
            if run.done is not None:
                run.completed_at = trio.current_time()
                run.done.set()
            if run.on_visible is not None:
                try:
                    run.on_visible(rc)
                except Exception:
                    logger.exception("on_visible failed for run %s", run_id)
        for listener in self._terminal_listeners:
            try:
                listener(rc)
            except Exception:
                logger.exception("a terminal listener failed for run %s", run_id)
        if path is not None and (run is None or run.on_visible is None):
            # Announced already when it was decided here (on_visible): not a second time.
            for listener in self._path_listeners.get(path, ()):
                try:
                    listener(rc)
                except Exception:
                    logger.exception("a workspace terminal listener failed for run %s", run_id)

    # -- health ------------------------------------------------------------------------

    def _failed(self) -> None:
        if self._connected:
            logger.warning("Redis is not answering; retrying")
        self._connected = False
        if self._down_since is None:
            self._down_since = trio.current_time()
            self._down.set()

    def _succeeded(self) -> None:
        if not self._connected:
            logger.warning("Redis answers again")
            self._resync.set()
        self._connected = True
        self._down_since = None
        if self._outage:
            self._outage = False
            self._pulse()

    def _pulse(self) -> None:
        self._health_changed.set()
        self._health_changed = trio.Event()

    async def _watchdog(self) -> None:
        # Declares an outage once Redis has been down for unavailable_after seconds.
        while True:
            await self._down.wait()
            self._down = trio.Event()
            while self._down_since is not None and not self._outage:
                remaining = self._down_since + self._unavailable_after - trio.current_time()
                if remaining <= 0:
                    logger.error(
                        "Redis unreachable for %.1fs: failing waits and flushes",
                        self._unavailable_after,
                    )
                    self._outage = True
                    self._pulse()
                    break
                await trio.sleep(remaining)

    # -- writer ------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            while not self._ops:
                self._ops_ready = trio.Event()
                await self._ops_ready.wait()
            batch = [self._ops[i] for i in range(min(len(self._ops), _MAX_BATCH))]
            live = [op for op in batch if not op.dropped]
            wire = [self._wire(op) for op in live]
            self._in_flight = batch[-1].seq
            try:
                with trio.fail_after(self._timeout):
                    await self._lease.ensure_registered()
                    results: object = (
                        await self._batch(
                            args=[
                                self._prefix,
                                json.dumps(
                                    {
                                        "limits": self._limits_wire,
                                        "ttl": self._lease.ttl_ms,
                                        "ops": wire,
                                    }
                                ),
                            ]
                        )
                        if wire
                        else []
                    )
            except _FAILED as exc:
                logger.debug("write batch failed: %r", exc)
                self._failed()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            self._succeeded()
            self._round_trips += 1
            for _ in batch:
                self._ops.popleft()
            await self._settle(live, [str(answer) for answer in cast(list[object], results)])
            self._acked = batch[-1].seq
            self._acked_changed.set()
            self._acked_changed = trio.Event()

    def _wire(self, op: _Op) -> list[object]:
        run = op.run
        if op.kind == "accept":
            return [
                "accept",
                op.run_id,
                run.session_id,
                run.node,
                run.routed,
                run.path or "",
                run.call or "",
                run.meta or "",
                run.member,
                run.rerun,
            ]
        if op.wire is not None:
            return op.wire
        if op.kind == "withdraw":
            return ["withdraw", op.run_id, run.node]
        rc = op.rc
        assert rc is not None
        node = run.node if run.accepted else self._lease.node_id
        return ["complete", op.run_id, rc.session_id, rc.outcome, rc.to_json(), node]

    async def _settle(self, ops: list[_Op], answers: list[str]) -> None:
        redo: list[_Op] = []
        fetch: list[str] = []
        work = False
        for op, answer in zip(ops, answers, strict=True):
            run = op.run
            if op.kind == "progress":
                self._progress_queued -= 1
                self._progress_forwarded += 1
                continue
            if op.kind in ("lane", "started"):
                continue
            if op.kind == "accept":
                if answer == "ok":
                    run.written = True
                    if run.routed:
                        run.call = None  # Redis holds it now
                        work = True
                    elif run.node != self._lease.node_id and not run.lost:
                        # Written under an incarnation fenced meanwhile: recovery's now.
                        run.lost = True
                        self._lose([op.run_id])
                elif answer == "fenced":
                    # The acceptance never reached Redis: it is still ours to make, under
                    # a live incarnation.
                    if run.node == self._lease.node_id:
                        self._fenced_now()
                    run.node = self._lease.node_id
                    redo.append(op)
                else:  # dup: another node holds the id; this acceptance never happened
                    logger.info("run id %s is taken in Redis: acceptance refused", op.run_id)
                    run.refused = True
                    if run.accepted:
                        run.accepted = False
                        self._accepted_total -= 1
                    fetch.append(op.run_id)
            elif op.kind == "complete":
                rc = op.rc
                assert rc is not None
                if answer == "ok":
                    self._show(rc)
                elif answer == "handed":
                    # A routed run this node accepted and does not run: its ending is the
                    # node's that runs it (or will). Watched from here on, like any other.
                    run.decided = None
                    run.on_visible = None
                    run.accepted = False
                    if run.session_id is not None:
                        self._remote[op.run_id] = run.session_id
                    if run.path is not None:
                        self._remote_paths[op.run_id] = run.path
                    if run.waiters == 0 and self._runs.get(op.run_id) is run:
                        del self._runs[op.run_id]
                elif answer == "fenced" and (not run.accepted or any(r.run is run for r in redo)):
                    # Not a zombie's terminal: a run this node never owned, or one whose
                    # acceptance is being redone under the new incarnation.
                    if run.node == self._lease.node_id and run.accepted:
                        self._fenced_now()
                    redo.append(op)
                else:
                    if answer == "fenced":
                        self._fenced += 1
                        if run.node == self._lease.node_id:
                            self._fenced_now()
                    else:
                        self._refused += 1
                    self._duplicates += 1
                    logger.info("Redis refused the terminal of run %s (%s)", op.run_id, answer)
                    fetch.append(op.run_id)
        if redo:
            for op in reversed(redo):
                self._ops.appendleft(op)
            self._ops_ready.set()
        if work:
            self._work()
        if fetch:
            await self._fetch(fetch)

    def _fenced_now(self) -> None:
        # This incarnation lost its lease: what it accepted and wrote is recovery's now.
        old = self._lease.renew_identity()
        logger.error("node %s was fenced (its lease expired); going on as %s", old, self.node_id)
        lost = []
        for run_id, run in self._runs.items():
            if run.accepted and run.node == old and run.written and (not run.routed or run.claimed):
                run.lost = True
                lost.append(run_id)
        self._lose(lost)

    def _lose(self, run_ids: list[str]) -> None:
        if not run_ids:
            return
        self._lost += len(run_ids)
        for listener in self._lost_listeners:
            try:
                listener(run_ids)
            except Exception:
                logger.exception("a lost-runs listener failed")

    async def _fetch(self, run_ids: Iterable[str]) -> None:
        # Show whatever terminal Redis holds for these runs (after a refusal, a reconnect).
        ids = list(run_ids)
        for start in range(0, len(ids), _MAX_BATCH):
            chunk = ids[start : start + _MAX_BATCH]
            try:
                with trio.fail_after(self._timeout):
                    values: object = await self._read(args=[self._prefix, *chunk])
            except _FAILED:
                self._failed()
                self._resync.set()  # try again after the next reconnection
                return
            for run_id, value in zip(chunk, cast(list[object], values), strict=True):
                if value is None:
                    self._remote.pop(run_id, None)  # Redis does not know it (any more)
                elif value != "":
                    self._show(RunComplete.from_json(cast(str, value)))

    # -- stream follower ---------------------------------------------------------------

    async def _follow_loop(self) -> None:
        backoff = _BACKOFF_MIN
        key = self._stream_key
        while True:
            try:
                if self._resync.is_set():
                    await self._resynchronise()
                with trio.fail_after(_BLOCK_MS / 1000 + self._timeout):
                    found = await self._blocking.xread(
                        {
                            key: self._last_id,
                            self._accepted_key: self._last_accepted_id,
                            self._control_key: self._last_control_id,
                            self._progress_key: self._last_progress_id,
                        },
                        count=_MAX_BATCH,
                        block=_BLOCK_MS,
                    )
            except _FAILED as exc:
                logger.debug("stream read failed: %r", exc)
                self._failed()
                self._resync.set()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            self._succeeded()
            work = False
            for entry in (found or {}).get(self._accepted_key, ()):
                self._last_accepted_id = str(entry.identifier)
                path = entry.field_values.get("p")
                withdrawn = "w" in entry.field_values
                run_id = str(entry.field_values.get("id"))
                if "x" in entry.field_values:
                    if run_id not in self._terminals:
                        self._active[str(entry.field_values.get("s"))] = run_id
                    continue
                self._note_acceptance(run_id, entry.field_values.get("s"), withdrawn=withdrawn)
                if path is not None and not withdrawn and run_id in self._remote:
                    self._remote_paths[run_id] = str(path)
                    work = True
            for entry in (found or {}).get(self._control_key, ()):
                self._last_control_id = str(entry.identifier)
                self._control(entry.field_values)
            for entry in (found or {}).get(self._progress_key, ()):
                self._last_progress_id = str(entry.identifier)
                self._remote_progress(entry.field_values)
            for entry in (found or {}).get(key, ()):
                self._last_id = str(entry.identifier)
                self._stream_entries += 1
                payload = entry.field_values.get("rc")
                if payload is None:
                    continue
                try:
                    rc = RunComplete.from_json(str(payload))
                except ValueError:
                    logger.exception("a malformed terminal on the stream: %r", payload)
                    continue
                path = entry.field_values.get("p")
                self._show(rc, None if path is None else str(path))
                work = work or path is not None
            if work:
                self._work()

    def _remote_progress(self, fields: Mapping[str | bytes, object]) -> None:
        listeners = self._progress_listeners.get(str(fields.get("p")))
        if not listeners:
            return
        try:
            progress = RunProgress.from_dict(json.loads(str(fields.get("d"))))
        except ValueError:
            logger.warning("a malformed progress entry on the stream: %r", fields)
            return
        run = self._runs.get(progress.run_id)
        if progress.run_id in self._terminals or (run is not None and run.claimed):
            return  # over already (lossy: late progress is dropped), or emitted here
        for listener in listeners:
            try:
                listener(progress)
            except Exception:
                logger.exception("a progress listener failed for run %s", progress.run_id)

    def _control(self, fields: Mapping[str | bytes, object]) -> None:
        # A cancellation of an active routed run: only the node that claimed it acts on it.
        run_id, node = str(fields.get("id")), fields.get("n")
        run = self._runs.get(run_id)
        if node != self._lease.node_id or run is None or not run.claimed:
            return
        self._control_total += 1
        reason = str(fields.get("reason") or "user")
        for listener in self._control_listeners:
            try:
                listener(run_id, str(fields.get("s")), reason)
            except Exception:
                logger.exception("a control listener failed for run %s", run_id)

    def _note_acceptance(self, run_id: str, session_id: object, *, withdrawn: bool) -> None:
        if withdrawn:
            self._remote.pop(run_id, None)
            watched = self._runs.get(run_id)
            if watched is not None and not watched.accepted and watched.decided is None:
                # Waited on here, withdrawn there: its waiters find it gone (UnknownRun).
                watched.withdrawn = True
                del self._runs[run_id]
                if watched.done is not None:
                    watched.done.set()
            return
        run = self._runs.get(run_id)
        if run_id in self._terminals or (run is not None and run.accepted):
            return
        if isinstance(session_id, str):
            self._remote[run_id] = session_id

    async def _load_pending(self) -> None:
        # Every run pending anywhere, so this node can answer for it from the start.
        flat = cast(list[object], await self._pending(args=[self._prefix]))
        for index in range(0, len(flat) - 1, 2):
            self._note_acceptance(str(flat[index]), flat[index + 1], withdrawn=False)

    async def _resynchronise(self) -> None:
        # After a reconnection: a stream that went backwards (Redis lost data) is read
        # again from the start, and every run still waiting here asks Redis directly, in
        # case its terminal was streamed while this node was not reading.
        self._resync = trio.Event()
        with trio.fail_after(self._timeout):
            newest = await self._client.xrevrange(self._stream_key, "+", "-", count=1)
            newest_accepted = await self._client.xrevrange(self._accepted_key, "+", "-", count=1)
        if not newest or _stream_id(str(newest[0].identifier)) < _stream_id(self._last_id):
            self._last_id = "0-0"
        if not newest_accepted or _stream_id(str(newest_accepted[0].identifier)) < _stream_id(
            self._last_accepted_id
        ):
            self._last_accepted_id = "0-0"
        # Controls and progress are not replayed: after a loss they go on from the newest.
        for attribute, key in (
            ("_last_control_id", self._control_key),
            ("_last_progress_id", self._progress_key),
        ):
            with trio.fail_after(self._timeout):
                last = await self._client.xrevrange(key, "+", "-", count=1)
            newest_id = str(last[0].identifier) if last else "0-0"
            if _stream_id(newest_id) < _stream_id(getattr(self, attribute)):
                setattr(self, attribute, newest_id)
        waiting = [run_id for run_id, run in self._runs.items() if run.terminal is None]
        await self._fetch([*waiting, *self._remote])
        self._work()

    async def _start_stream(self) -> None:
        with trio.fail_after(self._timeout):
            newest = await self._client.xrevrange(self._stream_key, "+", "-", count=1)
            accepted = await self._client.xrevrange(self._accepted_key, "+", "-", count=1)
            control = await self._client.xrevrange(self._control_key, "+", "-", count=1)
            progress = await self._client.xrevrange(self._progress_key, "+", "-", count=1)
            self._last_progress_id = str(progress[0].identifier) if progress else "0-0"
            self._last_id = str(newest[0].identifier) if newest else "0-0"
            self._last_accepted_id = str(accepted[0].identifier) if accepted else "0-0"
            self._last_control_id = str(control[0].identifier) if control else "0-0"
            await self._load_pending()

    # -- lease -------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        lease = self._lease
        while True:
            await trio.sleep(lease.interval)
            try:
                with trio.fail_after(self._timeout):
                    if lease.registered and not await lease.heartbeat():
                        self._fenced_now()
                    await lease.ensure_registered()
                    recovered = await lease.recover(self._limits)
            except _FAILED as exc:
                logger.debug("heartbeat failed: %r", exc)
                self._failed()
                continue
            self._succeeded()
            self._work()  # a lane a lost wake-up left waiting starts within a heartbeat
            if recovered:
                self._recovered += len(recovered)
                logger.warning(
                    "recovered %d runs of dead nodes (abandoned, or to run again)", len(recovered)
                )

    async def _drain(self, grace: float) -> None:
        # Leaving: give queued writes up to `grace` seconds, then drop the lease.
        with trio.move_on_after(grace):
            while self._ops:
                await self._wait_for(self._acked_changed)
        if self._ops:
            logger.error("%d writes were never acknowledged by Redis", len(self._ops))
        with trio.move_on_after(self._timeout):
            with suppress(*UNREACHABLE):
                await self._lease.release()

    def __repr__(self) -> str:
        return (
            f"<RedisStore node={self.node_id} pending={len(self.pending_run_ids())} "
            f"queued={len(self._ops)}>"
        )


def _listen(
    table: dict[str, list[Callable[[_T], object]]], path: str, callback: Callable[[_T], object]
) -> Callable[[], None]:
    # Register a workspace path's listener; returns the call that removes it.
    listeners = table.setdefault(path, [])
    listeners.append(callback)

    def stop() -> None:
        with suppress(ValueError):
            listeners.remove(callback)

    return stop


def _index_member(accepted_at: float | None, run_id: str) -> str:
    # Lexicographic order of the members is listing order: (accepted_at, run_id).
    return f"{float(accepted_at or 0.0):020.6f}|{run_id}"


def _run_info(run_id: str, fields: list[object], *, pending: RunState = "pending") -> RunInfo:
    session_id, path, meta_json, claimed_at, rc_json = (str(field) for field in fields[:5])
    meta = cast(dict[str, object], json.loads(meta_json)) if meta_json else {}
    terminal = RunComplete.from_json(rc_json) if rc_json else None
    accepted_at = meta.get("accepted_at")
    labels = meta.get("labels")
    started_at: float | None
    if terminal is not None:
        started_at = terminal.started_at
    else:
        started_at = float(claimed_at) if claimed_at else None
    return RunInfo(
        run_id=run_id,
        session_id=session_id,
        workspace_path=path or None,
        state="terminal" if terminal is not None else pending,
        accepted_at=float(accepted_at) if isinstance(accepted_at, int | float) else None,
        started_at=started_at,
        attempt=terminal.attempt if terminal is not None else 1,
        labels=cast(dict[str, str], labels) if isinstance(labels, dict) else {},
        terminal=terminal,
    )


def _stream_id(identifier: str) -> tuple[int, int]:
    ms, _, seq = identifier.partition("-")
    return int(ms), int(seq or 0)


def _check_positive(name: str, value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@asynccontextmanager
async def open_redis_store(
    url: str,
    *,
    namespace: str = "trio-runs",
    lease_ttl: float = DEFAULT_LEASE_TTL,
    limits: RetentionLimits | None = None,
    retain: int = 100_000,
    unavailable_after: float = 5.0,
    call_timeout: float = 5.0,
    close_grace: float = 5.0,
) -> AsyncIterator[RedisStore]:
    """Join the cluster on ``url`` as a new node; yields its :class:`RedisStore`.

    ``namespace`` separates clusters sharing one Redis. ``lease_ttl``: seconds this node's
    lease lives without a heartbeat (see :mod:`trio_runs.redis.lease`). ``limits``: how long
    Redis keeps terminals; ``retain``: how many this node keeps in memory. ``call_timeout``
    bounds every Redis call; ``unavailable_after``: seconds of unreachable Redis before
    waits and flushes fail with ``RedisUnavailable``.

    Raises ``RedisUnavailable`` if Redis does not answer while joining. Leaving the block
    gives queued writes ``close_grace`` seconds and drops the lease, so any run this node
    still owned is recovered by the others at once.
    """
    for name, value in (
        ("lease_ttl", lease_ttl),
        ("unavailable_after", unavailable_after),
        ("call_timeout", call_timeout),
        ("close_grace", close_grace),
    ):
        _check_positive(name, value)
    if not isinstance(retain, int) or isinstance(retain, bool) or retain < 1:
        raise ValueError(f"retain must be a positive int, got {retain!r}")
    prefix = namespace_prefix(namespace)
    client = connect(url, timeout=call_timeout)
    blocking = connect(url, timeout=call_timeout + _BLOCK_MS / 1000)
    body_error: BaseException | None = None
    try:
        async with client, blocking:
            store = RedisStore(
                client,
                blocking,
                prefix,
                lease_ttl=lease_ttl,
                limits=limits or RetentionLimits(),
                retain=retain,
                unavailable_after=unavailable_after,
                timeout=call_timeout,
            )
            try:
                with trio.fail_after(call_timeout):
                    await store._lease.ensure_registered()
                    await store._start_stream()
            except _FAILED as exc:
                raise RedisUnavailable(f"cannot join the cluster at {url}: {exc}") from exc
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._write_loop)
                nursery.start_soon(store._follow_loop)
                nursery.start_soon(store._lease_loop)
                nursery.start_soon(store._watchdog)
                try:
                    yield store
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    with trio.CancelScope(shield=True):
                        await store._drain(close_grace)
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery and the clients' task groups wrap what the block raised: hand it back
        # as it was raised when it is the only thing that went wrong.
        leaves = non_cancelled_leaves(group)
        if body_error is not None and leaves == non_cancelled_leaves(body_error):
            raise body_error from None
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    except UNREACHABLE as exc:
        raise RedisUnavailable(f"cannot reach Redis at {url}: {exc}") from exc
