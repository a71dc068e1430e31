"""3. Broker under flood: lossy events as fast as possible, terminals at 1 kHz.

For S = 1, 100 and 1,000 subscribers, one task floods lossy events while another publishes a
terminal every millisecond with ``publish_must_deliver``. Reported: the lossy publish cost
per subscriber (us), the terminal delivery latency p50/p99 (``publish_must_deliver`` ->
the subscriber's ``async for`` yields it), the lossy drops, and the terminals lost (a
terminal published and never received, or a subscriber disconnected: must be 0 everywhere).

"As fast as possible" in Trio: the flooder publishes in a tight loop and yields to the
scheduler only every ``slice_ms`` (without that no other task would ever run). Subscribers
are plain ``async for`` consumers, one task per subscription, taking one event per
scheduler pass, so the flood outruns them and their lossy buffers fill and drop.

Two topologies:

- **lanes** - how a ``Workspace`` is wired: lossy events on one broker (``events``),
  terminals on another (``run_completions``); every subscriber holds one subscription to
  each. Lossy traffic cannot get in front of a terminal; what delays it is only the CPU the
  flood and the other subscribers take. The latency target is measured here.
- **shared** - both lanes on one broker. ``Broker`` keeps one ordered queue per subscriber
  (a documented promise), so a terminal waits behind the lossy events queued before it
  (up to ``buffer_size``): its latency is the time to drain them, reported for information.

Floor: the same fan-out in bare Trio - a ``trio.open_memory_channel(inf)`` per subscriber
and lane, ``send_nowait``, and a per-subscriber count of queued events to drop lossy events
past ``buffer_size``.

``python -m benchmarks.flood [--quick] [--json PATH]``
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from trio_runs import Broker, EventType, RunComplete, RunProgress

from ._common import Report, Row, Stat, Target, paired, percentile, ratios, timer

FULL_SUBSCRIBERS = (1, 100, 1_000)
FULL_DURATION = 1.0
QUICK_DURATION = 0.15
SHARED_DURATION = 0.25
QUICK_SHARED_DURATION = 0.05
"""The shared topology floods for less time: draining what queued up behind the flood (one
event per subscriber per scheduler pass) takes far longer than the flood itself."""
TERMINAL_HZ = 1_000
SLICE_MS = 0.5
BUFFER_SIZE = 4096
LATENCY_TARGET_MS = 5.0
DRAIN_TIMEOUT = 120.0

_PROGRESS = RunProgress("flood", "run", "token")


class _Trial:
    """What one flood trial measured."""

    def __init__(self) -> None:
        self.publish_seconds = 0.0
        self.lossy_published = 0
        self.terminals_published = 0
        self.terminals_received = 0
        self.lossy_received = 0
        self.drops = 0
        self.overflows = 0
        self.latencies: list[float] = []


class _FloorSubscriber:
    """One bare-Trio subscriber: a memory channel per lane and a count of queued events."""

    __slots__ = ("queued", "receive", "send")

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[Any](math.inf)
        self.queued = 0


async def _drive(
    trial: _Trial,
    duration: float,
    slice_s: float,
    publish_lossy: Callable[[], None],
    publish_terminal: Callable[[RunComplete], None],
) -> None:
    """Flood and tick for ``duration`` seconds; returns when both stopped."""
    stop = False

    async def flooder() -> None:
        published = 0
        spent = 0.0
        while not stop:
            # The cost is counted in CPU time: a slice during which another process held the
            # core would otherwise be charged to the broker.
            cpu = time.process_time()
            until = timer() + slice_s
            while timer() < until:
                for _ in range(8):
                    publish_lossy()
                published += 8
            spent += time.process_time() - cpu
            await trio.lowlevel.checkpoint()
        trial.publish_seconds = spent
        trial.lossy_published = published

    async def ticker() -> None:
        period = 1.0 / TERMINAL_HZ
        due = trio.current_time()
        seq = 0
        while not stop:
            due += period
            await trio.sleep_until(max(due, trio.current_time()))
            publish_terminal(RunComplete("flood", f"t{seq}", result=timer()))
            seq += 1
        trial.terminals_published = seq

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flooder)
        nursery.start_soon(ticker)
        await trio.sleep(duration)
        stop = True


async def _wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(DRAIN_TIMEOUT):
        # The condition spans every subscriber's counter: a 1 ms poll is plenty for a drain.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.001)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def broker_trial(
    subscribers: int, duration: float, topology: str, slice_s: float = SLICE_MS / 1e3
) -> _Trial:
    """One flood of ``duration`` seconds through ``trio_runs.Broker``."""
    trial = _Trial()
    lossy: Broker[Any] = Broker(buffer_size=BUFFER_SIZE)
    terminals: Broker[Any] = lossy if topology == "shared" else Broker(buffer_size=BUFFER_SIZE)
    received = [0] * subscribers

    async def terminal_consumer(index: int, *, task_status: trio.TaskStatus[None]) -> None:
        async with terminals.subscribe() as subscription:
            task_status.started()
            try:
                async for event in subscription:
                    payload = event.payload
                    if type(payload) is RunComplete:
                        trial.latencies.append(timer() - payload.result)  # type: ignore[operator]
                        received[index] += 1
                    else:
                        trial.lossy_received += 1
            except Exception:
                trial.overflows += 1

    async def lossy_consumer(*, task_status: trio.TaskStatus[None]) -> None:
        async with lossy.subscribe() as subscription:
            task_status.started()
            async for _ in subscription:
                trial.lossy_received += 1

    def publish_lossy() -> None:
        lossy.publish(EventType.CREATED, _PROGRESS)

    def publish_terminal(rc: RunComplete) -> None:
        terminals.publish_must_deliver(EventType.UPDATED, rc)

    async with trio.open_nursery() as nursery:
        for index in range(subscribers):
            await nursery.start(terminal_consumer, index)
            if topology == "lanes":
                await nursery.start(lossy_consumer)
        await _drive(trial, duration, slice_s, publish_lossy, publish_terminal)
        # The flood is over: every terminal published must still arrive.
        await _wait_for(
            lambda: trial.overflows > 0 or min(received) == trial.terminals_published,
            "the terminals to drain",
        )
        nursery.cancel_scope.cancel()
    trial.terminals_received = sum(received)
    trial.drops = lossy.drop_count
    trial.overflows += lossy.overflow_count + (
        terminals.overflow_count if terminals is not lossy else 0
    )
    return trial


async def floor_trial(
    subscribers: int, duration: float, topology: str, slice_s: float = SLICE_MS / 1e3
) -> _Trial:
    """The same flood through bare Trio memory channels."""
    trial = _Trial()
    terminal_subs = [_FloorSubscriber() for _ in range(subscribers)]
    lossy_subs = (
        terminal_subs if topology == "shared" else [_FloorSubscriber() for _ in range(subscribers)]
    )
    received = [0] * subscribers
    drops = 0

    async def terminal_consumer(index: int, sub: _FloorSubscriber) -> None:
        async for item in sub.receive:
            sub.queued -= 1
            if type(item) is RunComplete:
                trial.latencies.append(timer() - item.result)  # type: ignore[operator]
                received[index] += 1
            else:
                trial.lossy_received += 1

    async def lossy_consumer(sub: _FloorSubscriber) -> None:
        async for _ in sub.receive:
            sub.queued -= 1
            trial.lossy_received += 1

    def publish_lossy() -> None:
        nonlocal drops
        for sub in lossy_subs:
            if sub.queued >= BUFFER_SIZE:
                drops += 1
                continue
            sub.queued += 1
            sub.send.send_nowait(_PROGRESS)

    def publish_terminal(rc: RunComplete) -> None:
        for sub in terminal_subs:
            sub.queued += 1
            sub.send.send_nowait(rc)

    async with trio.open_nursery() as nursery:
        for index, sub in enumerate(terminal_subs):
            nursery.start_soon(terminal_consumer, index, sub)
        if topology == "lanes":
            for sub in lossy_subs:
                nursery.start_soon(lossy_consumer, sub)
        await trio.lowlevel.checkpoint()
        await _drive(trial, duration, slice_s, publish_lossy, publish_terminal)
        await _wait_for(lambda: min(received) == trial.terminals_published, "the terminals")
        nursery.cancel_scope.cancel()
    trial.terminals_received = sum(received)
    trial.drops = drops
    return trial


def _paired_trials(
    reps: int, count: int, seconds: float, topology: str
) -> tuple[list[_Trial], list[_Trial]]:
    base: list[_Trial] = []
    subj: list[_Trial] = []

    def floor_rep() -> float:
        base.append(trio.run(floor_trial, count, seconds, topology))
        return 0.0

    def subject_rep() -> float:
        subj.append(trio.run(broker_trial, count, seconds, topology))
        return 0.0

    paired(reps, floor_rep, subject_rep)
    return base, subj


def _summarise(
    report: Report, label: str, subscribers: int, base: list[_Trial], subj: list[_Trial]
) -> tuple[Stat, int]:
    def cost(t: _Trial) -> float:
        return t.publish_seconds / max(t.lossy_published * subscribers, 1) * 1e6

    costs_s, costs_b = [cost(t) for t in subj], [cost(t) for t in base]
    report.add(
        Row(
            label,
            "lossy publish cost per subscriber (cpu)",
            "us",
            Stat.of(costs_s),
            Stat.of(costs_b),
            ratios(costs_s, costs_b),
        )
    )
    p50_s = [percentile(t.latencies, 50) * 1e3 for t in subj]
    p50_b = [percentile(t.latencies, 50) * 1e3 for t in base]
    report.add(
        Row(
            label,
            "terminal latency p50",
            "ms",
            Stat.of(p50_s),
            Stat.of(p50_b),
            ratios(p50_s, p50_b),
        )
    )
    p99_s = [percentile(t.latencies, 99) * 1e3 for t in subj]
    p99_b = [percentile(t.latencies, 99) * 1e3 for t in base]
    p99 = Stat.of(p99_s)
    report.add(Row(label, "terminal latency p99", "ms", p99, Stat.of(p99_b), ratios(p99_s, p99_b)))
    report.add(
        Row(
            label,
            "terminals published",
            "count",
            Stat.of(t.terminals_published for t in subj),
            Stat.of(t.terminals_published for t in base),
            note="one every ms while the scheduler keeps up; fewer when a pass takes longer",
        )
    )
    report.add(
        Row(
            label,
            "lossy published",
            "count",
            Stat.of(t.lossy_published for t in subj),
            Stat.of(t.lossy_published for t in base),
            note="a cheaper publish floods more in the same time (and in the shared topology "
            "queues more in front of each terminal)",
        )
    )
    report.add(
        Row(
            label,
            "lossy drops per subscriber",
            "count",
            Stat.of(t.drops / subscribers for t in subj),
            Stat.of(t.drops / subscribers for t in base),
        )
    )
    lost = [t.terminals_published * subscribers - t.terminals_received + t.overflows for t in subj]
    report.add(
        Row(
            label,
            "terminals lost",
            "count",
            Stat.of(lost),
            Stat.of(t.terminals_published * subscribers - t.terminals_received for t in base),
        )
    )
    return p99, max(lost)


def run(
    *,
    quick: bool = False,
    reps: int = 5,
    subscribers: Sequence[int] = FULL_SUBSCRIBERS,
    duration: float | None = None,
    topologies: Sequence[str] = ("lanes", "shared"),
) -> Report:
    """Flood each topology with each subscriber count, ``reps`` times against the floor."""
    seconds = duration if duration is not None else QUICK_DURATION if quick else FULL_DURATION
    shared_seconds = min(seconds, QUICK_SHARED_DURATION if quick else SHARED_DURATION)
    report = Report(
        name="flood",
        title="3. Broker under flood: lossy events as fast as possible, terminals at 1 kHz",
        baseline="floor: the same fan-out over bare trio memory channels (one per subscriber and "
        "lane), dropping lossy events past buffer_size",
        params={
            "subscribers": list(subscribers),
            "topologies": list(topologies),
            "seconds_per_flood": {"lanes": seconds, "shared": shared_seconds},
            "terminal_hz": TERMINAL_HZ,
            "flooder_slice_ms": SLICE_MS,
            "buffer_size": BUFFER_SIZE,
            "reps": reps,
        },
    )
    warm_up = min(0.05, seconds)
    trio.run(broker_trial, 10, warm_up, "lanes")
    trio.run(floor_trial, 10, warm_up, "lanes")
    worst_lost = 0
    latency_at_most: dict[int, Stat] = {}
    for topology in topologies:
        flood_seconds = shared_seconds if topology == "shared" else seconds
        for count in subscribers:
            base_trials, subj_trials = _paired_trials(reps, count, flood_seconds, topology)
            label = f"{topology}, {count:,} sub{'s' if count > 1 else ''}"
            p99, lost = _summarise(report, label, count, base_trials, subj_trials)
            worst_lost = max(worst_lost, lost)
            if topology == "lanes":
                latency_at_most[count] = p99
    report.targets.append(
        Target(
            "terminals lost under flood",
            "0 in every configuration",
            f"worst {worst_lost}",
            worst_lost == 0,
        )
    )
    if latency_at_most:
        most = max(latency_at_most)
        p99 = latency_at_most[most]
        report.targets.append(
            Target(
                "terminal p99 under flood",
                f"<= {LATENCY_TARGET_MS:g} ms with {most:,} subscribers (lanes)",
                f"{p99.median:.2f} ms [{p99.min:.2f}..{p99.max:.2f}]",
                p99.median <= LATENCY_TARGET_MS,
            )
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from . import main as run_all

    return run_all(["--only", "flood", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
