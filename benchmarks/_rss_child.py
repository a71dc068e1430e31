"""What ``benchmarks.memory`` runs in a fresh interpreter for each N: RSS around N runs.

Kept apart, importing no more than the runs need, so the process measured holds the runs
and little else (``trio.testing`` and ``tracemalloc``, which the parent imports, are not
loaded here).
"""

from __future__ import annotations

import trio

from ._common import rss_now, rss_peak, settle
from .dispatch import BATCH, floor_runs, trio_runs_runs


def measure(kind: str, n: int, retain: int) -> dict[str, int]:
    """RSS before and after ``n`` runs: ``kind`` is ``"trio_runs"`` or ``"floor"``."""
    settle()
    start_rss = rss_now()
    if kind == "floor":
        trio.run(floor_runs, n)
    else:
        trio.run(trio_runs_runs, n, BATCH, retain)
    settle()
    return {"start_rss": start_rss, "end_rss": rss_now(), "peak_rss": rss_peak()}
