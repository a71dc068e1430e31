"""``/metrics``: a ``prometheus_client`` collector over ``Backend.statistics()``.

Nothing here keeps counts of its own or reads private state: each scrape takes one snapshot
of the backend (its workspaces, brokers, coordinators and store) and renders it, with the
process metrics beside it. The exposition format follows the scrape's ``Accept`` header
(OpenMetrics when asked for, the Prometheus text format otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .._histogram import Histogram
from .service import RunService

__all__ = ["ServiceCollector", "exposition", "registry_for"]


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    # Prometheus buckets are cumulative and end with +Inf.
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
    return out


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=_buckets(histogram), sum_value=histogram.sum
    )


class ServiceCollector(Collector):
    """Collects the service's metrics from one ``statistics()`` snapshot per scrape."""

    def __init__(self, service: RunService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        stats = self._service.backend.statistics()
        ledger = stats.ledger
        yield CounterMetricFamily(
            "trio_runs_runs_accepted", "Runs accepted.", value=ledger.accepted_total
        )
        terminals = CounterMetricFamily(
            "trio_runs_terminals", "Terminals recorded, by outcome.", labels=["outcome"]
        )
        terminals.add_metric(["completed"], ledger.completed_total)
        terminals.add_metric(["failed"], ledger.failed_total)
        terminals.add_metric(["cancelled"], ledger.cancelled_total)
        yield terminals
        yield CounterMetricFamily(
            "trio_runs_duplicate_terminals_suppressed",
            "Second terminals for a run refused by the store (never fanned out).",
            value=ledger.duplicates_suppressed,
        )
        yield CounterMetricFamily(
            "trio_runs_terminals_evicted",
            "Terminals forgotten to stay within the retention bound.",
            value=ledger.evicted_total,
        )
        # Event streams read the workspaces' journals, which hold broker subscriptions of
        # their own: count the streams as the subscribers, not the journals.
        own, readers, reader_drops, reader_overflows = self._service.journal_statistics()
        yield CounterMetricFamily(
            "trio_runs_lossy_events_dropped",
            "Lossy progress events and notifications dropped for slow subscribers.",
            value=stats.drops + reader_drops,
        )
        yield CounterMetricFamily(
            "trio_runs_subscriber_overflows",
            "Subscribers disconnected for exceeding their backlog limit.",
            value=stats.overflows + reader_overflows,
        )
        for name, documentation, value in (
            ("trio_runs_runs_pending", "Runs accepted and not ended.", ledger.pending),
            ("trio_runs_runs_active", "Runs running now.", stats.active),
            ("trio_runs_runs_queued", "Runs waiting in a queue.", stats.queued),
            ("trio_runs_terminals_retained", "Terminals held for late waiters.", ledger.retained),
            (
                "trio_runs_subscribers",
                "Broker subscriptions open (event streams included).",
                stats.subscribers - own + readers,
            ),
            (
                "trio_runs_event_streams",
                "Server-Sent Events connections open.",
                self._service.stream_connections,
            ),
            ("trio_runs_workspaces", "Workspaces open.", stats.workspaces),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)
        yield _histogram(
            "trio_runs_queue_wait_seconds",
            "Seconds from a run's entry to its start.",
            stats.queue_wait,
        )
        yield _histogram(
            "trio_runs_run_duration_seconds",
            "Seconds from a run's start to its terminal.",
            stats.run_duration,
        )
        if ledger.delivery_latency is not None:
            yield _histogram(
                "trio_runs_terminal_delivery_seconds",
                "Seconds from a terminal being recorded to a blocked waiter getting it.",
                ledger.delivery_latency,
            )


def registry_for(service: RunService) -> CollectorRegistry:
    """A registry with the service's collector and this process's metrics (CPU, memory…)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type, in the format the ``Accept`` header asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
