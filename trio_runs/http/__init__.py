"""trio-runs over HTTP: a JSON API on Starlette, served by hypercorn on Trio, and its client.

Needs the ``http`` extra (``pip install "trio-runs[http]"``). ``serve`` hosts a backend;
``create_app`` is the ASGI app over a :class:`RunService`; :class:`RunsClient` is the async
client ``trio-runs run`` is built on. The API is versioned under ``/v1`` and described by
the OpenAPI document served at ``/v1/openapi.json``.

Names are imported from their submodules on first use, so a client does not pay for
importing the server (and the other way round).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .client import (
        ClientError,
        ClientNotOpen,
        EventGap,
        RunsClient,
        ServerLost,
        SseEvent,
        StreamItem,
    )
    from .schema import MAX_BODY_BYTES, ApiError, RunView, SessionView, WorkspaceView
    from .server import BindRefused, RunningServer, ServeOptions, check_bind, serve
    from .service import RunService, open_run_service

_EXPORTS = {
    "create_app": "app",
    "ClientError": "client",
    "ClientNotOpen": "client",
    "EventGap": "client",
    "RunsClient": "client",
    "ServerLost": "client",
    "SseEvent": "client",
    "StreamItem": "client",
    "MAX_BODY_BYTES": "schema",
    "ApiError": "schema",
    "RunView": "schema",
    "SessionView": "schema",
    "WorkspaceView": "schema",
    "BindRefused": "server",
    "RunningServer": "server",
    "ServeOptions": "server",
    "check_bind": "server",
    "serve": "server",
    "RunService": "service",
    "open_run_service": "service",
}

__all__ = [
    "MAX_BODY_BYTES",
    "ApiError",
    "BindRefused",
    "ClientError",
    "ClientNotOpen",
    "EventGap",
    "RunService",
    "RunView",
    "RunningServer",
    "RunsClient",
    "ServeOptions",
    "ServerLost",
    "SessionView",
    "SseEvent",
    "StreamItem",
    "WorkspaceView",
    "check_bind",
    "create_app",
    "open_run_service",
    "serve",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
