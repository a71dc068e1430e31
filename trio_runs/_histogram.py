"""Fixed-bucket duration histograms for ``statistics()`` (private).

A recorder is a mutable counter array behind a frozen snapshot, the way Prometheus
histograms are cumulative: ``observe`` is O(buckets) with no allocation, a snapshot is a
frozen :class:`Histogram` that can be summed with another of the same buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

import attrs

__all__ = ["DURATION_BUCKETS", "Histogram", "HistogramRecorder"]

DURATION_BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Upper bounds in seconds: from a millisecond (a terminal's delivery) to an hour (a run)."""


@attrs.frozen(kw_only=True)
class Histogram:
    """Observations of a duration, in seconds, by bucket.

    ``counts[i]`` is how many observations were ``<= bounds[i]`` and above the bound before
    it; the last count is those above every bound. Never cumulative, so two snapshots with
    the same bounds add up with :meth:`merged`.
    """

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(DURATION_BUCKETS) + 1)
    count: int = 0
    """Observations in all."""
    sum: float = 0.0
    """The observations added up, in seconds."""

    def merged(self, other: Histogram) -> Histogram:
        """This histogram and ``other`` (same bounds) added up."""
        if other.bounds != self.bounds:
            raise ValueError("only histograms with the same bounds can be merged")
        return Histogram(
            bounds=self.bounds,
            counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            count=self.count + other.count,
            sum=self.sum + other.sum,
        )


class HistogramRecorder:
    """Where a component records a duration; :meth:`snapshot` gives the frozen value."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration (negative ones, from a clock that went back, count as 0)."""
        if seconds < 0.0:  # a comparison, not max(): three of these run per run
            seconds = 0.0
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> Histogram:
        """The observations so far, frozen."""
        return Histogram(
            bounds=self._bounds,
            counts=tuple(self._counts),
            count=sum(self._counts),
            sum=self._sum,
        )
