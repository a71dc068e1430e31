"""The OpenAPI 3.1 description of the ``/v1`` API, served at ``/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .schema import MAX_BODY_BYTES, MAX_WAIT_SECONDS

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_ERRORS = {
    "401": _error("missing or wrong bearer token (only when the server has a token)"),
    "404": _error("unknown workspace, run or route"),
    "422": _error("well-formed JSON of the wrong shape, or a refused value"),
}
_BODY_ERRORS = {
    "400": _error("malformed JSON"),
    "413": _error(f"body over {MAX_BODY_BYTES} bytes"),
    "415": _error("body not sent as application/json"),
}

_WS_ID = {"name": "workspace_id", "in": "path", "required": True, "schema": {"type": "string"}}
_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI 3.1 document (a fresh dict on every call)."""
    state_enum = ["pending", "queued", "active", "completed", "failed", "cancelled"]
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "examples": ["workspace_not_found"]},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "Workspace": {
            "type": "object",
            "required": ["id", "path", "closing"],
            "properties": {
                "id": {"type": "string"},
                "path": {"type": "string", "description": "resolved under the workspace root"},
                "closing": {"type": "boolean"},
            },
        },
        "Terminal": {
            "type": "object",
            "description": "The run's one RunComplete.",
            "required": ["session_id", "run_id", "result", "error", "cancelled"],
            "properties": {
                "session_id": {"type": "string"},
                "run_id": {"type": "string"},
                "result": {"description": "the agent's return value"},
                "error": {"type": ["string", "null"]},
                "cancelled": {"type": "boolean"},
            },
        },
        "Run": {
            "type": "object",
            "required": ["run_id", "session_id", "state"],
            "properties": {
                "run_id": {"type": "string"},
                "session_id": {"type": "string"},
                "state": {"type": "string", "enum": state_enum},
                "terminal": _ref("Terminal"),
            },
        },
        "Session": {
            "type": "object",
            "required": ["workspace_id", "session_id", "busy", "active", "queued"],
            "properties": {
                "workspace_id": {"type": "string"},
                "session_id": {"type": "string"},
                "busy": {"type": "boolean"},
                "active": {"type": ["string", "null"], "description": "the active run's id"},
                "queued": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["run_id", "prompt"],
                        "properties": {"run_id": {"type": "string"}, "prompt": {"type": "string"}},
                    },
                },
            },
        },
    }
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness (never needs a token)",
                "security": [],
                "responses": {"200": {"description": "the server is up"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition of the counters and gauges",
                "responses": {"200": {"description": "text/plain; version=0.0.4"}},
            }
        },
        "/v1/workspaces": {
            "get": {
                "summary": "List open workspaces",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "workspaces": {"type": "array", "items": _ref("Workspace")}
                            },
                        },
                        "the workspaces",
                    )
                },
            },
            "post": {
                "summary": "Open the workspace for a path (the same path gives the same one)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["path"],
                                "properties": {"path": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(_ref("Workspace"), "created"),
                    "200": _json(_ref("Workspace"), "already open"),
                    "409": _error("the path's workspace is closing"),
                    "503": _error("the server is shutting down"),
                    **_BODY_ERRORS,
                    **_ERRORS,
                },
            },
        },
        "/v1/workspaces/{workspace_id}": {
            "parameters": [_WS_ID],
            "get": {
                "summary": "One workspace",
                "responses": {"200": _json(_ref("Workspace"), "the workspace"), **_ERRORS},
            },
            "delete": {
                "summary": "Close gracefully: returns once every run has its terminal",
                "responses": {"200": _json(_ref("Workspace"), "closed"), **_ERRORS},
            },
        },
        "/v1/workspaces/{workspace_id}/messages": {
            "parameters": [_WS_ID],
            "post": {
                "summary": "Submit a prompt: the run is accepted and will get one terminal",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["session_id", "prompt"],
                                "properties": {
                                    "session_id": {"type": "string"},
                                    "prompt": {"type": "string"},
                                    "run_id": {
                                        "type": ["string", "null"],
                                        "description": "client-minted id (retry-safe)",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "required": ["run_id"],
                            "properties": {"run_id": {"type": "string"}},
                        },
                        "accepted",
                    ),
                    "409": _error("workspace closing, or the run id was already accepted"),
                    "503": _error("the server is shutting down"),
                    **_BODY_ERRORS,
                    **_ERRORS,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/events": {
            "parameters": [_WS_ID],
            "get": {
                "summary": "Server-Sent Events: progress, notification (lossy), run_complete",
                "parameters": [
                    {"name": "run_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "session_id", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "text/event-stream; a ': heartbeat' comment every 15 s",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}": {
            "parameters": [_WS_ID, _SESSION_ID],
            "get": {
                "summary": "The session's lane",
                "responses": {"200": _json(_ref("Session"), "the session"), **_ERRORS},
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/cancel": {
            "parameters": [_WS_ID, _SESSION_ID],
            "post": {
                "summary": "Cancel the active run and drop the queue (each ends cancelled)",
                "responses": {"200": _json(_ref("Session"), "the session after"), **_ERRORS},
            },
        },
        "/v1/workspaces/{workspace_id}/sessions/{session_id}/queue": {
            "parameters": [_WS_ID, _SESSION_ID],
            "delete": {
                "summary": "Drop the queued runs (each ends cancelled); the active run goes on",
                "responses": {"200": _json(_ref("Session"), "the session after"), **_ERRORS},
            },
        },
        "/v1/runs/{run_id}": {
            "parameters": [_RUN_ID],
            "get": {
                "summary": "A run's state, and its terminal once it ended",
                "responses": {"200": _json(_ref("Run"), "the run"), **_ERRORS},
            },
        },
        "/v1/runs/{run_id}/cancel": {
            "parameters": [_RUN_ID],
            "post": {
                "summary": (
                    "Cancel this run only (the other runs of its session go on): a queued one "
                    "ends cancelled at once, an active one at its agent's next checkpoint; an "
                    "ended one is left as it is (idempotent)"
                ),
                "responses": {
                    "200": _json(_ref("Run"), "the run after: wait for its terminal if active"),
                    **_ERRORS,
                },
            },
        },
        "/v1/runs/{run_id}/wait": {
            "parameters": [
                _RUN_ID,
                {
                    "name": "timeout",
                    "in": "query",
                    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                    "description": "seconds to block (default 30)",
                },
            ],
            "get": {
                "summary": "Long poll: the terminal as soon as there is one",
                "responses": {
                    "200": _json(_ref("Run"), "ended: terminal included"),
                    "202": _json(_ref("Run"), "still not ended after timeout seconds"),
                    **_ERRORS,
                },
            },
        },
    }
    return {
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
        "servers": [{"url": "http://127.0.0.1:8765"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
