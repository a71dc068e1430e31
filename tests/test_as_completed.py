"""Backend.as_completed: every given run's terminal, each once, with no subscriber to race.

The complaint (issue 14): a subscriber started with ``nursery.start_soon`` and runs submitted
at once missed terminals — the runs ``clear_queue`` drops end before it returns, before the
subscriber's task ever ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Backend,
    CoordinatorFactory,
    RunComplete,
    SessionCoordinator,
    UnknownRun,
    open_backend,
)
from trio_runs.sqlite import open_sqlite_ledger
from trio_runs.testing import ScriptedAgent, return_, sleep

TIMEOUT = 600
RUNS = 20


def factory() -> CoordinatorFactory:
    return SessionCoordinator.factory(ScriptedAgent(sleep(1), return_("ok")))


async def submit_and_clear(backend: Backend, workspace_id: str, session: str) -> list[str]:
    """The trap's program: 20 runs on one lane, then drop the queue at once."""
    ids = [backend.send_message(workspace_id, AgentMessage(session, f"p{n}")) for n in range(RUNS)]
    backend.get_workspace(workspace_id).sessions.clear_queue(session)
    return ids


async def test_a_subscriber_started_with_start_soon_misses_terminals(backend, autojump_clock):
    # The original complaint, reproduced: the subscriber's task has not subscribed yet when
    # clear_queue ends the queued runs, synchronously.
    ws = await backend.create_workspace("/w", factory())
    seen: list[RunComplete] = []

    async def subscriber() -> None:
        async with ws.run_completions.subscribe() as subscription:
            async for event in subscription:
                seen.append(event.payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber)
        ids = await submit_and_clear(backend, ws.id, "s")
        with trio.fail_after(TIMEOUT):
            for run_id in ids:
                await backend.wait_run(run_id)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    missed = set(ids) - {rc.run_id for rc in seen}
    assert len(missed) == RUNS - 1  # every run the queue held; only the active one was seen


async def test_subscribing_with_nursery_start_misses_nothing(backend, autojump_clock):
    # The README's "subscribe before you submit": start() returns once subscribed.
    ws = await backend.create_workspace("/w", factory())
    seen: list[RunComplete] = []

    async def subscriber(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with ws.run_completions.subscribe() as subscription:
            task_status.started()
            async for event in subscription:
                seen.append(event.payload)

    async with trio.open_nursery() as nursery:
        await nursery.start(subscriber)
        ids = await submit_and_clear(backend, ws.id, "s")
        with trio.fail_after(TIMEOUT):
            for run_id in ids:
                await backend.wait_run(run_id)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sorted(rc.run_id for rc in seen) == sorted(ids)


async def test_as_completed_after_the_fact_gets_all_twenty_once(backend, autojump_clock):
    ws = await backend.create_workspace("/w", factory())
    ids = await submit_and_clear(backend, ws.id, "s")
    got: list[RunComplete] = []
    with trio.fail_after(TIMEOUT):
        async with backend.as_completed(ids) as completed:
            assert completed.remaining == RUNS
            async for rc in completed:
                got.append(rc)
            assert completed.remaining == 0
    assert sorted(rc.run_id for rc in got) == sorted(ids)
    # The 19 runs clear_queue dropped had ended: they come first, in the order given.
    assert [rc.run_id for rc in got[: RUNS - 1]] == ids[1:]
    assert all(rc.outcome == "cancelled" for rc in got[: RUNS - 1])
    assert (got[-1].run_id, got[-1].outcome) == (ids[0], "completed")


async def test_as_completed_yields_in_order_of_visibility(backend, autojump_clock):
    agent = ScriptedAgent(scripts={"3": [sleep(3)], "1": [sleep(1)], "2": [sleep(2)]})
    ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
    ids = {p: backend.send_message(ws.id, AgentMessage(f"s{p}", p)) for p in ("3", "1", "2")}
    done = await backend.run(ws.id, AgentMessage("s0", "0"))
    order: list[tuple[str, float]] = []
    start = trio.current_time()
    with trio.fail_after(TIMEOUT):
        async with backend.as_completed([ids["3"], done.run_id, ids["1"], ids["2"]]) as completed:
            async for rc in completed:
                order.append((rc.run_id, trio.current_time() - start))
    assert order == [(done.run_id, 0), (ids["1"], 1), (ids["2"], 2), (ids["3"], 3)]


async def test_as_completed_refuses_an_unknown_run_at_once(backend, autojump_clock):
    ws = await backend.create_workspace("/w", factory())
    known = backend.send_message(ws.id, AgentMessage("s", "x"))
    with pytest.raises(UnknownRun) as caught:
        backend.as_completed([known, "nobody"])
    assert caught.value.run_id == "nobody"
    with pytest.raises(TypeError, match="not a single str"):
        backend.as_completed(known)
    with pytest.raises(TypeError, match="must be str"):
        backend.as_completed([known, 7])  # type: ignore[list-item]


async def test_as_completed_yields_a_repeated_id_once_and_an_empty_set_not_at_all(
    backend, autojump_clock
):
    ws = await backend.create_workspace("/w", factory())
    run_id = backend.send_message(ws.id, AgentMessage("s", "x"))
    with trio.fail_after(TIMEOUT):
        async with backend.as_completed([run_id, run_id]) as completed:
            assert completed.run_ids == (run_id,)
            assert [rc.run_id async for rc in completed] == [run_id]
        async with backend.as_completed([]) as completed:
            assert [rc async for rc in completed] == []


async def test_as_completed_cancelled_while_waiting_loses_nothing(backend, autojump_clock):
    agent = ScriptedAgent(scripts={"a": [sleep(5)], "b": [sleep(10)]})
    ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
    a = backend.send_message(ws.id, AgentMessage("s1", "a"))
    b = backend.send_message(ws.id, AgentMessage("s2", "b"))
    async with backend.as_completed([a, b]) as completed:
        got: list[str] = []
        with trio.move_on_after(7):
            # Takes a at 5 s, then is cancelled at 7 s while waiting for b.
            async for rc in completed:
                got.append(rc.run_id)
        assert got == [a]
        await trio.sleep(5)  # b ends meanwhile, with nobody receiving
        with trio.fail_after(TIMEOUT):
            assert [rc.run_id async for rc in completed] == [b]
    assert agent.finished == [a, b]


async def test_leaving_as_completed_early_never_cancels_a_run(backend, autojump_clock):
    ws = await backend.create_workspace("/w", factory())
    ids = [backend.send_message(ws.id, AgentMessage(f"s{n}", "x")) for n in range(3)]
    async with backend.as_completed(ids) as completed:
        async for _ in completed:
            break
        with pytest.raises(RuntimeError, match="entered only once"):
            await completed.__aenter__()
    with pytest.raises(RuntimeError, match="inside its block"):
        await completed.__anext__()
    with trio.fail_after(TIMEOUT):
        assert [(await backend.wait_run(r)).outcome for r in ids] == ["completed"] * 3


async def test_as_completed_must_be_entered(backend, autojump_clock):
    ws = await backend.create_workspace("/w", factory())
    completed = backend.as_completed([backend.send_message(ws.id, AgentMessage("s", "x"))])
    with pytest.raises(RuntimeError, match="inside its block"):
        async for _ in completed:
            pass


async def test_an_error_in_the_block_comes_out_as_itself(backend, autojump_clock):
    ws = await backend.create_workspace("/w", factory())
    run_id = backend.send_message(ws.id, AgentMessage("s", "x"))
    with pytest.raises(KeyError, match="mine"):
        async with backend.as_completed([run_id]):
            raise KeyError("mine")


async def test_as_completed_spans_workspaces_and_their_closing(autojump_clock):
    async with open_backend() as backend:
        one = await backend.create_workspace("/one", factory())
        slow = ScriptedAgent(sleep(10), return_("ok"))
        two = await backend.create_workspace("/two", SessionCoordinator.factory(slow))
        ids = [backend.send_message(ws.id, AgentMessage("s", "x")) for ws in (one, two)]
        ids.append(backend.send_message(two.id, AgentMessage("s", "queued")))
        got: dict[str, str] = {}
        with trio.fail_after(TIMEOUT):
            async with backend.as_completed(ids) as completed:
                async for rc in completed:
                    got[rc.run_id] = rc.outcome
                    if len(got) == 1:
                        await backend.close_workspace(two.id)
    assert got == {ids[0]: "completed", ids[1]: "cancelled", ids[2]: "cancelled"}


async def test_as_completed_on_a_durable_store_yields_only_committed_terminals(
    tmp_path: Path, real_clock
):
    # A durable store shows a terminal once it is committed; as_completed asks it, so it
    # yields exactly what a late wait_run would. Real clock: a writer thread commits.
    async with open_sqlite_ledger(tmp_path / "runs.db") as store, open_backend(store) as backend:
        ws = await backend.create_workspace(str(tmp_path), factory())
        ids = await submit_and_clear(backend, ws.id, "s")
        with trio.fail_after(30):
            async with backend.as_completed(ids) as completed:
                got = [rc async for rc in completed]
        assert sorted(rc.run_id for rc in got) == sorted(ids)
        assert all(store.get(rc.run_id) == rc for rc in got)
