"""trio-runs benchmarks: what the guarantee costs, as ratios against floors measured in the
same run.

``python -m benchmarks [--quick] [--json PATH]`` runs them all; ``python -m benchmarks.NAME``
runs one (``dispatch``, ``sessions``, ``flood``, ``memory``, ``http``, ``durable``), from a
source checkout: the benchmarks are not part of the installed package. ``peers`` (trio-runs
against Celery and arq) runs only when named, ``python -m benchmarks.peers`` or
``--only peers``: it installs third-party software, so never by default and never in CI. See
``benchmarks/README.md`` for what each measures and the latest results.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ._common import MIN_REPS, Report, header_lines, parser, render, timer, write_json

__all__ = ["BENCHMARKS", "OPT_IN", "main", "run"]

BENCHMARKS = ("dispatch", "sessions", "flood", "memory", "http", "durable")
"""Every benchmark that runs by default, in order."""
OPT_IN = ("peers",)
"""Benchmarks that run only when named (``--only peers``): never by default, never in CI.
``peers`` installs Celery and arq into a virtualenv of its own and needs ``redis-server``."""


def run(name: str, *, quick: bool = False, reps: int = MIN_REPS) -> Report:
    """Run one benchmark by name and return its report."""
    if name not in BENCHMARKS + OPT_IN:
        choices = ", ".join(BENCHMARKS + OPT_IN)
        raise ValueError(f"unknown benchmark {name!r}; choose from {choices}")
    module = importlib.import_module(f"{__name__}.{name}")
    start = timer()
    report = module.run(quick=quick, reps=reps)
    if not isinstance(report, Report):
        raise TypeError(f"benchmark {name!r} returned {report!r}")
    report.seconds = timer() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print a table per benchmark, optionally write JSON; the exit code.

    ``argv`` excludes the program name (``sys.argv[1:]`` when ``None``). Returns 0, or 1 with
    ``--check`` when a target does not hold, or 2 for a usage error.
    """
    p = parser("Measure what trio-runs' guarantee costs against bare-Trio floors.")
    p.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS + OPT_IN,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}; "
        f"and, never by default: {', '.join(OPT_IN)} (installs Celery and arq)",
    )
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.reps < MIN_REPS:
        p.error(f"--reps must be at least {MIN_REPS}")
    names = list(dict.fromkeys(args.only or BENCHMARKS))
    for line in header_lines():
        print(line)
    print(flush=True)
    start = timer()
    reports: list[Report] = []
    for name in names:
        report = run(name, quick=args.quick, reps=args.reps)
        reports.append(report)
        print(render(report), end="\n\n", flush=True)
    seconds = timer() - start
    targets = [t for r in reports for t in r.targets]
    missed = [t for t in targets if not t.holds]
    print(
        f"{len(targets) - len(missed)} of {len(targets)} targets hold"
        + (f"; not: {', '.join(t.name for t in missed)}" if missed else "")
        + f" ({seconds:.0f} s{', --quick' if args.quick else ''})"
    )
    if args.json:
        write_json(args.json, reports, vars(args), seconds)
        print(f"wrote {args.json}")
    return 1 if args.check and missed else 0
