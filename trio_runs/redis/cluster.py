"""Cluster-wide session lanes: any node accepts a run, any node may run it (DESIGN R1-R4).

A workspace of a cluster node gets a :class:`ClusterCoordinator` (made by
:attr:`ClusterNode.coordinator_factory`). It does not run what it accepts: the run goes,
with its call, into its session's lane in Redis (:meth:`RedisStore.accept_call`), and its
dispatch waits for the run's terminal from whichever node ran it. Every node that runs work
(``trio-runs serve --redis`` and ``trio-runs worker``) has a :class:`ClusterNode` claiming
runs while it has room: the head of each ready lane becomes its session's one active run in
the whole cluster, owned by the claiming node, and runs here under the workspace's own
``SessionCoordinator`` (deadlines, retries, cancellation as on one machine).

- **One active run per session, FIFO, cluster-wide.** A lane starts its next run only when
  the active one's terminal is in Redis, or when recovery ended it because its node died.
- **Cancel from anywhere.** ``cancel``, ``clear_queue`` and ``cancel_run`` on any node end
  queued runs in Redis at once; an active run's node is told on the control stream and
  cancels it there (its terminal is that node's, as on one machine).
- **Node death is an ending.** A claimed run is its node's: when that node's lease expires,
  recovery ends it abandoned and its lane goes on on the other nodes. Queued runs belong to
  no node, so the death of the node that accepted them loses nothing.
- **Every node's subscribers see every terminal of their workspace once**: the store shows
  each terminal once per node, and the coordinator publishes exactly what it is shown.

Nodes of one cluster must open workspaces at the same paths (run them with the same
``--workspace-root``): a run is routed by its workspace's path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, Final, cast

import attrs
import trio

from .._terminals import announcer, fallback_terminal, is_cancellation, record_terminal
from ..backend import Backend, CoordinatorFactory, Workspace
from ..broker import Broker
from ..context import (
    current_run_complete_marker,
    mark_run_complete_published,
    run_complete_published,
)
from ..coordinator import (
    AcceptedRun,
    Coordinator,
    CoordinatorStatistics,
    Reservation,
    SessionCoordinator,
    WorkspaceResources,
)
from ..errors import (
    AgentNotInitialized,
    BackendClosed,
    RedisUnavailable,
    RunHandedOff,
    SessionMissing,
    WorkspaceClosing,
    WorkspaceNotFound,
)
from ..events import Attachment, EndReason, EventType, RunCall, RunComplete, RunProgress
from .store import ClaimedRun, RedisStore

__all__ = ["DEFAULT_CAPACITY", "ClusterCoordinator", "ClusterNode", "ClusterNodeStatistics"]

logger = logging.getLogger("trio_runs.redis")


class _Stop(Exception):
    # The backend is closing: this node takes no more work.
    pass


DEFAULT_CAPACITY: Final = 64
"""Runs a node runs at once unless told otherwise."""

_TICK: Final = 1.0  # a lane whose wake-up was lost starts within this (and a heartbeat)
_RETRY_MIN: Final = 0.05
_RETRY_MAX: Final = 1.0


@attrs.frozen(kw_only=True)
class ClusterNodeStatistics:
    """A snapshot of what a :class:`ClusterNode` runs, from :meth:`ClusterNode.statistics`."""

    capacity: int
    """Runs this node runs at once, at most."""
    running: int
    """Claimed runs running here now."""
    claimed_total: int
    """Runs this node claimed since it started."""
    refused_total: int
    """Claimed runs that could not start here (their workspace or the backend was
    closing): each went back to the head of its lane for any node to claim."""


class _Routed:
    """The reservation of a routed run: a place in a lane kept in Redis, not here."""

    __slots__ = ("_closed", "_owner", "call", "scope", "sequence", "session_id")

    def __init__(self, owner: ClusterCoordinator, session_id: str, sequence: int, call: RunCall):
        self._owner = owner
        self.session_id = session_id
        self.sequence = sequence
        self.call = call
        self.scope = trio.CancelScope()  # cancelled when this node leaves the run to others
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._routed.pop(self.call.run_id, None)

    def __repr__(self) -> str:
        return f"<routed run {self.call.run_id} session={self.session_id!r} #{self.sequence}>"


class ClusterCoordinator:
    """A workspace's coordinator on a cluster node; see the module docstring.

    Implements ``Coordinator``, ``SupportsCancelRun``, ``SupportsLaneQueries``,
    ``SupportsDeadlines`` and ``SupportsStatistics``. ``active_run_id`` is the cluster's (as
    this node last heard); the rest of what it says of a session (``is_session_busy``,
    ``queued_prompts``, ``queued_run_ids``) is what this node accepted or runs: the lanes
    live in Redis.
    """

    def __init__(
        self,
        node: ClusterNode,
        store: RedisStore,
        local: SessionCoordinator,
        workspace: WorkspaceResources,
        path: str,
    ) -> None:
        self._node = node
        self._store = store
        self._local = local
        self._path = path
        self._sequence = 0
        self._routed: dict[str, _Routed] = {}
        store.route_workspace(path, rerun=local.after_crash == "rerun")
        store.on_workspace_terminal(path, announcer(workspace.run_completions))
        store.on_workspace_progress(path, partial(workspace.events.publish, EventType.CREATED))

    @property
    def local(self) -> SessionCoordinator:
        """The coordinator that runs this workspace's claimed runs on this node."""
        return self._local

    @property
    def path(self) -> str:
        """The workspace path its runs are routed by."""
        return self._path

    # -- Coordinator -------------------------------------------------------------------

    async def run(
        self,
        session_id: str,
        prompt: str,
        *,
        run_id: str = "",
        attachments: Sequence[Attachment] = (),
        deadline: float | None = None,
    ) -> RunComplete:
        """The in-process path (no dispatcher): runs here, as ``SessionCoordinator.run``."""
        return await self._local.run(
            session_id, prompt, run_id=run_id, attachments=attachments, deadline=deadline
        )

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> Reservation:
        """Reserve a routed run's place (its lane is in Redis); never blocks.

        A run this node claimed to run here gets a place in the local coordinator's lane
        instead. Raises ``SessionMissing`` for a blank session id and ``ValueError`` without
        a call carrying its run id, reserving nothing.
        """
        if call is not None and self._node._take_claim(call.run_id):
            return self._local.begin_accepted(session_id, call)
        if not isinstance(session_id, str) or not session_id.strip():
            raise SessionMissing()
        if call is None or not call.run_id or call.session_id != session_id:
            raise ValueError("a routed run needs its call, for its session, with its run id")
        self._sequence += 1
        routed = _Routed(self, session_id, self._sequence, call)
        self._routed[call.run_id] = routed
        return routed

    async def run_accepted(self, accept: Reservation, call: RunCall) -> RunComplete:
        """Run a claimed run here, or wait for a routed run's terminal from any node.

        A routed run's wait outlasts a Redis outage (it asks again when Redis answers).
        When the workspace closes here, the wait for a run this node does not run ends
        with ``RunHandedOff``: the run goes on elsewhere or waits in its lane for another
        node. (A fallback terminal from this node, should one be offered at a hard stop,
        is refused by Redis: a routed run is ended only by the node that runs it, by a
        cancellation, or by recovery.)
        """
        if isinstance(accept, AcceptedRun):
            handed_at = time.time()
            try:
                return await self._local.run_accepted(accept, call)
            except Exception as exc:
                if not run_complete_published() and not is_cancellation(exc):
                    # A pre-run failure (prepare): record it here, where the store shows it
                    # and this workspace's listener announces it, once. The backend's
                    # fallback would announce it a second time.
                    rc = fallback_terminal(
                        call.session_id, call.run_id, exc, call=call, started_at=handed_at
                    )
                    record_terminal(self._store, None, rc)
                    mark_run_complete_published()
                raise
            finally:
                self._node._finished(call.run_id)
        if not isinstance(accept, _Routed) or accept._owner is not self:
            raise ValueError(f"{accept!r} was made by another coordinator, not this one")
        retry = _RETRY_MIN
        with accept.scope:
            while True:
                try:
                    rc = await self._store.wait(call.run_id)
                    break
                except RedisUnavailable:
                    await trio.sleep(retry)
                    retry = min(retry * 2, _RETRY_MAX)
        if accept.scope.cancelled_caught:
            raise RunHandedOff(call.run_id)
        marker = current_run_complete_marker()
        if marker is not None:
            marker.mark()  # published: by the node that ran it, through Redis
        return rc

    def cancel(self, session_id: str) -> None:
        """Cluster-wide: cancel the session's active run (wherever it runs) and end its
        queued runs cancelled (``reason="session_cancel"``). Never blocks; raises
        ``RedisUnavailable`` (cancelling nothing) while Redis is not answering."""
        self._store.cancel_session(session_id)  # first: it is what may refuse
        self._local.cancel(session_id)

    def cancel_all(self) -> None:
        """The workspace is closing on this node: the runs running here end cancelled
        (``reason="shutdown"``); the runs it accepted that run elsewhere, or wait in their
        lanes, are left to the cluster (their waits here end, their runs do not)."""
        self._local.cancel_all()
        for run_id, routed in self._routed.items():
            if run_id not in self._node._here:
                routed.scope.cancel()

    def cancel_run(self, session_id: str, run_id: str) -> bool:
        """Cluster-wide: cancel one run (queued: now; active: on its node). ``True`` if it
        was pending. Never blocks."""
        if self._local.cancel_run(session_id, run_id):
            return True
        return self._store.cancel_run(session_id, run_id)

    def clear_queue(self, session_id: str) -> None:
        """Cluster-wide: end the session's queued runs cancelled (``clear_queue``); raises
        ``RedisUnavailable`` (dropping nothing) while Redis is not answering."""
        self._store.clear_session(session_id)
        self._local.clear_queue(session_id)

    def is_session_busy(self, session_id: str) -> bool:
        """Whether the session has a run running here, or a run this node accepted that has
        not ended (wherever it runs)."""
        return self._local.is_session_busy(session_id) or any(
            routed.session_id == session_id for routed in self._routed.values()
        )

    def is_busy(self) -> bool:
        """Whether any run runs here, or any run this node accepted is not over."""
        return self._local.is_busy() or bool(self._routed)

    def queued_prompts(self, session_id: str) -> int:
        """How many of :meth:`queued_run_ids` there are."""
        return len(self.queued_run_ids(session_id))

    def queued_prompts_list(self, session_id: str) -> list[str]:
        """The prompts of :meth:`queued_run_ids`, in the same order."""
        active = self.active_run_id(session_id)
        routed = [
            routed.call.prompt
            for run_id, routed in self._routed.items()
            if routed.session_id == session_id and run_id != active
        ]
        return [*self._local.queued_prompts_list(session_id), *routed]

    @property
    def default_deadline(self) -> float | None:
        """The local coordinator's (``SupportsDeadlines``): what a run's call gets when it
        asks for no deadline, on whichever node runs it."""
        return self._local.default_deadline

    def active_run_id(self, session_id: str) -> str | None:
        """The session's active run, whichever node runs it (as this node last heard)."""
        return self._local.active_run_id(session_id) or self._store.active_run_id(session_id)

    def queued_run_ids(self, session_id: str) -> list[str]:
        """The session's runs this node accepted (or runs) that are not active yet."""
        active = self.active_run_id(session_id)
        routed = [
            run_id
            for run_id, routed in self._routed.items()
            if routed.session_id == session_id and run_id != active
        ]
        return [*self._local.queued_run_ids(session_id), *routed]

    def statistics(self) -> CoordinatorStatistics:
        """The local coordinator's statistics: the runs that ran here."""
        return self._local.statistics()

    def __repr__(self) -> str:
        return f"<ClusterCoordinator {self._path!r} routed={len(self._routed)}>"


class _Forwarding(Broker[RunProgress]):
    # The progress broker a workspace's local coordinator publishes to: the workspace's own
    # (this node's subscribers), and the cluster's progress stream (the other nodes').
    def __init__(self, target: Broker[RunProgress], forward: Callable[[RunProgress], None]) -> None:
        super().__init__()
        self._target = target
        self._forward = forward

    def publish(self, type: EventType, payload: RunProgress) -> None:
        self._target.publish(type, payload)
        self._forward(payload)


class _LocalWorkspace:
    # The workspace as the agent's factory sees it on a cluster node: the workspace itself
    # (its id, path, brokers, store), but the progress its runs emit also goes to the other
    # nodes' subscribers.
    def __init__(self, workspace: Workspace, events: Broker[RunProgress]) -> None:
        self._workspace = workspace
        self.events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._workspace, name)


class ClusterNode:
    """This node's share of the cluster's work: it claims routed runs while it has room
    (``capacity`` at once) and runs each in its workspace, opened here by path.

    ``agent_factory`` is the coordinator factory of one machine (``load_agent``'s): it
    builds the ``SessionCoordinator`` that runs a workspace's claimed runs here.
    :attr:`coordinator_factory` is the one to open workspaces with. Run :meth:`serve` in a
    nursery to take work; a node that never serves still accepts runs for the others.
    """

    def __init__(
        self,
        store: RedisStore,
        agent_factory: Callable[[Workspace], Coordinator | None],
        *,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._store = store
        self._agent_factory = agent_factory
        self._capacity = capacity
        self._running = 0
        self._claimed: set[str] = set()
        self._here: set[str] = set()  # claimed runs started here, not ended yet
        self._claimed_total = 0
        self._refused_total = 0
        self._wake = trio.Event()
        self._room = trio.Event()
        self._early_cancels: dict[str, str] = {}
        self._locals: dict[str, SessionCoordinator] = {}

        store.on_work(self._wake_up)
        store.on_control(self._cancel_here)
        store.on_lost(self._stop_lost)

    @property
    def capacity(self) -> int:
        """Runs this node runs at once, at most."""
        return self._capacity

    @property
    def coordinator_factory(self) -> CoordinatorFactory:
        """The factory for this node's workspaces: each gets a :class:`ClusterCoordinator`."""
        return self._make

    def statistics(self) -> ClusterNodeStatistics:
        """What this node runs: capacity, running, claimed and refused counts."""
        return ClusterNodeStatistics(
            capacity=self._capacity,
            running=self._running,
            claimed_total=self._claimed_total,
            refused_total=self._refused_total,
        )

    def _make(self, workspace: Workspace) -> ClusterCoordinator | None:
        if not isinstance(workspace, Workspace):
            raise TypeError("a cluster workspace is routed by its path: open it with a Backend")
        events = _Forwarding(workspace.events, partial(self._forward, workspace.path))
        local = self._agent_factory(cast(Workspace, _LocalWorkspace(workspace, events)))
        if local is None:
            return None
        if not isinstance(local, SessionCoordinator):
            raise TypeError(
                f"a cluster node runs work with a SessionCoordinator, got {local!r} from "
                "the agent's factory"
            )
        self._locals[workspace.path] = local
        return ClusterCoordinator(self, self._store, local, workspace, workspace.path)

    # -- claiming ----------------------------------------------------------------------

    async def serve(
        self, backend: Backend, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Claim routed runs and run them in ``backend``'s workspaces, until cancelled.

        Claims only while fewer than ``capacity`` claimed runs run here. A Redis outage
        pauses claiming (nothing is lost: the lanes wait in Redis). Returns once the
        backend is closing; a run claimed that could not start goes back to the head of
        its lane.
        """
        task_status.started()
        retry = _RETRY_MIN
        while True:
            with trio.move_on_after(_TICK):
                await self._wake.wait()
            self._wake = trio.Event()
            while self._running < self._capacity:
                try:
                    claimed = await self._store.claim(self._capacity - self._running)
                except RedisUnavailable:
                    await trio.sleep(retry)
                    retry = min(retry * 2, _RETRY_MAX)
                    break
                retry = _RETRY_MIN
                for index, run in enumerate(claimed):
                    try:
                        await self._start(backend, run)
                    except _Stop:
                        # The backend is closing: claim nothing more; give back the rest.
                        for rest in claimed[index + 1 :]:
                            with suppress(RedisUnavailable):
                                self._store.release_claim(rest)
                        return
                if not claimed:
                    break
            while self._running >= self._capacity:
                self._room = trio.Event()
                await self._room.wait()

    async def _start(self, backend: Backend, claimed: ClaimedRun) -> None:
        call = claimed.call
        self._claimed_total += 1
        self._running += 1
        try:
            workspace = await backend.create_workspace(
                claimed.workspace_path, self.coordinator_factory
            )
            self._claimed.add(call.run_id)
            self._here.add(call.run_id)
            backend.start_accepted(workspace.id, call)
        except (WorkspaceClosing, WorkspaceNotFound, BackendClosed, AgentNotInitialized) as exc:
            # Not this node's to run after all (it is closing): back to its lane's head.
            self._claimed.discard(call.run_id)
            self._here.discard(call.run_id)
            self._running -= 1
            self._refused_total += 1
            logger.info("claimed run %s could not start here (%r): released", call.run_id, exc)
            with suppress(RedisUnavailable):  # then recovery frees it with this node's lease
                self._store.release_claim(claimed)
            if isinstance(exc, BackendClosed):
                raise _Stop from None
            return
        reason = self._early_cancels.pop(call.run_id, None)
        if reason is not None:
            self._cancel_here(call.run_id, call.session_id, reason)

    def _forward(self, path: str, progress: RunProgress) -> None:
        # With the store's ordered writes: a run's progress reaches Redis before its
        # terminal, so another node never drops the last of it as late.
        self._store.forward_progress(path, progress)

    def _take_claim(self, run_id: str) -> bool:
        if run_id in self._claimed:
            self._claimed.discard(run_id)
            return True
        return False

    def _finished(self, run_id: str) -> None:
        self._here.discard(run_id)
        self._running -= 1
        self._room.set()
        self._wake.set()

    def _wake_up(self) -> None:
        self._wake.set()

    # -- control -----------------------------------------------------------------------

    def _cancel_here(self, run_id: str, session_id: str, reason: str) -> None:
        # Another node (or this one) cancelled a run this node claimed: end it here, where
        # it runs, so its terminal is this node's as on one machine.
        why: EndReason = "session_cancel" if reason == "session_cancel" else "user"
        for local in self._locals.values():
            if local.cancel_run(session_id, run_id, reason=why):
                return
        # Claimed but not started yet (the control outran the claim's answer): on start.
        if len(self._early_cancels) > 10_000:
            self._early_cancels.clear()
        self._early_cancels[run_id] = reason

    def _stop_lost(self, run_ids: list[str]) -> None:
        # Fenced: recovery ends these runs (abandoned); stop running what is no longer ours.
        for run_id in run_ids:
            session_id = self._store.session_of(run_id)
            if session_id is None:
                continue
            for local in self._locals.values():
                if local.cancel_run(session_id, run_id):
                    break
