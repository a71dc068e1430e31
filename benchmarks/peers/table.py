"""The peers benchmark's README table: one line per system, one column per client count.

``python -m benchmarks.peers.table peers.json`` (a ``--json`` file of ``benchmarks.peers``)
prints it; ``python -m benchmarks.peers --markdown PATH`` writes it at the end of a run. Each
cell: jobs/s, median [min..max] over the repetitions; then the medians of the per-repetition
ratios to Celery and to arq (above 1: faster); then the p99 latency in ms, median
[min..max] of the repetitions' 99th percentiles, and its ratios to the peers' (below 1:
lower). Nothing here measures; it reads the report's rows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._common import fmt

_PEERS = ("Celery", "arq")
_P99 = ", p99 latency"
TIMES = "\u00d7"  # the README's multiplication sign


def _span(stat: dict[str, Any], unit: str) -> str:
    if stat["min"] == stat["max"]:
        return fmt(stat["median"], unit)
    return f"{fmt(stat['median'], unit)} [{fmt(stat['min'], unit)}..{fmt(stat['max'], unit)}]"


def _parse(metric: str) -> tuple[str, bool, str | None]:
    # "LABEL[, p99 latency][, vs PEER]" -> (LABEL, is_latency, PEER or None)
    peer = None
    for name in _PEERS:
        if metric.endswith(f", vs {name}"):
            peer, metric = name, metric.removesuffix(f", vs {name}")
    latency = metric.endswith(_P99)
    return metric.removesuffix(_P99), latency, peer


def markdown(bench: dict[str, Any], document: dict[str, Any] | None = None) -> str:
    """The table of one peers report (its ``to_json()``), with a heading line from
    ``document`` (the ``--json`` file) when given."""
    systems: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for row in bench["rows"]:
        label, latency, peer = _parse(row["metric"])
        if label not in systems:
            systems.append(label)
        if row["label"] not in columns:
            columns.append(row["label"])
        cell = cells.setdefault((label, row["label"]), {"ratios": {}, "p99_ratios": {}})
        cell["p99" if latency else "rate"] = row["value"]
        if peer is not None and row["ratio"] is not None:
            cell["p99_ratios" if latency else "ratios"][peer] = row["ratio"]["median"]
    out: list[str] = []
    if document is not None:
        machine = document["machine"]
        # The file is written at the end of the run: its "at start" load is the end's.
        load = ", ".join(f"{x:.2f}" for x in machine.get("loadavg_at_start", []))
        params = bench["params"]
        out += [
            f"Written {document['generated_at']} at the end of the run, load {load} then, "
            f"trio-runs {machine['versions']['trio_runs_git']}, {params['jobs']} jobs a "
            f"measurement, {params['reps']} repetitions, {document['seconds']:.0f} s.",
            "",
        ]
    out.append("| system | " + " | ".join(columns) + " |")
    out.append("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for label in systems:
        line = []
        for column in columns:
            found = cells.get((label, column))
            if found is None or "rate" not in found:
                line.append("")
                continue
            cell = found
            parts = [_span(cell["rate"], "jobs/s")]
            if cell["ratios"]:
                parts.append(
                    ", ".join(f"{r:.2f}{TIMES} {peer}" for peer, r in cell["ratios"].items())
                )
            if "p99" in cell:
                p99 = f"p99 {_span(cell['p99'], 'ms')} ms"
                if cell["p99_ratios"]:
                    p99 += (
                        " ("
                        + ", ".join(
                            f"{r:.2f}{TIMES} {peer}'s" for peer, r in cell["p99_ratios"].items()
                        )
                        + ")"
                    )
                parts.append(p99)
            line.append("<br>".join(parts))
        out.append(f"| {label} | " + " | ".join(line) + " |")
    if bench["targets"]:
        out += ["", "| target | measured (per-repetition ratios, median [min..max]) | holds |"]
        out.append("| --- | --- | --- |")
        for target in bench["targets"]:
            holds = "yes" if target["holds"] else "**no**"
            out.append(f"| {target['name']} | {target['measured']} | {holds} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of every peers report in the given ``--json`` files."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m benchmarks.peers.table RESULTS.json ...", file=sys.stderr)
        return 2
    for path in paths:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        for bench in document["benchmarks"]:
            if bench["name"] == "peers" and not bench["skipped"]:
                print(markdown(bench, document), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
