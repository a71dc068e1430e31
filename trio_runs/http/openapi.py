"""The OpenAPI 3.1 description of the API, served at ``/v1/openapi.json``.

Every schema in it is generated (``msgspec.json.schema_components``) from the structs and
constrained types in :mod:`.schema`, the declarations the server validates requests with:
a value the document calls valid is one the server's decoding accepts, and the other way
round. Security (a bearer token, and the 401 it brings) is declared only when the server
has a token.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from .. import __version__
from .schema import (
    LIST_STATES,
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    MAX_LIST_LIMIT,
    Accepted,
    BatchAccepted,
    BatchEnded,
    BatchLine,
    BatchRefused,
    CreateWorkspace,
    ErrorBody,
    Health,
    Id,
    RunList,
    RunView,
    SessionView,
    SubmitBatch,
    SubmitMessage,
    WaitSeconds,
    WorkspaceId,
    WorkspaceList,
    WorkspacePath,
    WorkspaceView,
)

__all__ = ["openapi_document"]

_REF: Final = "#/components/schemas/{name}"


def _schema_hook(kind: type) -> dict[str, Any]:
    # RunComplete.result is the agent's return value: any JSON value.
    if kind is object:
        return {"description": "the agent's return value: any JSON value"}
    raise NotImplementedError


def _schema(kind: Any) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(kind, schema_hook=_schema_hook)
    return schema


# The API's names for the structs' components (the Python names say "view" and "body").
_NAMES: Final = {
    "ErrorBody": "Error",
    "WorkspaceView": "Workspace",
    "RunView": "Run",
    "RunComplete": "Terminal",
    "SessionView": "Session",
}


def _name(kind: type) -> str:
    return _NAMES.get(kind.__name__, kind.__name__)


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=_name(kind))}


def _renamed(value: Any) -> Any:
    # msgspec names a component after its class: give it its API name, references included.
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                name = item.rsplit("/", 1)[1]
                out[key] = _REF.format(name=_NAMES.get(name, name))
            else:
                out[key] = _renamed(item)
        return out
    if isinstance(value, list):
        return [_renamed(item) for item in value]
    return value


def _json(kind: type, description: str, links: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(kind)}},
    }
    if links:
        response["links"] = links
    return response


def _error(description: str) -> dict[str, Any]:
    return _json(ErrorBody, description)


def _body(kind: type) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(kind)}}}


def _schema_ref(kind: Any) -> dict[str, Any]:
    # A union of components, by reference (its members are in the document's components).
    schema: dict[str, Any] = msgspec.json.schema(kind, schema_hook=_schema_hook, ref_template=_REF)
    schema.pop("$defs", None)
    renamed: dict[str, Any] = _renamed(schema)
    return renamed


def _path(name: str, kind: Any, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _schema(kind),
    }


def _link(operation_id: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": parameters}


_WS_ID = _path("workspace_id", WorkspaceId, "the workspace's id, as POST /v1/workspaces gave it")
_SESSION_ID = _path("session_id", Id, "the session id (a 422 if it breaks the identifier rule)")
_RUN_ID = _path("run_id", Id, "the run id (a 422 if it breaks the identifier rule)")

_NOT_FOUND = {"404": _error("unknown workspace, run or route")}
_BAD_ID = {"422": _error("an id in the path breaks the identifier rule")}
_BODY_ERRORS = {
    "400": _error("malformed JSON (duplicate keys and NaN included)"),
    "413": _error(f"body over {MAX_BODY_BYTES} bytes"),
    "415": _error("body not sent as application/json"),
    "422": _error(
        "well-formed JSON of the wrong shape, or a value the rules refuse (typed code: "
        "session_missing, invalid_session_id, empty_prompt, invalid_prompt, invalid_run_id, "
        "deadline_too_long, path_outside_root, invalid_request)"
    ),
}
# Before OpenAPI 3.2 (itemSchema), a text/event-stream schema describes one event.
_SSE_EVENT: Final = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {
            "type": "string",
            "description": (
                "the workspace's event id (1, 2, 3, ... for the workspace's life; absent on "
                "gap, error, end and on a terminal read from the store): resume after it "
                "with Last-Event-ID"
            ),
        },
        "event": {
            "type": "string",
            "examples": ["progress", "notification", "run_complete", "gap", "error", "end"],
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_EVENT_ID: Final = {"type": "string", "pattern": "^ *[0-9]{1,18} *$"}
_RESUME: Final = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "description": (
            "resume after this event id: what the server still holds after it is sent first "
            "(an event: gap first if some of it is gone, or if the id was never sent), then "
            "the live events; wins over last_event_id"
        ),
        "schema": _EVENT_ID,
    },
    {
        "name": "last_event_id",
        "in": "query",
        "description": "as the Last-Event-ID header (0: from the oldest event still held)",
        "schema": _EVENT_ID,
    },
]
_BAD_RESUME = "a malformed Last-Event-ID or last_event_id"
_SHUTTING_DOWN = {"503": _error("the server is shutting down")}
_STORE_DOWN = {
    "503": _error("the run store cannot answer (store_unavailable: Redis unreachable); retry later")
}
_AGENTLESS = {"409": _error("the workspace has no agent")}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


_LIST_PARAMETERS: Final = [
    _query("workspace", _schema(WorkspaceId), "an open workspace's id (not with path)"),
    _query("path", _schema(WorkspacePath), "a workspace path, open or not (not with workspace)"),
    _query("session", _schema(Id), "only this session's runs"),
    _query(
        "state",
        {"type": "string", "enum": list(LIST_STATES)},
        "running: no terminal yet (pending, queued or active); ended: it has its terminal",
    ),
    _query(
        "label",
        {"type": "string", "pattern": "^[^=]+=.*$"},
        "key=value: only runs submitted with this label",
    ),
    _query("cursor", {"type": "string", "minLength": 1}, "next_cursor of the previous page"),
    _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT},
        f"runs per page, 1 to {MAX_LIST_LIMIT} (default 100)",
    ),
]


def _paths() -> dict[str, Any]:
    run_links = {
        "GetRun": _link("getRun", run_id="$response.body#/run_id"),
        "WaitRun": _link("waitRun", run_id="$response.body#/run_id"),
        "CancelRun": _link("cancelRun", run_id="$response.body#/run_id"),
        "GetSession": _link(
            "getSession",
            workspace_id="$request.path.workspace_id",
            session_id="$request.body#/session_id",
        ),
    }
    workspace_links = {
        "GetWorkspace": _link("getWorkspace", workspace_id="$response.body#/id"),
        "Submit": _link("submitMessage", workspace_id="$response.body#/id"),
        "CloseWorkspace": _link("closeWorkspace", workspace_id="$response.body#/id"),
    }
    return {
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness (never needs a token)",
                "responses": {"200": _json(Health, "the server is up")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus (or, on request, OpenMetrics) text exposition",
                "responses": {
                    "200": {
                        "description": "the counters, gauges and histograms",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/workspaces": {
            "get": {
                "operationId": "listWorkspaces",
                "summary": "List open workspaces",
                "responses": {
                    "200": _json(WorkspaceList, "the workspaces"),
                    "422": _error("a query parameter (there are none)"),
                },
            },
            "post": {
                "operationId": "createWorkspace",
                "summary": "Open the workspace for a path (the same path gives the same one)",
                "requestBody": _body(CreateWorkspace),
                "responses": {
                    "201": _json(WorkspaceView, "created", workspace_links),
                    "200": _json(WorkspaceView, "already open", workspace_links),
                    "409": _error("the path's workspace is closing"),
                    **_BODY_ERRORS,
                    **_SHUTTING_DOWN,
                },
            },
        },
        "/v1/workspaces/{workspace_id}": {
            "parameters": [_WS_ID],
            "get": {
                "operationId": "getWorkspace",
                "summary": "One workspace",
                "responses": {"200": _json(WorkspaceView, "the workspace"), **_NOT_FOUND},
            },
            "delete": {
                "operationId": "closeWorkspace",
                "summary": "Close gracefully: returns once every run has its terminal",
                "responses": {"200": _json(WorkspaceView, "closed"), **_NOT_FOUND},
            },
        },
        "/v1/workspaces/{workspace_id}/messages": {
            "parameters": [_WS_ID],
            "post": {
                "operationId": "submitMessage",
                "summary": (
                    "Submit a prompt: the run is accepted and will get one terminal; with "
                    "wait=S, also wait up to S seconds for it (one request per run)"
                ),
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "description": (
                            "once accepted, wait this many seconds (a JSON number) for the "
                            "run's end: 200 with it if it ended, else 202 with the run"
                        ),
                        "schema": _schema(WaitSeconds),
                    }
                ],
                "requestBody": _body(SubmitMessage),
                "responses": {
                    "200": _json(RunView, "with wait: accepted and ended, terminal included"),
                    "202": {
                        "description": (
                            "accepted: {run_id}; with wait, the run (not ended after wait "
                            "seconds: go on with /v1/runs/{run_id}/wait)"
                        ),
                        "content": {
                            "application/json": {
                                "schema": {"anyOf": [_ref(Accepted), _ref(RunView)]}
                            }
                        },
                        "links": run_links,
                    },
                    "422": _error(
                        "well-formed JSON of the wrong shape, a value the rules refuse (typed "
                        "code as below), or a bad wait (invalid_query)"
                    ),
                    "409": _error(
                        "workspace closing, no agent, or the run id was already accepted"
                    ),
                    **_NOT_FOUND,
                    **{k: v for k, v in _BODY_ERRORS.items() if k != "422"},
                    **_SHUTTING_DOWN,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/batches": {
            "parameters": [_WS_ID],
            "post": {
                "operationId": "submitBatch",
                "summary": (
                    f"Submit up to {MAX_BATCH_ITEMS} prompts in one request; their terminals "
                    "stream back in the same response as the runs end"
                ),
                "requestBody": _body(SubmitBatch),
                "responses": {
                    "200": {
                        "description": (
                            "sent once every accepted message is durable: NDJSON, first one "
                            "accepted or refused line per message in order, then one ended "
                            "line per accepted run as it ends (each exactly once); a blank "
                            "line is a heartbeat"
                        ),
                        "content": {"application/x-ndjson": {"schema": _schema_ref(BatchLine)}},
                    },
                    "409": _error("the workspace is closing or has no agent"),
                    **_NOT_FOUND,
                    **_BODY_ERRORS,
                    **_SHUTTING_DOWN,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/events": {
            "parameters": [_WS_ID],
            "get": {
                "operationId": "streamEvents",
                "summary": "Server-Sent Events: progress, notification (lossy), run_complete",
                "parameters": [
                    {
                        "name": "run_id",
                        "in": "query",
                        "description": "only this run's events",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "session_id",
                        "in": "query",
                        "description": "only this session's events",
                        "schema": {"type": "string"},
                    },
                    *_RESUME,
                ],
                "responses": {
                    "200": {
                        "description": (
                            "an endless stream (until the workspace closes) of events: "
                            "progress, notification (lossy), run_complete (must-deliver), and "
                            "a last end or error; a ': heartbeat' comment every 15 s"
                        ),
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    "422": _error(f"an unknown query parameter, or {_BAD_RESUME}"),
                    **_NOT_FOUND,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}": {
            "parameters": [_WS_ID, _SESSION_ID],
            "get": {
                "operationId": "getSession",
                "summary": "The session's lane",
                "responses": {
                    "200": _json(SessionView, "the session"),
                    **_NOT_FOUND,
                    **_BAD_ID,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/cancel": {
            "parameters": [_WS_ID, _SESSION_ID],
            "post": {
                "operationId": "cancelSession",
                "summary": "Cancel the active run and drop the queue (each ends cancelled)",
                "responses": {
                    "200": _json(SessionView, "the session after"),
                    **_AGENTLESS,
                    **_NOT_FOUND,
                    **_BAD_ID,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/queue": {
            "parameters": [_WS_ID, _SESSION_ID],
            "delete": {
                "operationId": "clearQueue",
                "summary": "Drop the queued runs (each ends cancelled); the active run goes on",
                "responses": {
                    "200": _json(SessionView, "the session after"),
                    **_AGENTLESS,
                    **_NOT_FOUND,
                    **_BAD_ID,
                },
            },
        },
        "/v1/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": (
                    "The runs the store knows, newest accepted first, a page at a time: "
                    "follow next_cursor (with the same filters) until it is null"
                ),
                "parameters": _LIST_PARAMETERS,
                "responses": {
                    "200": _json(RunList, "one page of runs"),
                    "404": _error("workspace names no open workspace"),
                    "422": _error(
                        "a bad or unknown query parameter (invalid_query), or a cursor this "
                        "server did not make (invalid_cursor)"
                    ),
                    "501": _error("the server's run store cannot list runs"),
                    "503": _error("the run store cannot be read (store_unavailable)"),
                },
            },
        },
        "/v1/runs/{run_id}": {
            "parameters": [_RUN_ID],
            "get": {
                "operationId": "getRun",
                "summary": "A run's state, and its terminal once it ended",
                "responses": {
                    "200": _json(RunView, "the run"),
                    "422": _error("the run id breaks the identifier rule, or a query parameter"),
                    **_NOT_FOUND,
                    **_STORE_DOWN,
                },
            },
        },
        "/v1/runs/{run_id}/cancel": {
            "parameters": [_RUN_ID],
            "post": {
                "operationId": "cancelRun",
                "summary": (
                    "Cancel this run only (the other runs of its session go on): a queued one "
                    "ends cancelled at once, an active one at its agent's next checkpoint; an "
                    "ended one is left as it is (idempotent)"
                ),
                "responses": {
                    "200": _json(RunView, "the run after: wait for its terminal if active"),
                    "422": _error("the run id breaks the identifier rule, or a query parameter"),
                    "501": _error("the workspace's coordinator cannot cancel one run"),
                    **_NOT_FOUND,
                    **_STORE_DOWN,
                },
            },
        },
        "/v1/runs/{run_id}/wait": {
            "parameters": [
                _RUN_ID,
                {
                    "name": "timeout",
                    "in": "query",
                    "description": "seconds to block, a JSON number (default 30)",
                    "schema": _schema(WaitSeconds),
                },
            ],
            "get": {
                "operationId": "waitRun",
                "summary": "Long poll: the terminal as soon as there is one",
                "responses": {
                    "200": _json(RunView, "ended: terminal included"),
                    "202": _json(RunView, "still not ended after timeout seconds"),
                    "422": _error("the run id breaks the identifier rule, or a bad timeout"),
                    **_NOT_FOUND,
                    **_STORE_DOWN,
                },
            },
        },
        # -- one run's event stream (resumable) --
        "/v1/runs/{run_id}/events": {
            "parameters": [_RUN_ID],
            "get": {
                "operationId": "followRun",
                "summary": (
                    "Server-Sent Events of one run, late or live: its progress still held, "
                    "then live, then its run_complete (from the store if need be), then end"
                ),
                "parameters": _RESUME,
                "responses": {
                    "200": {
                        "description": (
                            "the run's progress and notifications (lossy), its run_complete "
                            "(always), then a last end (reason run_ended), or an error "
                            "(store_unavailable: the store cannot answer) and end; a "
                            "': heartbeat' comment every 15 s while it runs"
                        ),
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                    },
                    "422": _error(
                        "the run id breaks the identifier rule, an unknown query parameter, "
                        f"or {_BAD_RESUME}"
                    ),
                    **_NOT_FOUND,
                },
            },
        },
    }


def openapi_document(*, secured: bool = False, max_deadline: float | None = None) -> dict[str, Any]:
    """The API's OpenAPI 3.1 document (a fresh dict on every call).

    ``secured``: the server requires a bearer token, so every operation but ``/healthz``
    declares the ``bearer`` scheme and its 401. ``max_deadline``: the server's maximum run
    deadline, declared as the submission's ``deadline`` maximum (a longer one is a 422).
    """
    _, schemas = msgspec.json.schema_components(
        [
            CreateWorkspace,
            SubmitMessage,
            SubmitBatch,
            BatchAccepted,
            BatchRefused,
            BatchEnded,
            ErrorBody,
            Health,
            Accepted,
            WorkspaceView,
            WorkspaceList,
            RunView,
            RunList,
            SessionView,
        ],
        schema_hook=_schema_hook,
        ref_template=_REF,
    )
    schemas = {_NAMES.get(name, name): _renamed(schema) for name, schema in schemas.items()}
    if max_deadline is not None:
        deadline = schemas["SubmitMessage"]["properties"]["deadline"]["anyOf"][0]
        deadline["maximum"] = min(deadline["maximum"], max_deadline)
    paths = _paths()
    components: dict[str, Any] = {"schemas": schemas}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "trio-runs",
            "version": __version__,
            "description": (
                "Every accepted run ends in exactly one terminal (completed, failed or "
                "cancelled) and every waiter observes it. Errors are "
                '{"error": {"code", "message"}}.'
            ),
        },
        "components": components,
        "paths": paths,
    }
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        unauthorized = _error("missing or wrong bearer token")
        for route, item in paths.items():
            for method, operation in item.items():
                if method == "parameters":
                    continue
                if route == "/healthz":
                    operation["security"] = []
                else:
                    operation["responses"]["401"] = unauthorized
    return document
