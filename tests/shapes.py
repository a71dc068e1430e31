"""Comparing JSON bodies that carry wall-clock run metadata (private to the tests)."""

from __future__ import annotations

from typing import Any

_TIMES = ("accepted_at", "started_at", "ended_at")


def without_times(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (a run view or a terminal) without its timestamps, checked on the way: each
    present one a number, in the order accepted ≤ started ≤ ended, the view's matching its
    terminal's. The rest of the shape can then be compared exactly."""
    body = dict(body)
    times = {key: body.pop(key) for key in _TIMES if key in body}
    terminal = body.get("terminal")
    if isinstance(terminal, dict):
        body["terminal"] = without_times(terminal)
        for key, value in times.items():
            assert terminal[key] == value, (key, terminal[key], value)
    assert all(isinstance(value, float) for value in times.values()), times
    ordered = [times[key] for key in _TIMES if key in times]
    assert ordered == sorted(ordered), times
    return body
