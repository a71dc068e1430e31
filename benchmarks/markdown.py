"""Render a ``--json`` results file as Markdown tables (for ``benchmarks/README.md``).

``python -m benchmarks.markdown results.json``
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import fmt


def _cell(stat: dict[str, Any] | None, unit: str) -> str:
    if stat is None:
        return ""
    median = fmt(stat["median"], unit)
    if stat["min"] == stat["max"]:
        return median
    return f"{median} [{fmt(stat['min'], unit)}..{fmt(stat['max'], unit)}]"


def render(document: dict[str, Any]) -> str:
    """Markdown: the machine, then one table per benchmark, then the targets."""
    machine = document["machine"]
    versions = machine["versions"]
    load = ", ".join(f"{x:.2f}" for x in machine.get("loadavg_at_start", []))
    out = [
        f"Measured {document['generated_at']} on {machine['cpu']} ({machine['cpus_usable']} "
        f"usable cores, load {load} at the start), Python {machine['python']}, trio "
        f"{versions['trio']}, attrs {versions['attrs']}, trio-runs {versions['trio_runs']} "
        f"({versions['trio_runs_git']}); {document['seconds']:.0f} s"
        + (" with `--quick`." if document["arguments"].get("quick") else "."),
        "",
    ]
    for bench in document["benchmarks"]:
        out.append(f"### {bench['title']}")
        out.append("")
        if bench["skipped"]:
            out.append(f"Skipped: {bench['skipped']}.")
            out.append("")
            continue
        params = ", ".join(f"{k}={v}" for k, v in bench["params"].items())
        out.append(f"Baseline: {bench['baseline']}. Parameters: {params}.")
        out.append("")
        out.append("| case | figure | unit | median [min..max] | baseline [min..max] | ratio |")
        out.append("| --- | --- | --- | ---: | ---: | ---: |")
        for row in bench["rows"]:
            ratio = _cell(row["ratio"], "x")
            out.append(
                f"| {row['label']} | {row['metric']} | {row['unit']} | "
                f"{_cell(row['value'], row['unit'])} | {_cell(row['baseline'], row['unit'])} | "
                f"{ratio + 'x' if ratio else ''} |"
            )
        out.append("")
    out.append("| target | limit | measured | holds |")
    out.append("| --- | --- | --- | --- |")
    for target in document["targets"]:
        out.append(
            f"| {target['name']} | {target['limit']} | {target['measured']} | "
            f"{'yes' if target['holds'] else '**no**'} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.markdown RESULTS.json", file=sys.stderr)
        return 2
    print(render(json.loads(Path(args[0]).read_text(encoding="utf-8"))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
