"""Prometheus text exposition (format 0.0.4) for the service's counters and gauges."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import attrs

__all__ = ["CONTENT_TYPE", "Metric", "render"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of :func:`render`'s output."""


@attrs.frozen(slots=True)
class Metric:
    """One metric family: a name, its kind, a help line and its labelled samples."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...]

    @classmethod
    def single(
        cls, name: str, kind: Literal["counter", "gauge"], help: str, value: float
    ) -> Metric:
        """A metric with one unlabelled sample."""
        return cls(name, kind, help, (({}, value),))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition of ``metrics``, each with its ``# HELP`` and ``# TYPE`` lines."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{metric.name}{{{inner}}} {_format_value(value)}")
            else:
                lines.append(f"{metric.name} {_format_value(value)}")
    return "\n".join(lines) + "\n"
