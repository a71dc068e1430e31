"""The cluster checker's agent (tests/test_redis_checker.py): ``--agent cluster_agent:agent``.

Scripted by the prompt, like the demo agent, and it keeps a diary: every execution appends a
``start`` line before its work and an ``end`` line after it (however it ends: returned,
raised or cancelled) to the JSONL file named by ``TRIO_RUNS_CLUSTER_AGENT_LOG`` (no diary
when it is unset). Each line holds the run id, the session, the node's pid and
``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every process on a Linux host, so
lines written by different nodes can be ordered against each other and against the
checker's own fault times.

Prompts:

- ``noop``: returns ``"noop"`` at once;
- ``sleep N``: sleeps ``N`` seconds (a decimal number), then returns the prompt;
- ``fail``: raises (a failed terminal).

A node killed mid-run leaves a ``start`` without an ``end``: the checker ends that execution
at the moment it killed the node.
"""

from __future__ import annotations

import json
import os
import time

import trio

from trio_runs import RunCall, RunContext

LOG_ENV = "TRIO_RUNS_CLUSTER_AGENT_LOG"

__all__ = ["LOG_ENV", "agent"]


def _record(event: str, call: RunCall, **extra: object) -> None:
    # One write(2) of one short line to a file opened with O_APPEND: lines from every node
    # land whole and in order. It is done inline, not in a thread, on purpose: the time is
    # taken and the line written in one step, so a SIGKILL cannot fall between an execution's
    # start and its record (the checker would miss an execution it must see). It is a test
    # agent writing a few hundred bytes to a local file, not I/O worth a thread.
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps(
        {
            "ev": event,
            "run": call.run_id,
            "session": call.session_id,
            "pid": os.getpid(),
            "t": time.monotonic_ns(),
            **extra,
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def agent(call: RunCall, ctx: RunContext) -> object:
    """Run one prompt (see the module docstring), recording its start and its end.

    Cancelled (the run's session cancelled, or the node shutting down), it records an ``end``
    with outcome ``cancelled`` and lets the cancellation go on; it never swallows it.
    """
    _record("start", call, prompt=call.prompt)
    outcome = "cancelled"
    try:
        words = call.prompt.split()
        if words == ["fail"]:
            await trio.lowlevel.checkpoint()
            outcome = "failed"
            raise RuntimeError("the cluster agent failed, as the prompt 'fail' asked")
        if len(words) == 2 and words[0] == "sleep":
            ctx.emit("sleeping")
            await trio.sleep(float(words[1]))
        else:
            await trio.lowlevel.checkpoint()
        outcome = "completed"
        return call.prompt
    finally:
        _record("end", call, outcome=outcome)
