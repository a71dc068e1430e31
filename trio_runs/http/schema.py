"""The HTTP API's values: strict request decoding, response views, and the error shape.

The request and response shapes are :mod:`msgspec` structs with their constraints attached
(``Annotated[..., Meta(...)]``): the server validates requests with exactly these
declarations, and :mod:`.openapi` generates the published JSON Schema from them, so the
document and the server cannot disagree. The id, prompt and path constraints are the
library's own rule (:mod:`trio_runs._validation`), the one ``Backend.send_message`` applies.

Decoding never raises anything but :class:`ApiError`, whatever bytes arrive: malformed JSON
is a 400, a body that is not JSON a 415, a body over :data:`MAX_BODY_BYTES` a 413, and a
JSON value of the wrong shape (wrong types, missing or unknown fields, a value the rule
refuses) a 422 with a typed code where there is one (``session_missing``,
``invalid_session_id``, ``empty_prompt``, ``invalid_prompt``, ``invalid_run_id``). Every
error response has the body ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Final, TypeVar

import attrs
import msgspec
from msgspec import Meta

from .._validation import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    PATH_PATTERN,
    PROMPT_PATTERN,
    id_problem,
    prompt_problem,
    workspace_path_problem,
)
from ..events import RunComplete

__all__ = [
    "MAX_BATCH_ITEMS",
    "MAX_BODY_BYTES",
    "MAX_DEADLINE_SECONDS",
    "MAX_PATH_LENGTH",
    "MAX_WAIT_SECONDS",
    "RUN_STATES",
    "Accepted",
    "ApiError",
    "BatchAccepted",
    "BatchEnded",
    "BatchLine",
    "BatchRefused",
    "CreateWorkspace",
    "Deadline",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "Id",
    "Prompt",
    "QueuedRun",
    "RunList",
    "RunListQuery",
    "RunView",
    "SessionView",
    "SubmitBatch",
    "SubmitMessage",
    "WaitSeconds",
    "WorkspaceId",
    "WorkspaceList",
    "WorkspacePath",
    "WorkspaceView",
    "check_path_id",
    "decode_batch",
    "decode_create_workspace",
    "decode_json_object",
    "decode_submit",
    "parse_run_list_query",
    "parse_submit_wait",
    "parse_wait_timeout",
]

MAX_BODY_BYTES: Final = 1 << 20
"""The largest request body the server reads (1 MiB); a larger one is refused with 413."""

MAX_PATH_LENGTH: Final = 4096
"""The longest workspace path a client may send, in characters (Linux's ``PATH_MAX``)."""

MAX_WAIT_SECONDS: Final = 60.0
"""The longest a ``/wait`` long poll may be asked to block."""

DEFAULT_WAIT_SECONDS: Final = 30.0

MAX_BATCH_ITEMS: Final = 1000
"""The most messages one batch may hold (and its body is bounded by :data:`MAX_BODY_BYTES`)."""

MAX_DEADLINE_SECONDS: Final = 1e9
"""The largest deadline the API can carry (the server's ``--max-deadline`` is usually lower)."""

RUN_STATES: Final = ("pending", "queued", "active", "completed", "failed", "cancelled")
"""What ``RunView.state`` can say."""

LIST_STATES: Final = ("running", "ended")
"""What ``GET /v1/runs?state=`` can ask for: runs without a terminal yet (pending, queued or
active), or runs that ended (completed, failed or cancelled)."""

MAX_LIST_LIMIT: Final = 1000
"""The most runs one page of ``GET /v1/runs`` holds."""

DEFAULT_LIST_LIMIT: Final = 100

# -- the constrained values ---------------------------------------------------------------

Id = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=ID_PATTERN,
        description=(
            f"1 to {MAX_ID_LENGTH} characters; no whitespace, control characters or '/', "
            "and not '.' or '..' (so it is addressable in a URL path once percent-encoded)"
        ),
    ),
]
"""A run or session id: the identifier rule."""

Prompt = Annotated[
    str,
    Meta(pattern=PROMPT_PATTERN, description="text: not blank, no NUL characters"),
]
"""A prompt: not blank, no NUL."""

Deadline = Annotated[
    float,
    Meta(
        gt=0,
        le=MAX_DEADLINE_SECONDS,
        description=(
            "seconds the run may take from its start (queued time does not count); past it "
            "the run ends failed with timed_out set. At most the server's maximum."
        ),
    ),
]
"""A run's deadline in seconds: > 0 (and finite: at most :data:`MAX_DEADLINE_SECONDS`)."""

MAX_LABELS: Final = 16
"""The most labels one run may carry."""

LabelKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern="^[A-Za-z0-9_.-]+$",
        description="1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'",
    ),
]
LabelValue = Annotated[
    str, Meta(max_length=256, pattern="^[^\\x00]*$", description="up to 256 characters, no NUL")
]
Labels = Annotated[
    dict[LabelKey, LabelValue],
    Meta(
        max_length=MAX_LABELS,
        description=(
            f"up to {MAX_LABELS} key/value pairs kept with the run: shown in its view and "
            "terminal, and usable as a filter of GET /v1/runs"
        ),
    ),
]
"""A run's labels: small, typed key/value strings supplied at submit."""

WorkspacePath = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_PATH_LENGTH,
        pattern=PATH_PATTERN,
        description=(
            "resolved against the server's workspace root, and confined to it; "
            "not blank, no control characters"
        ),
    ),
]
"""A workspace path as a client sends it."""

WorkspaceId = Annotated[
    str, Meta(extra_json_schema={"format": "uuid"}, description="minted by the server (a UUID)")
]
"""A workspace id: the server mints them (``Backend.create_workspace``), as UUID strings."""

WaitSeconds = Annotated[
    float,
    Meta(
        ge=0,
        le=MAX_WAIT_SECONDS,
        description=f"seconds to block, 0 to {MAX_WAIT_SECONDS:g} (default 30)",
    ),
]
"""The ``timeout`` of ``/wait``."""

_State = Annotated[str, Meta(extra_json_schema={"enum": list(RUN_STATES)})]


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


# -- requests -----------------------------------------------------------------------------


class CreateWorkspace(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/workspaces``: open (or find) the workspace for ``path``."""

    path: WorkspacePath


class SubmitMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/workspaces/{id}/messages``: a prompt for a session, maybe with its run id.

    Without ``run_id`` (or with ``null``) the server mints one; minting it client-side makes
    a retry safe (a second submission of the same id is refused as a duplicate). Without
    ``deadline`` the workspace's default applies, capped by the server's maximum; a deadline
    above that maximum is refused (422 ``deadline_too_long``).
    """

    session_id: Id
    prompt: Prompt
    run_id: Id | None = None
    deadline: Deadline | None = None
    labels: Labels | None = None


class SubmitBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/workspaces/{id}/batches``: several submissions in one request.

    Each message is a :class:`SubmitMessage` under the same rules; a message that breaks
    them refuses the whole request (a 422 naming it), so nothing of it is accepted.
    """

    messages: Annotated[
        list[SubmitMessage],
        Meta(
            min_length=1,
            max_length=MAX_BATCH_ITEMS,
            description=f"1 to {MAX_BATCH_ITEMS} messages (and a body of at most 1 MiB)",
        ),
    ]


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


_T = TypeVar("_T")


def _convert(data: dict[str, Any], kind: type[_T], typed: Callable[[dict[str, Any]], None]) -> _T:
    # The struct decides what is valid; ``typed`` turns a refusal the library's rule can
    # name into its typed error. It also runs on success: the rule is the authority where
    # a pattern cannot say everything (lone surrogates).
    try:
        value = msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        typed(data)
        raise _invalid(str(exc)) from None
    typed(data)
    return value


def _typed_submit(data: dict[str, Any]) -> None:
    session_id, prompt, run_id = (data.get(k) for k in ("session_id", "prompt", "run_id"))
    if isinstance(session_id, str):
        if not session_id.strip():
            raise ApiError(422, "session_missing", "the message has no session_id")
        problem = id_problem(session_id)
        if problem is not None:
            raise ApiError(
                422, "invalid_session_id", f"invalid session id {session_id!r}: {problem}"
            )
    if isinstance(prompt, str):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ApiError(422, "invalid_prompt", problem)
        if not prompt.strip():
            raise ApiError(422, "empty_prompt", "the prompt is empty")
    if isinstance(run_id, str):
        problem = id_problem(run_id)
        if problem is not None:
            raise ApiError(422, "invalid_run_id", f"invalid run id {run_id!r}: {problem}")


def _typed_workspace(data: dict[str, Any]) -> None:
    path = data.get("path")
    if isinstance(path, str):
        problem = workspace_path_problem(path)
        if problem is not None:
            raise _invalid(problem)


def decode_create_workspace(body: bytes, content_type: str | None) -> CreateWorkspace:
    """Decode ``{"path": str}``; raises :class:`ApiError` (see :func:`decode_json_object`)."""
    return _convert(decode_json_object(body, content_type), CreateWorkspace, _typed_workspace)


def decode_submit(body: bytes, content_type: str | None) -> SubmitMessage:
    """Decode ``{"session_id": str, "prompt": str, "run_id"?: str | null}``.

    Raises :class:`ApiError` (see :func:`decode_json_object`); a value the identifier rule
    (or the prompt rule) refuses is a 422 with its typed code.
    """
    return _convert(decode_json_object(body, content_type), SubmitMessage, _typed_submit)


def decode_batch(body: bytes, content_type: str | None) -> SubmitBatch:
    """Decode ``{"messages": [SubmitMessage, ...]}`` (1 to :data:`MAX_BATCH_ITEMS`).

    Raises :class:`ApiError` as :func:`decode_submit` does; a message the rules refuse is a
    422 with that message's typed code, its message saying which one (``messages[3]: ...``).
    """
    return _convert(decode_json_object(body, content_type), SubmitBatch, _typed_batch)


def _typed_batch(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list):
        return
    for index, item in enumerate(messages[:MAX_BATCH_ITEMS]):
        if not isinstance(item, dict):
            continue
        try:
            _convert(item, SubmitMessage, _typed_submit)
        except ApiError as exc:
            raise ApiError(exc.status, exc.code, f"messages[{index}]: {exc.message}") from None


def check_path_id(name: str, value: str) -> str:
    """Return the path parameter ``value``; a run or session id that breaks the identifier
    rule is a 422 (``invalid_run_id``, ``invalid_session_id``, ``session_missing``)."""
    if name == "run_id":
        problem = id_problem(value)
        if problem is not None:
            raise ApiError(422, "invalid_run_id", f"invalid run id {value!r}: {problem}")
    elif name == "session_id":
        _typed_submit({"session_id": value})
    return value


# JSON's number grammar, nothing else: no '_' separators, no sign but '-', no surrounding
# space, no 'nan' or 'inf', no non-ASCII digits (all of which float() takes).
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_wait_timeout(query: Mapping[str, str]) -> float:
    """The ``timeout`` query parameter of ``/wait``: seconds in ``[0, 60]``, default 30.

    Strict: the value must be a JSON number (``10``, ``2.5``, ``1e1``). Raises
    :class:`ApiError` 422 ``invalid_query`` for anything else, a value out of range, or any
    other parameter.
    """
    raw = _only_query(query, "timeout")
    return DEFAULT_WAIT_SECONDS if raw is None else _wait_seconds("timeout", raw)


def parse_submit_wait(query: Mapping[str, str]) -> float | None:
    """The ``wait`` query parameter of a submission: seconds in ``[0, 60]``, or ``None``.

    As strict as :func:`parse_wait_timeout`: a JSON number, nothing else; 422
    ``invalid_query`` for anything else or any other parameter.
    """
    raw = _only_query(query, "wait")
    return None if raw is None else _wait_seconds("wait", raw)


def _only_query(query: Mapping[str, str], name: str) -> str | None:
    unknown = sorted(key for key in query if key != name)
    if unknown:
        raise ApiError(422, "invalid_query", f"unknown query parameter(s): {', '.join(unknown)}")
    return query.get(name)


def _wait_seconds(name: str, raw: str) -> float:
    try:
        if not _NUMBER.fullmatch(raw):
            raise ValueError(raw)
        seconds = float(raw)
        if not math.isfinite(seconds):
            raise ValueError(raw)
        return float(msgspec.convert(seconds, WaitSeconds))
    except (ValueError, msgspec.ValidationError):
        raise ApiError(
            422,
            "invalid_query",
            f"{name} must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, got {raw!r}",
        ) from None


# -- responses ----------------------------------------------------------------------------


def _from_dict(kind: type[_T], data: object) -> _T:
    if not isinstance(data, Mapping):
        raise ValueError(f"{kind.__name__}: expected a JSON object, got {type(data).__name__}")
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{kind.__name__}: {exc}") from None


class ErrorDetail(msgspec.Struct, frozen=True):
    """What went wrong: a stable machine-readable ``code`` and a message for people."""

    code: Annotated[str, Meta(examples=["workspace_not_found"])]
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error response: ``{"error": {"code", "message"}}``, never a traceback."""

    error: ErrorDetail


class Health(msgspec.Struct, frozen=True):
    """``GET /healthz``: ``draining`` once shutdown began."""

    status: Annotated[str, Meta(extra_json_schema={"enum": ["ok", "draining"]})]


class Accepted(msgspec.Struct, frozen=True):
    """``202`` to a submission: the run's id, minted by the server if the client sent none."""

    run_id: str


class WorkspaceView(msgspec.Struct, frozen=True):
    """A workspace as the API shows it: ``path`` is resolved under the workspace root."""

    id: WorkspaceId
    path: str
    closing: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {"id": self.id, "path": self.path, "closing": self.closing}

    @classmethod
    def from_dict(cls, data: object) -> WorkspaceView:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        return _from_dict(cls, data)


class WorkspaceList(msgspec.Struct, frozen=True):
    """``GET /v1/workspaces``: every open (or closing) workspace."""

    workspaces: list[WorkspaceView]


class RunView(msgspec.Struct, frozen=True):
    """A run as the API shows it: its state, and its terminal once it has one.

    ``state`` is ``pending`` (accepted, not yet queued or started), ``queued``, ``active``,
    or the terminal's outcome: ``completed``, ``failed`` or ``cancelled``. ``terminal`` is
    present only once the run ended (it carries ``ended_at`` and the ``reason``).

    The run's metadata is present where the server's store keeps it: ``accepted_at`` and
    ``started_at`` (wall-clock UNIX seconds; ``started_at`` once its agent began, after any
    queue wait), ``attempt`` (2 and up for a run rerun after a crash) and the ``labels`` it
    was submitted with.
    """

    run_id: str
    session_id: str
    state: _State
    terminal: RunComplete | None = None
    accepted_at: float | None = None
    started_at: float | None = None
    attempt: Annotated[int, Meta(ge=1)] = 1
    labels: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended."""
        return self.terminal is not None

    @classmethod
    def ended(cls, terminal: RunComplete) -> RunView:
        """The view of a run that ended: its outcome as state, its metadata from ``terminal``."""
        return cls(
            terminal.run_id,
            terminal.session_id,
            terminal.outcome,
            terminal,
            accepted_at=terminal.accepted_at,
            started_at=terminal.started_at,
            attempt=terminal.attempt,
            labels=dict(terminal.labels),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON body; ``terminal`` is present only once the run ended."""
        body: dict[str, Any] = {
            "run_id": self.run_id,
            "session_id": self.session_id,
            "state": self.state,
        }
        if self.terminal is not None:
            body["terminal"] = self.terminal.to_dict()
        # Only what the store knows: a store without metadata shows the shape it always had.
        if self.accepted_at is not None:
            body["accepted_at"] = self.accepted_at
        if self.started_at is not None:
            body["started_at"] = self.started_at
        if self.attempt != 1:
            body["attempt"] = self.attempt
        if self.labels:
            body["labels"] = dict(self.labels)
        return body

    @classmethod
    def from_dict(cls, data: object) -> RunView:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        if not isinstance(data, Mapping):
            raise ValueError(f"RunView: expected a JSON object, got {type(data).__name__}")
        raw = data.get("terminal")
        terminal = RunComplete.from_dict(raw) if raw is not None else None
        view = _from_dict(cls, {k: v for k, v in data.items() if k != "terminal"})
        return msgspec.structs.replace(view, terminal=terminal)


class RunList(msgspec.Struct, frozen=True):
    """``GET /v1/runs``: one page of runs, newest accepted first.

    ``next_cursor`` is ``null`` on the last page; otherwise pass it as ``cursor`` (with the
    same filters) for the next one. Runs accepted after the first page was read do not
    appear on later pages, and no run appears twice.
    """

    runs: list[RunView]
    next_cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {"runs": [run.to_dict() for run in self.runs], "next_cursor": self.next_cursor}

    @classmethod
    def from_dict(cls, data: object) -> RunList:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on a malformed body."""
        if not isinstance(data, Mapping):
            raise ValueError(f"RunList: expected a JSON object, got {type(data).__name__}")
        runs = data.get("runs")
        if not isinstance(runs, list):
            raise ValueError("RunList: field 'runs' must be a list")
        cursor = data.get("next_cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError("RunList: field 'next_cursor' must be a string or null")
        return cls([RunView.from_dict(run) for run in runs], cursor)


@attrs.frozen(kw_only=True)
class RunListQuery:
    """The decoded query of ``GET /v1/runs`` (see :func:`parse_run_list_query`)."""

    workspace: str | None = None
    path: str | None = None
    session_id: str | None = None
    state: str | None = None
    label: tuple[str, str] | None = None
    cursor: str | None = None
    limit: int = DEFAULT_LIST_LIMIT


_LIST_PARAMETERS: Final = ("workspace", "path", "session", "state", "label", "cursor", "limit")


def parse_run_list_query(pairs: Iterable[tuple[str, str]]) -> RunListQuery:
    """The query of ``GET /v1/runs``; 422 ``invalid_query`` for anything it cannot be.

    ``workspace`` (an open workspace's id) or ``path`` (a workspace path, open or not),
    ``session``, ``state`` (``running`` or ``ended``), ``label`` (``key=value``, exact),
    ``cursor`` (from a previous page) and ``limit`` (1 to 1000, default 100). Each at most
    once (``pairs`` is the query in order, repeats included); an unknown parameter is
    refused, never ignored.
    """
    query: dict[str, str] = {}
    repeated: set[str] = set()
    for key, value in pairs:
        if key in query:
            repeated.add(key)
        query[key] = value
    unknown = sorted(key for key in query if key not in _LIST_PARAMETERS)
    if unknown:
        raise ApiError(422, "invalid_query", f"unknown query parameter(s): {', '.join(unknown)}")
    if repeated:
        raise ApiError(
            422, "invalid_query", f"query parameter(s) given twice: {', '.join(sorted(repeated))}"
        )
    if "workspace" in query and "path" in query:
        raise ApiError(422, "invalid_query", "give workspace or path, not both")
    session_id = query.get("session")
    if session_id is not None:
        problem = id_problem(session_id)
        if problem is not None:
            raise ApiError(422, "invalid_query", f"invalid session {session_id!r}: {problem}")
    path = query.get("path")
    if path is not None:
        problem = workspace_path_problem(path)
        if problem is None and len(path) > MAX_PATH_LENGTH:
            problem = f"longer than {MAX_PATH_LENGTH} characters"
        if problem is not None:
            raise ApiError(422, "invalid_query", f"invalid path {path[:80]!r}: {problem}")
    state = query.get("state")
    if state is not None and state not in LIST_STATES:
        raise ApiError(
            422, "invalid_query", f"state must be one of {', '.join(LIST_STATES)}, got {state!r}"
        )
    label: tuple[str, str] | None = None
    raw_label = query.get("label")
    if raw_label is not None:
        key, equals, value = raw_label.partition("=")
        if not equals or not key:
            raise ApiError(422, "invalid_query", f"label must be key=value, got {raw_label!r}")
        label = (key, value)
    raw_limit = query.get("limit", str(DEFAULT_LIST_LIMIT))
    if (
        not raw_limit.isascii()
        or not raw_limit.isdigit()
        or not (1 <= int(raw_limit) <= MAX_LIST_LIMIT)
    ):
        raise ApiError(
            422,
            "invalid_query",
            f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got {raw_limit!r}",
        )
    cursor = query.get("cursor")
    if cursor is not None and not cursor:
        raise ApiError(422, "invalid_cursor", "cursor is empty")
    return RunListQuery(
        workspace=query.get("workspace"),
        path=path,
        session_id=session_id,
        state=state,
        label=label,
        cursor=cursor,
        limit=int(raw_limit),
    )


class QueuedRun(msgspec.Struct, frozen=True):
    """One run waiting in a session's queue (``run_id`` is ``""`` where the coordinator
    cannot tell)."""

    run_id: str
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        return {"run_id": self.run_id, "prompt": self.prompt}


class SessionView(msgspec.Struct, frozen=True):
    """A session's lane: whether it is busy, its active run, and its queue in start order."""

    workspace_id: str
    session_id: str
    busy: bool
    active: Annotated[str | None, Meta(description="the active run's id")]
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
        return _from_dict(cls, data)


class BatchAccepted(msgspec.Struct, frozen=True, tag="accepted", tag_field="kind"):
    """A batch's line for a message it accepted (durably): its index and run id."""

    index: int
    run_id: str


class BatchRefused(msgspec.Struct, frozen=True, tag="refused", tag_field="kind"):
    """A batch's line for a message refused as a single submission would have been (409
    ``duplicate_run``, say): nothing of it was accepted. ``run_id`` is the one it sent.

    Also the last line of a message whose run was accepted but whose terminal the server
    could not give (``run_not_found``: evicted): its run ended, wait for it by id.
    """

    index: int
    run_id: str | None
    status: Annotated[int, Meta(description="the HTTP status a single submission would get")]
    error: ErrorDetail


class BatchEnded(msgspec.Struct, frozen=True, tag="ended", tag_field="kind"):
    """A batch's line for an accepted run that ended: its index and the run with its
    terminal. Sent exactly once per accepted run, in the order the runs end."""

    index: int
    run: RunView


BatchLine = BatchAccepted | BatchRefused | BatchEnded
"""One line of a batch's NDJSON response: first one ``accepted`` or ``refused`` per message,
in order, then one ``ended`` per accepted run as it ends."""
