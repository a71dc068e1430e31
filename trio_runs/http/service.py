"""``RunService``: what the HTTP routes do, independent of the web framework.

It wraps a :class:`~trio_runs.Backend`: decoded requests go in, views or :class:`ApiError`
come out, and a refused request changes nothing. It also owns the server's graceful
shutdown: refuse new work, give every accepted run its terminal, then let clients collect
those terminals for a bounded drain period.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, TypeVar

import msgspec
import trio

from ..backend import Backend, CoordinatorFactory, Workspace
from ..coordinator import Coordinator, SupportsDeadlines, SupportsLaneQueries
from ..errors import (
    AgentNotInitialized,
    BackendClosed,
    DuplicateRun,
    EmptyPrompt,
    InvalidRunId,
    InvalidSessionId,
    NotSupported,
    SessionMissing,
    StoreError,
    UnknownRun,
    WorkspaceClosing,
    WorkspaceNotFound,
)
from ..events import AgentMessage, RunComplete
from ..ledger import RunInfo, RunQuery, SupportsRunListing
from .journal import DEFAULT_EVENT_WINDOW, DEFAULT_WINDOW_BYTES, Journal, open_journal
from .schema import (
    ApiError,
    CreateWorkspace,
    QueuedRun,
    RunList,
    RunListQuery,
    RunView,
    SessionView,
    SubmitBatch,
    SubmitMessage,
    WorkspaceView,
)
from .sse import EventStream, RunEventStream

__all__ = ["RunService", "open_run_service"]

logger = logging.getLogger("trio_runs.http")


def _shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the server is shutting down and accepts no new work")


class RunService:
    """The operations behind the ``/v1`` routes, on one backend.

    Every method either does what it says or raises :class:`ApiError` having done nothing.
    Workspace paths are resolved against ``workspace_root``; one outside it is refused.
    """

    def __init__(
        self,
        backend: Backend,
        coordinator_factory: CoordinatorFactory,
        *,
        workspace_root: str | os.PathLike[str] = ".",
        close_grace: float = 10.0,
        max_deadline: float | None = None,
        event_window: int = DEFAULT_EVENT_WINDOW,
        event_window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> None:
        self.backend = backend
        """The backend every workspace and run lives in."""
        self.workspace_root = os.path.realpath(os.fspath(workspace_root))
        """The directory workspace paths are resolved against (and confined to)."""
        self._factory = coordinator_factory
        self._close_grace = close_grace
        self._max_deadline = max_deadline
        self._default_deadlines: dict[str, float | None] = {}  # workspace id -> its default
        self._draining = False
        self._awaiting_delivery: set[str] = set()
        self._delivered_all = trio.Event()
        self._streams: set[EventStream | RunEventStream] = set()
        # Each open workspace's event journal (events streams replay from it), kept by a
        # task in the nursery open_run_service gives (None: a service that keeps none).
        self._event_window = event_window
        self._event_window_bytes = event_window_bytes
        self._journals: dict[str, Journal] = {}
        self._journals_starting: dict[str, trio.Event] = {}
        self._journal_host: trio.Nursery | None = None
        self._closed_journal_drops = 0
        self._closed_journal_overflows = 0

    @property
    def max_deadline(self) -> float | None:
        """The longest deadline a submission may ask for (``None``: no limit)."""
        return self._max_deadline

    @property
    def stream_connections(self) -> int:
        """Event-stream (SSE) connections currently open."""
        return len(self._streams)

    def stream_opened(self, stream: EventStream | RunEventStream) -> None:
        """Track an event stream while it is open (its ``on_open``), so that closing its
        workspace, or the server, ends it within its bound."""
        if self._draining:
            stream.end_reason = "shutdown"
        self._streams.add(stream)

    def stream_closed(self, stream: EventStream | RunEventStream) -> None:
        """Stop tracking an event stream (its ``on_close``)."""
        self._streams.discard(stream)

    def _end_streams(self, workspace_id: str | None, reason: str) -> None:
        # Called once the workspace(s) closed: their streams send what is queued and a last
        # ``end`` event within the write timeout, or their connection is closed.
        for stream in list(self._streams):
            if workspace_id is None or stream.workspace_id == workspace_id:
                stream.end(reason)

    @property
    def draining(self) -> bool:
        """Whether the server is shutting down (new workspaces and runs are refused)."""
        return self._draining

    # -- workspaces --------------------------------------------------------------------

    def _resolve(self, path: str) -> str:
        root = self.workspace_root
        try:
            resolved = os.path.realpath(os.path.join(root, os.path.expanduser(path)))
            inside = os.path.commonpath([root, resolved]) == root
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"unusable path {path!r}: {exc}") from None
        if not inside:
            raise ApiError(
                422,
                "path_outside_root",
                f"path {path!r} resolves outside the server's workspace root {root!r}",
            )
        return resolved

    def workspace(self, workspace_id: str) -> Workspace:
        """The open (or closing) workspace with this id; 404 ``workspace_not_found``."""
        try:
            return self.backend.get_workspace(workspace_id)
        except WorkspaceNotFound:
            raise ApiError(
                404, "workspace_not_found", f"no open workspace has id {workspace_id!r}"
            ) from None

    def workspaces(self) -> list[WorkspaceView]:
        """Every open (or closing) workspace."""
        return [_view(ws) for ws in self.backend.workspaces]

    async def create_workspace(self, request: CreateWorkspace) -> tuple[WorkspaceView, bool]:
        """The workspace for the request's path and whether it was created just now.

        The same resolved path gives the same workspace. 409 ``workspace_closing`` while the
        path's workspace closes; 503 ``shutting_down`` during shutdown.
        """
        if self._draining:
            raise _shutting_down()
        resolved = self._resolve(request.path)
        known = {ws.id for ws in self.backend.workspaces}
        try:
            workspace = await self.backend.create_workspace(resolved, self._factory)
        except WorkspaceClosing as exc:
            raise ApiError(409, "workspace_closing", f"{exc}; retry once it has closed") from None
        except BackendClosed:
            raise _shutting_down() from None
        if self._journal_host is not None:
            # Before the workspace is handed out, so that its first run's events are kept.
            await self.journal(workspace)
        return _view(workspace), workspace.id not in known

    async def close_workspace(self, workspace_id: str) -> WorkspaceView:
        """Close a workspace gracefully: returns once every run of it has its terminal.

        The close goes on even if the caller goes away (it is shielded, and bounded by the
        close grace period). 404 for an unknown (or already closed) workspace.
        """
        workspace = self.workspace(workspace_id)
        # WorkspaceNotFound: closed by a concurrent request meanwhile, the same end state.
        journal = self._journals.get(workspace.id)
        with trio.CancelScope(shield=True), contextlib.suppress(WorkspaceNotFound):
            await self.backend.close_workspace(workspace_id, grace=self._close_grace)
            if journal is not None:
                # Its last events numbered (at once: the brokers are shut down), it is gone.
                await journal.wait_ended()
                self._forget_journal(workspace.id, journal)
        self._end_streams(workspace.id, "shutdown" if self._draining else "workspace_closed")
        return WorkspaceView(workspace.id, workspace.path, closing=True)

    # -- runs --------------------------------------------------------------------------

    async def submit(self, workspace_id: str, request: SubmitMessage) -> str:
        """Accept a run in a workspace and return its run id once the store made it durable.

        Maps the backend's typed refusals: 404 ``workspace_not_found``; 409
        ``workspace_closing``, ``agent_not_initialized``, ``duplicate_run``; 422
        ``session_missing``, ``invalid_session_id``, ``empty_prompt``, ``invalid_run_id``,
        ``deadline_too_long`` (above the server's maximum); 503 ``shutting_down``.
        """
        if self._draining:
            raise _shutting_down()
        try:
            return await self.backend.submit(workspace_id, self._message(workspace_id, request))
        except _REFUSALS as exc:
            raise self._refusal(workspace_id, exc) from None

    async def submit_and_wait(
        self, workspace_id: str, request: SubmitMessage, seconds: float
    ) -> RunView:
        """:meth:`submit`, then :meth:`wait` up to ``seconds`` for the run's end: the run's
        view, with its terminal if it ended in time. Refused as :meth:`submit` is."""
        run_id = await self.submit(workspace_id, request)
        return await self.wait(run_id, seconds)

    async def submit_batch(self, workspace_id: str, batch: SubmitBatch) -> list[str | ApiError]:
        """Accept each message of ``batch`` as :meth:`submit` would, in order, and return once
        every accepted one is durable: per message, its run id or the :class:`ApiError` a
        single submission would have raised (having accepted nothing of that message).

        The whole batch is refused (nothing accepted) during shutdown (503) and for an
        unknown workspace (404). If the store cannot make the accepted runs durable it is a
        503 ``store_unavailable``: none is acknowledged, and a retry with the same run ids is
        safe (the ones that were accepted come back as ``duplicate_run``).
        """
        if self._draining:
            raise _shutting_down()
        self.workspace(workspace_id)
        messages: list[AgentMessage] = []
        for index, request in enumerate(batch.messages):
            # A deadline above the maximum breaks the published schema, as a message breaking
            # the identifier rule does: the whole batch is refused, nothing accepted.
            try:
                messages.append(self._message(workspace_id, request))
            except ApiError as exc:
                raise ApiError(exc.status, exc.code, f"messages[{index}]: {exc.message}") from None
        results: list[str | ApiError] = []
        for msg in messages:
            try:
                results.append(self.backend.send_message(workspace_id, msg))
            except _REFUSALS as exc:
                results.append(self._refusal(workspace_id, exc))
        if any(isinstance(result, str) for result in results):
            try:
                await self.backend.ledger.flush()
            except StoreError as exc:
                raise self._refusal(workspace_id, exc) from None
        return results

    def _message(self, workspace_id: str, request: SubmitMessage) -> AgentMessage:
        # The message, its deadline within the server's maximum: a deadline above it is
        # refused (422); none asked for means the workspace's default, capped by it.
        deadline, cap = request.deadline, self._max_deadline
        if cap is not None and deadline is not None and deadline > cap:
            raise ApiError(
                422,
                "deadline_too_long",
                f"deadline {deadline:g} s is above the server's maximum of {cap:g} s",
            )
        if cap is not None and deadline is None:
            default = self._default_deadline(workspace_id)
            deadline = cap if default is None else min(default, cap)
        return AgentMessage(
            request.session_id,
            request.prompt,
            request.run_id or "",
            (),
            deadline,
            labels=request.labels or {},
        )

    def _default_deadline(self, workspace_id: str) -> float | None:
        # Read once per workspace: a runtime protocol check costs microseconds, too much for
        # every message of a batch (a coordinator's default deadline is fixed when it is made).
        try:
            return self._default_deadlines[workspace_id]
        except KeyError:
            pass
        coordinator = self.workspace(workspace_id).coordinator
        default = None
        if isinstance(coordinator, SupportsDeadlines):
            default = coordinator.default_deadline
        if len(self._default_deadlines) >= _DEADLINE_CACHE:
            self._default_deadlines.clear()
        self._default_deadlines[workspace_id] = default
        return default

    def _refusal(self, workspace_id: str, exc: Exception) -> ApiError:
        # The backend's typed refusal of a submission as its HTTP status and code.
        if isinstance(exc, WorkspaceNotFound):
            return self._missing_workspace(workspace_id)
        if isinstance(exc, StoreError):
            # Refused before anything was recorded (accept), or not yet durable (flush): either
            # way not acknowledged; a retry with the same run id is safe.
            return ApiError(503, "store_unavailable", str(exc))
        for kind, status, code in _REFUSAL_CODES:
            if isinstance(exc, kind):
                return ApiError(status, code, str(exc))
        raise AssertionError(f"not a refusal: {exc!r}")  # pragma: no cover

    def _missing_workspace(self, workspace_id: str) -> ApiError:
        return ApiError(404, "workspace_not_found", f"no open workspace has id {workspace_id!r}")

    def run(self, run_id: str) -> RunView:
        """The run's state (and terminal once it ended); 404 ``run_not_found``."""
        ledger = self.backend.ledger
        terminal = ledger.get(run_id)
        if terminal is not None:
            self._delivered(run_id)
            return RunView.ended(terminal)
        session_id = ledger.session_of(run_id)
        if session_id is None or ledger.state(run_id) not in ("pending", "ending"):
            raise ApiError(404, "run_not_found", f"no run with id {run_id!r} is known")
        return RunView(run_id, session_id, self._live_state(run_id, session_id))

    async def view(self, run_id: str) -> RunView:
        """:meth:`run`, after waiting for the store to commit a terminal it already decided,
        with the metadata (accepted and started times, attempt, labels) the store keeps.

        A run whose terminal is decided but not yet durable is never shown ended (nothing is
        visible before it is on disk), nor as still running: the answer waits for the commit,
        which is milliseconds away.
        """
        if self.backend.ledger.state(run_id) == "ending":
            await self.backend.ledger.flush()
        return await self._detailed(await self._located(run_id))

    async def _located(self, run_id: str) -> RunView:
        # `run`, and for a run this process never heard of, what its store holds: a
        # cluster's store knows every node's runs, so a node started later still answers.
        try:
            return self.run(run_id)
        except ApiError as exc:
            store = self.backend.ledger
            if exc.status != 404 or not isinstance(store, SupportsRunListing):
                raise
            info = await self._store_call(store.run_info, run_id)
            if info is None:
                raise
            if info.terminal is not None:
                self._delivered(run_id)
            return self._info_view(info)

    async def _detailed(self, view: RunView) -> RunView:
        # An ended run's terminal carries its metadata; a running one's is in the store,
        # unless the view was read from there already (a run this process never heard of).
        store = self.backend.ledger
        if (
            view.terminal is not None
            or view.accepted_at is not None
            or not isinstance(store, SupportsRunListing)
        ):
            return view
        info = await self._store_call(store.run_info, view.run_id)
        if info is None:
            return view
        # The state stays the one read with the view: the run may have moved on during the
        # read (ended, left its lane), and a state derived now could say it never started.
        return msgspec.structs.replace(
            view,
            accepted_at=info.accepted_at,
            started_at=info.started_at,
            attempt=info.attempt,
            labels=dict(info.labels),
        )

    async def list_runs(self, query: RunListQuery) -> RunList:
        """One page of the runs the store knows, newest accepted first, filtered.

        ``workspace`` names an open workspace (404 ``workspace_not_found`` otherwise);
        ``path`` a workspace path, open or not (so runs of a closed workspace, or of one
        before a restart, can be found). 422 ``invalid_cursor`` for a cursor the store did
        not make; 501 ``not_supported`` when the store cannot list; 503 ``store_unavailable``
        when it cannot be read.
        """
        store = self.backend.ledger
        if not isinstance(store, SupportsRunListing):
            raise ApiError(
                501,
                "not_supported",
                f"this server's run store ({type(store).__name__}) cannot list runs",
            )
        workspace_path: str | None = None
        if query.workspace is not None:
            workspace_path = self.workspace(query.workspace).path
        elif query.path is not None:
            workspace_path = self._resolve(query.path)
        store_query = RunQuery(
            workspace_path=workspace_path,
            session_id=query.session_id,
            state=None if query.state is None else _STORE_STATES[query.state],
            label=query.label,
            cursor=query.cursor,
            limit=query.limit,
        )
        try:
            page = await self._store_call(store.list_runs, store_query)
        except ValueError as exc:
            raise ApiError(422, "invalid_cursor", str(exc)) from None
        return RunList([self._info_view(info) for info in page.runs], page.next_cursor)

    async def _store_call(self, read: Callable[[_A], Awaitable[_R]], argument: _A) -> _R:
        try:
            return await read(argument)
        except StoreError as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from None

    def _info_view(self, info: RunInfo) -> RunView:
        if info.terminal is not None:
            return RunView.ended(info.terminal)
        state = self._live_state(info.run_id, info.session_id)
        if state == "pending" and info.started_at is not None:
            # Started, and out of its lane by now: its terminal is on its way to the store.
            state = "active"
        return RunView(
            info.run_id,
            info.session_id,
            state,
            accepted_at=info.accepted_at,
            started_at=info.started_at,
            attempt=info.attempt,
            labels=dict(info.labels),
        )

    async def cancel_run(self, run_id: str) -> RunView:
        """Cancel this one run and return its view; the other runs of its session go on.

        A queued run ends cancelled at once; an active one as soon as its agent reaches a
        checkpoint (until then the view still says ``active``: ``wait`` for the terminal). A
        run that already ended is left as it is and its terminal reported, so cancelling
        twice is harmless. 404 ``run_not_found`` for an unknown id, as :meth:`run`. Allowed
        during shutdown (it starts no work); a terminal it reports counts as collected.
        Waits only for the store to make what it decided durable.
        """
        await self._located(run_id)
        try:
            self.backend.cancel_run(run_id)
        except NotSupported as exc:
            raise ApiError(501, "not_supported", str(exc)) from None
        # A queued run's cancelled terminal is decided now: the answer shows it once durable.
        return await self.view(run_id)

    def _live_state(self, run_id: str, session_id: str) -> str:
        # "pending" where the coordinator cannot tell (it lacks SupportsLaneQueries).
        workspace = self.backend.workspace_of(run_id)
        coordinator = workspace.coordinator if workspace is not None else None
        if not isinstance(coordinator, SupportsLaneQueries):
            return "pending"
        if coordinator.active_run_id(session_id) == run_id:
            return "active"
        if run_id in coordinator.queued_run_ids(session_id):
            return "queued"
        return "pending"

    async def wait(self, run_id: str, seconds: float) -> RunView:
        """The run once it ended, or its current state after ``seconds``.

        Answers at once for a run that already ended; 404 ``run_not_found`` for an unknown id.
        """
        view = await self._located(run_id)
        if view.terminal is None:
            # UnknownRun: evicted meanwhile; the lookup below says 404.
            with trio.move_on_after(seconds), contextlib.suppress(UnknownRun):
                await self.backend.wait_run(run_id)
            view = await self._located(run_id)
        return await self._detailed(view)

    def _delivered(self, run_id: str) -> None:
        if run_id in self._awaiting_delivery:
            self._awaiting_delivery.discard(run_id)
            if not self._awaiting_delivery:
                self._delivered_all.set()

    # -- sessions ----------------------------------------------------------------------

    def session(self, workspace_id: str, session_id: str) -> SessionView:
        """The session's lane in the workspace: busy, active run, queue in start order."""
        workspace = self.workspace(workspace_id)
        coordinator = workspace.coordinator
        if coordinator is None:
            return SessionView(workspace.id, session_id, False, None, ())
        prompts = coordinator.queued_prompts_list(session_id)
        # Without SupportsLaneQueries the queue is listed by prompt alone (run ids "").
        run_ids: list[str] = [""] * len(prompts)
        active: str | None = None
        if isinstance(coordinator, SupportsLaneQueries):
            active = coordinator.active_run_id(session_id)
            queued_ids = coordinator.queued_run_ids(session_id)
            if len(queued_ids) == len(prompts):
                run_ids = queued_ids
        return SessionView(
            workspace.id,
            session_id,
            coordinator.is_session_busy(session_id),
            active,
            tuple(QueuedRun(r, p) for r, p in zip(run_ids, prompts, strict=True)),
        )

    async def cancel_session(self, workspace_id: str, session_id: str) -> SessionView:
        """Cancel the session's active run and drop its queue (each ends cancelled).

        Answers once the store holds what the cancel decided, so a run accepted after the
        answer (on any node of a cluster) is never caught by it.
        """
        self._coordinator(workspace_id).cancel(session_id)
        await self.backend.ledger.flush()
        return self.session(workspace_id, session_id)

    async def clear_queue(self, workspace_id: str, session_id: str) -> SessionView:
        """Drop the session's queued runs (each ends cancelled); its active run goes on.

        Answers once the store holds what it decided, as :meth:`cancel_session`.
        """
        self._coordinator(workspace_id).clear_queue(session_id)
        await self.backend.ledger.flush()
        return self.session(workspace_id, session_id)

    def _coordinator(self, workspace_id: str) -> Coordinator:
        workspace = self.workspace(workspace_id)
        if workspace.coordinator is None:
            raise ApiError(409, "agent_not_initialized", f"workspace {workspace_id!r} has no agent")
        return workspace.coordinator

    # -- event journals and streams ---------------------------------------------------

    async def journal(self, workspace: Workspace) -> Journal:
        """The workspace's event journal, started (in the service's nursery) if need be.

        Raises ``RuntimeError`` for a service not opened with :func:`open_run_service` (it
        keeps no journals). The journal ends when its workspace closes.
        """
        while True:
            journal = self._journals.get(workspace.id)
            if journal is not None:
                return journal
            starting = self._journals_starting.get(workspace.id)
            if starting is None:
                break
            await starting.wait()
        host = self._journal_host
        if host is None:
            raise RuntimeError("this RunService keeps no event journals: open_run_service it")
        starting = self._journals_starting[workspace.id] = trio.Event()
        try:
            return await host.start(self._keep_journal, workspace)  # type: ignore[no-any-return]
        finally:
            del self._journals_starting[workspace.id]
            starting.set()

    async def _keep_journal(
        self, workspace: Workspace, *, task_status: trio.TaskStatus[Journal]
    ) -> None:
        journal: Journal | None = None
        try:
            async with open_journal(
                workspace, window=self._event_window, window_bytes=self._event_window_bytes
            ) as journal:
                self._journals[workspace.id] = journal
                task_status.started(journal)
                # Leaving the block waits for the workspace's brokers to shut down.
        finally:
            if journal is not None:
                self._forget_journal(workspace.id, journal)

    def _forget_journal(self, workspace_id: str, journal: Journal) -> None:
        # Idempotent: once its workspace closed, a journal is neither listed nor counted.
        if self._journals.get(workspace_id) is journal:
            del self._journals[workspace_id]
            self._closed_journal_drops += journal.live.drop_count
            self._closed_journal_overflows += journal.live.overflow_count

    def journal_statistics(self) -> tuple[int, int, int, int]:
        """For ``/metrics``: ``(own, readers, drops, overflows)``: the broker subscriptions
        the journals themselves hold (3 per open workspace), the event streams reading the
        journals, and the lossy events dropped and readers disconnected, ever, by them."""
        journals = list(self._journals.values())
        return (
            3 * len(journals),
            sum(j.live.subscriber_count for j in journals),
            self._closed_journal_drops + sum(j.live.drop_count for j in journals),
            self._closed_journal_overflows + sum(j.live.overflow_count for j in journals),
        )

    async def events(
        self,
        workspace_id: str,
        *,
        run_id: str | None = None,
        session_id: str | None = None,
        last_event_id: int | None = None,
        heartbeat: float,
    ) -> EventStream:
        """The workspace's event stream, resuming after ``last_event_id`` if given.

        404 ``workspace_not_found``; 501 ``not_supported`` for a service that keeps no
        journals. An id the workspace never sent is answered with a gap (see the journal).
        """
        journal = await self._journal_or_refuse(self.workspace(workspace_id))
        return EventStream(
            journal,
            heartbeat=heartbeat,
            run_id=run_id,
            session_id=session_id,
            last_event_id=last_event_id,
            on_open=self.stream_opened,
            on_close=self.stream_closed,
        )

    async def run_events(
        self, run_id: str, *, last_event_id: int | None = None, heartbeat: float
    ) -> RunEventStream:
        """One run's events: its progress still in its workspace's journal, then live, then
        its terminal (from the store if need be), then ``end``; late or live.

        404 ``run_not_found``.
        """
        await self._located(run_id)
        journal: Journal | None = None
        workspace = self.backend.workspace_of(run_id)
        if workspace is not None and self._journal_host is not None:
            journal = await self.journal(workspace)
        else:
            # Its dispatch is over: its events may still be in its workspace's window.
            journal = next((j for j in self._journals.values() if j.holds_run(run_id)), None)
        return RunEventStream(
            run_id,
            journal,
            ended=self._ended,
            wait_ended=self._wait_ended,
            heartbeat=heartbeat,
            last_event_id=last_event_id,
            on_open=self.stream_opened,
            on_close=self.stream_closed,
        )

    async def _journal_or_refuse(self, workspace: Workspace) -> Journal:
        try:
            return await self.journal(workspace)
        except RuntimeError:
            raise ApiError(501, "not_supported", "this server keeps no event journals") from None

    def _ended(self, run_id: str) -> RunComplete | None:
        # The visible terminal, counted as collected (as GET /v1/runs/{id} counts it).
        terminal = self.backend.ledger.get(run_id)
        if terminal is not None:
            self._delivered(run_id)
        return terminal

    async def _wait_ended(self, run_id: str) -> RunComplete:
        # Waits for the run's visible terminal: every accepted run gets one.
        ledger = self.backend.ledger
        if ledger.state(run_id) == "ending":
            await ledger.flush()
        terminal = self._ended(run_id)
        if terminal is not None:
            return terminal
        await self.backend.wait_run(run_id)
        if ledger.state(run_id) == "ending":
            await ledger.flush()
        terminal = self._ended(run_id)
        assert terminal is not None
        return terminal

    # -- shutdown ----------------------------------------------------------------------

    async def shutdown(self, drain: float) -> None:
        """Refuse new work, end every run with its terminal, then let clients collect them.

        Returns once every accepted run has its terminal and either every run that was
        pending when shutdown began has had its terminal fetched (by ``GET /v1/runs/{id}``
        or ``/wait``), or ``drain`` seconds have passed. Event streams end with their
        workspaces (reason ``shutdown``), within the write timeout.
        """
        self._draining = True
        for stream in self._streams:
            stream.end_reason = "shutdown"
        self._awaiting_delivery = set(self.backend.ledger.pending_run_ids())
        if not self._awaiting_delivery:
            self._delivered_all.set()
        logger.info(
            "shutting down: closing %d workspace(s), cancelling %d run(s)",
            len(self.backend.workspaces),
            len(self._awaiting_delivery),
        )
        await self.backend.aclose(grace=self._close_grace)
        self._end_streams(None, "shutdown")
        with trio.move_on_after(drain):
            await self._delivered_all.wait()
        if self._awaiting_delivery:
            logger.info(
                "shutdown: %d terminal(s) were not collected within %.1fs",
                len(self._awaiting_delivery),
                drain,
            )


_REFUSAL_CODES: tuple[tuple[type[Exception], int, str], ...] = (
    (WorkspaceClosing, 409, "workspace_closing"),
    (AgentNotInitialized, 409, "agent_not_initialized"),
    (DuplicateRun, 409, "duplicate_run"),
    (SessionMissing, 422, "session_missing"),
    (InvalidSessionId, 422, "invalid_session_id"),
    (EmptyPrompt, 422, "empty_prompt"),
    (InvalidRunId, 422, "invalid_run_id"),
)
_REFUSALS: tuple[type[Exception], ...] = (
    WorkspaceNotFound,
    StoreError,
    *(kind for kind, _, _ in _REFUSAL_CODES),
)


_DEADLINE_CACHE: Final = 10_000
"""Workspaces whose default deadline the service remembers, at most (then it reads again)."""

_STORE_STATES: dict[str, Literal["pending", "terminal"]] = {
    "running": "pending",
    "ended": "terminal",
}

_A = TypeVar("_A")
_R = TypeVar("_R")


@asynccontextmanager
async def open_run_service(
    backend: Backend,
    coordinator_factory: CoordinatorFactory,
    **options: Any,
) -> AsyncIterator[RunService]:
    """A :class:`RunService` (``options`` as its constructor's) that keeps each workspace's
    event journal, in a nursery that lives in this block.

    Each journal ends when its workspace closes; leaving the block stops the ones left (their
    streams end). No task outlives the block.
    """
    service = RunService(backend, coordinator_factory, **options)
    async with trio.open_nursery() as nursery:
        service._journal_host = nursery
        try:
            yield service
        finally:
            service._journal_host = None
            nursery.cancel_scope.cancel()


def _view(workspace: Workspace) -> WorkspaceView:
    return WorkspaceView(workspace.id, workspace.path, workspace.closing)
