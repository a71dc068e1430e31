"""The values that cross trio-runs' boundaries, and their JSON round-trip.

Every class here is an immutable, slotted ``attrs`` value. Each has ``to_dict()`` /
``from_dict()`` (plain JSON-compatible mappings) and ``to_json()`` / ``from_json()``.
Decoding is strict: a missing field, an unknown field or a field of the wrong type raises
``ValueError`` naming the class and the field, never a ``KeyError`` from deep inside.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Generic, Literal, Self, TypeVar, get_args

import attrs

__all__ = [
    "AgentMessage",
    "Attachment",
    "EndReason",
    "Event",
    "EventType",
    "Notification",
    "NotificationType",
    "RunCall",
    "RunComplete",
    "RunProgress",
]

T = TypeVar("T")

Outcome = Literal["completed", "failed", "cancelled"]

EndReason = Literal["user", "session_cancel", "clear_queue", "shutdown", "deadline", "abandoned"]
"""What ended a run when the agent itself did not (``RunComplete.reason``): ``user``, its
``cancel_run``; ``session_cancel``, a ``cancel`` of its session; ``clear_queue``, dropped from
its session's queue; ``shutdown``, its workspace or backend closing; ``deadline``, its deadline
(the terminal is ``timed_out``); ``abandoned``, recovery after its process stopped."""

END_REASONS: Final[frozenset[str]] = frozenset(get_args(EndReason))

_NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})


def _no_labels() -> Mapping[str, str]:
    # A factory, not a default value: a schema generator (msgspec, for the OpenAPI document)
    # would have to encode a default, and a mappingproxy is not JSON.
    return _NO_LABELS


def _to_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    # A read-only copy: a frozen value must not change because the caller's dict did. The
    # empty case (nearly every run) shares one object and allocates nothing.
    if not value:
        return _NO_LABELS
    if type(value) is MappingProxyType and value is not _NO_LABELS:
        # Ours already (a copy made here or by decoding): copying again buys nothing.
        return value
    return MappingProxyType(dict(value))


def _labels_from(data: Mapping[str, Any], what: str) -> Mapping[str, str]:
    raw = _opt(data, "labels", dict, what, None)
    if raw is None:
        return _NO_LABELS
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ValueError(
                f"{what}: field 'labels': value of {key!r} must be str, got {type(value).__name__}"
            )
    return MappingProxyType(dict(raw))


def _opt_time(data: Mapping[str, Any], key: str, what: str) -> float | None:
    value = _opt(data, key, (int, float, type(None)), what, None)
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError(f"{what}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _opt_attempt(data: Mapping[str, Any], what: str) -> int:
    value: int = _opt(data, "attempt", int, what, 1)
    if value < 1:
        raise ValueError(f"{what}: field 'attempt' must be >= 1, got {value}")
    return value


def _loads(text: str | bytes | bytearray, what: str) -> Mapping[str, Any]:
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what}: JSON nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_keys(
    data: object, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a mapping, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{what}: missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}")
    return data


def _typed(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data[key]
    # bool is an int subclass: refuse True where an int is wanted, and 1 where a bool is.
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{what}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _opt(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str, default: Any
) -> Any:
    if key not in data:
        return default
    return _typed(data, key, kind, what)


class _JSONValue:
    """``to_json`` / ``from_json`` for a value class with ``to_dict`` / ``from_dict``."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: object) -> Self:
        raise NotImplementedError

    def to_json(self) -> str:
        """Serialise to JSON; raises ``TypeError`` if a free-form field is not serialisable."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes | bytearray) -> Self:
        """Parse :meth:`to_json`'s output; raises ``ValueError`` on malformed input."""
        return cls.from_dict(_loads(text, cls.__name__))


class NotificationType(enum.Enum):
    """Kinds of lossy, best-effort notifications a workspace publishes."""

    AGENT_ERROR = "agent_error"
    """A run ended with an error (the authoritative ending is still its ``RunComplete``)."""


class EventType(enum.Enum):
    """What happened to an event's payload."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


@attrs.frozen(slots=True)
class RunComplete(_JSONValue):
    """The terminal of one run: how it ended, exactly once per accepted run.

    ``result`` is the agent's return value (it must be JSON-serialisable to cross a process
    boundary), so a client that lost live events can still reconcile. A terminal is never
    both cancelled and an error as far as :attr:`outcome` is concerned: cancelled wins.

    ``abandoned`` marks a failed terminal given by recovery, not by the run: the process
    (or node) that ran it stopped before it ended, so whether its work happened is unknown.
    It is always ``failed`` (``error`` says why) and never cancelled; tell it from an
    ordinary failure by this field, never by parsing ``error``.

    ``timed_out`` marks a failed terminal of a run cut off by its deadline (``RunCall.deadline``
    or its coordinator's default): a failure of the run, not a cancellation. Like
    ``abandoned`` it always comes with an ``error`` and is never cancelled (nor abandoned).

    The run's metadata (keyword-only, each on the wire only when set): ``reason``, what ended
    it when the agent itself did not (see :data:`EndReason`; ``None`` when its own return,
    raise or self-cancellation did); ``accepted_at``, ``started_at`` and ``ended_at``, wall
    clock UNIX seconds (``time.time()``) of its acceptance, of its agent starting to execute
    (after any queue wait; ``None`` if it never started; for a terminal the backend records
    itself, because its coordinator published none, when the backend handed the run to that
    coordinator) and of its terminal being decided;
    ``attempt``, which execution of the run this is (``2`` for its first rerun after a
    crash); ``labels``, the read-only labels it was submitted with. Equality (and the hash)
    compares the ending only, the seven fields above: compare metadata field by field (or
    by ``to_dict()``).
    """

    session_id: str
    run_id: str
    result: object = None
    error: str | None = None
    cancelled: bool = False
    abandoned: bool = False
    timed_out: bool = False
    # The metadata is not part of equality (nor of the hash): two terminals are equal when
    # they tell the same ending of the same run, whenever it was recorded.
    reason: EndReason | None = attrs.field(default=None, kw_only=True, eq=False)
    accepted_at: float | None = attrs.field(default=None, kw_only=True, eq=False)
    started_at: float | None = attrs.field(default=None, kw_only=True, eq=False)
    ended_at: float | None = attrs.field(default=None, kw_only=True, eq=False)
    attempt: int = attrs.field(default=1, kw_only=True, eq=False)
    labels: Mapping[str, str] = attrs.field(
        factory=_no_labels, kw_only=True, converter=_to_labels, eq=False
    )

    def __attrs_post_init__(self) -> None:
        if self.abandoned and (self.error is None or self.cancelled):
            raise ValueError("an abandoned terminal is a failure: it needs an error, not cancelled")
        if self.timed_out and (self.error is None or self.cancelled or self.abandoned):
            raise ValueError(
                "a timed-out terminal is a failure: it needs an error, not cancelled or abandoned"
            )

    @property
    def outcome(self) -> Outcome:
        """``"cancelled"``, ``"failed"`` or ``"completed"``; cancellation wins over an error."""
        if self.cancelled:
            return "cancelled"
        if self.error is not None:
            return "failed"
        return "completed"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping (``result`` is passed through as is)."""
        return {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "result": self.result,
            "error": self.error,
            "cancelled": self.cancelled,
            # Only when set: the wire shape of every other terminal stays as it was.
            **({"abandoned": True} if self.abandoned else {}),
            **({"timed_out": True} if self.timed_out else {}),
            **({"reason": self.reason} if self.reason is not None else {}),
            **({"accepted_at": self.accepted_at} if self.accepted_at is not None else {}),
            **({"started_at": self.started_at} if self.started_at is not None else {}),
            **({"ended_at": self.ended_at} if self.ended_at is not None else {}),
            **({"attempt": self.attempt} if self.attempt != 1 else {}),
            **({"labels": dict(self.labels)} if self.labels else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> RunComplete:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(
            data,
            what,
            ("session_id", "run_id"),
            (
                "result",
                "error",
                "cancelled",
                "abandoned",
                "timed_out",
                "reason",
                "accepted_at",
                "started_at",
                "ended_at",
                "attempt",
                "labels",
            ),
        )
        reason = _opt(d, "reason", (str, type(None)), what, None)
        if reason is not None and reason not in END_REASONS:
            raise ValueError(f"{what}: field 'reason': unknown end reason {reason!r}")
        return cls(
            session_id=_typed(d, "session_id", str, what),
            run_id=_typed(d, "run_id", str, what),
            result=d.get("result"),
            error=_opt(d, "error", (str, type(None)), what, None),
            cancelled=_opt(d, "cancelled", bool, what, False),
            abandoned=_opt(d, "abandoned", bool, what, False),
            timed_out=_opt(d, "timed_out", bool, what, False),
            reason=reason,
            accepted_at=_opt_time(d, "accepted_at", what),
            started_at=_opt_time(d, "started_at", what),
            ended_at=_opt_time(d, "ended_at", what),
            attempt=_opt_attempt(d, what),
            labels=_labels_from(d, what),
        )


@attrs.frozen(slots=True)
class Notification(_JSONValue):
    """A lossy, best-effort notice for observers (e.g. an agent error).

    Never the authoritative ending of a run: that is always the run's :class:`RunComplete`.
    """

    type: NotificationType
    session_id: str
    run_id: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping."""
        return {
            "type": self.type.value,
            "session_id": self.session_id,
            "run_id": self.run_id,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: object) -> Notification:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(data, what, ("type", "session_id", "run_id", "message"))
        raw_type = _typed(d, "type", str, what)
        try:
            kind = NotificationType(raw_type)
        except ValueError:
            raise ValueError(f"{what}: unknown notification type {raw_type!r}") from None
        return cls(
            type=kind,
            session_id=_typed(d, "session_id", str, what),
            run_id=_typed(d, "run_id", str, what),
            message=_typed(d, "message", str, what),
        )


@attrs.frozen(slots=True)
class RunProgress(_JSONValue):
    """One lossy progress item an agent emitted with ``RunContext.emit``.

    Observers may miss any of these under load; they never carry a run's ending.
    """

    session_id: str
    run_id: str
    payload: object
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping (``payload`` is passed through as is)."""
        return {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "payload": self.payload,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, data: object) -> RunProgress:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(data, what, ("session_id", "run_id", "payload"), ("attempt",))
        return cls(
            session_id=_typed(d, "session_id", str, what),
            run_id=_typed(d, "run_id", str, what),
            payload=d["payload"],
            attempt=_opt(d, "attempt", int, what, 1),
        )


@attrs.frozen(slots=True)
class Attachment(_JSONValue):
    """A file handed to a run alongside its prompt.

    A *text* attachment (``mime_type`` ``text/*``) with non-blank content counts as input on
    its own, so a message whose prompt is empty but carries one is not an ``EmptyPrompt``.
    """

    name: str
    data: bytes
    mime_type: str = "application/octet-stream"

    @classmethod
    def text(cls, name: str, content: str, mime_type: str = "text/plain") -> Attachment:
        """An attachment holding ``content`` encoded as UTF-8."""
        return cls(name=name, data=content.encode("utf-8"), mime_type=mime_type)

    @property
    def is_text(self) -> bool:
        """Whether the attachment is textual (its MIME type is ``text/*``)."""
        return self.mime_type.split(";", 1)[0].strip().lower().startswith("text/")

    def has_text(self) -> bool:
        """Whether this is a text attachment with at least one non-blank character."""
        if not self.is_text:
            return False
        return bool(self.data.decode("utf-8", errors="replace").strip())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping; ``data`` is base64-encoded."""
        return {
            "name": self.name,
            "mime_type": self.mime_type,
            "data": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: object) -> Attachment:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(data, what, ("name", "data"), ("mime_type",))
        try:
            raw = base64.b64decode(_typed(d, "data", str, what), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{what}: field 'data' is not valid base64: {exc}") from None
        return cls(
            name=_typed(d, "name", str, what),
            data=raw,
            mime_type=_opt(d, "mime_type", str, what, "application/octet-stream"),
        )


def _attachments_from(data: Mapping[str, Any], what: str) -> tuple[Attachment, ...]:
    raw = _opt(data, "attachments", list, what, [])
    return tuple(Attachment.from_dict(item) for item in raw)


def _to_attachments(value: Iterable[Attachment]) -> tuple[Attachment, ...]:
    return tuple(value)


def check_deadline(value: object, name: str = "deadline") -> float | None:
    """``value`` as a deadline in seconds: ``None``, or a finite number > 0 (``ValueError``)."""
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number of seconds > 0 or None, got {value!r}")
    return float(value)


def _validate_deadline(_: object, __: object, value: float | None) -> None:
    check_deadline(value)


def _deadline_from(data: Mapping[str, Any], what: str) -> float | None:
    value = _opt(data, "deadline", (int, float, type(None)), what, None)
    try:
        return check_deadline(value)
    except ValueError as exc:
        raise ValueError(f"{what}: field 'deadline': {exc}") from None


@attrs.frozen(slots=True)
class AgentMessage(_JSONValue):
    """What a client submits: a prompt for a session, optionally with its own run id.

    An empty ``run_id`` asks the backend to mint one (a UUID4 string). ``deadline``, when
    given, is how many seconds the run may take once it starts (queued time does not count);
    past it the run ends failed with ``timed_out`` set. ``None`` leaves it to the
    coordinator's default (and maximum). ``labels`` (read-only, empty by default) go with the
    run into its terminal and the store's listing; ``send_message`` refuses ill-formed ones
    with ``InvalidLabels`` (at most 16; keys 1-64 chars of ``[A-Za-z0-9_.-]``; values at
    most 256 chars, no NUL or lone surrogates).
    """

    session_id: str
    prompt: str
    run_id: str = ""
    attachments: tuple[Attachment, ...] = attrs.field(default=(), converter=_to_attachments)
    deadline: float | None = attrs.field(default=None, validator=_validate_deadline)
    labels: Mapping[str, str] = attrs.field(
        factory=_no_labels, kw_only=True, converter=_to_labels, hash=False
    )

    def has_input(self) -> bool:
        """Whether there is something to run: a non-blank prompt or a non-blank text file."""
        return bool(self.prompt.strip()) or any(a.has_text() for a in self.attachments)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping."""
        return {
            "session_id": self.session_id,
            "prompt": self.prompt,
            "run_id": self.run_id,
            "attachments": [a.to_dict() for a in self.attachments],
            **({"deadline": self.deadline} if self.deadline is not None else {}),
            **({"labels": dict(self.labels)} if self.labels else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> AgentMessage:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(
            data,
            what,
            ("session_id", "prompt"),
            ("run_id", "attachments", "deadline", "labels"),
        )
        return cls(
            session_id=_typed(d, "session_id", str, what),
            prompt=_typed(d, "prompt", str, what),
            run_id=_opt(d, "run_id", str, what, ""),
            attachments=_attachments_from(d, what),
            deadline=_deadline_from(d, what),
            labels=_labels_from(d, what),
        )


@attrs.frozen(slots=True)
class RunCall(_JSONValue):
    """What the agent receives for one attempt of one run.

    ``deadline`` is the message's (seconds from the run's start, or ``None`` for the
    coordinator's default). ``attempt`` counts the agent's tries within this execution (a
    ``RetryPolicy``); ``execution`` counts executions of the run (``2`` for its first rerun
    after a crash), which its terminal reports as ``RunComplete.attempt``. ``labels`` and
    ``accepted_at`` (wall clock) are the run's, from its acceptance, for its terminal.
    """

    session_id: str
    prompt: str
    run_id: str = ""
    attachments: tuple[Attachment, ...] = attrs.field(default=(), converter=_to_attachments)
    attempt: int = 1
    deadline: float | None = attrs.field(default=None, validator=_validate_deadline)
    labels: Mapping[str, str] = attrs.field(
        factory=_no_labels, kw_only=True, converter=_to_labels, hash=False
    )
    # When is not what: two calls for the same work are equal whenever they were accepted.
    accepted_at: float | None = attrs.field(default=None, kw_only=True, eq=False)
    execution: int = attrs.field(default=1, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping."""
        return {
            "session_id": self.session_id,
            "prompt": self.prompt,
            "run_id": self.run_id,
            "attachments": [a.to_dict() for a in self.attachments],
            "attempt": self.attempt,
            **({"deadline": self.deadline} if self.deadline is not None else {}),
            **({"labels": dict(self.labels)} if self.labels else {}),
            **({"accepted_at": self.accepted_at} if self.accepted_at is not None else {}),
            **({"execution": self.execution} if self.execution != 1 else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> RunCall:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(
            data,
            what,
            ("session_id", "prompt"),
            ("run_id", "attachments", "attempt", "deadline", "labels", "accepted_at", "execution"),
        )
        execution: int = _opt(d, "execution", int, what, 1)
        if execution < 1:
            raise ValueError(f"{what}: field 'execution' must be >= 1, got {execution}")
        return cls(
            session_id=_typed(d, "session_id", str, what),
            prompt=_typed(d, "prompt", str, what),
            run_id=_opt(d, "run_id", str, what, ""),
            attachments=_attachments_from(d, what),
            attempt=_opt(d, "attempt", int, what, 1),
            deadline=_deadline_from(d, what),
            labels=_labels_from(d, what),
            accepted_at=_opt_time(d, "accepted_at", what),
            execution=execution,
        )


# Payload kinds an Event can carry across a process boundary, by tag.
_PAYLOAD_KINDS: Final[dict[str, Callable[[object], Any]]] = {
    "run_complete": RunComplete.from_dict,
    "notification": Notification.from_dict,
    "run_progress": RunProgress.from_dict,
    "agent_message": AgentMessage.from_dict,
    "run_call": RunCall.from_dict,
}
_PAYLOAD_TAGS: Final[dict[type, str]] = {
    RunComplete: "run_complete",
    Notification: "notification",
    RunProgress: "run_progress",
    AgentMessage: "agent_message",
    RunCall: "run_call",
}


@attrs.frozen(slots=True)
class Event(_JSONValue, Generic[T]):
    """One item delivered by a :class:`~trio_runs.Broker`: what happened, and to what."""

    type: EventType
    payload: T

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible mapping; the payload is tagged with its kind so it decodes back.

        Payloads that are not trio-runs values are passed through as plain JSON (kind
        ``"json"``).
        """
        tag = _PAYLOAD_TAGS.get(type(self.payload))
        if tag is None:
            return {"type": self.type.value, "kind": "json", "payload": self.payload}
        payload: Any = self.payload
        return {"type": self.type.value, "kind": tag, "payload": payload.to_dict()}

    @classmethod
    def from_dict(cls, data: object) -> Event[Any]:
        """Decode :meth:`to_dict`'s output; raises ``ValueError`` on any malformed field."""
        what = cls.__name__
        d = _check_keys(data, what, ("type", "kind", "payload"))
        raw_type = _typed(d, "type", str, what)
        try:
            kind = EventType(raw_type)
        except ValueError:
            raise ValueError(f"{what}: unknown event type {raw_type!r}") from None
        tag = _typed(d, "kind", str, what)
        if tag == "json":
            return Event(kind, d["payload"])
        decode = _PAYLOAD_KINDS.get(tag)
        if decode is None:
            raise ValueError(f"{what}: unknown payload kind {tag!r}")
        return Event(kind, decode(d["payload"]))
