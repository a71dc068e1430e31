"""The backend: a registry of workspaces, and the dispatcher that starts their runs.

A run's task lives in its workspace's nursery, not in the task of whoever submitted it: a
client that goes away does not take the run with it, and a workspace that closes takes all
of its runs with it, each ending in a cancelled terminal before the workspace is gone.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

import attrs
import trio

from ._histogram import Histogram
from ._terminals import (
    announcer,
    fallback_terminal,
    is_cancellation,
    non_cancelled_leaves,
    record_terminal,
    stamped_terminal,
)
from ._validation import validate_labels, validate_submission, validate_workspace_path
from .broker import Broker
from .context import enter_run_for_task, run_complete_published
from .coordinator import (
    Coordinator,
    Reservation,
    SessionCoordinator,
    SupportsAfterCrash,
    SupportsCancelRun,
    SupportsLaneQueries,
    SupportsStatistics,
    new_run_id,
)
from .errors import (
    AgentNotInitialized,
    BackendClosed,
    DuplicateRun,
    NotSupported,
    RunHandedOff,
    UnknownRun,
    WorkspaceClosing,
    WorkspaceNotFound,
)
from .events import (
    AgentMessage,
    EventType,
    Notification,
    NotificationType,
    RunCall,
    RunComplete,
    RunProgress,
)
from .ledger import LedgerStatistics, RunLedger, RunStore, SupportsRerun, SupportsRunMetadata

__all__ = [
    "AsCompleted",
    "Backend",
    "BackendStatistics",
    "CoordinatorFactory",
    "Workspace",
    "open_backend",
]

logger = logging.getLogger("trio_runs")

CoordinatorFactory = Callable[["Workspace"], Coordinator | None]
"""Builds a workspace's coordinator from the workspace (``None``: a workspace with no agent)."""

DEFAULT_CLOSE_GRACE = 10.0
FLUSH_BOUND = 10.0
"""Seconds a closing workspace waits for the store to commit its last terminals."""


@attrs.frozen(kw_only=True)
class BackendStatistics:
    """A snapshot of a :class:`Backend` and everything in it, from ``Backend.statistics()``.

    Counters (``*_total``, ``drops``, ``overflows``) never go down: closed workspaces' counts
    are kept. Gauges are summed over the open (and closing) workspaces.
    """

    workspaces: int
    """Workspaces open or closing."""
    runs_in_flight: int
    """Runs whose dispatch has not finished."""
    active: int
    """Runs running now (counted where the coordinator implements ``SupportsLaneQueries``)."""
    queued: int
    """Runs waiting in a session's queue."""
    subscribers: int
    """Subscriptions open on the workspaces' brokers."""
    drops: int
    """Lossy progress events and notifications dropped for slow subscribers, ever."""
    overflows: int
    """Subscribers disconnected for exceeding their backlog, ever (every broker)."""
    queue_wait: Histogram
    """Seconds from a run's entry to its start, summed over coordinators that report
    statistics (``SupportsStatistics``, as ``SessionCoordinator`` does)."""
    run_duration: Histogram
    """Seconds from a run's start to its terminal, over the same coordinators."""
    ledger: LedgerStatistics
    """The store's own snapshot."""


class Workspace:
    """A place runs live: its own nursery, brokers, coordinator, and the backend's ledger.

    ``run_completions`` is must-deliver (every terminal reaches every live subscriber);
    ``notifications`` and ``events`` are lossy. No run outlives its workspace: closing it
    ends every accepted run with exactly one terminal before the brokers shut down.
    """

    def __init__(self, workspace_id: str, path: str, ledger: RunStore) -> None:
        self.id = workspace_id
        """The workspace's id (a UUID4 string)."""
        self.path = path
        """The resolved path the workspace was created for."""
        self.ledger = ledger
        """The backend's store: the source of truth for terminals."""
        self.run_completions: Broker[RunComplete] = Broker()
        """Must-deliver: one ``RunComplete`` per accepted run of this workspace."""
        self.notifications: Broker[Notification] = Broker()
        """Lossy notices (e.g. ``AGENT_ERROR``); never a run's ending."""
        self.events: Broker[RunProgress] = Broker()
        """Lossy progress the agents emit."""
        self.coordinator: Coordinator | None = None
        """The coordinator the factory built, or ``None`` for a workspace without an agent."""
        self._nursery: trio.Nursery | None = None
        self._hard_stop = trio.CancelScope()
        self._started = trio.Event()
        self._close_requested = trio.Event()
        self._closed = trio.Event()
        self._closing = False
        self._start_failed = False
        self._runs: set[str] = set()
        # Whether a crash reruns this workspace's runs (its coordinator asks, the store can).
        self._rerun_after_crash = False

    @property
    def sessions(self) -> SessionCoordinator:
        """The workspace's coordinator as the :class:`SessionCoordinator` it is, typed.

        For the session methods (``cancel``, ``cancel_run``, ``clear_queue``,
        ``queued_prompts_list``, ``active_run_id``...) without an ``isinstance`` check.
        Raises ``AgentNotInitialized`` for a workspace without an agent and ``NotSupported``
        when its coordinator is another kind (use :attr:`coordinator` for that one).
        """
        coordinator = self.coordinator
        if coordinator is None:
            raise AgentNotInitialized(self.id)
        if not isinstance(coordinator, SessionCoordinator):
            raise NotSupported(self.id, "session methods (it is not a SessionCoordinator)")
        return coordinator

    @property
    def closing(self) -> bool:
        """Whether the workspace refuses new runs because it is closing or closed."""
        return self._closing

    @property
    def closed(self) -> bool:
        """Whether every run ended and the brokers shut down."""
        return self._closed.is_set()

    @property
    def run_ids(self) -> frozenset[str]:
        """Ids of the runs dispatched here whose dispatch has not finished yet."""
        return frozenset(self._runs)

    async def _serve(
        self,
        on_started: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self._hard_stop:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    on_started()
                    task_status.started()
                    self._started.set()
                    await self._close_requested.wait()
                    # Leaving the block waits for every dispatched run to end.
        finally:
            # Every dispatch has ended here, and each left its run with a terminal.
            self._closing = True
            await self._until_visible()
            self.run_completions.shutdown()
            self.notifications.shutdown()
            self.events.shutdown()
            self._closed.set()

    async def _until_visible(self) -> None:
        # A durable store fans a terminal out once it is committed: the brokers must outlive
        # that, or a subscriber would miss its workspace's last terminals. Runs while
        # cancelled (hard stop), so shielded and bounded.
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_BOUND) as bounded:
            try:
                await self.ledger.flush()
            except Exception:
                logger.exception("workspace %s: the store failed to commit its terminals", self.id)
        if bounded.cancelled_caught:
            logger.error(
                "workspace %s: the store did not commit within %ss; subscribers may miss "
                "terminals a waiter will still get",
                self.id,
                FLUSH_BOUND,
            )

    def _begin_close(self) -> None:
        # Synchronous, so that closing several workspaces cancels all of their runs at once,
        # before any of them gets another step.
        if not self._closing:
            self._closing = True
            if self.coordinator is not None:
                self.coordinator.cancel_all()
        self._close_requested.set()

    async def _close(self, grace: float) -> None:
        self._begin_close()
        with trio.move_on_after(grace):
            await self._closed.wait()
        # A coordinator that ignored cancel_all() (or an agent still busy past the grace
        # period) is cut off: its dispatch tasks are cancelled and end their runs cancelled.
        self._hard_stop.cancel()
        await self._closed.wait()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "closing" if self._closing else "open"
        return f"<Workspace {self.id} path={self.path!r} runs={len(self._runs)} {state}>"


class Backend:
    """The registry of workspaces and the entry point for submitting runs.

    Made by :func:`open_backend`, which owns the nursery every workspace runs in.
    :meth:`send_message` either accepts a run (it will get exactly one terminal) or raises a
    typed error having reserved, registered and started nothing.
    """

    def __init__(self, nursery: trio.Nursery, ledger: RunStore) -> None:
        self._nursery = nursery
        self._ledger = ledger
        # A store that lists runs is given each run's metadata at acceptance (checked once:
        # a runtime protocol check costs microseconds, too much for every send).
        self._metadata_store = ledger if isinstance(ledger, SupportsRunMetadata) else None
        self._workspaces: dict[str, Workspace] = {}
        self._by_path: dict[str, Workspace] = {}
        self._closing = False
        # Counters of closed workspaces' brokers, so statistics() never goes down.
        self._closed_drops = 0
        self._closed_overflows = 0
        self._closed_queue_wait = Histogram()
        self._closed_run_duration = Histogram()

    @property
    def ledger(self) -> RunStore:
        """The store every workspace records terminals in."""
        return self._ledger

    def statistics(self) -> BackendStatistics:
        """A frozen snapshot of the backend: workspaces, runs, brokers and the store.

        Walks every open workspace and the sessions of its runs in flight.
        """
        store = self._ledger
        runs = active = queued = subscribers = 0
        drops, overflows = self._closed_drops, self._closed_overflows
        queue_wait, run_duration = self._closed_queue_wait, self._closed_run_duration
        for workspace in self._workspaces.values():
            runs += len(workspace._runs)
            for broker in (workspace.run_completions, workspace.notifications, workspace.events):
                subscribers += broker.subscriber_count
                overflows += broker.overflow_count
            drops += workspace.notifications.drop_count + workspace.events.drop_count
            coordinator = workspace.coordinator
            if coordinator is None:
                continue
            if isinstance(coordinator, SupportsStatistics):
                own = coordinator.statistics()
                queue_wait = queue_wait.merged(own.queue_wait)
                run_duration = run_duration.merged(own.run_duration)
            sessions = {store.session_of(run_id) for run_id in workspace._runs}
            for session_id in sessions:
                if session_id is None:
                    continue
                if (
                    isinstance(coordinator, SupportsLaneQueries)
                    and coordinator.active_run_id(session_id) is not None
                ):
                    active += 1
                queued += coordinator.queued_prompts(session_id)
        return BackendStatistics(
            workspaces=len(self._workspaces),
            runs_in_flight=runs,
            active=active,
            queued=queued,
            subscribers=subscribers,
            drops=drops,
            overflows=overflows,
            queue_wait=queue_wait,
            run_duration=run_duration,
            ledger=store.statistics(),
        )

    @property
    def workspaces(self) -> list[Workspace]:
        """The open (or closing) workspaces."""
        return list(self._workspaces.values())

    async def create_workspace(
        self, path: str | os.PathLike[str], coordinator_factory: CoordinatorFactory
    ) -> Workspace:
        """The workspace for ``path``, created (and its nursery started) if need be.

        The same resolved path gives the same workspace (the factory is then not called).
        ``coordinator_factory(workspace)`` is called synchronously with the new workspace; if
        it raises, nothing is registered. Raises ``WorkspaceClosing`` if the path's
        workspace is closing, ``BackendClosed`` if the backend is.
        """
        if self._closing:
            raise BackendClosed()
        resolved = _resolve(path)
        existing = self._by_path.get(resolved)
        if existing is not None:
            if existing.closing:
                raise WorkspaceClosing(existing.id)
            await existing._started.wait()
            if existing._start_failed:
                raise WorkspaceClosing(existing.id)
            return existing
        workspace = Workspace(str(uuid.uuid4()), resolved, self._ledger)
        coordinator = coordinator_factory(workspace)
        if coordinator is not None and not isinstance(coordinator, Coordinator):
            raise TypeError(
                f"coordinator_factory must return a Coordinator or None, got {coordinator!r}"
            )
        workspace.coordinator = coordinator
        workspace._rerun_after_crash = (
            isinstance(coordinator, SupportsAfterCrash)
            and coordinator.after_crash == "rerun"
            and isinstance(self._ledger, SupportsRerun)
        )
        # Claim the path before the await so a concurrent create for it waits for this one;
        # the id is published only once the nursery exists, so nothing can send to it early.
        self._by_path[resolved] = workspace
        try:
            await self._nursery.start(self._serve_workspace, workspace)
        except BaseException:
            workspace._start_failed = True
            workspace._started.set()
            self._unregister(workspace)
            raise
        logger.debug("workspace %s opened for %s", workspace.id, resolved)
        self._rerun_recovered(workspace)
        return workspace

    async def _serve_workspace(
        self, workspace: Workspace, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        def publish_id() -> None:
            # Only now, with its nursery open, can the workspace take runs.
            self._workspaces[workspace.id] = workspace

        try:
            await workspace._serve(publish_id, task_status=task_status)
        finally:
            self._unregister(workspace)

    def _unregister(self, workspace: Workspace) -> None:
        if self._workspaces.get(workspace.id) is workspace:
            del self._workspaces[workspace.id]
            self._closed_drops += workspace.notifications.drop_count + workspace.events.drop_count
            self._closed_overflows += (
                workspace.run_completions.overflow_count
                + workspace.notifications.overflow_count
                + workspace.events.overflow_count
            )
            if isinstance(workspace.coordinator, SupportsStatistics):
                own = workspace.coordinator.statistics()
                self._closed_queue_wait = self._closed_queue_wait.merged(own.queue_wait)
                self._closed_run_duration = self._closed_run_duration.merged(own.run_duration)
        if self._by_path.get(workspace.path) is workspace:
            del self._by_path[workspace.path]

    def get_workspace(self, workspace_id: str) -> Workspace:
        """The open (or closing) workspace with this id; raises ``WorkspaceNotFound``."""
        workspace = self._workspaces.get(workspace_id)
        if workspace is None:
            raise WorkspaceNotFound(workspace_id)
        return workspace

    async def close_workspace(
        self, workspace_id: str, *, grace: float = DEFAULT_CLOSE_GRACE
    ) -> None:
        """Close a workspace: refuse new runs, cancel every run, wait for every terminal.

        Returns once every accepted run of the workspace has its terminal and its brokers
        are shut down. Runs get ``grace`` seconds to honour the cancellation before their
        tasks are cancelled outright. Closing a closing workspace waits for the same end.
        """
        workspace = self.get_workspace(workspace_id)
        await workspace._close(grace)

    def _taking_runs(self, workspace_id: str) -> tuple[Workspace, Coordinator]:
        # The workspace and its coordinator, if it takes runs now; else the typed refusal.
        workspace = self._workspaces.get(workspace_id)
        if workspace is None:
            raise WorkspaceNotFound(workspace_id)
        if workspace.closing or self._closing:
            raise WorkspaceClosing(workspace_id)
        coordinator = workspace.coordinator
        if coordinator is None:
            raise AgentNotInitialized(workspace_id)
        return workspace, coordinator

    def send_message(self, workspace_id: str, msg: AgentMessage) -> str:
        """Accept a run and start it in the workspace; returns its run id. Never blocks.

        Raises, synchronously and with nothing reserved, registered or started:
        ``WorkspaceNotFound``, ``WorkspaceClosing``, ``AgentNotInitialized``,
        ``SessionMissing``, ``InvalidSessionId``, ``EmptyPrompt``, ``InvalidRunId``,
        ``DuplicateRun``, ``InvalidLabels``, ``ValueError`` for a prompt holding NUL or lone
        surrogates, or ``TypeError`` for a ``msg`` that is not an ``AgentMessage``.

        The run's terminal carries its labels and its acceptance time (now, wall clock).
        """
        if not isinstance(msg, AgentMessage):
            raise TypeError(f"msg must be an AgentMessage, got {type(msg).__name__}")
        workspace, coordinator = self._taking_runs(workspace_id)
        validate_submission(msg.session_id, msg.prompt, msg.run_id, msg.attachments)
        labels = msg.labels
        if labels:
            validate_labels(labels)
        run_id = msg.run_id or new_run_id()
        # Only a caller's id can already be known: checking a freshly minted UUID4 would cost
        # two lookups in a table of up to `retain` terminals, cold in cache, on every send
        # (and ledger.accept below still refuses a duplicate, releasing the reservation).
        if msg.run_id and self._ledger.state(run_id) is not None:
            raise DuplicateRun(run_id)
        nursery = workspace._nursery
        assert nursery is not None
        call = RunCall(
            msg.session_id,
            msg.prompt,
            run_id,
            msg.attachments,
            deadline=msg.deadline,
            labels=labels,
            accepted_at=time.time(),
        )
        # The call goes with the reservation so the run is listed as queued (and clear_queue
        # can drop it) before its task gets to run.
        accept = coordinator.begin_accepted(msg.session_id, call)
        try:
            if workspace._rerun_after_crash:
                store = self._ledger
                assert isinstance(store, SupportsRerun)
                store.accept_rerunnable(run_id, msg.session_id, workspace.path, call)
            elif self._metadata_store is not None:
                self._metadata_store.accept_call(call, workspace.path)
            else:
                self._ledger.accept(run_id, msg.session_id)
            try:
                nursery.start_soon(self._dispatch, workspace, coordinator, accept, call)
            except BaseException:
                self._ledger.withdraw(run_id)
                raise
        except BaseException:
            accept.close()
            raise
        workspace._runs.add(run_id)
        return run_id

    async def _dispatch(
        self,
        workspace: Workspace,
        coordinator: Coordinator,
        accept: Reservation,
        call: RunCall,
    ) -> None:
        # The seed's runAgent: owns the reservation, attaches the run id and a fresh marker,
        # and makes sure the run has a terminal however run_accepted ends.
        run_id = call.run_id
        # When the run was handed to its coordinator: the `started_at` of a terminal the
        # backend records itself, for a coordinator that published none (it cannot say when
        # its agent started, nor whether it did).
        handed_at = time.time()
        failure: BaseException | None = None
        returned: object = None
        handed_off = False
        # This task is the run's alone (its context a copy of its spawner's), so the run id
        # and the marker are set for the rest of it, with nothing to restore.
        enter_run_for_task(run_id)
        try:
            try:
                returned = await coordinator.run_accepted(accept, call)
            except RunHandedOff:
                # Another party (a cluster's other nodes) ends it: nothing to record here.
                logger.info("run %s was handed off as its workspace closed", run_id)
                handed_off = True
                return
            except BaseException as exc:
                failure = exc
                self._after_failure(workspace, call, handed_at, exc)
                if isinstance(exc, Exception) and not is_cancellation(exc):
                    # One run's failure must not take down its workspace's other runs.
                    return
                raise
        finally:
            _close_reservation(accept)
            workspace._runs.discard(run_id)
            if not handed_off and self._ledger.state(run_id) == "pending":
                # Last resort, for a coordinator that flagged the marker (or returned)
                # without publishing: the ledger, not the marker, says the run is not over.
                self._publish_missing_terminal(workspace, call, handed_at, failure, returned)

    def _publish_missing_terminal(
        self,
        workspace: Workspace,
        call: RunCall,
        handed_at: float,
        failure: BaseException | None,
        returned: object,
    ) -> None:
        session_id, run_id = call.session_id, call.run_id
        if failure is not None:
            rc = fallback_terminal(
                session_id,
                run_id,
                failure,
                call=call,
                started_at=handed_at,
                cancel_reason="shutdown",
            )
        elif isinstance(returned, RunComplete) and returned.run_id == run_id:
            rc = returned
        else:
            rc = stamped_terminal(
                call,
                session_id,
                run_id,
                started_at=handed_at,
                error="the coordinator published no terminal",
            )
        # Only a coordinator that misbehaves, or a store that failed to record, gets here.
        logger.error(
            "run %s has no recorded terminal after its dispatch (coordinator %r); recording %s",
            run_id,
            workspace.coordinator,
            rc.outcome,
        )
        self._record(workspace, rc)

    def _record(self, workspace: Workspace, rc: RunComplete) -> None:
        # Synchronous and never raising: it runs in finally blocks, and a store that fails
        # for one run must not take the workspace's other runs down with it.
        try:
            record_terminal(self._ledger, announcer(workspace.run_completions), rc)
        except Exception:
            logger.exception("could not record the terminal of run %s", rc.run_id)

    def _after_failure(
        self, workspace: Workspace, call: RunCall, handed_at: float, exc: BaseException
    ) -> None:
        # Synchronous: may run while cancelled.
        session_id, run_id = call.session_id, call.run_id
        if is_cancellation(exc):
            # The coordinator owns the cancelled terminal; cancellation is never an error.
            # Only if it published none (a coordinator that is not a SessionCoordinator) is
            # a cancelled terminal recorded here, so no run is left without one: its dispatch
            # task was cancelled, which only the workspace's hard stop at close does.
            if not run_complete_published():
                self._record(
                    workspace,
                    fallback_terminal(
                        session_id,
                        run_id,
                        exc,
                        call=call,
                        started_at=handed_at,
                        cancel_reason="shutdown",
                    ),
                )
            return
        message = str(exc) or type(exc).__name__
        workspace.notifications.publish(
            EventType.CREATED,
            Notification(NotificationType.AGENT_ERROR, session_id, run_id, message),
        )
        logger.info("run %s (session %s) failed: %s", run_id, session_id, message, exc_info=exc)
        if not run_complete_published():
            # A pre-run failure (prepare, or anything before the coordinator published):
            # the lossy notification alone could be dropped and leave a waiter hanging.
            self._record(
                workspace,
                fallback_terminal(session_id, run_id, exc, call=call, started_at=handed_at),
            )

    def rerunnable_paths(self) -> list[str]:
        """Workspace paths whose runs a crash left to run again (open them to run them)."""
        store = self._ledger
        return store.rerunnable_paths() if isinstance(store, SupportsRerun) else []

    def _rerun_recovered(self, workspace: Workspace) -> None:
        # Runs the store recovered to run again (DESIGN D3, at-least-once): dispatched now,
        # under their own ids, as if just accepted (the store holds them pending already).
        store = self._ledger
        if not isinstance(store, SupportsRerun):
            return
        calls = store.take_rerunnable(workspace.path)
        if not calls:
            return
        logger.warning("workspace %s: running %d crashed run(s) again", workspace.id, len(calls))
        coordinator = workspace.coordinator
        nursery = workspace._nursery
        assert nursery is not None
        for call in calls:
            if coordinator is None:
                self._record(
                    workspace,
                    RunComplete(
                        call.session_id,
                        call.run_id,
                        error="abandoned: the workspace has no agent to run it again",
                        abandoned=True,
                        reason="abandoned",
                        accepted_at=call.accepted_at,
                        attempt=call.execution,
                        labels=call.labels,
                    ),
                )
                continue
            accept = coordinator.begin_accepted(call.session_id, call)
            nursery.start_soon(self._dispatch, workspace, coordinator, accept, call)
            workspace._runs.add(call.run_id)

    def start_accepted(self, workspace_id: str, call: RunCall) -> None:
        """Run ``call`` in the workspace: a run its store already holds as accepted (one
        another node of a cluster accepted, and this node claimed). Never blocks.

        It is dispatched as :meth:`send_message` dispatches (reserved with the workspace's
        coordinator, one terminal however it ends) but not registered with the store again.
        Raises ``WorkspaceNotFound``, ``WorkspaceClosing`` or ``AgentNotInitialized``,
        having reserved and started nothing: the caller then owns the run's ending.
        """
        workspace, coordinator = self._taking_runs(workspace_id)
        nursery = workspace._nursery
        assert nursery is not None
        accept = coordinator.begin_accepted(call.session_id, call)
        try:
            nursery.start_soon(self._dispatch, workspace, coordinator, accept, call)
        except BaseException:
            accept.close()
            raise
        workspace._runs.add(call.run_id)

    def workspace_of(self, run_id: str) -> Workspace | None:
        """The workspace a run was dispatched in, while its dispatch is going on."""
        for workspace in self._workspaces.values():
            if run_id in workspace._runs:
                return workspace
        return None

    def cancel_run(self, run_id: str) -> bool:
        """Cancel one run wherever it is; ``True`` if it was found and had not ended yet.

        The run ends cancelled (never failed); the other runs of its session go on. ``False`` for
        unknown or ended runs. Raises ``NotSupported`` (changing nothing) when the run's
        coordinator does not implement ``SupportsCancelRun``, as ``SessionCoordinator`` does.
        A run pending in the store but dispatched on no workspace here (another node of a
        cluster accepted it) is cancelled through the store when the store implements
        ``SupportsCancelRun`` (``RedisStore`` does), else ``False``. Never blocks.
        """
        workspace = self.workspace_of(run_id)
        session_id = self._ledger.session_of(run_id)
        if session_id is None or self._ledger.state(run_id) != "pending":
            return False
        if workspace is None:
            # Dispatched on no workspace here: a store shared by many nodes (a cluster's)
            # may still cancel it, wherever it runs.
            store = self._ledger
            return isinstance(store, SupportsCancelRun) and bool(
                store.cancel_run(session_id, run_id)
            )
        coordinator = workspace.coordinator
        if not isinstance(coordinator, SupportsCancelRun):
            raise NotSupported(workspace.id, "cancelling one run (SupportsCancelRun)")
        return bool(coordinator.cancel_run(session_id, run_id))

    async def submit(self, workspace_id: str, msg: AgentMessage) -> str:
        """Accept a run like :meth:`send_message`, and return its id once that is durable.

        Returns after the store has made the acceptance durable (``RunStore.flush``): a run
        acknowledged this way survives a crash of the process (with a durable store). Raises
        what ``send_message`` raises, having accepted nothing, and whatever ``flush`` raises.
        If cancelled while waiting for the store, the run stays accepted and runs (its id was
        just never handed back).
        """
        run_id = self.send_message(workspace_id, msg)
        await self._ledger.flush()
        return run_id

    async def wait_run(self, run_id: str) -> RunComplete:
        """The run's terminal, at once if it already ended; raises ``UnknownRun``."""
        return await self._ledger.wait(run_id)

    def as_completed(self, run_ids: Iterable[str]) -> AsCompleted:
        """The terminals of ``run_ids`` as they become visible, each once: no subscriber race.

        ``async with backend.as_completed(run_ids) as completed: async for rc in completed:``
        yields the runs already ended first (in the order given), then each other run's
        terminal as it becomes visible in the store, and ends after the last. Call it
        whenever you like after submitting: it reads the store, so a run that ended before
        the call (a ``clear_queue`` ends the runs it drops before it returns) is not missed.

        Raises ``UnknownRun`` at once, before yielding anything, for a run id the store does
        not know (never accepted, or evicted past retention), and ``TypeError`` for a run id
        that is not a str. Repeated ids are yielded once. Cancelled while waiting, nothing is
        lost (see :class:`AsCompleted`); leaving the block early never cancels a run.
        """
        return AsCompleted(self._ledger, run_ids)

    async def run(self, workspace_id: str, msg: AgentMessage) -> RunComplete:
        """Submit ``msg`` and wait for its terminal (the in-process ``trio-runs run``).

        Raises what :meth:`send_message` raises; a run that fails returns its failed
        terminal rather than raising.
        """
        run_id = self.send_message(workspace_id, msg)
        return await self.wait_run(run_id)

    async def aclose(self, *, grace: float = DEFAULT_CLOSE_GRACE) -> None:
        """Close every workspace (see :meth:`close_workspace`) and refuse new ones."""
        self._closing = True
        workspaces = list(self._workspaces.values())
        for workspace in workspaces:
            workspace._begin_close()
        async with trio.open_nursery() as nursery:
            for workspace in workspaces:
                nursery.start_soon(workspace._close, grace)


def _close_reservation(accept: Reservation) -> None:
    # Runs in the dispatch's finally: a user's reservation that fails to close must not keep
    # the run from its last-resort terminal.
    try:
        accept.close()
    except Exception:
        logger.exception("could not close the reservation %r", accept)


def _resolve(path: str | os.PathLike[str]) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise TypeError("path must be a text path, not bytes")
    if not raw.strip():
        raise ValueError("path must not be empty")
    validate_workspace_path(raw)
    return os.path.realpath(raw)


@asynccontextmanager
async def open_backend(
    ledger: RunStore | None = None, *, close_grace: float = DEFAULT_CLOSE_GRACE
) -> AsyncIterator[Backend]:
    """Open a backend whose workspaces (and all their runs) live inside this block.

    Leaving the block normally closes every workspace gracefully (see
    ``Backend.close_workspace``); leaving it with an exception cancels them, and every
    accepted run still ends with its cancelled terminal. No task outlives the block. An
    exception raised in the block comes out as itself, not wrapped in an ``ExceptionGroup``.
    """
    if ledger is not None and not isinstance(ledger, RunStore):
        raise TypeError(f"ledger must implement RunStore, got {type(ledger).__name__}")
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            backend = Backend(nursery, ledger if ledger is not None else RunLedger())
            try:
                yield backend
            except BaseException as exc:
                body_error = exc
                backend._closing = True
                nursery.cancel_scope.cancel()
                raise
            await backend.aclose(grace=close_grace)
    except BaseExceptionGroup as group:
        single = _sole_error(group, body_error)
        if single is None:
            raise
        raise single from None


def _sole_error(
    group: BaseExceptionGroup[BaseException], body_error: BaseException | None
) -> BaseException | None:
    # The nursery wraps whatever the block raised; hand it back as it was raised when it is
    # the only thing that went wrong (the Cancelled of our own shutdown does not count). A
    # lone error from a workspace task (e.g. KeyboardInterrupt) is unwrapped to itself too.
    others = [exc for exc in group.exceptions if not is_cancellation(exc)]
    if body_error is not None and not isinstance(body_error, trio.Cancelled):
        # Trio may hand back a copy of a group the block raised (it splits Cancelled out of
        # groups), so recognise it by its leaves, which are never copied.
        if len(others) == 1 and non_cancelled_leaves(others[0]) == non_cancelled_leaves(body_error):
            return body_error
        return None
    leaves = [leaf for exc in others for leaf in non_cancelled_leaves(exc)]
    return leaves[0] if len(leaves) == 1 else None


# -- as_completed --------------------------------------------------------------------------


class AsCompleted:
    """The terminals of a fixed set of runs, each once, as they become visible in the store.

    Made by :meth:`Backend.as_completed`; use it as ``async with backend.as_completed(ids) as
    completed: async for rc in completed: ...``. It asks the store, never a broker: a run
    that ended before the call (a run ``clear_queue`` dropped ends before it returns) is
    found there as surely as one that ends later, so there is no subscriber to start first
    and nothing to race.

    Entering the block yields the runs already ended, in the order given, then the others as
    their terminals become visible; iteration ends after the last. It starts one waiting task
    per run not yet ended, inside the block (memory grows with the number of runs given,
    never with how many terminals the workspaces publish). Leaving the block early cancels
    those waits, never the runs.

    Cancelled while waiting for the next terminal, nothing is lost: a terminal not yet handed
    out stays with its waiting task and the next ``__anext__`` in the same block returns it.
    Never yields a run twice, never yields a run that was not given, and never cancels a run.
    """

    def __init__(self, store: RunStore, run_ids: Iterable[str]) -> None:
        if isinstance(run_ids, str):
            # A bare string would be taken as one run id per character.
            raise TypeError("run_ids must be an iterable of run ids, not a single str")
        unique: dict[str, None] = {}
        for run_id in run_ids:
            if not isinstance(run_id, str):
                raise TypeError(f"run ids must be str, got {type(run_id).__name__}")
            if store.state(run_id) is None:
                raise UnknownRun(run_id)
            unique[run_id] = None
        self._store = store
        self._run_ids = tuple(unique)
        self._left = len(self._run_ids)
        self._ended: deque[str] = deque()
        self._state = _NEW
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._receive: trio.MemoryReceiveChannel[RunComplete | Exception] | None = None

    @property
    def run_ids(self) -> tuple[str, ...]:
        """The runs to yield, each once, in the order given (repeats dropped)."""
        return self._run_ids

    @property
    def remaining(self) -> int:
        """How many of the runs have not been yielded yet."""
        return self._left

    async def __aenter__(self) -> AsCompleted:
        if self._state != _NEW:
            raise RuntimeError("an as_completed block can be entered only once")
        self._state = _OPEN
        manager = self._nursery_manager = trio.open_nursery()
        nursery = self._nursery = await manager.__aenter__()
        # Unbuffered: a terminal stays with its waiter until it is handed out, so nothing
        # piles up unread, and a cancelled receive loses nothing.
        send, self._receive = trio.open_memory_channel[RunComplete | Exception](0)
        async with send:
            for run_id in self._run_ids:
                if self._store.get(run_id) is not None:
                    self._ended.append(run_id)
                else:
                    nursery.start_soon(self._wait_one, run_id, send.clone())
        return self

    async def _wait_one(
        self, run_id: str, send: trio.MemorySendChannel[RunComplete | Exception]
    ) -> None:
        try:
            try:
                got: RunComplete | Exception = await self._store.wait(run_id)
            except Exception as exc:
                # UnknownRun (evicted past retention), a store failing: raised to the
                # consumer as itself, not as an ExceptionGroup out of the block.
                got = exc
            await send.send(got)
        finally:
            send.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery is not None
        assert self._nursery_manager is not None
        self._state = _CLOSED
        # Left before every run ended: the waits end with the block, never the runs.
        self._nursery.cancel_scope.cancel()
        try:
            return bool(await self._nursery_manager.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # The waiters never raise, so a group holds what the block raised: hand it back
            # as it was raised (as open_backend does).
            if _sole_error(group, exc) is exc:
                return False
            raise

    def __aiter__(self) -> AsCompleted:
        return self

    async def __anext__(self) -> RunComplete:
        """The next terminal; ``StopAsyncIteration`` once every run was yielded."""
        if self._state != _OPEN:
            raise RuntimeError(
                "use it inside its block: async with backend.as_completed(run_ids) as completed"
            )
        assert self._receive is not None
        if self._ended:
            await trio.lowlevel.checkpoint()
            run_id = self._ended[0]
            rc = self._store.get(run_id)
            if rc is None:
                # Evicted since the block was entered (retention): wait raises UnknownRun.
                rc = await self._store.wait(run_id)
            self._ended.popleft()
            self._left -= 1
            return rc
        try:
            got = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(got, Exception):
            raise got
        self._left -= 1
        return got


_NEW, _OPEN, _CLOSED = 0, 1, 2
