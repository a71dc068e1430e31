"""The model test's state machine, against a cluster of two nodes on a real ``redis-server``.

tests/test_model.py drives one in-process ``Backend`` against :class:`~test_model.Model`, the
plain-Python reference of what DESIGN.md promises. Here the same operations and the same model
drive a Redis-backed cluster instead: two nodes in this process, each its own
``RedisStore`` (its own connections, lease and stream follower), ``Backend`` and
``ClusterNode``, both serving (claiming runs) and both with the workspace open at the same
path. What one node decides the other sees only through Redis. Every run is submitted to one
node (drawn), its waiters wait on the other, and cancel, clear-queue and cancel-one-run come
from either node (drawn): the model does not care which, and neither may the cluster.

What changes, because Redis needs the real clock
-------------------------------------------------
- *Quiet points are waited for, not computed.* On the autojump clock ``wait_all_tasks_blocked``
  is a quiet point; across Redis there is none to ask for. After an operation the model
  settles first (its prediction), then the program waits, bounded in real seconds
  (:data:`SETTLE_BOUND`), until the cluster shows it: every predicted terminal answered by
  ``wait_run`` on every node, every predicted active run's agent started, and then every
  check passing (what the nodes learn from Redis streams arrives a moment later). A cluster
  that never gets there fails with the check's own message. Nothing sleeps to let things
  settle; the only loop polls the checks themselves, within the bound.
- *Every operation but a send settles before it runs*, so cancels, clears and releases land
  at quiet points. Sends may stay unsettled (``settle=False``): a burst of them is accepted
  (``submit``: durable in Redis, in program order, whichever node took each) while the
  nodes are already claiming, and the model's ``fresh`` state covers them.
- *No virtual time*: no ``SLEEP`` agents, no ``Advance``, no terminal times checked; a waiter
  must return within the settle bound of its run's terminal.
- *A failure is not shrunk* by default (each program opens two nodes, so shrinking runs into
  Hypothesis's five-minute limit): its message names the step, and the program as drawn is
  at most :data:`STEPS` steps. ``TRIO_RUNS_REDIS_MODEL_SHRINK=1`` shrinks.
- *Closing is per node*: ``Close`` on a node closes the workspace *there* and opens it again;
  the model cancels the active runs that node runs (which node claimed a run is observed,
  not predicted) and nothing else: the runs it accepted go on, queued in their lanes or
  running elsewhere. Its recorders then hold what ended before the close (each once), and
  its new progress reader is checked for over-delivery only (events in flight at the close
  went nowhere).
- *Not in this variant*: ``SendStale``, ``cancel_all`` (a closing node's own business, see
  ``Close``) and the notification checks (per node, for the runs that node ran), which stay
  in the in-process machine.
- *New here*: :class:`CancelRun`, one run cancelled from either node (queued: it ends at once;
  active: its node cancels it; ended: refused).

What is checked at every quiet point, on both nodes
----------------------------------------------------
- every accepted run is pending on both nodes (``state``) exactly while the model says so,
  then has exactly one terminal, the predicted one, shown on both nodes; no node ever
  attempted a second terminal (``duplicates_suppressed``), each node counts exactly the runs
  it accepted, and at the end Redis's cluster-wide counters agree (accepted, outcomes, no
  duplicate, nothing fenced or abandoned);
- each node's terminal recorders got each terminal once (slow ones too, at a ``Drain``);
- lossy progress is never silently lost: on each node, the events read (at every check, from
  a small buffer) plus those dropped are every event emitted, whichever node ran the flood;
- every waiter, on either node, returned exactly the predicted terminal, or is still waiting
  on a pending run; a waiter on an unknown id got ``UnknownRun``;
- per session, cluster-wide: the agent started in acceptance order minus the dropped runs,
  never two at once (one agent object serves both nodes, so it sees the whole cluster); the
  agent's cancelled and finished runs are the predicted ones;
- ``active_run_id`` on both nodes is the model's (the cluster's); each node's
  ``queued_run_ids``, ``queued_prompts_list`` and ``queued_prompts`` hold the queued runs *it*
  accepted, in order; ``is_session_busy`` holds on a node that accepted one of the session's
  pending runs or runs its active one, and ``is_busy`` when any session is busy there; every
  node's ``wait_run`` returns each terminal within the bound;
- the library logs nothing at WARNING or above but the one warning per stubborn run that
  raised while being cancelled.

Bugs it found
-------------
Each is a plain test at the bottom, the machine's own program that showed it: a waiter on the
node that then claimed the run never returned, and a failed ``prepare`` reached the claiming
node's subscribers twice (both fixed in ec6321c); a cancel or clear ended a run another node
accepted after it returned (fixed: a session's cancellation carries a fence, the time of the
call, and spares the runs other nodes accepted after it).

The profile: few examples (:data:`MAX_EXAMPLES`, ``TRIO_RUNS_REDIS_MODEL_EXAMPLES`` to
change it) of up to :data:`STEPS` steps, each on a namespace of its own.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import attrs
import trio
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from test_model import (
    CANCELLING,
    COMPLETE,
    COMPLETIONS_BUFFER,
    EVENTS_BUFFER,
    FLOOD,
    GATED,
    INSTANT,
    MAX_BACKLOG,
    PREPARE_FAIL,
    RAISE,
    SESSIONS,
    SLEEPING,
    STUBBORN,
    Behaviour,
    Cancel,
    CheckFailed,
    ClearQueue,
    Close,
    Drain,
    LogCapture,
    Model,
    ModelRun,
    Op,
    Recorder,
    Release,
    Send,
    SendDuplicate,
    Subscribe,
    Wait,
    Waiter,
    WaitUnknown,
    cleanup_error_of,
    error_of,
    logger,
    prompt_of,
    result_of,
    session_ids,
)

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    DuplicateRun,
    RunCall,
    RunContext,
    RunProgress,
    SessionCoordinator,
    Subscription,
    UnknownRun,
    Workspace,
    open_backend,
)
from trio_runs.coordinator import WorkspaceResources
from trio_runs.redis import ClusterCoordinator, ClusterNode, RedisStore, open_redis_store
from trio_runs.testing import (
    ScriptedAgent,
    Step,
    TerminalRecorder,
    emit,
    raise_,
    return_,
    wait_for,
)

# -- knobs ---------------------------------------------------------------------------------

NODES = 2
LEASE_TTL = 5.0
"""Seconds: long, so a node on a busy machine is never taken for dead (no fault injection
here; tests/test_redis_checker.py kills nodes)."""

SETTLE_BOUND = 10.0
"""Real seconds the cluster has to show what the model predicts after an operation."""

PROGRAM_BOUND = 120.0
"""Real seconds for a whole program, opening and closing the nodes included."""

POLL = 0.002
"""Seconds between two looks at state the nodes learn from Redis streams (no event says
when it arrived); only ever inside a bounded wait."""

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SHRINK = os.environ.get("TRIO_RUNS_REDIS_MODEL_SHRINK", "") not in {"", "0"}
MAX_EXAMPLES = int(os.environ.get("TRIO_RUNS_REDIS_MODEL_EXAMPLES", "20"))
STEPS = 20

AWAIT_LANE_OPS = False
"""Whether the machine waits for the issuing node's writes (``store.flush()``) after each
``cancel`` / ``clear_queue`` / ``cancel_run``: not needed since a cancellation is fenced by
the time of its call (it was, before: a run another node accepted meanwhile was caught)."""

WORKSPACE_PATH = "/trio-runs-model-redis/0"
GENERATION = 0  # one workspace for the whole program (no Close here)


# -- operations added here -------------------------------------------------------------------


@attrs.frozen
class At:
    """Apply ``op`` on node ``node`` (for a ``Send``, its waiter waits on the other node)."""

    node: int
    op: Op | CancelRun


@attrs.frozen
class CancelRun:
    """``backend.cancel_run`` of accepted run number ``run`` (modulo)."""

    run: int


class ClusterModel(Model):
    """The reference model, with cancel-one-run."""

    def cancel_run(self, run: ModelRun) -> bool:
        """Whether the run was pending. Active: cancelled at the next settle; else now."""
        lane = self.lane(run.key)
        if run not in lane:
            return False
        if run.state in (GATED, SLEEPING, CANCELLING):
            run.state = CANCELLING
            return True
        lane.remove(run)
        self._end(run, cancelled=True)
        self._set_lane(run.key, lane)
        return True


# -- the nodes -------------------------------------------------------------------------------


@attrs.define(eq=False)
class LiveNode:
    index: int
    store: RedisStore
    backend: Backend
    cluster: ClusterNode
    workspace: Workspace
    factory: Callable[[WorkspaceResources], ClusterCoordinator | None]
    generation: int = 0  # how many times its workspace was closed (and opened again)
    events: Subscription[RunProgress] | None = None  # read at every check
    events_read: int = 0
    events_exact: bool = True  # False once reopened: events in flight at the close are lost

    @property
    def here(self) -> tuple[int, int]:
        """This node's current workspace: (node, generation)."""
        return (self.index, self.generation)

    @property
    def coordinator(self) -> ClusterCoordinator:
        coordinator = self.workspace.coordinator
        assert isinstance(coordinator, ClusterCoordinator)
        return coordinator


@attrs.define(eq=False)
class NodeRecorder:
    entry: Recorder
    node: int
    closed_at: int | None = None  # model.tseq when its workspace was closed
    optional: set[str] = attrs.Factory(set)  # ended by that close: may come after it shut


class ClusterProgram:
    """Runs a list of operations against two Redis-backed nodes and the model."""

    def __init__(
        self,
        ops: Iterable[At | Op],
        url: str,
        namespace: str,
        *,
        await_lane_ops: bool = AWAIT_LANE_OPS,
    ) -> None:
        self.ops = list(ops)
        self.await_lane_ops = await_lane_ops
        self.url = url
        self.namespace = namespace
        self.model = ClusterModel()
        self.log = LogCapture()
        self.nodes: list[LiveNode] = []
        self.waiters: list[Waiter] = []
        self.waiter_nodes: list[int] = []
        self.recorders: list[NodeRecorder] = []
        self.gates: dict[int, trio.Event] = {}
        self.send_index: dict[int, int] = {}
        self.accepted_on: dict[str, int] = {}
        self.accepted_in: dict[str, tuple[int, int]] = {}  # run id -> (node, generation)
        self.ran_in: dict[str, tuple[int, int]] = {}  # run id -> (node, generation)
        self.answered: set[tuple[int, str]] = set()  # (node, run id): wait_run returned
        self.waits = 0  # the settle's event-driven waits still waiting
        self.quiet = True
        self.step = -1
        self.failure: Exception | None = None
        self._prepare_fails: set[str] = set()  # prompts of PREPARE_FAIL runs
        self._stubborn: set[str] = set()  # prompts of STUBBORN runs
        self._agent = self._build_agent()
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None

    # -- entry point ------------------------------------------------------------------

    def run(self) -> None:
        logger.addHandler(self.log)
        propagate, logger.propagate = logger.propagate, False
        try:
            trio.run(self._main)
        finally:
            logger.propagate = propagate
            logger.removeHandler(self.log)
        failure = self.failure
        if failure is not None:
            if isinstance(failure, CheckFailed):
                failure.__context__ = failure.__cause__ = None
            raise failure

    async def _main(self) -> None:
        with trio.fail_after(PROGRAM_BOUND):
            async with AsyncExitStack() as stack:
                self._stack = stack
                for index in range(NODES):
                    self.nodes.append(await stack.enter_async_context(self._node(index)))
                for node in self.nodes:
                    await self._watch(node)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        for step, op in enumerate(self.ops):
                            self.step = step
                            await self._apply(op)
                        self.step = len(self.ops)
                        await self._the_end()
                    except Exception as exc:
                        self.failure = exc
                    nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def _node(self, index: int) -> AsyncIterator[LiveNode]:
        async with (
            open_redis_store(
                self.url,
                namespace=self.namespace,
                lease_ttl=LEASE_TTL,
                unavailable_after=SETTLE_BOUND,
                call_timeout=SETTLE_BOUND,
            ) as store,
            open_backend(store) as backend,
            trio.open_nursery() as nursery,
        ):
            cluster = ClusterNode(
                store,
                SessionCoordinator.factory(self._agent_on(index), prepare=self._prepare),
                capacity=len(SESSIONS),
            )

            def factory(workspace: WorkspaceResources) -> ClusterCoordinator | None:
                # Small buffers, so slow recorders go far past them and floods overflow.
                assert isinstance(workspace, Workspace)
                workspace.run_completions = Broker(COMPLETIONS_BUFFER, MAX_BACKLOG)
                workspace.events = Broker(EVENTS_BUFFER, MAX_BACKLOG)
                return cluster.coordinator_factory(workspace)  # type: ignore[return-value]

            # The workspace first, with the small buffer: claims then find it open.
            workspace = await backend.create_workspace(WORKSPACE_PATH, factory)
            await nursery.start(cluster.serve, backend)
            yield LiveNode(index, store, backend, cluster, workspace, factory)
            # Stop claiming before the backend closes (ClusterNode.serve says why).
            nursery.cancel_scope.cancel()

    def _build_agent(self) -> ScriptedAgent:
        scripts: dict[str, list[Step]] = {}
        for position, op in enumerate(self.ops):
            send = op.op if isinstance(op, At) else op
            if not isinstance(send, Send):
                continue
            index = self.send_index[position] = len(self.send_index)
            gate = self.gates[index] = trio.Event()
            kind, amount = send.behaviour.kind, send.behaviour.amount
            prompt, value = prompt_of(index), return_(result_of(index))
            if kind == INSTANT:
                scripts[prompt] = [value]
            elif kind == RAISE:
                scripts[prompt] = [wait_for(gate), raise_(RuntimeError(error_of(index)))]
            elif kind == FLOOD:
                scripts[prompt] = [*(emit(i) for i in range(amount)), wait_for(gate), value]
            elif kind == PREPARE_FAIL:
                self._prepare_fails.add(prompt)
            else:  # COMPLETE and STUBBORN
                scripts[prompt] = [wait_for(gate), value]
                if kind == STUBBORN:
                    self._stubborn.add(prompt)
        return ScriptedAgent(scripts=scripts)

    def _agent_on(self, node: int):  # type: ignore[no-untyped-def]
        # One ScriptedAgent for both nodes, so it sees the whole cluster (two runs of a
        # session at once, on any nodes, is max_concurrent_per_session 2); and who ran what.
        async def agent(call: RunCall, ctx: RunContext) -> object:
            self.ran_in[call.run_id] = self.nodes[node].here
            try:
                return await self._agent(call, ctx)
            except trio.Cancelled:
                if call.prompt in self._stubborn:
                    raise RuntimeError(cleanup_error_of(int(call.prompt.split()[-1]))) from None
                raise

        return agent

    async def _prepare(self, call: RunCall) -> None:
        # By prompt (known before the send), not by run id: the claiming node may prepare
        # the run before the submitting node has even been told its id.
        await trio.lowlevel.checkpoint()
        if call.prompt in self._prepare_fails:
            raise RuntimeError(f"prepare failed for {call.run_id}")

    async def _watch(self, node: LiveNode) -> None:
        # Every workspace has a live recorder and a progress reader from the start.
        assert self._stack is not None
        await self._subscribe(node.index, slow=False)
        node.events = await self._stack.enter_async_context(node.workspace.events.subscribe())
        node.events_read = 0

    async def _subscribe(self, node: int, *, slow: bool) -> None:
        assert self._stack is not None
        recorder = await self._stack.enter_async_context(
            TerminalRecorder(self.nodes[node].workspace)
        )
        self.recorders.append(
            NodeRecorder(Recorder(recorder, GENERATION, self.model.tseq, slow), node)
        )

    # -- operations -------------------------------------------------------------------

    async def _apply(self, at: At | Op) -> None:
        node, op = (at.node, at.op) if isinstance(at, At) else (0, at)
        live, model = self.nodes[node], self.model
        if not isinstance(op, Send):
            await self._settle()  # everything but a send lands at a quiet point
        if isinstance(op, Send):
            await self._send(node, op)
            self.quiet = False
            if op.settle:
                await self._settle()
        elif isinstance(op, Cancel):
            live.coordinator.cancel(SESSIONS[op.session])
            model.cancel((GENERATION, SESSIONS[op.session]))
            await self._lane_op_done(live)
        elif isinstance(op, ClearQueue):
            live.coordinator.clear_queue(SESSIONS[op.session])
            model.clear_queue((GENERATION, SESSIONS[op.session]))
            await self._lane_op_done(live)
        elif isinstance(op, CancelRun):
            if model.runs:
                run = model.runs[op.run % len(model.runs)]
                got = live.backend.cancel_run(run.run_id)
                expected = model.cancel_run(run)
                self.expect(
                    got == expected, f"cancel_run of run {run.index} said {got}, not {expected}"
                )
                await self._lane_op_done(live)
        elif isinstance(op, Release):
            for shift in range(len(SESSIONS)):
                key = (GENERATION, SESSIONS[(op.session + shift) % len(SESSIONS)])
                if model.release(key):
                    self.gates[model.lane(key)[0].index].set()
                    break
            await self._settle(force=True)
        elif isinstance(op, Wait | WaitUnknown):
            if isinstance(op, Wait) and model.runs:
                target = model.runs[op.run % len(model.runs)]
                self._start_waiter(node, target.run_id, target)
            else:
                self._start_waiter(node, f"never-sent-{self.step}", None)
            await self._settle(force=True)
        elif isinstance(op, Close):
            await self._close(live)
        elif isinstance(op, Subscribe):
            await self._subscribe(node, slow=op.slow)
        elif isinstance(op, Drain):
            self._check_recorders(include_slow=True)
        elif isinstance(op, SendDuplicate):
            explicit = [run for run in model.runs if run.run_id.startswith("run-")]
            if explicit:
                run = explicit[op.run % len(explicit)]
                msg = AgentMessage("s0", "again", run.run_id)
                try:
                    await live.backend.submit(live.workspace.id, msg)
                except DuplicateRun:
                    pass
                else:
                    self.expect(False, f"node {node} accepted {run.run_id!r} a second time")
        else:  # pragma: no cover
            raise TypeError(op)
        if self.quiet:
            self.check()

    async def _send(self, node: int, op: Send) -> None:
        index = self.send_index[self.step]
        live = self.nodes[node]
        explicit = f"run-{index}" if op.explicit_id else ""
        session = SESSIONS[op.session]
        # submit, not send_message: the acceptance is in Redis before the next operation, so
        # the lanes hold the runs in program order whichever node accepted each.
        run_id = await live.backend.submit(
            live.workspace.id, AgentMessage(session, prompt_of(index), run_id=explicit)
        )
        if explicit:
            self.expect(run_id == explicit, f"submit returned {run_id!r}, not {explicit!r}")
        else:
            minted = uuid.UUID(run_id)
            self.expect(str(minted) == run_id and minted.version == 4, f"minted id {run_id!r}")
        self.accepted_on[run_id] = node
        self.accepted_in[run_id] = live.here
        run = ModelRun(index, GENERATION, session, op.behaviour, run_id)
        self.model.accept(run)
        if op.waiter:
            self._start_waiter(1 - node, run_id, run)  # waits on the other node

    async def _close(self, live: LiveNode) -> None:
        # Closing the workspace on one node ends what runs *there* (cancelled); the runs it
        # accepted that wait in their lanes or run elsewhere go on (ClusterCoordinator's
        # cancel_all). Then the node opens it again at once, as test_model's Close does.
        model = self.model
        closed_at = model.tseq
        ended = set()
        for session in SESSIONS:
            active = model.active_run_id((GENERATION, session))
            if active is not None and self.ran_in.get(active) == live.here:
                model.cancel_run(model.lane((GENERATION, session))[0])
                ended.add(active)
        with trio.fail_after(SETTLE_BOUND):
            await live.backend.close_workspace(live.workspace.id)
        self.expect(live.workspace.closed, "close_workspace returned before the workspace closed")
        for each in self.recorders:
            if each.node == live.index and each.closed_at is None:
                each.closed_at, each.optional = closed_at, ended
        # A run this node claims from now on runs in the workspace opened now (a claim may
        # have opened it first, with the node's own factory: then we get that one). Events
        # in flight to the closed one went nowhere.
        live.generation += 1
        live.events_exact = False
        live.workspace = await live.backend.create_workspace(WORKSPACE_PATH, live.factory)
        await self._settle(force=True)
        # Watched from this quiet point on: what ended before was shown here before.
        await self._watch(live)
        self.check()

    async def _lane_op_done(self, live: LiveNode) -> None:
        # Until the cancel is in Redis, a run another node accepts meanwhile may be hit by it
        # (/tmp/h4-bugs.md #3): wait for it, then for the quiet point.
        if self.await_lane_ops:
            await live.store.flush()
            await self._settle(force=True)
        else:
            self.quiet = False  # a send right after lands before the writer sent this op

    def _start_waiter(self, node: int, run_id: str, run: ModelRun | None) -> None:
        waiter = Waiter(run_id, run, trio.current_time())
        self.waiters.append(waiter)
        self.waiter_nodes.append(node)
        assert self._nursery is not None
        self._nursery.start_soon(self._wait, self.nodes[node].backend, waiter)

    async def _wait(self, backend: Backend, waiter: Waiter) -> None:
        try:
            waiter.results.append(await backend.wait_run(waiter.run_id))
        except UnknownRun:
            waiter.unknown = True
        waiter.returned_at = trio.current_time()

    async def _the_end(self) -> None:
        # Every session cancelled from one node, then the same checks once more, and the
        # cluster-wide counters Redis keeps.
        await self._settle()
        last = self.nodes[len(self.ops) % NODES]
        for session in SESSIONS:
            last.coordinator.cancel(session)
            self.model.cancel((GENERATION, session))
        await self._settle(force=True)
        self._check_recorders(include_slow=True)
        self.expect(not self.model.pending(), "the model left runs pending")
        self.expect(all(w.returned_at is not None for w in self.waiters), "a waiter hung")
        stats = await last.store.cluster_statistics()
        runs = self.model.runs
        outcomes = Counter(run.expected.outcome for run in runs if run.expected)
        # Claimed: every run that became its session's active run (its agent started, or its
        # prepare failed), once; more only where a closing node gave a claim back to its lane
        # (claimed again). No duplicate, nothing fenced, abandoned or evicted.
        claimed = sum(run.agent_started or run.behaviour.kind == PREPARE_FAIL for run in runs)
        claimed -= sum(
            run.behaviour.kind == PREPARE_FAIL
            and run.expected is not None
            and run.expected.cancelled
            for run in runs
        )
        got = {key: value for key, value in stats.items() if value}
        reclaimed = got.get("claimed", 0) - claimed
        self.expect(
            reclaimed == 0
            or (
                reclaimed > 0
                and any(isinstance(op, At) and isinstance(op.op, Close) for op in self.ops)
            ),
            f"Redis counted {got.get('claimed', 0)} claims, expected {claimed}",
        )
        got.pop("claimed", None)
        expected = {"accepted": len(runs), **outcomes}
        self.expect(got == expected, f"Redis counted {got}, expected {expected}")

    # -- quiet points -----------------------------------------------------------------

    async def _settle(self, *, force: bool = False) -> None:
        """The model settles; then wait (bounded) until the cluster shows what it predicts."""
        if self.quiet and not force:
            return
        self.model.settle()
        self.quiet = True
        broken: CheckFailed | None = None
        with trio.move_on_after(SETTLE_BOUND) as bound:
            async with trio.open_nursery() as nursery:
                for run in self.model.runs:
                    if run.expected is not None:
                        for node in self.nodes:
                            if (node.index, run.run_id) not in self.answered:
                                nursery.start_soon(self._terminal_answered, node, run)
                    elif run.agent_started:
                        nursery.start_soon(self._started, run.run_id)
                # What nodes learn from the streams (active runs, closed reservations)
                # arrives a moment after the terminals: look again until it all agrees, in
                # bound; what can never come right again fails at once.
                while True:
                    try:
                        self._check_irrecoverable()
                    except CheckFailed as exc:
                        broken = exc
                        bound.cancel()
                        break
                    if not self.waits and self._agrees():
                        break
                    await trio.sleep(POLL)
        if broken is not None:
            raise broken
        self.check()  # outside the bound: fails with what still disagrees
        unanswered = [
            f"run {run.index} on node {node.index}"
            for run in self.model.runs
            if run.expected is not None
            for node in self.nodes
            if (node.index, run.run_id) not in self.answered
        ]
        self.expect(not unanswered, f"wait_run did not return within {SETTLE_BOUND}s: {unanswered}")

    async def _terminal_answered(self, node: LiveNode, run: ModelRun) -> None:
        self.waits += 1
        with suppress(UnknownRun):  # the check says so
            rc = await node.backend.wait_run(run.run_id)
            self.expect(rc == run.expected, f"wait_run of run {run.index} gave {rc}")
            self.answered.add((node.index, run.run_id))
        self.waits -= 1

    async def _started(self, run_id: str) -> None:
        self.waits += 1
        await self._agent.wait_started(run_id)
        self.waits -= 1

    def _agrees(self) -> bool:
        try:
            self.check()
        except CheckFailed:
            return False
        return True

    # -- checks -----------------------------------------------------------------------

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            op = self.ops[self.step] if 0 <= self.step < len(self.ops) else "(the end)"
            raise CheckFailed(f"step {self.step} {op!r}: {message}")

    def check(self) -> None:
        self._check_progress()
        self._check_stores()
        self._check_queries()
        self._check_recorders(include_slow=False)
        self._check_waiters()
        self._check_agent()
        expected = sorted(
            f"WARNING: run {run.run_id} (session {run.session}) raised while being cancelled; "
            "it ends cancelled"
            for run in self.model.runs
            if run.behaviour.kind == STUBBORN and run.run_id in self.model.agent_cancelled
        )
        records = sorted(f"{r.levelname}: {r.getMessage()}" for r in self.log.records)
        self.expect(records == expected, f"the library logged {records}, expected {expected}")

    def _check_irrecoverable(self) -> None:
        """What, once wrong, no later moment can put right: checked while waiting for a quiet
        point, so a broken cluster fails at once instead of at the end of the bound."""
        agent, model = self._agent, self.model
        self.expect(
            agent.max_concurrent_per_session <= 1,
            "a session had two agents running at once (on any nodes)",
        )
        session_of = {run.run_id: run.key for run in model.runs}
        started: defaultdict[tuple[int, str], list[str]] = defaultdict(list)
        for run_id in agent.started:
            started[session_of[run_id]].append(run_id)
        for key, run_ids in started.items():
            predicted = model.agent_started.get(key, [])
            self.expect(
                run_ids == predicted[: len(run_ids)],
                f"agent start order in {key[1]}: {[self._name(r) for r in run_ids]}, "
                f"expected {[self._name(r) for r in predicted]}",
            )
        self.expect(
            set(agent.cancelled) <= model.agent_cancelled,
            f"agents cancelled: {self._named(agent.cancelled)}",
        )
        self.expect(
            set(agent.finished) <= model.agent_finished,
            f"agents finished: {self._named(agent.finished)}",
        )
        for node in self.nodes:
            self.expect(
                node.store.statistics().duplicates_suppressed == 0,
                f"node {node.index} attempted a second terminal",
            )
            for run in model.runs:
                got = node.store.get(run.run_id)
                self.expect(
                    got is None or got == run.expected,
                    f"run {run.index} on node {node.index}: terminal {got}, expected "
                    f"{run.expected}",
                )
        for waiter, node_index in zip(self.waiters, self.waiter_nodes, strict=True):
            if waiter.run is not None and waiter.returned_at is not None:
                self.expect(
                    waiter.results == [waiter.run.expected],
                    f"a waiter on node {node_index} on run {waiter.run.index} got "
                    f"{waiter.results}, expected [{waiter.run.expected}]",
                )
        for each in self.recorders:
            if each.entry.slow:
                continue  # read at a Drain only
            expected = self.model.ended_since(GENERATION, each.entry.since)
            for run_id, rcs in each.entry.recorder.by_run.items():
                self.expect(
                    len(rcs) <= 1 and run_id in expected,
                    f"recorder on node {each.node} got {self._named({run_id: len(rcs)})}",
                )

    def _check_progress(self) -> None:
        # Lossy progress is never silently lost, on any node: every event a run emitted
        # (wherever it ran: the other node's arrive through Redis) is read here, or counted
        # as dropped by this node's small events buffer.
        emitted = self.model.emitted[GENERATION]
        for node in self.nodes:
            reader = node.events
            assert reader is not None
            while True:
                try:
                    payload = reader.receive_nowait().payload
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self.expect(isinstance(payload, RunProgress), f"progress event {payload!r}")
                node.events_read += 1
            if node.events_exact:
                self.expect(
                    node.events_read + reader.dropped == emitted,
                    f"events on node {node.index}: read {node.events_read} + dropped "
                    f"{reader.dropped} != {emitted} emitted",
                )
            else:  # reopened: the events in flight to it at the close went nowhere
                self.expect(
                    node.events_read + reader.dropped <= emitted,
                    f"events on node {node.index}: read {node.events_read} + dropped "
                    f"{reader.dropped} > {emitted} emitted",
                )

    def _check_stores(self) -> None:
        model = self.model
        pending = model.pending()
        for node in self.nodes:
            store, n = node.store, node.index
            stats = store.statistics()
            self.expect(
                stats.duplicates_suppressed == 0,
                f"node {n} attempted a second terminal ({stats.duplicates_suppressed})",
            )
            accepted_here = sum(1 for i in self.accepted_on.values() if i == n)
            self.expect(
                stats.accepted_total == accepted_here,
                f"node {n} counts {stats.accepted_total} accepted runs, it accepted "
                f"{accepted_here}",
            )
            self.expect(
                set(store.pending_run_ids()) <= pending,
                f"node {n} holds as pending {sorted(set(store.pending_run_ids()) - pending)}",
            )
            for run in model.runs:
                state, got = store.state(run.run_id), store.get(run.run_id)
                if run.expected is None:
                    self.expect(
                        state == "pending",
                        f"run {run.index} is {state!r} on node {n} (terminal {got}), "
                        "the model says pending",
                    )
                else:
                    self.expect(
                        state == "terminal" and got == run.expected,
                        f"run {run.index} on node {n}: {state!r}, terminal {got}, "
                        f"expected {run.expected}",
                    )
        held = {run_id for node in self.nodes for run_id in node.store.pending_run_ids()}
        self.expect(held == pending, f"pending on the nodes {held}, in the model {pending}")

    def _check_queries(self) -> None:
        # The lane queries of a ClusterCoordinator: the active run is the cluster's; the
        # queue and busyness are what this node accepted (or runs), the lanes being in Redis.
        model = self.model
        for node in self.nodes:
            coordinator, here = node.coordinator, node.index
            busy_sessions = 0
            for session in SESSIONS:
                key = (GENERATION, session)
                lane = model.lane(key)
                active = model.active_run_id(key)
                queued = [run for run in lane[1:] if self.accepted_in[run.run_id] == node.here]
                busy = any(self.accepted_in[run.run_id] == node.here for run in lane) or (
                    active is not None and self.ran_in.get(active) == node.here
                )
                busy_sessions += busy
                actual = (
                    coordinator.active_run_id(session),
                    coordinator.queued_run_ids(session),
                    coordinator.queued_prompts_list(session),
                    coordinator.queued_prompts(session),
                    coordinator.is_session_busy(session),
                )
                expected = (
                    active,
                    [run.run_id for run in queued],
                    [run.prompt for run in queued],
                    len(queued),
                    busy,
                )
                self.expect(
                    actual == expected,
                    f"node {here} session {session}: (active, queued ids here, prompts, "
                    f"count, busy here) = {actual}, expected {expected}",
                )
            self.expect(
                coordinator.is_busy() == bool(busy_sessions), f"node {here}: is_busy() disagrees"
            )

    def _check_recorders(self, *, include_slow: bool) -> None:
        for each in self.recorders:
            entry = each.entry
            if entry.slow and not include_slow:
                continue
            by_run = entry.recorder.by_run
            self.expect(entry.recorder.overflow is None, "a recorder overflowed")
            counts = {run_id: len(rcs) for run_id, rcs in by_run.items() if rcs}
            expected = self.model.ended_since(GENERATION, entry.since)
            if each.closed_at is not None:
                # Its workspace closed: every terminal until then, once; of the runs the
                # close itself ended, whichever reached it before its broker shut.
                before = expected - self.model.ended_since(GENERATION, each.closed_at)
                expected = before | (each.optional & set(counts))
            self.expect(
                counts == dict.fromkeys(expected, 1),
                f"{'slow' if entry.slow else 'live'} recorder on node {each.node} got "
                f"{self._named(counts)}, expected each of {self._named(expected)} once",
            )
            for run_id, rcs in by_run.items():
                run = next(run for run in self.model.runs if run.run_id == run_id)
                self.expect(all(rc == run.expected for rc in rcs), f"a recorder got {rcs}")

    def _name(self, run_id: str) -> str:
        # Run ids are uuids: say which run (its index) it is, and what it does.
        for run in self.model.runs:
            if run.run_id == run_id:
                return f"run {run.index} ({run.behaviour.kind})"
        return run_id

    def _named(self, run_ids: Iterable[str]) -> dict[str, object]:
        counts = run_ids if isinstance(run_ids, dict) else dict.fromkeys(run_ids, 1)
        return dict(sorted((self._name(run_id), count) for run_id, count in counts.items()))

    def _check_waiters(self) -> None:
        for waiter, node in zip(self.waiters, self.waiter_nodes, strict=True):
            run = waiter.run
            if run is None:
                self.expect(
                    waiter.unknown and not waiter.results,
                    f"waiter on node {node} on {waiter.run_id}: no UnknownRun",
                )
            elif run.expected is None:
                self.expect(
                    waiter.returned_at is None,
                    f"a waiter on node {node} on pending run {run.index} got {waiter.results}",
                )
            else:
                self.expect(
                    waiter.results == [run.expected] and not waiter.unknown,
                    f"a waiter on node {node} on run {run.index} got {waiter.results} "
                    f"(unknown={waiter.unknown}), expected [{run.expected}]",
                )

    def _check_agent(self) -> None:
        agent, model = self._agent, self.model
        self.expect(
            agent.max_concurrent_per_session <= 1,
            "a session had two agents running at once (on any nodes)",
        )
        session_of = {run.run_id: run.key for run in model.runs}
        started: defaultdict[tuple[int, str], list[str]] = defaultdict(list)
        for run_id in agent.started:
            started[session_of[run_id]].append(run_id)
        self.expect(
            started == model.agent_started,
            f"agent start order per session {dict(started)}, expected {dict(model.agent_started)}",
        )
        self.expect(
            set(agent.cancelled) == model.agent_cancelled
            and len(agent.cancelled) == len(set(agent.cancelled)),
            f"agents cancelled: {agent.cancelled}, expected {sorted(model.agent_cancelled)}",
        )
        self.expect(
            set(agent.finished) == model.agent_finished,
            f"agents finished: {agent.finished}, expected {sorted(model.agent_finished)}",
        )


def run_cluster_program(ops: Iterable[At | Op], url: str, **knobs: bool) -> ClusterProgram:
    """Run ``ops`` against two fresh nodes (a namespace of their own) and the model."""
    program = ClusterProgram(ops, url, "m" + uuid.uuid4().hex[:16], **knobs)
    program.run()
    return program


# -- the state machine --------------------------------------------------------------------

node_ids = st.integers(0, NODES - 1)
behaviours = st.one_of(
    st.just(Behaviour(INSTANT)),
    st.just(Behaviour(COMPLETE)),
    st.just(Behaviour(RAISE)),
    st.builds(Behaviour, st.just(FLOOD), st.integers(1, 3 * EVENTS_BUFFER)),
    st.just(Behaviour(PREPARE_FAIL)),
    st.just(Behaviour(STUBBORN)),
)


class ClusterModelMachine(RuleBasedStateMachine):
    """Rules record operations, each on a node; teardown runs the program on the cluster."""

    url = ""  # set by the test (the redis_url fixture)

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[At | Op] = []
        self.sent = 0
        self.subscribed = 0
        self.slow = 0
        self.closed = 0

    @rule(
        node=node_ids,
        session=session_ids,
        behaviour=behaviours,
        explicit_id=st.booleans(),
        waiter=st.booleans(),
        settle=st.booleans(),
    )
    def send(
        self,
        node: int,
        session: int,
        behaviour: Behaviour,
        explicit_id: bool,
        waiter: bool,
        settle: bool,
    ) -> None:
        self.ops.append(At(node, Send(session, behaviour, explicit_id, waiter, settle)))
        self.sent += 1

    @rule(node=node_ids, session=session_ids, behaviour=behaviours)
    def send_and_settle(self, node: int, session: int, behaviour: Behaviour) -> None:
        self.ops.append(At(node, Send(session, behaviour)))
        self.sent += 1

    @precondition(lambda self: self.sent)
    @rule(session=session_ids)
    def release(self, session: int) -> None:
        self.ops.append(Release(session))

    @precondition(lambda self: self.sent)
    @rule(node=node_ids, session=session_ids)
    def cancel(self, node: int, session: int) -> None:
        self.ops.append(At(node, Cancel(session)))

    @precondition(lambda self: self.sent)
    @rule(node=node_ids, session=session_ids)
    def clear_queue(self, node: int, session: int) -> None:
        self.ops.append(At(node, ClearQueue(session)))

    @precondition(lambda self: self.sent)
    @rule(node=node_ids, run=st.integers(0, 50))
    def cancel_run(self, node: int, run: int) -> None:
        self.ops.append(At(node, CancelRun(run)))

    @precondition(lambda self: self.sent)
    @rule(node=node_ids, run=st.integers(-1, 50))
    def wait(self, node: int, run: int) -> None:
        self.ops.append(At(node, Wait(run) if run >= 0 else WaitUnknown()))

    @precondition(lambda self: self.sent and self.subscribed < 4)
    @rule(node=node_ids, slow=st.booleans())
    def subscribe(self, node: int, slow: bool) -> None:
        self.ops.append(At(node, Subscribe(slow)))
        self.subscribed += 1
        self.slow += slow

    @precondition(lambda self: self.slow)
    @rule()
    def drain(self) -> None:
        self.ops.append(Drain())

    @precondition(lambda self: self.sent and self.closed < 2)
    @rule(node=node_ids)
    def close(self, node: int) -> None:
        self.ops.append(At(node, Close()))
        self.closed += 1

    @precondition(lambda self: self.sent)
    @rule(node=node_ids, run=st.integers(0, 50))
    def send_duplicate(self, node: int, run: int) -> None:
        self.ops.append(At(node, SendDuplicate(run)))

    def teardown(self) -> None:
        run_cluster_program(self.ops, self.url)


REDIS_MODEL_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    # In CI the same examples every run (few: a failure must reproduce); locally new ones,
    # with the example database replaying what failed, as tests/test_model.py does.
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    # Shrinking replays hundreds of programs, each opening two nodes: Hypothesis's own
    # limit (5 minutes) is what ends it. A failure reports the program as drawn (at most
    # STEPS steps, each step named in the message); TRIO_RUNS_REDIS_MODEL_SHRINK=1 shrinks.
    phases=list(Phase) if SHRINK else [p for p in Phase if p is not Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_model_machine_on_a_redis_cluster(redis_url: str) -> None:
    machine = type("Machine", (ClusterModelMachine,), {"url": redis_url})
    run_state_machine_as_test(machine, settings=REDIS_MODEL_SETTINGS)


# -- plain programs ------------------------------------------------------------------------


def test_a_cluster_program_through_every_operation(redis_url: str) -> None:
    """By hand: every behaviour, sends on both nodes, cancels and clears from the node that
    did not accept the runs, a burst of unsettled sends into one lane."""
    program = run_cluster_program(
        [
            At(1, Subscribe(slow=True)),
            At(0, Send(0, Behaviour(COMPLETE), explicit_id=True, waiter=True)),
            At(1, Send(0, Behaviour(RAISE), waiter=True)),
            At(0, Send(0, Behaviour(PREPARE_FAIL), waiter=True)),
            At(1, Send(0, Behaviour(FLOOD, 3 * EVENTS_BUFFER))),
            At(0, Send(1, Behaviour(INSTANT))),
            At(1, Send(1, Behaviour(COMPLETE))),
            Release(0),
            Release(0),  # RAISE fails, PREPARE_FAIL fails before starting, FLOOD floods
            At(1, Wait(0)),
            Release(0),
            At(0, Cancel(1)),
            At(1, Send(2, Behaviour(STUBBORN), settle=False)),
            At(0, Send(2, Behaviour(COMPLETE), settle=False)),
            At(1, Send(2, Behaviour(INSTANT), settle=False)),
            At(0, Send(2, Behaviour(COMPLETE), explicit_id=True)),
            At(0, CancelRun(8)),  # a queued run, accepted by the other node
            At(0, CancelRun(6)),  # the active stubborn run: cancelled, with its warning
            At(1, CancelRun(0)),  # an ended run: refused
            At(1, ClearQueue(2)),
            At(0, SendDuplicate(0)),
            At(1, WaitUnknown()),
            Drain(),
        ],
        redis_url,
    )
    outcomes = Counter(run.expected.outcome for run in program.model.runs if run.expected)
    assert outcomes == {"completed": 3, "failed": 2, "cancelled": 5}


def test_closing_the_workspace_on_one_node_ends_only_what_runs_there(redis_url: str) -> None:
    """Both nodes run a gated run each (whichever claims which); node 0 accepted queued runs
    behind both. Closing the workspace on node 0 cancels the run node 0 runs; the runs it
    accepted go on, on whichever node, and node 0 opens the workspace again."""
    complete = Behaviour(COMPLETE)
    program = run_cluster_program(
        [
            At(0, Send(0, complete, waiter=True)),
            At(0, Send(1, complete, waiter=True)),
            At(0, Send(0, Behaviour(INSTANT), waiter=True)),
            At(0, Send(1, Behaviour(STUBBORN), waiter=True)),
            At(1, Subscribe(slow=True)),
            At(0, Close()),
            Release(0),
            Release(1),
            Release(0),
            At(0, Close()),
            Drain(),
        ],
        redis_url,
    )
    assert all(run.expected is not None for run in program.model.runs)
    assert sum(run.agent_started for run in program.model.runs) >= 3  # the lanes went on


# -- bugs the machine found, each by the machine's own program --------------------------------


def test_a_waiter_on_the_node_that_claims_the_run_returns(redis_url: str) -> None:
    """Found by the machine: a waiter on node 1 for a run node 0 accepted never returned when
    node 1 then claimed the run (``RedisStore.claim`` replaced the record the waiter
    watched). Fixed in ec6321c."""
    # Waiters on node 1 for runs node 0 accepted: node 1 claims some of them (both serve).
    sends = [At(0, Send(i % len(SESSIONS), Behaviour(INSTANT), waiter=True)) for i in range(9)]
    run_cluster_program(sends, redis_url)


def test_a_prepare_failure_reaches_each_subscriber_once(redis_url: str) -> None:
    """Found by the machine: the node that claimed a run whose ``prepare`` failed published
    its terminal twice to its subscribers (the backend's fallback announced it, and so did
    the store). Fixed in ec6321c."""
    run_cluster_program([At(0, Send(0, Behaviour(PREPARE_FAIL)))], redis_url)


def test_a_cancel_on_one_node_leaves_a_run_accepted_after_it_on_another(redis_url: str) -> None:
    program = [
        op
        for _ in range(5)
        for op in (
            At(0, Cancel(0)),
            At(1, Send(0, Behaviour(INSTANT))),
            At(1, ClearQueue(1)),
            At(0, Send(1, Behaviour(INSTANT))),
        )
    ]
    run_cluster_program(program, redis_url, await_lane_ops=False)
