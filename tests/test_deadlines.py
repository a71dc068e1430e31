"""Per-run deadlines: a run that outlives its deadline ends once, failed and ``timed_out``.

The promise: a hung agent does not keep its session's lane, nor its waiters, forever. Past
its deadline (the call's, or the coordinator's default, never more than its maximum) the run
ends with exactly one terminal, failed with ``timed_out`` set (never cancelled), the lane
moves on and every waiter returns. The deadline counts from the run's *start*: time spent
queued behind the session's other runs does not count. Everything runs on the virtual clock,
every wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    RetryPolicy,
    RunCall,
    RunComplete,
    RunContext,
    RunLedger,
    SessionCoordinator,
    SupportsDeadlines,
)

TIMEOUT = 600  # virtual seconds


async def hang(call: RunCall, ctx: RunContext) -> object:
    """An agent that never ends on its own."""
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def nap(call: RunCall, ctx: RunContext) -> object:
    """An agent that takes as many seconds as its prompt says, then returns them."""
    await trio.sleep(float(call.prompt))
    return call.prompt


def coordinator(agent: object = hang, **kwargs: object) -> tuple[SessionCoordinator, RunLedger]:
    ledger = RunLedger()
    coord = SessionCoordinator(
        agent,  # type: ignore[arg-type]
        run_completions=Broker[RunComplete](),
        ledger=ledger,
        **kwargs,  # type: ignore[arg-type]
    )
    return coord, ledger


# -- values ------------------------------------------------------------------------------------


def test_timed_out_terminal_is_a_failure_and_round_trips() -> None:
    """A timed-out terminal is failed, says so by a field, and keeps it across JSON."""
    rc = RunComplete("s", "r", error="timed out", timed_out=True)
    assert rc.outcome == "failed"
    assert rc.to_dict()["timed_out"] is True
    assert RunComplete.from_json(rc.to_json()) == rc
    assert "timed_out" not in RunComplete("s", "r", error="boom").to_dict()


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"cancelled": True, "error": "x"}, {"error": "x", "abandoned": True}],
)
def test_timed_out_terminal_needs_an_error_and_no_other_flag(kwargs: dict[str, object]) -> None:
    """``timed_out`` without an error, or with cancelled or abandoned, is refused."""
    with pytest.raises(ValueError, match="timed-out"):
        RunComplete("s", "r", timed_out=True, **kwargs)  # type: ignore[arg-type]


def test_timed_out_of_the_wrong_type_is_refused_on_decode() -> None:
    with pytest.raises(ValueError, match="timed_out"):
        RunComplete.from_dict({"session_id": "s", "run_id": "r", "error": "x", "timed_out": 1})


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, True, "5"])
def test_deadline_must_be_finite_and_positive(bad: object) -> None:
    """A message's, a call's and a coordinator's deadlines are finite seconds > 0."""
    with pytest.raises(ValueError, match="deadline"):
        AgentMessage("s", "p", deadline=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline"):
        RunCall("s", "p", deadline=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline"):
        AgentMessage.from_dict({"session_id": "s", "prompt": "p", "deadline": bad})
    with pytest.raises(ValueError, match="default_deadline"):
        coordinator(default_deadline=bad)
    with pytest.raises(ValueError, match="max_deadline"):
        coordinator(max_deadline=bad)


def test_deadline_round_trips_and_stays_off_the_wire_when_unset() -> None:
    msg = AgentMessage("s", "p", deadline=2.5)
    assert AgentMessage.from_json(msg.to_json()) == msg
    call = RunCall("s", "p", "r", deadline=3)
    assert RunCall.from_json(call.to_json()) == call
    assert "deadline" not in AgentMessage("s", "p").to_dict()
    assert "deadline" not in RunCall("s", "p").to_dict()


def test_effective_deadline_is_the_calls_or_the_default_capped_by_the_maximum() -> None:
    coord, _ = coordinator(default_deadline=10, max_deadline=60)
    assert isinstance(coord, SupportsDeadlines)
    assert coord.default_deadline == 10
    assert coord.deadline_for(RunCall("s", "p")) == 10
    assert coord.deadline_for(RunCall("s", "p", deadline=30)) == 30
    assert coord.deadline_for(RunCall("s", "p", deadline=300)) == 60
    assert coordinator(max_deadline=60)[0].deadline_for(RunCall("s", "p")) == 60
    assert coordinator()[0].deadline_for(RunCall("s", "p")) is None


# -- the coordinator -----------------------------------------------------------------------------


async def test_a_hung_run_times_out_once_and_its_waiters_return(autojump_clock: object) -> None:
    """Past its deadline a hung run ends failed + timed_out, exactly once, at the deadline."""
    coord, ledger = coordinator()
    seen: list[RunComplete] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                seen.append(await ledger.wait("r1"))

            start = trio.current_time()
            ledger_run = coord.run("s", "p", run_id="r1", deadline=5)
            nursery.start_soon(waiter)
            rc = await ledger_run
    assert trio.current_time() - start == pytest.approx(5)
    assert rc.outcome == "failed"
    assert rc.timed_out
    assert not rc.cancelled
    assert "deadline of 5 s" in (rc.error or "")
    assert seen == [rc]
    assert ledger.get("r1") == rc
    assert ledger.statistics().failed_total == 1
    assert not coord.is_busy()


async def test_queued_time_does_not_count_and_the_lane_moves_on(autojump_clock: object) -> None:
    """A run queued behind a hung one starts when that one times out, with its full deadline."""
    coord, _ledger = coordinator(nap, default_deadline=10)
    ends: dict[str, tuple[float, RunComplete]] = {}

    async def run(prompt: str, run_id: str) -> None:
        rc = await coord.run("s", prompt, run_id=run_id)
        ends[run_id] = (trio.current_time(), rc)

    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "1000", "hung")
            await trio.testing.wait_all_tasks_blocked()
            # Queued for 10 s, then needs 8 of its own 10: it completes.
            nursery.start_soon(run, "8", "next")
    hung_at, hung = ends["hung"]
    next_at, nxt = ends["next"]
    assert hung.timed_out
    assert hung_at - start == pytest.approx(10, abs=0.1)
    assert nxt.outcome == "completed"
    assert nxt.result == "8"
    assert next_at - start == pytest.approx(18, abs=0.1)


async def test_a_run_that_ends_in_time_is_untouched(autojump_clock: object) -> None:
    coord, _ = coordinator(nap, default_deadline=10)
    with trio.fail_after(TIMEOUT):
        rc = await coord.run("s", "9.5")
    assert rc.outcome == "completed"
    assert not rc.timed_out


async def test_cancel_before_the_deadline_stays_a_cancellation(autojump_clock: object) -> None:
    """An explicit cancel is never reported as a timeout, nor as an error."""
    coord, _ = coordinator(default_deadline=10)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            result: list[RunComplete] = []

            async def run() -> None:
                result.append(await coord.run("s", "p"))

            nursery.start_soon(run)
            await trio.sleep(3)
            coord.cancel("s")
    assert result[0].outcome == "cancelled"
    assert not result[0].timed_out


async def test_deadline_covers_retries_and_their_backoff(autojump_clock: object) -> None:
    """Attempts share the run's deadline: a retried run cannot outlive it."""
    attempts: list[int] = []

    async def flaky(call: RunCall, ctx: RunContext) -> object:
        attempts.append(call.attempt)
        await trio.sleep(4)
        raise RuntimeError("flaky")

    coord, _ = coordinator(flaky, default_deadline=10, retry=RetryPolicy(max_attempts=5))
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        rc = await coord.run("s", "p")
    assert rc.timed_out
    assert trio.current_time() - start == pytest.approx(10, abs=0.1)
    assert attempts == [1, 2, 3]


async def test_an_agent_raising_while_cut_off_still_times_out(autojump_clock: object) -> None:
    async def stubborn(call: RunCall, ctx: RunContext) -> object:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    coord, _ = coordinator(stubborn, default_deadline=2)
    with trio.fail_after(TIMEOUT):
        rc = await coord.run("s", "p")
    assert rc.timed_out
    assert rc.outcome == "failed"


# -- the backend ---------------------------------------------------------------------------------


async def test_backend_message_deadline_reaches_the_run(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock: object
) -> None:
    """``AgentMessage.deadline`` is the run's: a hung run submitted with it times out."""
    ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(hang))
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        rc = await backend.run(ws.id, AgentMessage("s", "p", deadline=7))
    assert rc.timed_out
    assert trio.current_time() - start == pytest.approx(7)
    # The lane moved on: the session takes a new run.
    assert not ws.coordinator.is_session_busy("s")  # type: ignore[union-attr]


async def test_backend_workspace_default_deadline(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock: object
) -> None:
    ws = await backend.create_workspace(
        tmp_path, SessionCoordinator.factory(hang, default_deadline=3, max_deadline=5)
    )
    with trio.fail_after(TIMEOUT):
        assert (await backend.run(ws.id, AgentMessage("s", "p"))).timed_out
        start = trio.current_time()
        rc = await backend.run(ws.id, AgentMessage("s", "p", deadline=100))
    assert rc.timed_out
    assert trio.current_time() - start == pytest.approx(5)


# -- the HTTP service (in-process, virtual time) ---------------------------------------------------


async def test_service_caps_deadlines_and_refuses_longer_ones(
    backend: Backend, tmp_path: pathlib.Path, autojump_clock: object
) -> None:
    """The server's maximum: a longer deadline is a 422, none means the workspace's default
    capped by the maximum, and a timed-out run reads as failed with ``timed_out``."""
    from trio_runs.http.schema import ApiError, CreateWorkspace, SubmitBatch, SubmitMessage
    from trio_runs.http.service import RunService

    factories = {
        "plain": SessionCoordinator.factory(hang),
        "short": SessionCoordinator.factory(hang, default_deadline=4),
    }
    service = RunService(
        backend,
        lambda ws: factories[pathlib.Path(ws.path).name](ws),
        workspace_root=tmp_path,
        max_deadline=30,
    )
    plain, _ = await service.create_workspace(CreateWorkspace("plain"))
    short, _ = await service.create_workspace(CreateWorkspace("short"))
    with pytest.raises(ApiError) as info:
        await service.submit(plain.id, SubmitMessage("s", "p", deadline=31))
    assert (info.value.status, info.value.code) == (422, "deadline_too_long")
    assert backend.ledger.statistics().accepted_total == 0
    # In a batch, as for a message breaking the identifier rule: the whole batch is refused.
    with pytest.raises(ApiError) as info:
        await service.submit_batch(
            plain.id, SubmitBatch([SubmitMessage("b", "p"), SubmitMessage("s", "p", deadline=99)])
        )
    assert (info.value.status, info.value.code) == (422, "deadline_too_long")
    assert info.value.message.startswith("messages[1]: ")
    assert backend.ledger.statistics().accepted_total == 0
    [accepted] = await service.submit_batch(plain.id, SubmitBatch([SubmitMessage("b", "p")]))
    assert isinstance(accepted, str)
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        asked = await service.submit(plain.id, SubmitMessage("s1", "p", deadline=2))
        capped = await service.submit(plain.id, SubmitMessage("s2", "p"))
        default = await service.submit(short.id, SubmitMessage("s3", "p"))
        ends = {}
        for run_id in (asked, default, capped):
            rc = await backend.wait_run(run_id)
            ends[run_id] = trio.current_time() - start
            assert rc.timed_out
        view = service.run(capped)
    assert ends[asked] == pytest.approx(2, abs=0.1)
    assert ends[default] == pytest.approx(4, abs=0.1)
    assert ends[capped] == pytest.approx(30, abs=0.1)
    assert view.state == "failed"
    assert view.terminal is not None
    assert view.terminal.timed_out


def test_the_openapi_document_declares_the_servers_maximum() -> None:
    """A deadline above the server's maximum is refused, so the document says so."""
    from trio_runs.http.openapi import openapi_document

    def maximum(document: dict[str, object]) -> object:
        schemas = document["components"]["schemas"]  # type: ignore[index]
        return schemas["SubmitMessage"]["properties"]["deadline"]["anyOf"][0]["maximum"]

    assert maximum(openapi_document(max_deadline=30)) == 30
    assert maximum(openapi_document()) == 1e9


def test_the_in_memory_ledger_keeps_the_flag_of_older_terminals() -> None:
    """``timed_out`` survives however the ledger keeps a terminal as newer ones arrive."""
    ledger = RunLedger(retain=20_000)
    ledger.accept("late", "s")
    ledger.complete(RunComplete("s", "late", error="timed out", timed_out=True))
    for n in range(10_000):
        ledger.accept(f"r{n}", "s")
        ledger.complete(RunComplete("s", f"r{n}", result=n))
    kept = ledger.get("late")
    assert kept is not None
    assert kept.timed_out
