"""The one rule of what a run's result or progress payload may be: a JSON value (private).

A result crosses the store and the wire, a progress payload the wire; both must arrive as
the very value the agent produced, in-process and over HTTP alike. So the rule admits only
what JSON holds exactly: ``dict`` with ``str`` keys, ``list``, ``str``, ``int``, finite
``float``, ``bool`` and ``None``, nested at most :data:`MAX_DEPTH` deep. Everything else —
tuples, sets, bytes, datetimes, ``Decimal``, subclasses of the admitted types (an ``IntEnum``,
an ``OrderedDict``), any other object, non-``str`` keys, NaN and the infinities, cycles — is
refused, never converted: ``json`` would turn a tuple into a list and ``repr`` a set into a
string, and a value that changes on its way is worse than one refused at the boundary.

Where it is applied: :func:`checked_terminal` (every terminal is recorded through it, so a
result breaking the rule makes the run fail, identically in every store and over HTTP) and
:func:`check_progress` (``RunContext.emit`` raises :class:`~trio_runs.UnencodableValue`).
An error is always a ``str`` (an exception's ``str()``, or its type name when that is
empty), passed as is.
"""

from __future__ import annotations

import math
from typing import Final, TypeVar

import attrs

from .errors import UnencodableValue
from .events import RunComplete

__all__ = ["MAX_DEPTH", "check_progress", "checked_terminal", "json_problem"]

MAX_DEPTH: Final = 200
"""How many containers (dicts, lists) may nest inside one another. Deeper values are refused:
every JSON encoder and decoder on the way (stores, HTTP, the client) recurses, and a value
that one of them cannot handle must be refused here rather than fail there."""

_SCALARS: Final = frozenset((str, int, bool, type(None)))

_RC = TypeVar("_RC", bound=RunComplete)


class _Refused(Exception):
    # Raised from deep inside the walk, carrying the location back up without any cost on
    # the way down: the path is built only when something is refused.
    def __init__(self, what: str, too_deep: bool = False) -> None:
        self.what = what
        self.too_deep = too_deep
        self.path: list[str] = []
        self.containers: list[int] = []  # ids, innermost first; only read to name a cycle


def _segment(key: str | int) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    if key.isidentifier():
        return f".{key}"
    shown = key if len(key) <= 40 else key[:37] + "..."
    return '["' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"]'


def _kind(value: object) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a key's own __repr__ failing must not hide the real problem
        return "(unprintable)"
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_leaf(value: object) -> _Refused:
    if type(value) is float:
        return _Refused(f"float {value!r}")
    return _Refused(_kind(value))


def _walk(value: object, depth: int) -> None:
    # The hot path: exact type checks (a subclass is refused), scalars tested inline so a
    # flat container costs one loop, and no bookkeeping for cycles, which the depth bound
    # ends anyway (and which are named only once something was refused).
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH}", too_deep=True)
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                refused = _Refused(f"{_kind(key)} key {_short_repr(key)}")
                refused.containers.append(id(value))
                raise refused
            item_kind = type(item)
            if item_kind in _SCALARS or (item_kind is float and math.isfinite(item)):
                continue
            try:
                _walk(item, depth + 1)
            except _Refused as refused:
                refused.path.append(_segment(key))
                refused.containers.append(id(value))
                raise
    elif kind is list:
        if depth >= MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH}", too_deep=True)
        for index, item in enumerate(value):  # type: ignore[arg-type]
            item_kind = type(item)
            if item_kind in _SCALARS or (item_kind is float and math.isfinite(item)):
                continue
            try:
                _walk(item, depth + 1)
            except _Refused as refused:
                refused.path.append(_segment(index))
                refused.containers.append(id(value))
                raise
    elif kind is float and math.isfinite(value):  # type: ignore[arg-type]
        return
    else:
        raise _refuse_leaf(value)


def _described(refused: _Refused) -> str:
    path = list(reversed(refused.path))
    if refused.too_deep:
        outermost_first = list(reversed(refused.containers))
        seen: dict[int, int] = {}
        for depth, ident in enumerate(outermost_first):
            if ident in seen:
                # The walk went round a cycle: name the container that holds itself.
                where = "".join(path[: seen[ident]])
                return f"a container inside itself (a cycle) at ${where}"
            seen[ident] = depth
        shown = "".join(path[:8])
        return f"{refused.what} at ${shown}... ({len(path)} levels)"
    return f"{refused.what} at ${''.join(path)}"


def json_problem(value: object) -> str | None:
    """``None`` if ``value`` is a JSON value by the rule; else what breaks it and where.

    For example ``"set at $"``, ``"float nan at $.scores[2]"``, ``"int key 1 at $.by_id"``.
    ``$`` is ``value`` itself. Never raises, never recurses past :data:`MAX_DEPTH` (a cycle is
    refused, not followed).
    """
    if type(value) in _SCALARS:
        return None
    try:
        _walk(value, 0)
    except _Refused as refused:
        return _described(refused)
    except RecursionError:
        # Only if the caller was already within MAX_DEPTH frames of the recursion limit.
        return "nesting too deep to check at $"
    return None


def check_progress(payload: object) -> None:
    """Raise :class:`~trio_runs.UnencodableValue` if ``payload`` breaks the rule; else nothing."""
    if type(payload) in _SCALARS:
        return
    problem = json_problem(payload)
    if problem is not None:
        raise UnencodableValue("progress payload", problem)


# The last terminal whose (container) result passed: a terminal is checked up to three times
# on its way (by the coordinator, by record_terminal, by the store), all in one synchronous
# step, so a large result is walked once, not three times.
_passed: list[RunComplete | None] = [None]


def checked_terminal(rc: _RC) -> _RC:
    """``rc`` itself if its result is a JSON value and its error a ``str`` (or ``None``);
    otherwise ``rc`` turned into a *failed* terminal saying what was refused and where.

    The failed terminal keeps every other field of ``rc`` (run metadata included), with
    ``result`` ``None``, ``cancelled`` false and ``error`` such as ``"result is not a JSON
    value: set at $.items"`` (followed by the run's own error, if it had one). Never raises
    for a bad result: the terminal must still be recorded, exactly once.
    """
    if rc is _passed[0]:
        return rc
    result, error = rc.result, rc.error
    if type(result) in _SCALARS or (problem := json_problem(result)) is None:
        if error is None or type(error) is str:
            if type(result) not in _SCALARS:
                _passed[0] = rc
            return rc
        return attrs.evolve(rc, error=f"error is not a str: {_kind(error)}", cancelled=False)
    message = str(UnencodableValue("result", problem))
    if type(error) is str:
        message = f"{message} (the run's error: {error})"
    return attrs.evolve(rc, result=None, error=message, cancelled=False)
