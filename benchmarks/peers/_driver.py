"""The peers' clients: Celery and arq "submit a no-op job and wait for its result" loops.

Runs in the peers' own virtualenv (``benchmarks/peers/.venv``: Celery and arq are not
trio-runs dependencies), started by the runner (``benchmarks/peers/__init__.py``) as
``python _driver.py``. It reads one JSON command a line on stdin and answers each with one JSON
line on stdout, until stdin closes:

- ``{"op": "ready", "timeout": S}``: one job through each system, each bounded by ``S``
  seconds (the workers are up) -> ``{"ok": true}`` or ``{"ok": false, "error": "..."}``;
- ``{"op": "measure", "system": "celery" | "arq", "clients": C, "jobs": N}``: ``C``
  concurrent clients share ``N`` jobs, each submitting one job and waiting for its result
  before the next -> ``{"wall": s, "client_cpu": s, "ended": n, "completed": n,
  "latencies": [s, ...]}``, ``latencies`` holding each completed job's submit -> result
  seconds as its client saw them.

Celery's clients are threads (its client is blocking), arq's are asyncio tasks (its client is
async), each the way that library is meant to be used. Every wait is bounded by
:data:`JOB_TIMEOUT`. Nothing here imports trio-runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import _arq_app
import _celery_app
from arq import create_pool
from arq.connections import RedisSettings

JOB_TIMEOUT = float(os.environ.get("PEERS_JOB_TIMEOUT", "60"))


def _shares(clients: int, jobs: int) -> list[int]:
    return [jobs // clients + (i < jobs % clients) for i in range(clients)]


def measure_celery(clients: int, jobs: int) -> dict[str, Any]:
    completed = 0
    lock = threading.Lock()
    errors: list[BaseException] = []
    latencies: list[float] = []
    start_line = threading.Barrier(clients + 1, timeout=JOB_TIMEOUT)

    def client(share: int) -> None:
        nonlocal completed
        done = 0
        mine: list[float] = []
        try:
            start_line.wait()
            for _ in range(share):
                sent = time.perf_counter()
                _celery_app.noop.delay().get(timeout=JOB_TIMEOUT)
                mine.append(time.perf_counter() - sent)
                done += 1
        except BaseException as exc:  # reported to the runner, which fails the figure
            errors.append(exc)
        with lock:
            completed += done
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(s,)) for s in _shares(clients, jobs)]
    for t in threads:
        t.start()
    cpu = time.process_time()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(JOB_TIMEOUT * (jobs + 1))
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"celery client failed: {errors[0]!r}")
    return {
        "wall": wall,
        "client_cpu": time.process_time() - cpu,
        "ended": jobs,
        "completed": completed,
        "latencies": latencies,
    }


async def _measure_arq(clients: int, jobs: int) -> dict[str, Any]:
    redis = await create_pool(RedisSettings.from_dsn(_arq_app.REDIS))
    try:
        completed = 0
        latencies: list[float] = []

        async def client(share: int) -> None:
            nonlocal completed
            for _ in range(share):
                sent = time.perf_counter()
                job = await redis.enqueue_job("noop")
                assert job is not None
                await job.result(timeout=JOB_TIMEOUT, poll_delay=_arq_app.POLL)
                latencies.append(time.perf_counter() - sent)
                completed += 1

        cpu = time.process_time()
        start = time.perf_counter()
        async with asyncio.timeout(JOB_TIMEOUT * (jobs + 1)):
            await asyncio.gather(*(client(s) for s in _shares(clients, jobs)))
        wall = time.perf_counter() - start
        return {
            "wall": wall,
            "client_cpu": time.process_time() - cpu,
            "ended": jobs,
            "completed": completed,
            "latencies": latencies,
        }
    finally:
        await redis.aclose()


def measure(system: str, clients: int, jobs: int) -> dict[str, Any]:
    if system == "celery":
        return measure_celery(clients, jobs)
    if system == "arq":
        return asyncio.run(_measure_arq(clients, jobs))
    raise ValueError(f"unknown system {system!r}")


def ready(timeout: float) -> dict[str, Any]:
    global JOB_TIMEOUT
    saved, JOB_TIMEOUT = JOB_TIMEOUT, timeout
    try:
        for system in ("celery", "arq"):
            measure(system, 1, 1)
    finally:
        JOB_TIMEOUT = saved
    return {"ok": True}


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            if command["op"] == "ready":
                answer = ready(float(command["timeout"]))
            else:
                answer = measure(command["system"], int(command["clients"]), int(command["jobs"]))
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
