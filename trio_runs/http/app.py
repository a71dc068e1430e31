"""The ASGI application: Starlette routes over a :class:`RunService`.

Handlers decode strictly, call the service, and answer JSON. Whatever a client sends, the
answer is a JSON response (errors as ``{"error": {"code", "message"}}``), never a traceback:
unexpected failures are logged on the ``trio_runs.http`` logger and answered with a 500.
The app runs on Trio (it is served by hypercorn's Trio worker).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import StoreError
from . import metrics as prometheus
from .batch import BatchStream
from .openapi import openapi_document
from .schema import (
    MAX_BODY_BYTES,
    ApiError,
    check_path_id,
    decode_batch,
    decode_create_workspace,
    decode_submit,
    parse_run_list_query,
    parse_submit_wait,
    parse_wait_timeout,
)
from .service import RunService
from .sse import CLIENT_CONNECTION, DEFAULT_HEARTBEAT, parse_last_event_id

__all__ = ["create_app", "json_response"]

logger = logging.getLogger("trio_runs.http")


def _dumps(body: object) -> bytes:
    # Strict: never a fallback that turns a value into something else (repr, str). Results
    # and progress payloads are JSON values by the time they get here (UnencodableValue's
    # rule, applied where they enter), so a body that is not JSON is a bug to surface as a
    # 500, not a value to change silently.
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response of ``body``; raises ``TypeError`` / ``ValueError`` (and converts
    nothing) if ``body`` is not JSON."""
    return Response(
        _dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(error: ApiError) -> Response:
    """The JSON error response for ``error``."""
    return json_response(error.body(), error.status, error.headers or None)


# How much of an oversized body is read (and thrown away) before answering 413, so that a
# client still sending it reads the answer instead of a reset connection.
_DISCARD_BYTES = 8 * MAX_BODY_BYTES
_DISCARD_SECONDS = 2.0


def _too_large() -> ApiError:
    return ApiError(413, "body_too_large", f"the request body exceeds {MAX_BODY_BYTES} bytes")


async def _read_body(request: Request) -> bytes:
    # Bounded whatever the client claims: Content-Length is checked first, then the bytes.
    # Read straight from receive() (not Request.stream(), an async generator that would be
    # left unfinished when the limit is hit).
    length = request.headers.get("content-length", "").strip()
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        if int(length) <= _DISCARD_BYTES:
            await _discard(request, 0)
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        chunk, more = await _next_chunk(request)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            if more:
                await _discard(request, size)
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def _next_chunk(request: Request) -> tuple[bytes, bool]:
    message = await request.receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), bool(message.get("more_body", False))


async def _discard(request: Request, size: int) -> None:
    with trio.move_on_after(_DISCARD_SECONDS):
        more = True
        while more and size <= _DISCARD_BYTES:
            chunk, more = await _next_chunk(request)
            size += len(chunk)


def _no_query(request: Request) -> None:
    if request.query_params:
        names = ", ".join(sorted(request.query_params.keys()))
        raise ApiError(422, "invalid_query", f"unknown query parameter(s): {names}")


Handler = Callable[[Request], Awaitable[Response]]


def _route(path: str, **handlers: Handler) -> Route:
    # One Route for several methods of a path (HEAD goes where GET goes).
    async def by_method(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, by_method, methods=list(handlers))


def create_app(
    service: RunService,
    *,
    token: str | None = None,
    heartbeat: float = DEFAULT_HEARTBEAT,
) -> ASGIApp:
    """The ASGI app serving ``service``: ``/healthz``, ``/metrics`` and the ``/v1`` API.

    With ``token``, every route but ``/healthz`` requires ``Authorization: Bearer <token>``
    (compared in constant time). Event streams send a heartbeat every ``heartbeat`` seconds.
    """

    def path(request: Request, name: str) -> str:
        # A run or session id that breaks the identifier rule is a 422 (it was never accepted).
        value: str = request.path_params[name]
        return check_path_id(name, value)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "draining" if service.draining else "ok"})

    registry = prometheus.registry_for(service)

    async def metrics(request: Request) -> Response:
        body, content_type = prometheus.exposition(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    document = json_response(
        openapi_document(secured=token is not None, max_deadline=service.max_deadline)
    ).body

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def list_workspaces(request: Request) -> Response:
        _no_query(request)
        return json_response({"workspaces": [ws.to_dict() for ws in service.workspaces()]})

    async def create_workspace(request: Request) -> Response:
        _no_query(request)
        decoded = decode_create_workspace(
            await _read_body(request), request.headers.get("content-type")
        )
        view, created = await service.create_workspace(decoded)
        return json_response(view.to_dict(), 201 if created else 200)

    async def get_workspace(request: Request) -> Response:
        workspace = service.workspace(path(request, "workspace_id"))
        return json_response(
            {"id": workspace.id, "path": workspace.path, "closing": workspace.closing}
        )

    async def close_workspace(request: Request) -> Response:
        view = await service.close_workspace(path(request, "workspace_id"))
        return json_response(view.to_dict())

    async def submit(request: Request) -> Response:
        seconds = parse_submit_wait(request.query_params)
        workspace_id = path(request, "workspace_id")
        decoded = decode_submit(await _read_body(request), request.headers.get("content-type"))
        if seconds is None:
            run_id = await service.submit(workspace_id, decoded)
            return json_response({"run_id": run_id}, 202)
        view = await service.submit_and_wait(workspace_id, decoded, seconds)
        return json_response(view.to_dict(), 200 if view.is_terminal else 202)

    async def submit_batch(request: Request) -> Response:
        _no_query(request)
        workspace_id = path(request, "workspace_id")
        batch = decode_batch(await _read_body(request), request.headers.get("content-type"))
        results = await service.submit_batch(workspace_id, batch)
        run_ids = [message.run_id for message in batch.messages]
        return BatchStream(service, results, run_ids, heartbeat=heartbeat, dumps=_dumps)

    def last_event_id(request: Request, allowed: set[str]) -> int | None:
        # The resume point (header, else query): 422 before any stream opens.
        unknown = sorted(set(request.query_params.keys()) - allowed - {"last_event_id"})
        if unknown:
            raise ApiError(
                422, "invalid_query", f"unknown query parameter(s): {', '.join(unknown)}"
            )
        return parse_last_event_id(
            request.headers.get("last-event-id"), request.query_params.get("last_event_id")
        )

    async def events(request: Request) -> Response:
        resume = last_event_id(request, {"run_id", "session_id"})
        return await service.events(
            path(request, "workspace_id"),
            run_id=request.query_params.get("run_id"),
            session_id=request.query_params.get("session_id"),
            last_event_id=resume,
            heartbeat=heartbeat,
        )

    async def run_events(request: Request) -> Response:
        resume = last_event_id(request, set())
        return await service.run_events(
            path(request, "run_id"), last_event_id=resume, heartbeat=heartbeat
        )

    async def session(request: Request) -> Response:
        view = service.session(path(request, "workspace_id"), path(request, "session_id"))
        return json_response(view.to_dict())

    async def cancel_session(request: Request) -> Response:
        view = await service.cancel_session(
            path(request, "workspace_id"), path(request, "session_id")
        )
        return json_response(view.to_dict())

    async def clear_queue(request: Request) -> Response:
        view = await service.clear_queue(path(request, "workspace_id"), path(request, "session_id"))
        return json_response(view.to_dict())

    async def list_runs(request: Request) -> Response:
        query = parse_run_list_query(request.query_params.multi_items())
        return json_response((await service.list_runs(query)).to_dict())

    async def get_run(request: Request) -> Response:
        _no_query(request)
        return json_response((await service.view(path(request, "run_id"))).to_dict())

    async def cancel_run(request: Request) -> Response:
        _no_query(request)
        return json_response((await service.cancel_run(path(request, "run_id"))).to_dict())

    async def wait_run(request: Request) -> Response:
        timeout = parse_wait_timeout(request.query_params)
        view = await service.wait(path(request, "run_id"), timeout)
        return json_response(view.to_dict(), 200 if view.is_terminal else 202)

    ws = "/v1/workspaces/{workspace_id}"
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/openapi.json", openapi, methods=["GET"]),
        # One route per path, so that a 405's Allow lists every method of the path.
        _route("/v1/workspaces", GET=list_workspaces, POST=create_workspace),
        _route(ws, GET=get_workspace, DELETE=close_workspace),
        Route(f"{ws}/messages", submit, methods=["POST"]),
        Route(f"{ws}/batches", submit_batch, methods=["POST"]),
        Route(f"{ws}/events", events, methods=["GET"]),
        Route(f"{ws}/sessions/{{session_id}}", session, methods=["GET"]),
        Route(f"{ws}/sessions/{{session_id}}/cancel", cancel_session, methods=["POST"]),
        Route(f"{ws}/sessions/{{session_id}}/queue", clear_queue, methods=["DELETE"]),
        Route("/v1/runs", list_runs, methods=["GET"]),
        Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
        Route("/v1/runs/{run_id}/wait", wait_run, methods=["GET"]),
        Route("/v1/runs/{run_id}/events", run_events, methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    ]

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {
            404: f"no route for {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, code, message, exc.headers))

    async def on_store_error(request: Request, exc: Exception) -> Response:
        # A store that cannot answer (Redis unreachable, a failing disk) on any route that
        # did not say more: the request may be retried once the store is back.
        logger.warning("%s %s: the store cannot answer: %s", request.method, request.url.path, exc)
        return error_response(ApiError(503, "store_unavailable", str(exc), {"Retry-After": "1"}))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this; _Guard logs it.
        return error_response(ApiError(500, "internal_error", "internal server error (logged)"))

    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: on_api_error,
            StoreError: on_store_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    return _Guard(_Auth(app, token))


class _Auth:
    # Bearer-token check for every route but /healthz; a no-op without a token.
    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        given = credentials.strip().encode("utf-8", "surrogateescape")
        # compare_digest runs in time independent of where the tokens differ.
        if scheme.lower() == "bearer" and hmac.compare_digest(given, self.token):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "unauthorized",
            "this server requires Authorization: Bearer <token>",
            {"www-authenticate": "Bearer"},
        )
        await error_response(error)(scope, receive, send)


class _Guard:
    # The outermost layer: a failure nobody handled becomes a logged 500 with the JSON error
    # shape (if the response has not started yet), never a traceback sent to the client.
    #
    # It also makes a complete answer (one body message, the usual JSON response) leave in
    # one socket write: hypercorn writes the head on http.response.start, the body on the
    # body message and the end of the body after the last one, each a write of its own. The
    # start is held back until the first body message and handed to hypercorn with it under
    # the connection's hold_writes(), as is the last body message with the end hypercorn
    # writes after it: one write each (issue 12's profile: the writes, not the app, are the
    # server's cost per request). Every response here sends its first body message right
    # after its start (event streams and batches send a first line at once), so no head
    # waits for long.
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        connection = CLIENT_CONNECTION.get(None)
        started = False  # a start reached hypercorn: too late for the JSON 500
        held: Message | None = None

        async def forward(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            try:
                await send(message)
            except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
                # The connection is closing under the answer (hypercorn closes it without
                # taking its send lock when a client hangs up mid-upload): nobody is left to
                # read it, so this is a client that went away, not a server error.
                raise ClientDisconnect() from None

        async def tracking_send(message: Message) -> None:
            nonlocal held
            if connection is None:
                await forward(message)
                return
            if message["type"] == "http.response.start":
                held = message
                return
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if held is None and not last:
                await forward(message)
                return
            # The held head with the first body message, and a last body message with the
            # end of the body hypercorn writes after it: each pair in one write.
            start, held = held, None
            connection.hold_writes()
            try:
                if start is not None:
                    await forward(start)
                await forward(message)
            finally:
                await connection.release_writes()

        try:
            await self.app(scope, receive, tracking_send)
            if held is not None:  # a start without a body (no Starlette response does it)
                await forward(held)
        except ClientDisconnect:
            logger.debug("client went away during %s %s", scope["method"], scope["path"])
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                error = ApiError(500, "internal_error", "internal server error (logged)")
                await error_response(error)(scope, receive, send)
