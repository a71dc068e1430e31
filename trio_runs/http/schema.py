"""The HTTP API's values: strict request decoding, response views, and the error shape.

Decoding never raises anything but :class:`ApiError`, whatever bytes arrive: malformed JSON
is a 400, a body that is not JSON a 415, a body over :data:`MAX_BODY_BYTES` a 413, and a
JSON value of the wrong shape (wrong types, missing or unknown fields) a 422. Every error
response has the body ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ..events import RunComplete

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_WAIT_SECONDS",
    "ApiError",
    "CreateWorkspace",
    "QueuedRun",
    "RunView",
    "SessionView",
    "SubmitMessage",
    "WorkspaceView",
    "decode_create_workspace",
    "decode_json_object",
    "decode_submit",
    "parse_wait_timeout",
]

MAX_BODY_BYTES: Final = 1 << 20
"""The largest request body the server reads (1 MiB); a larger one is refused with 413."""

MAX_WAIT_SECONDS: Final = 60.0
"""The longest a ``/wait`` long poll may be asked to block."""

DEFAULT_WAIT_SECONDS: Final = 30.0


class ApiError(Exception):
    """A refused request: an HTTP status, a stable machine-readable code and a message.

    Raising it from a handler yields ``{"error": {"code", "message"}}`` with ``status``; the
    request had no effect.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def decode_json_object(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Parse a request body that must be a JSON object sent as ``application/json``.

    Raises :class:`ApiError`: 413 over :data:`MAX_BODY_BYTES`, 415 for another content type,
    400 for anything that is not strict UTF-8 JSON (``NaN`` and duplicate keys included),
    422 for JSON that is not an object.
    """
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"the request body exceeds {MAX_BODY_BYTES} bytes")
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the request body must be application/json, got {media_type or 'nothing'!r}",
        )
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except RecursionError:
        raise ApiError(400, "malformed_json", "the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid(f"the body must be a JSON object, got {_json_type(data)}")
    return data


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_fields(
    data: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    missing = [key for key in required if key not in data]
    if missing:
        raise _invalid(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(key for key in data if key not in required and key not in optional)
    if unknown:
        shown = ", ".join(repr(key)[:80] for key in unknown[:5])
        raise _invalid(f"unknown field(s): {shown}")


def _string(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise _invalid(f"field {key!r} must be a string, got {_json_type(value)}")
    return value


@attrs.frozen(slots=True)
class CreateWorkspace:
    """``POST /v1/workspaces``: open (or find) the workspace for ``path``."""

    path: str


@attrs.frozen(slots=True)
class SubmitMessage:
    """``POST /v1/workspaces/{id}/messages``: a prompt for a session, maybe with its run id.

    An empty ``run_id`` asks the server to mint one.
    """

    session_id: str
    prompt: str
    run_id: str = ""


def decode_create_workspace(body: bytes, content_type: str | None) -> CreateWorkspace:
    """Decode ``{"path": str}``; raises :class:`ApiError` (see :func:`decode_json_object`)."""
    data = decode_json_object(body, content_type)
    _check_fields(data, ("path",))
    path = _string(data, "path")
    if not path.strip():
        raise _invalid("field 'path' must not be blank")
    if "\x00" in path:
        raise _invalid("field 'path' must not contain NUL characters")
    return CreateWorkspace(path)


def decode_submit(body: bytes, content_type: str | None) -> SubmitMessage:
    """Decode ``{"session_id": str, "prompt": str, "run_id"?: str | null}``.

    Raises :class:`ApiError` (see :func:`decode_json_object`). Blank sessions, blank prompts
    and unusable run ids are left to the backend, which refuses them with typed errors.
    """
    data = decode_json_object(body, content_type)
    _check_fields(data, ("session_id", "prompt"), ("run_id",))
    run_id = data.get("run_id")
    if run_id is None:
        run_id = ""
    elif not isinstance(run_id, str):
        raise _invalid(f"field 'run_id' must be a string or null, got {_json_type(run_id)}")
    return SubmitMessage(_string(data, "session_id"), _string(data, "prompt"), run_id)


def parse_wait_timeout(query: Mapping[str, str]) -> float:
    """The ``timeout`` query parameter of ``/wait``: seconds in ``[0, 60]``, default 30.

    Raises :class:`ApiError` 422 for any other parameter or a value out of range.
    """
    unknown = sorted(key for key in query if key != "timeout")
    if unknown:
        raise ApiError(422, "invalid_query", f"unknown query parameter(s): {', '.join(unknown)}")
    raw = query.get("timeout")
    if raw is None:
        return DEFAULT_WAIT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise ApiError(
            422,
            "invalid_query",
            f"timeout must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, got {raw!r}",
        )
    return seconds


@attrs.frozen(slots=True)
class WorkspaceView:
    """A workspace as the API shows it."""

    id: str
    path: str
    closing: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {"id": self.id, "path": self.path, "closing": self.closing}

    @classmethod
    def from_dict(cls, data: object) -> WorkspaceView:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        if not isinstance(data, Mapping):
            raise ValueError(f"WorkspaceView: expected a JSON object, got {type(data).__name__}")
        ws_id, path, closing = data.get("id"), data.get("path"), data.get("closing", False)
        if not (isinstance(ws_id, str) and isinstance(path, str) and isinstance(closing, bool)):
            raise ValueError("WorkspaceView: id and path must be strings, closing a boolean")
        return cls(ws_id, path, closing)


@attrs.frozen(slots=True)
class RunView:
    """A run as the API shows it: its state, and its terminal once it has one.

    ``state`` is ``pending`` (accepted, not yet queued or started), ``queued``, ``active``,
    or the terminal's outcome: ``completed``, ``failed`` or ``cancelled``.
    """

    run_id: str
    session_id: str
    state: str
    terminal: RunComplete | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended."""
        return self.terminal is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON body; ``terminal`` is present only once the run ended."""
        body: dict[str, Any] = {
            "run_id": self.run_id,
            "session_id": self.session_id,
            "state": self.state,
        }
        if self.terminal is not None:
            body["terminal"] = self.terminal.to_dict()
        return body

    @classmethod
    def from_dict(cls, data: object) -> RunView:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        if not isinstance(data, Mapping):
            raise ValueError(f"RunView: expected a JSON object, got {type(data).__name__}")
        run_id, session_id, state = (data.get(k) for k in ("run_id", "session_id", "state"))
        if not (isinstance(run_id, str) and isinstance(session_id, str) and isinstance(state, str)):
            raise ValueError("RunView: run_id, session_id and state must be strings")
        raw = data.get("terminal")
        terminal = RunComplete.from_dict(raw) if raw is not None else None
        return cls(run_id, session_id, state, terminal)


@attrs.frozen(slots=True)
class QueuedRun:
    """One run waiting in a session's queue."""

    run_id: str
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {"run_id": self.run_id, "prompt": self.prompt}


@attrs.frozen(slots=True)
class SessionView:
    """A session's lane: whether it is busy, its active run, and its queue in order."""

    workspace_id: str
    session_id: str
    busy: bool
    active: str | None
    queued: tuple[QueuedRun, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {
            "workspace_id": self.workspace_id,
            "session_id": self.session_id,
            "busy": self.busy,
            "active": self.active,
            "queued": [run.to_dict() for run in self.queued],
        }

    @classmethod
    def from_dict(cls, data: object) -> SessionView:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        if not isinstance(data, Mapping):
            raise ValueError(f"SessionView: expected a JSON object, got {type(data).__name__}")
        ws_id, sid = data.get("workspace_id"), data.get("session_id")
        busy, active, queued = data.get("busy"), data.get("active"), data.get("queued")
        if not (
            isinstance(ws_id, str)
            and isinstance(sid, str)
            and isinstance(busy, bool)
            and (active is None or isinstance(active, str))
            and isinstance(queued, list)
        ):
            raise ValueError("SessionView: malformed body")
        runs: list[QueuedRun] = []
        for item in queued:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("run_id"), str)
                and isinstance(item.get("prompt"), str)
            ):
                raise ValueError("SessionView: malformed queued run")
            runs.append(QueuedRun(item["run_id"], item["prompt"]))
        return cls(ws_id, sid, busy, active, tuple(runs))
