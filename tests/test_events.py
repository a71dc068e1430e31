"""Tests for ``trio_runs.events``: frozen, slotted values with a strict JSON round-trip.

Promises checked (DESIGN.md "Events" and the module docstrings):

- every value round-trips through ``to_dict``/``from_dict`` and ``to_json``/``from_json``;
- ``RunComplete.outcome`` is completed / failed / cancelled, and cancelled wins over an error;
- malformed input raises ``ValueError`` naming the class and the field, never ``KeyError`` or
  ``TypeError`` from deep inside;
- values are frozen and slotted;
- ``AgentMessage.has_input`` / ``Attachment.has_text`` semantics.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_runs import (
    AgentMessage,
    Attachment,
    Event,
    EventType,
    Notification,
    NotificationType,
    RunCall,
    RunComplete,
    RunProgress,
)

SETTINGS = settings(max_examples=40, deadline=None)

# -- strategies -------------------------------------------------------------------------

# JSON values that survive json.dumps/json.loads unchanged (no NaN, no tuples, str keys).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(max_size=30)

run_completes = st.builds(
    RunComplete,
    session_id=texts,
    run_id=texts,
    result=json_values,
    error=st.none() | texts,
    cancelled=st.booleans(),
)
notifications = st.builds(
    Notification,
    type=st.sampled_from(NotificationType),
    session_id=texts,
    run_id=texts,
    message=texts,
)
run_progresses = st.builds(
    RunProgress,
    session_id=texts,
    run_id=texts,
    payload=json_values,
    attempt=st.integers(min_value=-5, max_value=10**6),
)
attachments = st.builds(
    Attachment,
    name=texts,
    data=st.binary(max_size=64),
    mime_type=st.sampled_from(["text/plain", "application/octet-stream", "image/png"]) | texts,
)
agent_messages = st.builds(
    AgentMessage,
    session_id=texts,
    prompt=texts,
    run_id=texts,
    attachments=st.lists(attachments, max_size=3).map(tuple),
)
run_calls = st.builds(
    RunCall,
    session_id=texts,
    prompt=texts,
    run_id=texts,
    attachments=st.lists(attachments, max_size=3).map(tuple),
    attempt=st.integers(min_value=1, max_value=10**6),
)
events = st.builds(
    Event,
    type=st.sampled_from(EventType),
    payload=st.one_of(run_completes, notifications, run_progresses, json_values),
)

ALL_VALUE_CLASSES = [
    pytest.param(Attachment, attachments, id="Attachment"),
    pytest.param(RunComplete, run_completes, id="RunComplete"),
    pytest.param(Notification, notifications, id="Notification"),
    pytest.param(RunProgress, run_progresses, id="RunProgress"),
    pytest.param(AgentMessage, agent_messages, id="AgentMessage"),
    pytest.param(RunCall, run_calls, id="RunCall"),
    pytest.param(Event, events, id="Event"),
]

# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "strategy"), ALL_VALUE_CLASSES)
@SETTINGS
@given(data=st.data())
def test_values_round_trip(cls: Any, strategy: Any, data: st.DataObject) -> None:
    """``cls.from_dict(v.to_dict()) == v`` with plain JSON-compatible ``to_dict`` output, and
    ``cls.from_json(v.to_json()) == v`` for str, bytes and bytearray input."""
    value = data.draw(strategy)
    as_dict = value.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    decoded = cls.from_dict(as_dict)
    assert type(decoded) is cls
    assert decoded == value
    text = value.to_json()
    assert isinstance(text, str)
    assert cls.from_json(text) == value
    assert cls.from_json(text.encode("utf-8")) == value
    assert cls.from_json(bytearray(text.encode("utf-8"))) == value


def test_event_payload_kinds_are_tagged_and_decode_to_their_class() -> None:
    """An Event tags trio-runs payloads with their kind and plain payloads as ``json``."""
    rc = RunComplete("s", "r", result={"answer": 42})
    note = Notification(NotificationType.AGENT_ERROR, "s", "r", "boom")
    progress = RunProgress("s", "r", payload=[1, 2], attempt=2)
    plain = {"session_id": "s", "run_id": "r"}  # looks like a RunComplete, but is plain JSON
    cases: list[tuple[object, str]] = [
        (rc, "run_complete"),
        (note, "notification"),
        (progress, "run_progress"),
        (plain, "json"),
        ([1, "two", None], "json"),
        (None, "json"),
    ]
    for payload, kind in cases:
        event = Event(EventType.UPDATED, payload)
        as_dict = event.to_dict()
        assert as_dict["kind"] == kind
        assert as_dict["type"] == "updated"
        decoded = Event.from_json(event.to_json())
        assert decoded == event
        assert type(decoded.payload) is type(payload)


def test_event_with_non_json_payload_to_json_raises_type_error() -> None:
    """``Event.to_json`` documents a ``TypeError`` for a payload that is not JSON-serialisable."""
    with pytest.raises(TypeError):
        Event(EventType.CREATED, object()).to_json()


def test_defaults() -> None:
    """Documented defaults: optional fields of each value class."""
    rc = RunComplete("s", "r")
    assert (rc.result, rc.error, rc.cancelled) == (None, None, False)
    msg = AgentMessage("s", "p")
    assert (msg.run_id, msg.attachments) == ("", ())
    call = RunCall("s", "p")
    assert (call.run_id, call.attachments, call.attempt) == ("", (), 1)
    assert RunProgress("s", "r", payload=None).attempt == 1
    assert Attachment("a", b"x").mime_type == "application/octet-stream"
    # Optional fields may be left out of the encoded form.
    assert RunComplete.from_dict({"session_id": "s", "run_id": "r"}) == rc
    assert AgentMessage.from_dict({"session_id": "s", "prompt": "p"}) == msg
    assert RunCall.from_dict({"session_id": "s", "prompt": "p"}) == call


def test_attachments_are_stored_as_a_tuple() -> None:
    """``attachments`` given as any iterable is stored as a tuple (so the value is hashable)."""
    att = Attachment.text("a.txt", "hello")
    msg = AgentMessage("s", "p", attachments=[att])
    call = RunCall("s", "p", attachments=iter([att]))
    assert msg.attachments == (att,)
    assert call.attachments == (att,)
    assert hash(msg) == hash(AgentMessage("s", "p", attachments=(att,)))


# -- outcome ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "cancelled", "outcome"),
    [
        (None, False, "completed"),
        ("boom", False, "failed"),
        (None, True, "cancelled"),
        ("boom", True, "cancelled"),  # cancelled wins over an error
    ],
)
def test_run_complete_outcome(error: str | None, cancelled: bool, outcome: str) -> None:
    """``outcome`` is completed / failed / cancelled, and cancelled wins over an error."""
    rc = RunComplete("s", "r", result="x", error=error, cancelled=cancelled)
    assert rc.outcome == outcome
    assert RunComplete.from_json(rc.to_json()).outcome == outcome


# -- frozen and slotted ------------------------------------------------------------------

SAMPLES: list[Any] = [
    RunComplete("s", "r"),
    Notification(NotificationType.AGENT_ERROR, "s", "r", "m"),
    RunProgress("s", "r", payload=1),
    Attachment("a", b"x"),
    AgentMessage("s", "p"),
    RunCall("s", "p"),
    Event(EventType.CREATED, RunComplete("s", "r")),
]


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: type(v).__name__)
def test_values_are_frozen_and_slotted(value: Any) -> None:
    """Assigning any field raises ``FrozenInstanceError``; instances have no ``__dict__``."""
    for field in attrs.fields(type(value)):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(value, field.name, "changed")
    assert "__slots__" in type(value).__dict__
    assert not hasattr(value, "__dict__")
    with pytest.raises((AttributeError, attrs.exceptions.FrozenInstanceError)):
        value.not_a_field = 1


# -- has_input / has_text -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attachment", "has_text"),
    [
        (Attachment.text("a.txt", "hello"), True),
        (Attachment.text("a.txt", "  \n\t "), False),
        (Attachment.text("a.txt", ""), False),
        (Attachment.text("a.md", "# hi", mime_type="text/markdown; charset=utf-8"), True),
        (Attachment("a.txt", b"hello", mime_type="TEXT/PLAIN"), True),
        (Attachment("a.bin", b"hello"), False),  # default mime type is not text
        (Attachment("a.png", b"hello", mime_type="image/png"), False),
        (Attachment("a.json", b"{}", mime_type="application/json"), False),
    ],
)
def test_attachment_has_text(attachment: Attachment, has_text: bool) -> None:
    """``has_text``: a ``text/*`` attachment with at least one non-blank character."""
    assert attachment.has_text() is has_text


def test_attachment_text_constructor_encodes_utf8() -> None:
    """``Attachment.text`` stores the content as UTF-8 with a ``text/plain`` default type."""
    att = Attachment.text("é.txt", "héllo ✓")
    assert att.data == "héllo ✓".encode()
    assert att.mime_type == "text/plain"
    assert att.is_text


@pytest.mark.parametrize(
    ("message", "has_input"),
    [
        (AgentMessage("s", "do it"), True),
        (AgentMessage("s", "  x  "), True),
        (AgentMessage("s", ""), False),
        (AgentMessage("s", " \n\t "), False),
        (AgentMessage("s", "", attachments=(Attachment.text("a.txt", "content"),)), True),
        (AgentMessage("s", "  ", attachments=(Attachment.text("a.txt", "   "),)), False),
        (AgentMessage("s", "", attachments=(Attachment("a.bin", b"data"),)), False),
        (
            AgentMessage(
                "s", "", attachments=(Attachment("a.bin", b"x"), Attachment.text("b.txt", "y"))
            ),
            True,
        ),
    ],
)
def test_agent_message_has_input(message: AgentMessage, has_input: bool) -> None:
    """``has_input``: a non-blank prompt, or a text attachment with non-blank content."""
    assert message.has_input() is has_input


# -- malformed input ----------------------------------------------------------------------

B64 = base64.b64encode(b"hello").decode("ascii")
VALID: dict[type, dict[str, Any]] = {
    RunComplete: {
        "session_id": "s",
        "run_id": "r",
        "result": {"a": [1]},
        "error": None,
        "cancelled": False,
    },
    Notification: {"type": "agent_error", "session_id": "s", "run_id": "r", "message": "m"},
    RunProgress: {"session_id": "s", "run_id": "r", "payload": {"p": 1}, "attempt": 2},
    Attachment: {"name": "a.txt", "data": B64, "mime_type": "text/plain"},
    AgentMessage: {
        "session_id": "s",
        "prompt": "p",
        "run_id": "r",
        "attachments": [{"name": "a.txt", "data": B64, "mime_type": "text/plain"}],
    },
    RunCall: {
        "session_id": "s",
        "prompt": "p",
        "run_id": "r",
        "attachments": [{"name": "a.txt", "data": B64, "mime_type": "text/plain"}],
        "attempt": 3,
    },
    Event: {
        "type": "created",
        "kind": "run_complete",
        "payload": {"session_id": "s", "run_id": "r"},
    },
}
REQUIRED: dict[type, tuple[str, ...]] = {
    RunComplete: ("session_id", "run_id"),
    Notification: ("type", "session_id", "run_id", "message"),
    RunProgress: ("session_id", "run_id", "payload"),
    Attachment: ("name", "data"),
    AgentMessage: ("session_id", "prompt"),
    RunCall: ("session_id", "prompt"),
    Event: ("type", "kind", "payload"),
}
# field -> values of the wrong type (bool where an int is wanted and an int where a bool is).
WRONG_TYPES: dict[type, dict[str, list[object]]] = {
    RunComplete: {
        "session_id": [1, None, ["s"]],
        "run_id": [2, {"r": 1}],
        "error": [5, False, ["e"]],
        "cancelled": [1, 0, "true", None],
    },
    Notification: {
        "type": [1, None],
        "session_id": [1, None],
        "run_id": [True],
        "message": [1.5],
    },
    RunProgress: {
        "session_id": [1],
        "run_id": [None],
        "attempt": [True, False, "1", 1.0, None],
    },
    Attachment: {"name": [1, None], "data": [1, None, ["aGk="]], "mime_type": [1, None]},
    AgentMessage: {
        "session_id": [1, None],
        "prompt": [1, None],
        "run_id": [1, None],
        "attachments": ["a", {"name": "a"}, None],
    },
    RunCall: {
        "session_id": [1],
        "prompt": [None],
        "run_id": [0],
        "attachments": ["a", None],
        "attempt": [True, "2", 2.5, None],
    },
    Event: {"type": [1, None], "kind": [1, None]},
}


def _cases() -> list[Any]:
    cases: list[Any] = []
    for cls, valid in VALID.items():
        name = cls.__name__
        for field in REQUIRED[cls]:
            data = {k: v for k, v in valid.items() if k != field}
            cases.append(pytest.param(cls, data, (name, field), id=f"{name}-missing-{field}"))
        data = {**valid, "surprise": 1}
        cases.append(pytest.param(cls, data, (name, "surprise"), id=f"{name}-unknown-field"))
        for field, bad_values in WRONG_TYPES[cls].items():
            for i, bad in enumerate(bad_values):
                data = {**valid, field: bad}
                cases.append(
                    pytest.param(cls, data, (name, field), id=f"{name}-wrong-type-{field}-{i}")
                )
    cases += [
        pytest.param(
            Notification,
            {**VALID[Notification], "type": "AGENT_ERROR"},
            ("Notification", "type", "AGENT_ERROR"),
            id="Notification-bad-enum",
        ),
        pytest.param(
            Event,
            {**VALID[Event], "type": "exploded"},
            ("Event", "type", "exploded"),
            id="Event-bad-enum",
        ),
        pytest.param(
            Event,
            {**VALID[Event], "kind": "mystery"},
            ("Event", "kind", "mystery"),
            id="Event-unknown-payload-kind",
        ),
        pytest.param(
            Event,
            {**VALID[Event], "payload": {"session_id": "s"}},
            ("RunComplete", "run_id"),
            id="Event-bad-payload-missing-field",
        ),
        pytest.param(
            Event,
            {**VALID[Event], "kind": "notification"},
            ("Notification", "type"),
            id="Event-payload-of-wrong-kind",
        ),
        pytest.param(
            Event,
            {**VALID[Event], "payload": [1, 2]},
            ("RunComplete",),
            id="Event-payload-not-an-object",
        ),
        pytest.param(
            Attachment,
            {**VALID[Attachment], "data": "not base64!!"},
            ("Attachment", "data", "base64"),
            id="Attachment-bad-base64",
        ),
        pytest.param(
            Attachment,
            {**VALID[Attachment], "data": "aGk"},  # bad padding
            ("Attachment", "data", "base64"),
            id="Attachment-bad-base64-padding",
        ),
        pytest.param(
            Attachment,
            {**VALID[Attachment], "data": "é"},  # not even ASCII
            ("Attachment", "data"),
            id="Attachment-non-ascii-base64",
        ),
        pytest.param(
            AgentMessage,
            {**VALID[AgentMessage], "attachments": [{"name": "a", "data": "%%%"}]},
            ("Attachment", "data"),
            id="AgentMessage-attachment-bad-base64",
        ),
        pytest.param(
            RunCall,
            {**VALID[RunCall], "attachments": [{"data": B64}]},
            ("Attachment", "name"),
            id="RunCall-attachment-missing-field",
        ),
        pytest.param(
            RunCall,
            {**VALID[RunCall], "attachments": ["aGk="]},
            ("Attachment",),
            id="RunCall-attachment-not-an-object",
        ),
    ]
    return cases


def _decoders(cls: Any) -> list[Callable[[Any], Any]]:
    return [cls.from_dict, lambda data: cls.from_json(json.dumps(data))]


def test_valid_samples_decode() -> None:
    """The base documents the malformed cases are derived from are themselves valid."""
    for cls, data in VALID.items():
        for decode in _decoders(cls):
            assert isinstance(decode(data), cls)


@pytest.mark.parametrize(("cls", "data", "words"), _cases())
def test_malformed_input_raises_value_error_naming_the_field(
    cls: Any, data: dict[str, Any], words: tuple[str, ...]
) -> None:
    """Missing/unknown/wrong-typed fields, bad enums, bad base64 and unknown payload kinds
    raise ``ValueError`` whose message names the class and the offending field."""
    for decode in _decoders(cls):
        with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
            decode(data)
        assert type(info.value) is ValueError
        message = str(info.value)
        for word in words:
            assert re.search(re.escape(word), message), (word, message)


NOT_JSON = ["", "{", "nope", "{'single': 'quotes'}", b"\xff\xfe\x00", "[1,", "{} {}"]
NOT_OBJECTS = ["[]", "[1, 2]", "1", "1.5", '"text"', "null", "true"]


@pytest.mark.parametrize("cls", [p.values[0] for p in ALL_VALUE_CLASSES])
def test_from_json_rejects_non_json_and_non_objects(cls: Any) -> None:
    """Not JSON, or JSON that is not an object, raises a ``ValueError`` naming the class."""
    for text in NOT_JSON:
        with pytest.raises(ValueError, match=f"{cls.__name__}.*JSON"):
            cls.from_json(text)
    for text in NOT_OBJECTS:
        with pytest.raises(ValueError, match=f"{cls.__name__}.*object"):
            cls.from_json(text)
    with pytest.raises(ValueError, match=cls.__name__):
        cls.from_json(None)  # not even text


@pytest.mark.parametrize("cls", [RunComplete, Event])
def test_from_json_rejects_deeply_nested_garbage_with_value_error(cls: Any) -> None:
    """Malformed input is a ``ValueError`` however it is malformed: an unterminated,
    deeply nested array (a cheap hostile request body) included."""
    with pytest.raises(ValueError, match=cls.__name__):
        cls.from_json("[" * 100_000)


@pytest.mark.parametrize("cls", [p.values[0] for p in ALL_VALUE_CLASSES])
def test_from_dict_rejects_non_mappings(cls: Any) -> None:
    """``from_dict`` of something that is not a mapping raises ``ValueError``, not TypeError."""
    for data in (None, [], [("session_id", "s")], "text", 1, b"{}"):
        with pytest.raises(ValueError, match=cls.__name__):
            cls.from_dict(data)


# Field names of every class, so arbitrary objects often look almost valid.
FIELD_NAMES = sorted({key for valid in VALID.values() for key in valid} | {"surprise"})
SPECIAL_STRINGS = [
    "agent_error",
    "created",
    "updated",
    "deleted",
    "json",
    "run_complete",
    "notification",
    "run_progress",
    B64,
    "not base64!!",
]
fuzz_values = st.recursive(
    json_scalars | st.sampled_from(SPECIAL_STRINGS),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), children, max_size=6)
    ),
    max_leaves=15,
)


@st.composite
def near_valid_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid encoded value with up to three random edits (drop, replace or add a field)."""
    obj = draw(st.sampled_from(ALL_VALUE_CLASSES).flatmap(lambda p: p.values[1])).to_dict()
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop" and obj:
            del obj[draw(st.sampled_from(sorted(obj)))]
        elif action == "replace" and obj:
            obj[draw(st.sampled_from(sorted(obj)))] = draw(fuzz_values)
        else:
            obj[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=5))] = draw(fuzz_values)
    return obj


fuzz_objects = near_valid_objects() | st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=5), fuzz_values, max_size=7
)


ALL_CLASSES = [p.values[0] for p in ALL_VALUE_CLASSES]


@settings(max_examples=100, deadline=None)
@given(obj=fuzz_objects)
def test_arbitrary_json_objects_decode_or_raise_value_error(obj: dict[str, Any]) -> None:
    """Any JSON object either decodes to a value that round-trips, or raises ``ValueError``:
    never ``KeyError``, ``TypeError`` or anything else (checked for every class)."""
    for cls in ALL_CLASSES:
        for decode in _decoders(cls):
            try:
                value = decode(obj)
            except ValueError:
                continue
            assert type(value) is cls
            assert cls.from_dict(value.to_dict()) == value


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40) | fuzz_values.map(json.dumps))
def test_arbitrary_text_decodes_or_raises_value_error(text: str) -> None:
    """Any text given to ``from_json`` either decodes or raises ``ValueError``."""
    for cls in ALL_CLASSES:
        try:
            value = cls.from_json(text)
        except ValueError:
            continue
        assert type(value) is cls


def test_an_abandoned_terminal_is_a_failure_told_apart_by_its_field():
    rc = RunComplete("s", "r", error="the server stopped before the run ended", abandoned=True)
    assert rc.outcome == "failed"
    assert rc.to_dict()["abandoned"] is True
    assert RunComplete.from_json(rc.to_json()) == rc
    plain = RunComplete("s", "r", error="boom")
    assert "abandoned" not in plain.to_dict()  # every other terminal's shape is unchanged
    assert RunComplete.from_dict(plain.to_dict()).abandoned is False


@pytest.mark.parametrize(
    "fields", [{"abandoned": True}, {"abandoned": True, "error": "x", "cancelled": True}]
)
def test_an_abandoned_terminal_must_be_a_failure(fields):
    with pytest.raises(ValueError, match="abandoned"):
        RunComplete("s", "r", **fields)
    with pytest.raises(ValueError, match="abandoned"):
        RunComplete.from_dict({"session_id": "s", "run_id": "r", **fields})


def test_abandoned_must_be_a_bool_on_the_wire():
    with pytest.raises(ValueError, match="abandoned"):
        RunComplete.from_dict({"session_id": "s", "run_id": "r", "error": "x", "abandoned": 1})
