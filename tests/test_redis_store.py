"""The Redis-backed store against a real ``redis-server`` (DESIGN "Distribution (Redis)").

Several nodes are opened in one process, each its own ``open_redis_store`` (its own
connections, writer, stream follower and lease), on one namespace: what one node decides,
the others see only through Redis.

These tests wait on real sockets, so they run on the real clock (``real_clock``): Trio's
autojump clock would jump over every ``fail_after`` while a reply is on its way. Every wait
is bounded in real seconds instead, and leases are short (``TTL`` seconds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_runs import (
    AgentMessage,
    DuplicateRun,
    RunComplete,
    RunStore,
    SessionCoordinator,
    UnknownRun,
    open_backend,
)
from trio_runs.errors import RedisUnavailable
from trio_runs.redis import RedisStore, RetentionLimits, open_redis_store
from trio_runs.testing import ScriptedAgent, return_, sleep

TTL = 1.0
BOUND = 20.0  # real seconds: every wait here


@asynccontextmanager
async def node(url: str, ns: str, **kwargs: Any) -> AsyncIterator[RedisStore]:
    options: dict[str, Any] = {
        "lease_ttl": TTL,
        "unavailable_after": 1.0,
        "call_timeout": 1.0,
        "close_grace": 2.0,
    }
    options.update(kwargs)
    with trio.fail_after(BOUND):
        async with open_redis_store(url, namespace=ns, **options) as store:
            yield store


async def stream_entries(store: RedisStore) -> list[RunComplete]:
    """Every terminal on the cluster's stream, in order (read straight from Redis)."""
    client = store._client
    entries = await client.xrange(store._stream_key, "-", "+")
    return [RunComplete.from_json(entry.field_values["rc"]) for entry in entries]


def test_the_redis_store_implements_the_store_protocol():
    assert issubclass(RedisStore, RunStore)


# -- R1: one guarantee, any node --------------------------------------------------------------


async def test_a_terminal_written_on_one_node_reaches_waiters_on_every_node(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        got: dict[str, RunComplete] = {}

        async def wait_on(name: str, store: RedisStore) -> None:
            got[name] = await store.wait("r1")

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_on, "a", a)
                nursery.start_soon(wait_on, "b", b)
                await trio.sleep(0.2)
                assert got == {}
                shown: list[RunComplete] = []
                assert a.complete(RunComplete("s", "r1", result=7), shown.append)
        assert got["a"] == got["b"] == RunComplete("s", "r1", result=7)
        assert shown == [got["a"]]
        assert b.get("r1") == got["b"]
        # A late waiter on a third node is answered from Redis.
        async with node(redis_url, namespace) as c:
            with trio.fail_after(BOUND):
                assert await c.wait("r1") == got["a"]
        assert [rc.run_id for rc in await stream_entries(a)] == ["r1"]


async def test_first_terminal_wins_across_nodes_and_the_loser_is_refused_and_counted(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        shown_a: list[RunComplete] = []
        shown_b: list[RunComplete] = []
        # Both decide at once (each is first on its own node); Redis settles it.
        assert a.complete(RunComplete("s", "r1", result="a"), shown_a.append)
        assert b.complete(RunComplete("s", "r1", result="b"), shown_b.append)
        with trio.fail_after(BOUND):
            winner = await a.wait("r1")
            assert await b.wait("r1") == winner
            while len(shown_a) + len(shown_b) < 2:
                await trio.sleep(0.01)
        # Each node shows the winner once, to its own on_visible too.
        assert shown_a == shown_b == [winner]
        assert a.statistics().duplicates_suppressed + b.statistics().duplicates_suppressed == 1
        assert [rc.run_id for rc in await stream_entries(a)] == ["r1"]
        assert (await a.cluster_statistics()).get("duplicates") == 1
        # A third terminal, once the first is known here, is refused at once.
        assert not b.complete(RunComplete("s", "r1", cancelled=True))


async def test_a_run_id_taken_on_another_node_is_refused_by_the_durable_submit(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        # Refused at once if b already read the acceptance on the stream, else by Redis.
        with trio.fail_after(BOUND), pytest.raises(DuplicateRun):  # noqa: PT012 (either step)
            b.accept("r1", "s")
            await b.flush()
        # b knows the run as pending on another node (not as its own).
        with trio.fail_after(BOUND):
            while b.state("r1") is None:
                await trio.sleep(0.01)
        assert (b.state("r1"), b.session_of("r1")) == ("pending", "s")
        assert b.pending_run_ids() == []
        async with node(redis_url, namespace) as late:  # joins knowing what is pending
            assert (late.state("r1"), late.session_of("r1")) == ("pending", "s")
        a.complete(RunComplete("s", "r1", result=1))
        with trio.fail_after(BOUND):
            assert (await b.wait("r1")).result == 1
        # Still taken once ended (D4: while the terminal is retained), on every node.
        async with node(redis_url, namespace) as c:
            c.accept("r1", "s")  # c has not seen r1: Redis refuses it
            with trio.fail_after(BOUND), pytest.raises(DuplicateRun):
                await c.flush()
            with pytest.raises(DuplicateRun):
                c.accept("r1", "s")  # known here now: refused at once


async def test_unknown_and_withdrawn_runs_are_unknown_on_every_node(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        with trio.fail_after(BOUND), pytest.raises(UnknownRun):
            await b.wait("never")
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        a.withdraw("r1")
        with trio.fail_after(BOUND):
            await a.flush()
            with pytest.raises(UnknownRun):
                await b.wait("r1")
        assert a.state("r1") is None
        assert a.statistics().accepted_total == 0
        # Withdrawn before it was ever written: nothing reaches Redis at all.
        a.accept("r2", "s")
        a.withdraw("r2")
        with trio.fail_after(BOUND):
            await a.flush()
        assert (await a.cluster_statistics()).get("accepted", 0) == 0


async def test_retention_bounds_what_redis_keeps_and_late_waiters_past_it_get_unknown(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace, limits=RetentionLimits(count=3), retain=2) as a:
        for i in range(5):
            a.accept(f"r{i}", "s")
            a.complete(RunComplete("s", f"r{i}", result=i))
        with trio.fail_after(BOUND):
            await a.flush()
        assert a.statistics().retained == 2  # this node's memory bound
        async with node(redis_url, namespace) as b:
            with trio.fail_after(BOUND):
                for i in (2, 3, 4):
                    assert (await b.wait(f"r{i}")).result == i
                for i in (0, 1):
                    with pytest.raises(UnknownRun):
                        await b.wait(f"r{i}")
        stats = await a.cluster_statistics()
        assert stats["evicted"] == 2
        assert stats["completed"] == 5


async def test_the_backend_runs_on_the_redis_store_and_other_nodes_wait_on_its_runs(
    redis_url, namespace, real_clock, tmp_path
):
    agent = ScriptedAgent(sleep(0.05), return_("done"))
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        async with open_backend(a) as backend:
            ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
            async with ws.run_completions.subscribe() as sub:
                with trio.fail_after(BOUND):
                    ids = [
                        await backend.submit(ws.id, AgentMessage(f"s{i % 3}", f"p{i}"))
                        for i in range(12)
                    ]
                    for run_id in ids:
                        assert (await b.wait(run_id)).result == "done"
                        assert (await backend.wait_run(run_id)).result == "done"
                    seen = [(await sub.receive()).payload.run_id for _ in ids]
            assert sorted(seen) == sorted(ids)
        assert a.statistics().completed_total == 12
        assert a.pending_run_ids() == []


# -- visibility follows the commit, and Redis trouble is loud (R5) ----------------------------


async def test_nothing_is_shown_before_redis_holds_it(redis_server, namespace, real_clock):
    async with node(redis_server.url, namespace, unavailable_after=30.0) as a:
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        redis_server.pause()
        try:
            shown: list[RunComplete] = []
            assert a.complete(RunComplete("s", "r1", result=1), shown.append)
            await trio.sleep(0.3)
            assert a.state("r1") == "ending"
            assert a.get("r1") is None
            assert shown == []
        finally:
            redis_server.resume()
        with trio.fail_after(BOUND):
            assert (await a.wait("r1")).result == 1
        assert shown == [RunComplete("s", "r1", result=1)]


async def test_unreachable_redis_refuses_runs_fails_waits_in_bound_and_work_resumes(
    redis_server, namespace, real_clock
):
    async with node(redis_server.url, namespace) as a:
        a.accept("r1", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        redis_server.kill()
        a.complete(RunComplete("s", "r1", result=1))  # decided; queued for Redis
        with trio.fail_after(BOUND):
            while a.redis_statistics().connected:
                await trio.sleep(0.05)
        with pytest.raises(RedisUnavailable):
            a.accept("r2", "s")
        assert a.state("r2") is None
        # A waiter fails within unavailable_after (+ a call), it does not hang.
        started = trio.current_time()
        with trio.fail_after(BOUND), pytest.raises(RedisUnavailable):
            await a.wait("r1")
        with trio.fail_after(BOUND), pytest.raises(RedisUnavailable):
            await a.flush()
        assert trio.current_time() - started < 5
        redis_server.start()  # AOF replays r1's acceptance
        with trio.fail_after(BOUND):
            assert (await a.wait("r1")).result == 1
            while not a.redis_statistics().connected:
                await trio.sleep(0.05)
        a.accept("r2", "s")
        with trio.fail_after(BOUND):
            await a.flush()


# -- R3 and R4 in one process: lease expiry and fencing ---------------------------------------


async def test_a_node_whose_lease_expires_is_fenced_and_its_runs_end_abandoned_once(
    redis_url, namespace, real_clock
):
    async with node(redis_url, namespace) as a, node(redis_url, namespace) as b:
        lost: list[str] = []
        a.on_lost(lost.extend)
        for i in range(3):
            a.accept(f"r{i}", "s")
        with trio.fail_after(BOUND):
            await a.flush()
        old = a.node_id
        # As if the node had been paused past its TTL and another node had swept: its lease
        # is gone and it is declared dead (what RECOVER does), in one step.
        await a._client.eval(
            "redis.call('DEL', KEYS[1]); redis.call('SREM', KEYS[2], ARGV[1]);"
            " redis.call('SADD', KEYS[3], ARGV[1])",
            keys=[a._prefix + "lease:" + old, a._prefix + "nodes", a._prefix + "dead"],
            args=[old],
        )
        # The zombie's own terminal is refused and counted; it shows the abandoned one.
        shown: list[RunComplete] = []
        assert a.complete(RunComplete("s", "r0", result="late"), shown.append)
        with trio.fail_after(BOUND):
            ends = [await b.wait(f"r{i}") for i in range(3)]
        assert all(rc.abandoned and rc.outcome == "failed" for rc in ends)
        with trio.fail_after(BOUND):
            assert await a.wait("r0") == ends[0]
            while not lost:
                await trio.sleep(0.05)
        assert shown == [ends[0]]
        assert a.node_id != old
        assert sorted(lost) == ["r0", "r1", "r2"]
        assert a.redis_statistics().fenced_total == 1
        stats = await a.cluster_statistics()
        assert stats["abandoned"] == 3
        assert stats["fenced"] == 1
        entries = await stream_entries(a)
        assert sorted(rc.run_id for rc in entries) == ["r0", "r1", "r2"]
        # The node goes on under its new incarnation.
        a.accept("r9", "s")
        a.complete(RunComplete("s", "r9", result=9))
        with trio.fail_after(BOUND):
            await a.flush()
            assert (await b.wait("r9")).result == 9
