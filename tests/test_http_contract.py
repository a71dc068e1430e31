"""The OpenAPI document matches the server (issue 10, finding 4).

The request schemas are generated from the structs the server decodes with; here a
JSON Schema validator (``jsonschema_rs``, the ECMA-262 regex dialect schemathesis and other
tools use) judges generated bodies and ids, and the server's decoding must agree with it
exactly. Security is declared only when the server has a token; a 405 lists every method of
its path. ``.ci/run`` also runs schemathesis against a live server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_runs import open_backend
from trio_runs._validation import (
    is_valid_id,
    prompt_problem,
    validate_submission,
    workspace_path_problem,
)
from trio_runs.agents import demo
from trio_runs.http.app import create_app
from trio_runs.http.openapi import openapi_document
from trio_runs.http.schema import (
    MAX_PATH_LENGTH,
    ApiError,
    check_path_id,
    decode_create_workspace,
    decode_submit,
)
from trio_runs.http.service import RunService

TIMEOUT = 60  # virtual seconds
JSON = "application/json"
DOC = openapi_document()


def validator(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` that resolves the document's ``$ref``s."""
    return jsonschema_rs.validator_for({**schema, "components": DOC["components"]})


def body_validator(route: str) -> Any:
    schema = DOC["paths"][route]["post"]["requestBody"]["content"][JSON]["schema"]
    return validator(schema)


def parameter_validator(route: str, name: str) -> Any:
    (parameter,) = (p for p in DOC["paths"][route]["parameters"] if p["name"] == name)
    return validator(parameter["schema"])


SUBMIT = body_validator("/v1/workspaces/{workspace_id}/messages")
CREATE = body_validator("/v1/workspaces")
RUN_ID = parameter_validator("/v1/runs/{run_id}", "run_id")
SESSION_ID = parameter_validator(
    "/v1/workspaces/{workspace_id}/sessions/{session_id}", "session_id"
)

# UTF-8 text: a lone surrogate cannot travel as UTF-8, so no schema can be asked about it
# (the server refuses one that arrives as a JSON escape: tests/test_id_rule.py).
text = st.text(st.characters(codec="utf-8"), max_size=12)
awkward = st.sampled_from(
    ["", " ", ".", "..", "a/b", "\x00", "a\nb", "r\n", "\u2028", "\x85", "\ufeff", "x" * 257]
)
strings = text | awkward
values = strings | st.none() | st.integers() | st.booleans()


def refusal(call: Any, *args: Any) -> ApiError | None:
    """The ApiError ``call(*args)`` raises, or None."""
    try:
        call(*args)
    except ApiError as error:
        return error
    return None


def decodes(decode: Any, body: object) -> bool:
    error = refusal(decode, json.dumps(body).encode(), JSON)
    assert error is None or error.status in {400, 422}, error
    return error is None


@settings(max_examples=400, deadline=None)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={"session_id": values, "prompt": values, "run_id": values, "other": values},
    )
)
def test_a_submission_is_schema_valid_exactly_when_the_server_takes_it(body: dict[str, Any]):
    # The server takes what it decodes and Backend.send_message accepts (the rest of its
    # refusals are about state: an unknown workspace, a duplicate run id).
    decoded = decodes(decode_submit, body)
    accepted = library_accepts(body)
    assert SUBMIT.is_valid(body) == (decoded and accepted), body
    assert decoded == accepted or not decoded, body


def library_accepts(body: dict[str, Any]) -> bool:
    run_id = body.get("run_id")
    try:
        validate_submission(body.get("session_id"), body.get("prompt"), run_id or "", ())
    except (TypeError, ValueError):
        return False
    return run_id != ""


@settings(max_examples=300, deadline=None)
@given(
    body=st.fixed_dictionaries({}, optional={"path": values, "other": values})
    | st.builds(lambda n: {"path": "p" * n}, st.integers(MAX_PATH_LENGTH - 2, MAX_PATH_LENGTH + 2))
)
def test_a_workspace_request_is_schema_valid_exactly_when_the_server_decodes_it(
    body: dict[str, Any],
):
    assert CREATE.is_valid(body) == decodes(decode_create_workspace, body), body


def code_points() -> list[str]:
    # All of the BMP but surrogates, and a sample of the astral planes.
    return [
        chr(c) for c in [*range(0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 97)]
    ]


def test_every_character_is_read_alike_by_the_library_and_an_ecma_validator():
    # The published patterns spell whitespace and control characters out; an ECMA engine
    # and Python's re (with the library's checks) must agree on every character.
    prompt = validator(DOC["components"]["schemas"]["SubmitMessage"]["properties"]["prompt"])
    path = validator(DOC["components"]["schemas"]["CreateWorkspace"]["properties"]["path"])
    mismatches = []
    for c in code_points():
        for value in (c, f"x{c}y"):
            if RUN_ID.is_valid(value) != is_valid_id(value):
                mismatches.append(("id", value))
            if prompt.is_valid(value) != (prompt_problem(value) is None and bool(value.strip())):
                mismatches.append(("prompt", value))
            if path.is_valid(value) != (workspace_path_problem(value) is None):
                mismatches.append(("path", value))
    assert mismatches == []


@settings(max_examples=300, deadline=None)
@given(value=strings)
def test_a_path_id_is_schema_valid_exactly_when_the_server_takes_it(value: str):
    for name, schema in (("run_id", RUN_ID), ("session_id", SESSION_ID)):
        error = refusal(check_path_id, name, value)
        assert error is None or error.status == 422
        assert schema.is_valid(value) == (error is None), (name, value)


# -- the served document and the routes -------------------------------------------------


@asynccontextmanager
async def app_client(root: Path, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    async with open_backend() as backend:
        service = RunService(backend, demo.coordinator_factory, workspace_root=root)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=create_app(service, token=token))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as http:
            yield http
        await service.shutdown(0)


async def test_security_is_declared_only_when_the_server_has_a_token(
    autojump_clock: object, tmp_path: Path
):
    with trio.fail_after(TIMEOUT):
        async with app_client(tmp_path) as http:
            open_doc = (await http.get("/v1/openapi.json")).json()
        async with app_client(tmp_path, token="s3cret") as http:
            secured_doc = (await http.get("/v1/openapi.json")).json()
    assert "security" not in open_doc
    assert "securitySchemes" not in open_doc["components"]
    for route, item in open_doc["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                assert "401" not in operation["responses"], (route, method)
                assert "security" not in operation

    assert secured_doc["security"] == [{"bearer": []}]
    assert secured_doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for route, item in secured_doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if route == "/healthz":
                assert operation["security"] == []
            else:
                assert "401" in operation["responses"], (route, method)
    assert "401" in secured_doc["paths"]["/metrics"]["get"]["responses"]
    assert "401" in secured_doc["paths"]["/v1/workspaces"]["get"]["responses"]


async def test_a_405_allows_exactly_the_documented_methods(autojump_clock: object, tmp_path: Path):
    with trio.fail_after(TIMEOUT):
        async with app_client(tmp_path) as http:
            ws = (await http.post("/v1/workspaces", json={"path": "w"})).json()["id"]
            for route, item in DOC["paths"].items():
                url = route.format(workspace_id=ws, session_id="s", run_id="r")
                documented = {m.upper() for m in item if m != "parameters"}
                expected = documented | ({"HEAD"} if "GET" in documented else set())
                for method in ("OPTIONS", "PATCH", "PUT"):
                    if method in documented:
                        continue
                    response = await http.request(method, url)
                    assert response.status_code == 405, (method, route, response.text)
                    allow = {m.strip() for m in response.headers["allow"].split(",")}
                    assert allow == expected, (method, route)
                    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_the_served_document_is_the_generated_one(autojump_clock: object, tmp_path: Path):
    with trio.fail_after(TIMEOUT):
        async with app_client(tmp_path) as http:
            response = await http.get("/v1/openapi.json")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(DOC))


# -- what the transport does under us -----------------------------------------------------


@pytest.mark.parametrize(
    "error", [trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError]
)
async def test_a_connection_closing_under_an_answer_is_not_logged_as_an_error(
    autojump_clock: object,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    error: type[Exception],
):
    # Hypercorn closes a connection (send_eof) without taking its send lock: when the client
    # hangs up while a 413 is on its way, the answer's send raises BusyResourceError. Nobody
    # is left to read the answer, so it is a client that went away, not a server error.
    async with open_backend() as backend:
        app = create_app(RunService(backend, demo.coordinator_factory, workspace_root=tmp_path))
        body = b'{"path": "' + b"x" * (2 << 20) + b'"}'
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message["type"])
            if message["type"] == "http.response.body":
                raise error("the connection is closing")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/workspaces",
            "raw_path": b"/v1/workspaces",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        with caplog.at_level(logging.DEBUG, logger="trio_runs.http"), trio.fail_after(TIMEOUT):
            await app(scope, receive, send)
    assert sent == ["http.response.start", "http.response.body"]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("went away" in r.getMessage() for r in caplog.records)
