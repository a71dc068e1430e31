"""Introspection the Trio way: ``statistics()`` returns frozen values, counters are read-only,
and ``/metrics`` is built from ``statistics()`` alone (with process metrics beside it)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Broker,
    EventType,
    Histogram,
    RunComplete,
    RunLedger,
    SessionCoordinator,
    open_backend,
)
from trio_runs.http.metrics import exposition, registry_for
from trio_runs.http.service import RunService
from trio_runs.testing import ScriptedAgent, return_, sleep

TIMEOUT = 600


def bucket_of(histogram: Histogram, seconds: float) -> int:
    """How many observations fell in the bucket that holds ``seconds``."""
    index = next(i for i, bound in enumerate(histogram.bounds) if seconds <= bound)
    return histogram.counts[index]


def test_broker_statistics_are_a_frozen_snapshot_and_settings_are_read_only():
    broker: Broker[int] = Broker(buffer_size=2, max_backlog=3)
    stats = broker.statistics()
    assert (stats.subscribers, stats.backlog, stats.drops, stats.overflows) == (0, 0, 0, 0)
    assert (stats.buffer_size, stats.max_backlog, stats.shut_down) == (2, 3, False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.drops = 1  # type: ignore[misc]
    for name in ("buffer_size", "max_backlog", "drop_count", "overflow_count"):
        with pytest.raises(AttributeError):
            setattr(broker, name, 0)


async def test_broker_statistics_count_backlog_drops_and_overflows(autojump_clock):
    broker: Broker[int] = Broker(buffer_size=2, max_backlog=3)
    async with broker.subscribe():
        for n in range(3):
            broker.publish(EventType.CREATED, n)
        assert broker.statistics().backlog == 2
        assert broker.statistics().drops == 1
        broker.publish_must_deliver(EventType.UPDATED, 9)
        broker.publish_must_deliver(EventType.UPDATED, 10)
        stats = broker.statistics()
        assert (stats.overflows, stats.subscribers, stats.backlog) == (1, 0, 0)
    broker.shutdown()
    assert broker.statistics().shut_down


def test_ledger_counters_are_read_only_and_match_statistics():
    ledger = RunLedger(retain=2)
    for n in range(3):
        ledger.accept(f"r{n}", "s")
    ledger.withdraw("r2")
    ledger.complete(RunComplete("s", "r0", result=1))
    ledger.complete(RunComplete("s", "r0", error="again"))
    ledger.complete(RunComplete("s", "r1", cancelled=True))
    ledger.complete(RunComplete("s", "x", error="stray"))
    stats = ledger.statistics()
    assert attrs.asdict(stats, recurse=False) | {"delivery_latency": None} == {
        "accepted_total": 2,
        "pending": 0,
        "retained": 2,
        "completed_total": 1,
        "failed_total": 1,
        "cancelled_total": 1,
        "duplicates_suppressed": 1,
        "evicted_total": 1,
        "delivery_latency": None,
    }
    for name in ("retain", "accepted_total", "duplicates_suppressed", "evicted_total"):
        with pytest.raises(AttributeError):
            setattr(ledger, name, 0)
    with pytest.raises(TypeError):
        ledger.outcomes["completed"] = 5  # type: ignore[index]


async def test_ledger_times_each_blocked_waiter_from_record_to_wake(autojump_clock):
    ledger = RunLedger()
    ledger.accept("r", "s")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ledger.wait, "r")
        await trio.testing.wait_all_tasks_blocked()
        ledger.complete(RunComplete("s", "r"))
    latency = ledger.statistics().delivery_latency
    assert latency is not None
    assert (latency.count, latency.sum) == (3, 0.0)  # virtual time: no delay at all
    with trio.fail_after(TIMEOUT):
        await ledger.wait("r")  # a late waiter did not block: not a delivery
    assert ledger.statistics().delivery_latency.count == 3  # type: ignore[union-attr]


async def test_coordinator_statistics_time_queue_wait_and_run_duration(autojump_clock):
    agent = ScriptedAgent(sleep(7), return_("ok"))
    async with open_backend() as backend:
        ws = await backend.create_workspace("/w", SessionCoordinator.factory(agent))
        coordinator = ws.coordinator
        assert isinstance(coordinator, SessionCoordinator)
        ids = [backend.send_message(ws.id, AgentMessage("s", f"p{n}")) for n in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        stats = coordinator.statistics()
        assert (stats.sessions, stats.accepted_total, stats.active, stats.queued) == (1, 3, 1, 2)
        with trio.fail_after(TIMEOUT):
            for run_id in ids:
                await backend.wait_run(run_id)
        stats = coordinator.statistics()
        # Each run took 7 s; the second waited 7 s in the queue and the third 14 s.
        assert stats.run_duration.count == 3
        assert stats.run_duration.sum == pytest.approx(21)
        assert stats.queue_wait.sum == pytest.approx(21)
        assert bucket_of(stats.queue_wait, 0.0) == 1
        assert bucket_of(stats.queue_wait, 7) == 1
        assert bucket_of(stats.queue_wait, 14) == 1
        totals = backend.statistics()
        assert totals.run_duration == stats.run_duration
        await backend.close_workspace(ws.id)
        # Closed workspaces' histograms stay in the backend's totals.
        assert backend.statistics().run_duration == stats.run_duration
        assert backend.statistics().workspaces == 0


async def test_metrics_come_from_statistics_with_histograms_and_process_metrics(
    autojump_clock, tmp_path: Path
):
    agent = ScriptedAgent(sleep(2), return_("ok"))
    async with open_backend() as backend:
        service = RunService(backend, SessionCoordinator.factory(agent), workspace_root=tmp_path)
        ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
        run_id = backend.send_message(ws.id, AgentMessage("s", "x"))
        with trio.fail_after(TIMEOUT):
            await backend.wait_run(run_id)
        registry = registry_for(service)
        text, content_type = exposition(registry, None)
        lines = text.decode().splitlines()
        assert content_type.startswith("text/plain")
        assert "trio_runs_run_duration_seconds_count 1.0" in lines
        assert 'trio_runs_run_duration_seconds_bucket{le="5.0"} 1.0' in lines
        assert 'trio_runs_run_duration_seconds_bucket{le="1.0"} 0.0' in lines
        assert "trio_runs_queue_wait_seconds_count 1.0" in lines
        assert "trio_runs_terminal_delivery_seconds_count 1.0" in lines
        assert any(line.startswith("process_cpu_seconds_total ") for line in lines)
        om, om_type = exposition(registry, "application/openmetrics-text; version=1.0.0")
        assert om_type.startswith("application/openmetrics-text")
        assert om.decode().endswith("# EOF\n")
        assert "trio_runs_runs_accepted_total 1.0" in om.decode().splitlines()
