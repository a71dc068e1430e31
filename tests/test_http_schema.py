"""Request decoding is total: any bytes give a request value or an ``ApiError``, never a crash.

Property-based (hypothesis): arbitrary bodies, content types and JSON values are decoded;
the outcome is always either a well-typed request or an ``ApiError`` whose status is one of
400/413/415/422 with the ``{"error": {"code", "message"}}`` shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_runs import RunComplete
from trio_runs._validation import ID_PATTERN, validate_submission
from trio_runs.http.openapi import openapi_document
from trio_runs.http.schema import (
    MAX_BODY_BYTES,
    ApiError,
    CreateWorkspace,
    QueuedRun,
    RunView,
    SessionView,
    SubmitMessage,
    WorkspaceView,
    decode_create_workspace,
    decode_json_object,
    decode_submit,
    parse_wait_timeout,
)

JSON = "application/json"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
content_types = st.sampled_from(
    [JSON, "application/json; charset=utf-8", "text/plain", "", "APPLICATION/JSON", "x/y"]
) | st.text(max_size=30)


def check_error(error: ApiError) -> None:
    assert error.status in {400, 413, 415, 422}
    body = error.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"]
    assert body["error"]["message"]
    json.dumps(body)  # always serialisable


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=300), content_type=content_types | st.none())
def test_any_bytes_decode_or_are_refused_cleanly(body: bytes, content_type: str | None):
    for decode in (decode_submit, decode_create_workspace):
        try:
            value = decode(body, content_type)
        except ApiError as error:
            check_error(error)
        else:
            assert isinstance(value, SubmitMessage | CreateWorkspace)


@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_any_json_value_decodes_or_is_refused_cleanly(value: Any):
    body = json.dumps(value).encode()
    try:
        message = decode_submit(body, JSON)
    except ApiError as error:
        check_error(error)
        status = error.status
    else:
        status = 202
        assert isinstance(value, dict)
        assert set(value) <= {"session_id", "prompt", "run_id"}
        assert message.session_id == value["session_id"]
        assert message.prompt == value["prompt"]
        assert message.run_id == value.get("run_id")
    assert status in {202, 400, 422}


def library_accepts(session_id: str, prompt: str, run_id: str | None) -> bool:
    try:
        validate_submission(session_id, prompt, run_id or "", ())
    except ValueError:
        return False
    return run_id != ""


@settings(max_examples=300, deadline=None)
@given(session_id=st.text(), prompt=st.text(), run_id=st.none() | st.text())
def test_well_typed_submissions_decode_exactly_when_the_library_accepts_them(
    session_id: str, prompt: str, run_id: str | None
):
    # One rule: the HTTP decoder refuses what Backend.send_message would refuse, no more.
    data: dict[str, Any] = {"session_id": session_id, "prompt": prompt}
    if run_id is not None:
        data["run_id"] = run_id
    refusal: ApiError | None = None
    try:
        decoded = decode_submit(json.dumps(data).encode(), JSON)
    except ApiError as error:
        refusal = error
    if refusal is not None:
        assert (refusal.status, refusal.code) in REFUSALS, refusal
        assert not library_accepts(session_id, prompt, run_id)
    else:
        assert decoded == SubmitMessage(session_id, prompt, run_id)
        assert library_accepts(session_id, prompt, run_id)


REFUSALS = {
    (422, "session_missing"),
    (422, "invalid_session_id"),
    (422, "empty_prompt"),
    (422, "invalid_prompt"),
    (422, "invalid_run_id"),
}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"session_id": "a/b", "prompt": "p"}, "invalid_session_id"),
        ({"session_id": "..", "prompt": "p"}, "invalid_session_id"),
        ({"session_id": "s\n", "prompt": "p"}, "invalid_session_id"),
        ({"session_id": "s\ud800", "prompt": "p"}, "invalid_session_id"),
        ({"session_id": "s", "prompt": "p\x00"}, "invalid_prompt"),
        ({"session_id": "s", "prompt": "\udfff"}, "invalid_prompt"),
        ({"session_id": "s", "prompt": "p", "run_id": "."}, "invalid_run_id"),
        ({"session_id": "s", "prompt": "p", "run_id": ""}, "invalid_run_id"),
        ({"session_id": "s", "prompt": "p", "run_id": "r\n"}, "invalid_run_id"),
        ({"session_id": "s", "prompt": "p", "run_id": "r", "x": 1}, "invalid_request"),
    ],
)
def test_values_the_rule_refuses_get_their_typed_code(data: dict[str, Any], code: str):
    with pytest.raises(ApiError) as info:
        decode_submit(json.dumps(data).encode(), JSON)
    assert (info.value.status, info.value.code) == (422, code)


def test_a_trailing_newline_is_refused_although_python_dollar_would_let_it_through():
    # Python's '$' matches before a final newline: the pattern alone would take "r\n".
    assert re.search(ID_PATTERN, "r\n")
    with pytest.raises(ApiError) as info:
        decode_submit(b'{"session_id": "s", "prompt": "p", "run_id": "r\\n"}', JSON)
    assert info.value.code == "invalid_run_id"


@settings(max_examples=100, deadline=None)
@given(extra=st.text(min_size=1).filter(lambda k: k not in {"session_id", "prompt", "run_id"}))
def test_unknown_fields_are_422(extra: str):
    body = json.dumps({"session_id": "s", "prompt": "p", extra: 1}).encode()
    with pytest.raises(ApiError) as info:
        decode_submit(body, JSON)
    assert (info.value.status, info.value.code) == (422, "invalid_request")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"session_id": "s"', JSON, 400, "malformed_json"),
        (b"\xff\xfe", JSON, 400, "malformed_json"),
        (b'{"session_id": NaN, "prompt": "p"}', JSON, 400, "malformed_json"),
        (b'{"session_id": "a", "session_id": "b", "prompt": "p"}', JSON, 400, "malformed_json"),
        (b"[" * 100_000, JSON, 400, "malformed_json"),
        (b'{"session_id": "s", "prompt": "p"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"session_id": "s", "prompt": "p"}', None, 415, "unsupported_media_type"),
        (b"[]", JSON, 422, "invalid_request"),
        (b'"text"', JSON, 422, "invalid_request"),
        (b'{"prompt": "p"}', JSON, 422, "invalid_request"),
        (b'{"session_id": 1, "prompt": "p"}', JSON, 422, "invalid_request"),
        (b'{"session_id": "s", "prompt": ["p"]}', JSON, 422, "invalid_request"),
        (b'{"session_id": "s", "prompt": "p", "run_id": 7}', JSON, 422, "invalid_request"),
        (b'{"session_id": "s", "prompt": "p", "extra": 1}', JSON, 422, "invalid_request"),
    ],
)
def test_each_refusal_has_its_status_and_code(
    body: bytes, content_type: str | None, status: int, code: str
):
    with pytest.raises(ApiError) as info:
        decode_submit(body, content_type)
    assert (info.value.status, info.value.code) == (status, code)
    check_error(info.value)


def test_a_body_over_one_mebibyte_is_413_whatever_it_holds():
    body = b'{"session_id": "s", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    with pytest.raises(ApiError) as info:
        decode_json_object(body, "text/plain")
    assert (info.value.status, info.value.code) == (413, "body_too_large")
    assert decode_json_object(b"{}" + b" " * (MAX_BODY_BYTES - 2), JSON) == {}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"path": ""}', "invalid_request"),
        (b'{"path": "  "}', "invalid_request"),
        (b'{"path": "a\\u0000b"}', "invalid_request"),
        (b'{"path": "a\\nb"}', "invalid_request"),
        (b'{"path": "a\\u001bb"}', "invalid_request"),
        (b'{"path": "a\\ud800"}', "invalid_request"),
        (b'{"path": "' + b"x" * 4097 + b'"}', "invalid_request"),
        (b'{"path": 3}', "invalid_request"),
        (b'{"path": "a", "b": 1}', "invalid_request"),
        (b"{}", "invalid_request"),
    ],
)
def test_workspace_paths_are_checked(body: bytes, code: str):
    with pytest.raises(ApiError) as info:
        decode_create_workspace(body, JSON)
    assert (info.value.status, info.value.code) == (422, code)


def test_a_workspace_path_decodes():
    assert decode_create_workspace(b'{"path": "p/q"}', JSON) == CreateWorkspace("p/q")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, 30.0),
        ({"timeout": "0"}, 0.0),
        ({"timeout": "2.5"}, 2.5),
        ({"timeout": "60"}, 60.0),
        ({"timeout": "1e1"}, 10.0),
        ({"timeout": "1E-5"}, 1e-5),
        ({"timeout": "0.0"}, 0.0),
        ({"timeout": "-0"}, 0.0),
    ],
)
def test_wait_timeouts_in_range(query: dict[str, str], expected: float):
    assert parse_wait_timeout(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        {"timeout": "61"},
        {"timeout": "-1"},
        {"timeout": "nan"},
        {"timeout": "inf"},
        {"timeout": "soon"},
        {"timeout": "1_0"},
        {"timeout": "+5"},
        {"timeout": " 5"},
        {"timeout": "5\n"},
        {"timeout": "05"},
        {"timeout": ".5"},
        {"timeout": "5."},
        {"timeout": "0x10"},
        {"timeout": "\u0661"},
        {"timeout": "Infinity"},
        {"timeout": "1e400"},
        {"timeout": ""},
        {"timeout": "1", "other": "x"},
    ],
)
def test_wait_timeouts_out_of_range_are_422(query: dict[str, str]):
    with pytest.raises(ApiError) as info:
        parse_wait_timeout(query)
    assert (info.value.status, info.value.code) == (422, "invalid_query")


@settings(max_examples=100, deadline=None)
@given(query=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3))
def test_any_query_parses_or_is_refused(query: dict[str, str]):
    try:
        seconds = parse_wait_timeout(query)
    except ApiError as error:
        status = error.status
    else:
        status = 200
        assert 0 <= seconds <= 60
    assert status in {200, 422}


# -- views ----------------------------------------------------------------------------------


def test_views_round_trip():
    ws = WorkspaceView("id", "/p", True)
    assert WorkspaceView.from_dict(ws.to_dict()) == ws
    rc = RunComplete("s", "r", result={"a": [1]}, error=None)
    for view in (RunView("r", "s", "active"), RunView("r", "s", "completed", rc)):
        assert RunView.from_dict(json.loads(json.dumps(view.to_dict()))) == view
    assert "terminal" not in RunView("r", "s", "queued").to_dict()
    session = SessionView("w", "s", True, "r1", (QueuedRun("r2", "p2"),))
    assert SessionView.from_dict(session.to_dict()) == session


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (WorkspaceView, []),
        (WorkspaceView, {"id": 1, "path": "p"}),
        (RunView, {"run_id": "r"}),
        (RunView, "x"),
        (RunView, {"run_id": "r", "session_id": "s", "state": "x", "terminal": {"bad": 1}}),
        (SessionView, {"workspace_id": "w"}),
        (SessionView, None),
        (
            SessionView,
            {"workspace_id": "w", "session_id": "s", "busy": True, "active": None, "queued": [1]},
        ),
    ],
)
def test_malformed_views_are_value_errors(kind: Any, body: object):
    with pytest.raises(ValueError, match=r"View|RunComplete"):
        kind.from_dict(body)


# -- metrics and OpenAPI --------------------------------------------------------------------


def test_the_openapi_document_names_every_route_and_the_error_shape():
    doc = openapi_document()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for route in (
        "/v1/workspaces",
        "/v1/workspaces/{workspace_id}",
        "/v1/workspaces/{workspace_id}/messages",
        "/v1/workspaces/{workspace_id}/events",
        "/v1/workspaces/{workspace_id}/sessions/{session_id}",
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/cancel",
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/queue",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/wait",
        "/healthz",
        "/metrics",
    ):
        assert route in paths
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert openapi_document(secured=True)["paths"]["/healthz"]["get"]["security"] == []
    json.dumps(doc)
