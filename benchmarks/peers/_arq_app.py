"""The arq side of the peers benchmark: one no-op job, its worker settings.

The worker runs as ``arq _arq_app.WorkerSettings`` in the peers' own virtualenv; the Redis URL
comes from ``PEERS_ARQ_REDIS`` (the runner sets it). arq polls: the worker polls the queue
every :data:`POLL` seconds and takes up to ``queue_read_limit`` jobs a poll, and a client polls
for its job's result every :data:`POLL` seconds (``_driver.py``). arq's defaults are 0.5 s and
10 jobs at a time; these are tuned for throughput, in arq's favour.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

REDIS = os.environ.get("PEERS_ARQ_REDIS", "redis://127.0.0.1:6379/1")
POLL = float(os.environ.get("PEERS_ARQ_POLL", "0.002"))


async def noop(ctx: dict[str, Any]) -> None:
    """The job: nothing."""


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 - arq reads class attributes
    redis_settings = RedisSettings.from_dsn(REDIS)
    poll_delay = POLL
    max_jobs = 1000
    keep_result = 600
    handle_signals = True
    log_results = False
