"""The Celery side of the peers benchmark: one no-op task, Redis as broker and result backend.

Imported by the Celery worker (``celery -A _celery_app worker --pool threads``) and by the
driver (``_driver.py``), both in the peers' own virtualenv, never by trio-runs. The Redis URL
comes from ``PEERS_CELERY_REDIS`` (the runner sets it).
"""

from __future__ import annotations

import os

from celery import Celery

REDIS = os.environ.get("PEERS_CELERY_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("peers", broker=REDIS, backend=REDIS)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # No-op jobs: hand the worker several at a time, as a tuned deployment would.
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    result_expires=600,
)


@app.task(name="peers.noop")
def noop() -> None:
    """The job: nothing."""
