"""5. HTTP round trips - NOT AVAILABLE YET: the HTTP service does not exist.

STUB. Once ``trio_runs.http`` serves submissions, this measures submit + wait round trips per
second with 1, 8 and 64 concurrent clients on loopback (127.0.0.1 only), p50/p99 latency,
next to the in-process figure (``Backend.run``) measured in the same run. Until then it
reports itself as skipped, and ``python -m benchmarks.http`` exits 2.

``python -m benchmarks.http`` / ``python -m benchmarks --http``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._common import Report

NOT_AVAILABLE = (
    "not available yet: the HTTP service does not exist. Item 5 (submit + wait round trips "
    "per second with 1, 8 and 64 concurrent clients on loopback, p50/p99, beside the "
    "in-process figure) will be measured here once it does"
)


def run(*, quick: bool = False, reps: int = 5) -> Report:
    """A skipped report saying why: there is no HTTP service to measure yet."""
    return Report(
        name="http",
        title="5. HTTP: submit + wait round trips over loopback",
        baseline="the in-process Backend.run round trip (once implemented)",
        params={"clients": [1, 8, 64], "reps": reps, "quick": quick},
        skipped=NOT_AVAILABLE,
    )


def main(argv: Sequence[str] | None = None) -> int:
    print(f"benchmarks.http: {NOT_AVAILABLE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
