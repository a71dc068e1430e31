"""Shared plumbing: repetitions, statistics, the human table, the JSON report, machine facts.

Every figure is the median of at least :data:`MIN_REPS` repetitions, reported with its min and
max. Every timing has a *baseline* measured in the same process run, repetition by repetition:
each repetition runs the baseline and the subject back to back (alternating which goes first,
so a slow spell on this shared machine hits both), and the ratio is taken per repetition before
its median is. Absolute times on a noisy 2-core machine drift; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

MIN_REPS = 5
"""Repetitions behind every figure (``--reps`` may ask for more, never fewer)."""

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


# -- statistics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A figure over repetitions: its median, min, max and every sample."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stat:
        values = tuple(float(v) for v in samples)
        if not values:
            raise ValueError("a figure needs at least one sample")
        return cls(statistics.median(values), min(values), max(values), values)

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": list(self.samples),
        }


def ratios(values: Sequence[float], baselines: Sequence[float]) -> Stat:
    """Per-repetition ratios ``value / baseline`` (paired: same repetition, same spell)."""
    return Stat.of(v / b if b else float("inf") for v, b in zip(values, baselines, strict=True))


def percentile(data: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (``statistics.quantiles``, inclusive method)."""
    if not data:
        return float("nan")
    if len(data) == 1:
        return float(data[0])
    cuts = statistics.quantiles(data, n=1000, method="inclusive")
    index = round(pct * 10) - 1
    return cuts[min(max(index, 0), len(cuts) - 1)]


def settle() -> None:
    """Start a repetition from a collected heap, so one repetition's garbage is not the next's."""
    gc.collect()


class Timing(NamedTuple):
    """One measured interval: wall-clock seconds, this process's CPU seconds, and the CPU
    seconds of that spent in the cyclic garbage collector.

    CPU time (``time.process_time``) is what the work cost: on a shared machine it leaves out
    the time other processes held the cores, which wall time does not. Both are reported.
    """

    wall: float
    cpu: float
    gc: float = 0.0


class _GcClock:
    # CPU seconds spent in gc collections since import, from gc.callbacks (two calls per
    # collection: negligible next to the collection itself).
    __slots__ = ("_started", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.total += time.process_time() - self._started


_gc_clock = _GcClock()


class Stopwatch:
    """Starts on creation; :meth:`read` gives the :class:`Timing` since."""

    __slots__ = ("_cpu", "_gc", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._gc = _gc_clock.total

    def read(self) -> Timing:
        return Timing(
            time.perf_counter() - self._wall,
            time.process_time() - self._cpu,
            _gc_clock.total - self._gc,
        )


def paired(
    reps: int,
    baseline: Callable[[], T],
    subject: Callable[[], T],
) -> tuple[list[T], list[T]]:
    """Run ``baseline`` and ``subject`` ``reps`` times each, back to back, alternating order.

    Returns ``(baseline_samples, subject_samples)``; sample ``i`` of both came from the same
    spell of the machine, so their ratio is meaningful even when absolute times drift.
    """
    base, subj = interleaved(reps, baseline, subject)
    return base, subj


def interleaved(reps: int, *measures: Callable[[], T]) -> list[list[T]]:
    """Run every one of ``measures`` ``reps`` times, back to back, rotating which goes first.

    Returns one list of samples per measure, in the order given; sample ``i`` of every list
    came from the same spell of the machine (:func:`paired` is the two-measure case).
    """
    samples: list[list[T]] = [[] for _ in measures]
    for rep in range(reps):
        for k in range(len(measures)):
            index = (k + rep) % len(measures)
            settle()
            samples[index].append(measures[index]())
    return samples


# -- report ------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: its value over repetitions, next to its baseline and their ratio."""

    label: str
    metric: str
    unit: str
    value: Stat
    baseline: Stat | None = None
    ratio: Stat | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "metric": self.metric,
            "unit": self.unit,
            "value": self.value.to_json(),
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "ratio": None if self.ratio is None else self.ratio.to_json(),
            "note": self.note,
        }


@dataclass
class Target:
    """A target of the issue, as measured by this run."""

    name: str
    limit: str
    measured: str
    holds: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "limit": self.limit,
            "measured": self.measured,
            "holds": self.holds,
        }


@dataclass
class Report:
    """What one benchmark measured."""

    name: str
    title: str
    baseline: str
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "baseline": self.baseline,
            "params": self.params,
            "rows": [row.to_json() for row in self.rows],
            "targets": [target.to_json() for target in self.targets],
            "notes": self.notes,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }


def fmt(value: float, unit: str = "") -> str:
    """A number for the table: thousands separators, a sensible number of digits."""
    if value != value:  # NaN
        return "n/a"
    if value in (float("inf"), float("-inf")):
        return "inf"
    magnitude = abs(value)
    if unit == "x":
        return f"{value:.2f}"
    if magnitude >= 1000 or (magnitude == int(magnitude) and unit in {"", "count", "bytes"}):
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _span(stat: Stat, unit: str) -> str:
    if stat.min == stat.max:
        return fmt(stat.median, unit)
    return f"{fmt(stat.median, unit)} [{fmt(stat.min, unit)}..{fmt(stat.max, unit)}]"


def render(report: Report) -> str:
    """The human table: one line per figure, its baseline and ratio beside it."""
    lines = [f"== {report.title}"]
    if report.skipped:
        lines.append(f"   SKIPPED: {report.skipped}")
        return "\n".join(lines)
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    lines.append(f"   baseline: {report.baseline}")
    lines.append(f"   params: {params}")
    header = ("case", "figure", "unit", "median [min..max]", "baseline [min..max]", "ratio")
    table = [header]
    for row in report.rows:
        table.append(
            (
                row.label,
                row.metric,
                row.unit,
                _span(row.value, row.unit),
                "" if row.baseline is None else _span(row.baseline, row.unit),
                "" if row.ratio is None else _span(row.ratio, "x") + "x",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for index, cells in enumerate(table):
        # Words left-aligned, numbers right-aligned.
        padded = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        line = "   " + "  ".join(padded)
        lines.append(line.rstrip())
        if index == 0:
            lines.append("   " + "  ".join("-" * w for w in widths))
    for metric, note in dict.fromkeys((row.metric, row.note) for row in report.rows if row.note):
        lines.append(f"   note ({metric}): {note}")
    for note in report.notes:
        lines.append(f"   note: {note}")
    for target in report.targets:
        verdict = "holds" if target.holds else "DOES NOT HOLD"
        lines.append(f"   target {target.name}: {target.limit} -> {target.measured}: {verdict}")
    lines.append(f"   ({report.seconds:.1f} s)")
    return "\n".join(lines)


# -- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int | None:
    return proc_status_field("MemTotal", "/proc/meminfo")


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    """Facts about this machine and the software measured, for the JSON report."""
    import attrs
    import trio

    import trio_runs

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total_bytes": _mem_total(),
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": {
            "trio": trio.__version__,
            "attrs": attrs.__version__,
            "trio_runs": trio_runs.__version__,
            "trio_runs_git": _git_revision(),
        },
    }


def proc_status_field(name: str, path: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) or meminfo, in bytes."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_now() -> int:
    """This process's resident set size in bytes (``VmRSS``)."""
    value = proc_status_field("VmRSS")
    return value if value is not None else 0


def rss_peak() -> int:
    """This process's peak resident set size in bytes (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    value = proc_status_field("VmHWM")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- command line ------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and shorter floods: every figure, in well under 2 minutes",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON here")
    p.add_argument(
        "--reps",
        type=int,
        default=MIN_REPS,
        help=f"repetitions behind every figure (at least {MIN_REPS}; default {MIN_REPS})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target does not hold (default: report it and exit 0)",
    )
    return p


def write_json(path: str, reports: Sequence[Report], args: dict[str, Any], seconds: float) -> None:
    facts = machine()
    with contextlib.suppress(OSError):
        facts["loadavg_at_end"] = list(os.getloadavg())
    document = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": facts,
        "arguments": args,
        "seconds": seconds,
        "benchmarks": [report.to_json() for report in reports],
        "targets": [
            dict(target.to_json(), benchmark=report.name)
            for report in reports
            for target in report.targets
        ],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def header_lines() -> list[str]:
    facts = machine()
    v = facts["versions"]
    return [
        f"trio-runs benchmarks - {facts['cpu']}, {facts['cpus_usable']} usable cores, "
        f"load {', '.join(f'{x:.2f}' for x in facts['loadavg_at_start'])}",
        f"Python {facts['python']} ({facts['implementation']}), trio {v['trio']}, "
        f"attrs {v['attrs']}, trio-runs {v['trio_runs']} ({v['trio_runs_git']})",
        "Every figure: median [min..max] of the repetitions; every timing beside its baseline "
        "measured in the same run; ratio = the subject's cost / the baseline's, per repetition.",
    ]


def timer() -> float:
    """Wall-clock seconds (for latencies and for how long a benchmark took)."""
    return time.perf_counter()


def timing_rows(
    label: str,
    what: str,
    subject: Sequence[Timing],
    baseline: Sequence[Timing],
    *,
    per: int = 1,
    unit: str = "ms",
) -> list[Row]:
    """Two rows for paired timings: CPU time (the cost; its ratio is the one to read) and
    wall time, each beside the baseline, divided by ``per`` and scaled to ``unit``."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    rows = []
    for clock in ("cpu", "wall"):
        subj = [getattr(t, clock) * scale / per for t in subject]
        base = [getattr(t, clock) * scale / per for t in baseline]
        rows.append(
            Row(label, f"{what} ({clock})", unit, Stat.of(subj), Stat.of(base), ratios(subj, base))
        )
    return rows
