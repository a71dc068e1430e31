"""Cluster-wide session lanes on a real ``redis-server`` (DESIGN R1, R2): any node accepts a
run, any node with room runs it, each session's runs one at a time in acceptance order, and
cancel, clear-queue and cancel-one-run work from any node.

Several nodes live in one process here, each its own store, backend and ``ClusterNode``
(its own connections, lease and stream follower): what one decides, the others see only
through Redis. Real clock (``real_clock``), every wait bounded in real seconds.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_runs import (
    AgentMessage,
    RunCall,
    RunComplete,
    SessionCoordinator,
    SupportsDeadlines,
    open_backend,
)
from trio_runs.backend import Backend, Workspace
from trio_runs.coordinator import RunContext
from trio_runs.redis import ClusterNode, RedisStore, open_redis_store

TTL = 1.0
BOUND = 30.0
README = Path(__file__).resolve().parent.parent / "README.md"


@attrs.define
class Execution:
    node: str
    session_id: str
    run_id: str
    started: float
    ended: float = 0.0


@attrs.define
class Node:
    name: str
    store: RedisStore
    backend: Backend
    cluster: ClusterNode
    workspace: Workspace


class Recorder:
    """The agent of every node: records each execution (node, start, end) on Trio's clock,
    which all nodes of this process share. ``sleep S`` sleeps, ``steps N`` emits N progress
    items; every run returns its prompt."""

    def __init__(self) -> None:
        self.executions: list[Execution] = []
        self.started: dict[str, trio.Event] = defaultdict(trio.Event)

    def agent_for(self, name: str) -> Any:
        async def agent(call: RunCall, ctx: RunContext) -> object:
            execution = Execution(name, call.session_id, call.run_id, trio.current_time())
            self.executions.append(execution)
            self.started[call.run_id].set()
            try:
                if call.prompt.startswith("steps "):
                    for step in range(int(call.prompt.split()[1])):
                        ctx.emit({"step": step})
                        await trio.sleep(0)
                if call.prompt.startswith("sleep "):
                    await trio.sleep(float(call.prompt.split()[1]))
                    await trio.sleep(0)
                return call.prompt
            finally:
                execution.ended = trio.current_time()

        return agent


@asynccontextmanager
async def cluster_node(
    url: str, ns: str, name: str, recorder: Recorder, path: str, *, serve: bool, capacity: int = 4
) -> AsyncIterator[Node]:
    async with (
        open_redis_store(
            url, namespace=ns, lease_ttl=TTL, unavailable_after=2.0, call_timeout=2.0
        ) as store,
        open_backend(store) as backend,
        trio.open_nursery() as nursery,
    ):
        cluster = ClusterNode(
            store, SessionCoordinator.factory(recorder.agent_for(name)), capacity=capacity
        )
        if serve:
            await nursery.start(cluster.serve, backend)
        workspace = await backend.create_workspace(path, cluster.coordinator_factory)
        yield Node(name, store, backend, cluster, workspace)
        nursery.cancel_scope.cancel()


async def submit(node: Node, session_id: str, prompt: str) -> str:
    return await node.backend.submit(node.workspace.id, AgentMessage(session_id, prompt))


async def test_a_sessions_runs_run_one_at_a_time_in_acceptance_order_on_any_node(
    redis_url, namespace, real_clock, tmp_path
):
    recorder = Recorder()
    path = str(tmp_path)
    async with (
        cluster_node(redis_url, namespace, "a", recorder, path, serve=True) as a,
        cluster_node(redis_url, namespace, "b", recorder, path, serve=True) as b,
    ):
        with trio.fail_after(BOUND):
            order: dict[str, list[str]] = defaultdict(list)
            for i in range(40):
                session_id = f"s{i % 8}"
                order[session_id].append(await submit((a, b)[i % 2], session_id, "sleep 0.01"))
            for run_ids in order.values():
                for run_id in run_ids:
                    for each in (a, b):
                        assert (await each.backend.wait_run(run_id)).outcome == "completed"
    by_session: dict[str, list[Execution]] = defaultdict(list)
    for execution in recorder.executions:
        by_session[execution.session_id].append(execution)
    for session_id, executions in by_session.items():
        executions.sort(key=lambda e: e.started)
        # FIFO in acceptance order, and never two at once.
        assert [e.run_id for e in executions] == order[session_id]
        for earlier, later in itertools.pairwise(executions):
            assert earlier.ended <= later.started, (session_id, earlier, later)
    assert {e.node for e in recorder.executions} == {"a", "b"}  # both nodes ran work
    assert len(recorder.executions) == 40  # each run ran once


async def test_a_worker_runs_what_a_node_that_runs_nothing_accepted(
    redis_url, namespace, real_clock, tmp_path
):
    recorder = Recorder()
    path = str(tmp_path)
    async with (
        cluster_node(redis_url, namespace, "front", recorder, path, serve=False) as front,
        cluster_node(redis_url, namespace, "worker", recorder, path, serve=True) as worker,
    ):
        async with front.workspace.run_completions.subscribe() as seen_front:
            with trio.fail_after(BOUND):
                run_ids = [await submit(front, f"s{i}", f"hello {i}") for i in range(5)]
                for i, run_id in enumerate(run_ids):
                    assert (await front.backend.wait_run(run_id)).result == f"hello {i}"
                seen = [(await seen_front.receive()).payload.run_id for _ in run_ids]
        assert sorted(seen) == sorted(run_ids)  # the front's subscribers saw each once
        assert worker.cluster.statistics().claimed_total == 5
    assert {e.node for e in recorder.executions} == {"worker"}


async def test_cancel_clear_and_cancel_one_run_work_from_any_node(
    redis_url, namespace, real_clock, tmp_path
):
    recorder = Recorder()
    path = str(tmp_path)
    async with (
        cluster_node(redis_url, namespace, "front", recorder, path, serve=False) as front,
        cluster_node(redis_url, namespace, "worker", recorder, path, serve=True) as worker,
        cluster_node(redis_url, namespace, "other", recorder, path, serve=False) as other,
    ):
        seen: dict[str, list[RunComplete]] = defaultdict(list)
        async with (
            front.workspace.run_completions.subscribe() as on_front,
            worker.workspace.run_completions.subscribe() as on_worker,
        ):
            with trio.fail_after(BOUND):
                active = await submit(front, "s", "sleep 60")
                queued = [await submit(front, "s", f"q{i}") for i in range(3)]
                elsewhere = await submit(front, "t", "sleep 60")
                await recorder.started[active].wait()
                await recorder.started[elsewhere].wait()

                # One queued run, cancelled by the node that accepted it.
                assert front.backend.cancel_run(queued[1])
                ended = await other.backend.wait_run(queued[1])
                assert (ended.outcome, ended.reason) == ("cancelled", "user")

                # The queue, cleared from the node that runs the active run.
                assert worker.workspace.coordinator is not None
                worker.workspace.coordinator.clear_queue("s")
                for run_id in (queued[0], queued[2]):
                    ended = await other.backend.wait_run(run_id)
                    assert (ended.outcome, ended.reason) == ("cancelled", "clear_queue")
                assert active not in [e.run_id for e in recorder.executions if e.ended]

                # An active run, cancelled by a node that has no workspace open for it.
                await other.backend.close_workspace(other.workspace.id)
                assert other.backend.cancel_run(elsewhere)
                ended = await front.backend.wait_run(elsewhere)
                assert (ended.outcome, ended.reason) == ("cancelled", "user")

                # The session, cancelled from the front: its active run ends on the worker.
                assert front.workspace.coordinator is not None
                front.workspace.coordinator.cancel("s")
                ended = await front.backend.wait_run(active)
                assert (ended.outcome, ended.reason) == ("cancelled", "session_cancel")

                everything = [active, *queued, elsewhere]
                for sub, name in ((on_front, "front"), (on_worker, "worker")):
                    while len(seen[name]) < len(everything):
                        seen[name].append((await sub.receive()).payload)
        for name in ("front", "worker"):
            # Every node's subscribers saw each terminal once, the one Redis holds.
            assert sorted(rc.run_id for rc in seen[name]) == sorted(everything)
    # Only the two active runs ever ran; the queued ones never started.
    assert sorted(e.run_id for e in recorder.executions) == sorted([active, elsewhere])


async def test_a_node_that_leaves_hands_its_queued_runs_to_the_cluster(
    redis_url, namespace, real_clock, tmp_path
):
    """A node that shuts down gracefully ends what it runs, not what it accepted: runs
    waiting in their lanes go on on the nodes that stay (a rolling restart loses nothing)."""
    recorder = Recorder()
    path = str(tmp_path)
    async with cluster_node(redis_url, namespace, "stays", recorder, path, serve=False) as stays:
        async with cluster_node(
            redis_url, namespace, "leaves", recorder, path, serve=True, capacity=1
        ) as leaves:
            with trio.fail_after(BOUND):
                running = await submit(leaves, "s", "sleep 60")
                waiting = [await submit(leaves, "s", f"w{i}") for i in range(3)]
                await recorder.started[running].wait()
            with trio.fail_after(BOUND / 3):  # leaving does not wait for the lane
                await leaves.backend.aclose()
        ended = await stays.store.wait(running)
        assert (ended.outcome, ended.reason) == ("cancelled", "shutdown")
        assert all(stays.store.state(run_id) == "pending" for run_id in waiting)
        async with cluster_node(redis_url, namespace, "joins", recorder, path, serve=True):
            with trio.fail_after(BOUND):
                for i, run_id in enumerate(waiting):
                    assert (await stays.store.wait(run_id)).result == f"w{i}"
    assert [e.node for e in recorder.executions if e.run_id in waiting] == ["joins"] * 3


async def test_progress_of_a_run_on_another_node_reaches_this_nodes_subscribers(
    redis_url, namespace, real_clock, tmp_path
):
    """Progress is lossy, but what a run emits on the node that runs it reaches the other
    nodes' subscribers of its workspace, in order, and before its terminal: it is written
    with the node's ordered writes, ahead of the terminal."""
    recorder = Recorder()
    path = str(tmp_path)
    async with (
        cluster_node(redis_url, namespace, "front", recorder, path, serve=False) as front,
        cluster_node(redis_url, namespace, "worker", recorder, path, serve=True) as worker,
    ):
        async with (
            front.workspace.events.subscribe() as progress,
            front.workspace.run_completions.subscribe() as ends,
        ):
            with trio.fail_after(BOUND):
                run_id = await submit(front, "s", "steps 50")
                assert (await ends.receive()).payload.run_id == run_id
                seen = []
                while True:
                    try:
                        seen.append(progress.receive_nowait().payload)
                    except trio.WouldBlock:
                        break
        assert [item.payload for item in seen] == [{"step": step} for step in range(50)]
        assert {item.run_id for item in seen} == {run_id}
        assert worker.store.redis_statistics().progress_forwarded == 50
        # The node that ran it published it to its own subscribers once, not twice.
        assert front.store.redis_statistics().progress_forwarded == 0


async def test_a_claim_whose_answer_was_lost_is_asked_for_again(
    redis_url, namespace, real_clock, tmp_path
):
    """A claim Redis ran but whose answer never reached the node (Redis went away just
    then) left the run active in Redis, owned by a live node that never heard of it: no
    recovery would end it and its lane would wait forever. The node's next claim asks for
    its own runs again and runs them."""
    recorder = Recorder()
    path = str(tmp_path)
    async with cluster_node(redis_url, namespace, "a", recorder, path, serve=False) as a:
        with trio.fail_after(BOUND):
            run_id = await submit(a, "s", "hello")
            behind = await submit(a, "s", "after")
            # The claim runs in Redis, and its answer is lost on the way back (as when Redis
            # is killed right after it ran the script): what a failed claim leaves.
            store = a.store
            await store._claim(
                args=[store._prefix, store.node_id, 1, 100, store._lease.ttl_ms, "0"]
            )
            store._claim_uncertain = True
            async with trio.open_nursery() as nursery:
                await nursery.start(a.cluster.serve, a.backend)
                assert (await a.backend.wait_run(run_id)).result == "hello"
                assert (await a.backend.wait_run(behind)).result == "after"
                nursery.cancel_scope.cancel()
    assert [e.run_id for e in recorder.executions] == [run_id, behind]


async def test_the_readmes_python_cluster_node_runs(
    redis_url, namespace, real_clock, capsys: pytest.CaptureFixture[str]
):
    """README "Scaling out", "From Python": the node it shows runs a run end to end."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", text, re.S)
    assert match, "the README lost its cluster example"
    code = match.group(1).replace(
        "open_redis_store(url)", f"open_redis_store(url, namespace={namespace!r})"
    )
    scope: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), scope)
    with trio.fail_after(BOUND):
        await scope["main"](redis_url)
    assert capsys.readouterr().out.startswith("completed ")


async def test_a_cluster_workspace_keeps_its_agents_default_deadline(
    redis_url, namespace, real_clock, tmp_path
):
    """A service capping deadlines reads the workspace's default (SupportsDeadlines): on a
    cluster node it is the agent's, not the cap, or every run would get the cap."""
    async with (
        open_redis_store(redis_url, namespace=namespace) as store,
        open_backend(store) as backend,
    ):
        factory = SessionCoordinator.factory(Recorder().agent_for("a"), default_deadline=5.0)
        cluster = ClusterNode(store, factory)
        workspace = await backend.create_workspace(str(tmp_path), cluster.coordinator_factory)
        assert isinstance(workspace.coordinator, SupportsDeadlines)
        assert workspace.coordinator.default_deadline == 5.0
