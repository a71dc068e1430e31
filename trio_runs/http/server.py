"""``serve``: a backend and its HTTP API, served by hypercorn on Trio, with graceful shutdown.

The backend (and so every workspace and run) lives in the ``serve`` call: nothing outlives
it. Shutdown, on :meth:`RunningServer.request_shutdown` or the first SIGINT/SIGTERM, goes in
order: new workspaces and runs are refused (503), every workspace is closed so every accepted
run gets its cancelled terminal (at most ``close_grace``), clients get a bounded drain period
to collect those terminals (at most ``drain``), then the HTTP server stops: in-flight
responses get ``graceful_timeout``, after which every connection still open is closed. So
shutdown ends within ``close_grace + drain + graceful_timeout`` whatever clients do. A second
signal cuts it short at once; the runs still end with their terminals.

Whatever a client does, no write to it blocks for long: a write it does not take within
``write_timeout`` closes its connection (hypercorn shields its socket writes from
cancellation, so a response blocked on a client that stopped reading could otherwise never
be stopped, not even by hypercorn's own graceful timeout).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, cast

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from ..agents import load_agent, load_store
from ..backend import Backend, CoordinatorFactory, open_backend
from ..ledger import RunStore
from ..sqlite import SqliteRetention, open_sqlite_ledger
from .app import create_app
from .journal import DEFAULT_EVENT_WINDOW, DEFAULT_WINDOW_BYTES
from .schema import MAX_DEADLINE_SECONDS
from .service import RunService, open_run_service
from .sse import CLIENT_CONNECTION, DEFAULT_HEARTBEAT, DEFAULT_WRITE_TIMEOUT

__all__ = [
    "DEFAULT_DB",
    "BindRefused",
    "RunningServer",
    "ServeOptions",
    "check_bind",
    "database_path",
    "is_loopback",
    "serve",
]

logger = logging.getLogger("trio_runs.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_AGENT = "trio_runs.agents:demo"
DEFAULT_MAX_DEADLINE: Final = 86_400.0
"""A day: the longest a run may take from its start unless ``--max-deadline`` says otherwise."""
DEFAULT_DB = os.path.join(".trio-runs", "runs.db")
"""The run database's path under the workspace root, unless ``--db`` says otherwise."""


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    _non_negative(_, attribute, value)
    if value == 0:
        raise ValueError(f"{attribute.name} must be > 0")


def _max_deadline(_: object, __: object, value: float | None) -> None:
    if value is not None and not (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_DEADLINE_SECONDS
    ):
        raise ValueError(
            f"max_deadline must be None or seconds in (0, {MAX_DEADLINE_SECONDS:g}], got {value!r}"
        )


def _positive_int(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive int, got {value!r}")


def _port(_: object, __: object, value: int) -> None:
    if not (isinstance(value, int) and 0 <= value <= 65535):
        raise ValueError(f"port must be 0..65535, got {value!r}")


def _token(_: object, __: object, value: str | None) -> None:
    # The server strips the credentials clients send, and a header cannot carry control or
    # non-ASCII characters: a token that is empty, surrounded by whitespace or made of such
    # characters would start fine and then answer 401 to every client. Refuse it up front.
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"token must be a string or None, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("the token is empty or blank: give a real token, or none at all")
    if value != value.strip():
        raise ValueError(
            "the token starts or ends with whitespace, so no client could ever match it "
            "(credentials are compared without surrounding whitespace): remove it"
        )
    if not (value.isascii() and value.isprintable()):
        raise ValueError(
            "the token has control or non-ASCII characters, which an HTTP header cannot "
            "carry, so no client could ever match it"
        )


@attrs.frozen(slots=True)
class ServeOptions:
    """How to serve: where to bind, which agent, and the shutdown and heartbeat timings.

    ``port=0`` picks a free port (the bound URL is in :attr:`RunningServer.url`).
    ``token=None`` means none; a token no client could ever match (empty, blank, surrounded
    by whitespace, or with control or non-ASCII characters) is refused with ``ValueError``.

    Shutdown ends within ``close_grace + drain + graceful_timeout`` seconds whatever clients
    do; a client that takes no write for ``write_timeout`` seconds is disconnected.
    """

    host: str = DEFAULT_HOST
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    agent: str = DEFAULT_AGENT
    store: str | None = None
    """``"module:callable"`` making the run store; when set, ``db`` is not used."""
    db: str | None = None
    """The SQLite run database (durable runs, DESIGN D1-D6); ``None``: ``DEFAULT_DB`` under
    ``workspace_root``; ``":memory:"``: the in-memory ``RunLedger`` (nothing survives)."""
    retention: SqliteRetention = attrs.field(factory=SqliteRetention)
    """How many terminals the database keeps, and for how long (ids stay taken meanwhile)."""
    workspace_root: str = "."
    token: str | None = attrs.field(default=None, validator=_token)
    heartbeat: float = attrs.field(default=DEFAULT_HEARTBEAT, validator=_positive)
    close_grace: float = attrs.field(default=10.0, validator=_non_negative)
    drain: float = attrs.field(default=2.0, validator=_non_negative)
    graceful_timeout: float = attrs.field(default=3.0, validator=_non_negative)
    """Seconds in-flight responses get once the drain is over; then every connection left
    (event streams and long polls included) is closed."""
    max_deadline: float | None = attrs.field(default=DEFAULT_MAX_DEADLINE, validator=_max_deadline)
    """The longest any run may take from its start, in seconds (``None``: no limit). A
    submission asking for more is refused (422 ``deadline_too_long``); one asking for nothing
    gets its workspace's default deadline, capped by this."""
    write_timeout: float = attrs.field(default=DEFAULT_WRITE_TIMEOUT, validator=_positive)
    """Seconds a client gets to take each write (64 KiB at most) before its connection is
    closed; an event stream whose workspace closed has this long to send its last events."""
    event_window: int = attrs.field(default=DEFAULT_EVENT_WINDOW, validator=_positive_int)
    """How many of each workspace's newest events are held for a client that resumes its
    event stream (``Last-Event-ID``) or follows a run late."""
    event_window_bytes: int = attrs.field(default=DEFAULT_WINDOW_BYTES, validator=_positive_int)
    """The most bytes of event data each workspace holds for that (its newest event always)."""


class BindRefused(ValueError):
    """Serving on a non-loopback address without a token was refused."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost`` or a loopback address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse (``BindRefused``) to expose the API beyond loopback without a bearer token."""
    if not token and not is_loopback(host):
        raise BindRefused(
            f"refusing to serve on {host!r} without a token: only loopback addresses "
            "(127.0.0.1, ::1, localhost) may be served without one. Pass --token or set "
            "TRIO_RUNS_TOKEN, and give clients the same token."
        )


@attrs.frozen(slots=True, eq=False)
class RunningServer:
    """A started server: its URL, its service, and the way to shut it down gracefully."""

    url: str
    service: RunService
    _shutdown: trio.Event = attrs.field(alias="shutdown")

    def request_shutdown(self) -> None:
        """Start the graceful shutdown (idempotent); ``serve`` returns once it is done."""
        self._shutdown.set()


def _bind_address(host: str, port: int) -> str:
    host = host.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve(
    options: ServeOptions,
    *,
    coordinator_factory: CoordinatorFactory | None = None,
    store: RunStore | None = None,
    handle_signals: bool = False,
    node_work: Callable[[Backend], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until shutdown is requested; start with ``await nursery.start(serve, …)``.

    ``node_work(backend)``, when given, is what this node does beside serving requests (a
    cluster node claiming runs: ``ClusterNode.serve``): it starts with the backend and is
    cancelled as soon as shutdown begins, before any workspace closes.

    ``coordinator_factory`` overrides ``options.agent``; ``store`` overrides ``options.store``
    and ``options.db`` (default: the SQLite database, recovered before the first request is
    served). With ``handle_signals`` (main thread only), the first SIGINT/SIGTERM starts the
    graceful shutdown and a second one cuts its drain short. Raises ``BindRefused`` before
    binding anything for a non-loopback host without a token, ``ValueError`` for an agent
    that cannot be loaded, and ``StoreError`` for a database that cannot be used (in use by
    another server, not a run database, a newer schema). When it returns, every run it
    accepted has its terminal, committed.
    """
    token = options.token
    check_bind(options.host, token)
    factory = coordinator_factory if coordinator_factory is not None else load_agent(options.agent)
    if store is None and options.store is not None:
        store = load_store(options.store)
    async with contextlib.AsyncExitStack() as stack:
        if store is None and options.db != ":memory:":
            path = await trio.to_thread.run_sync(database_path, options)
            store = await stack.enter_async_context(
                open_sqlite_ledger(path, retention=options.retention)
            )
            logger.info("runs are recorded in %s", path)
        await _serve(options, factory, store, handle_signals, node_work, task_status)


def database_path(options: ServeOptions) -> str:
    """Where ``options`` puts the run database (its directory is created). Blocking."""
    if options.db is not None:
        path = os.path.abspath(options.db)
    else:
        path = os.path.join(os.path.abspath(options.workspace_root), DEFAULT_DB)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


async def _serve(
    options: ServeOptions,
    factory: CoordinatorFactory,
    store: RunStore | None,
    handle_signals: bool,
    node_work: Callable[[Backend], Awaitable[object]] | None,
    task_status: trio.TaskStatus[RunningServer],
) -> None:
    token = options.token
    config = HypercornConfig()
    config.bind = [_bind_address(options.host, options.port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("trio_runs.http.hypercorn")
    config.graceful_timeout = options.graceful_timeout
    shutdown = trio.Event()
    stop_http = trio.Event()
    async with (
        open_backend(store, close_grace=options.close_grace) as backend,
        open_run_service(
            backend,
            factory,
            workspace_root=options.workspace_root,
            close_grace=options.close_grace,
            max_deadline=options.max_deadline,
            event_window=options.event_window,
            event_window_bytes=options.event_window_bytes,
        ) as service,
    ):
        # Runs a crash left to run again (D3) start before the first request is served
        # (their workspaces' event journals with them).
        for path in backend.rerunnable_paths():
            await service.journal(await backend.create_workspace(path, factory))
        app = cast(ASGIFramework, create_app(service, token=token, heartbeat=options.heartbeat))
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(_watch_signals, shutdown, outer.cancel_scope)
            work = trio.CancelScope()
            if node_work is not None:
                outer.start_soon(_node_work, work, node_work, backend)
            async with trio.open_nursery() as http:
                binds: list[str] = await http.start(
                    partial(
                        _serve_http,
                        app,
                        config,
                        write_timeout=options.write_timeout,
                        stop=stop_http,
                    )
                )
                url = binds[0]
                logger.info("serving on %s", url)
                task_status.started(RunningServer(url, service, shutdown))
                await shutdown.wait()
                work.cancel()
                await service.shutdown(options.drain)
                stop_http.set()
            outer.cancel_scope.cancel()
    logger.info("server stopped")


async def _node_work(
    scope: trio.CancelScope, work: Callable[[Backend], Awaitable[object]], backend: Backend
) -> None:
    with scope:
        await work(backend)


async def _watch_signals(shutdown: trio.Event, force: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not shutdown.is_set():
                logger.warning(
                    "%s: shutting down gracefully (again to skip the drain)",
                    signal.Signals(signum).name,
                )
                shutdown.set()
            else:
                logger.warning("second signal: stopping now; runs still end cancelled")
                force.cancel()
                return


# -- the HTTP server: hypercorn's Trio worker loop, with connections shutdown can close ----

_WRITE_CHUNK = 64 * 1024
"""The most one timed write sends: a client must take this much per ``write_timeout``."""


class _ClientConnection(trio.abc.HalfCloseableStream):
    # One client's TCP connection, as hypercorn's TCPServer uses it. A write the client does
    # not take in time (or still unfinished at the deadline an ending response set) closes
    # the connection; so does abort(), from the shutdown path. hypercorn writes in a
    # cancel-shielded scope: closing the socket is the one way to stop a blocked write.

    def __init__(self, stream: trio.SocketStream, write_timeout: float) -> None:
        self._stream = stream
        self.socket = stream.socket  # hypercorn reads the addresses from it
        self.write_timeout = write_timeout
        self._deadline = math.inf
        self._writing: trio.CancelScope | None = None
        self._aborted = False
        # Writes held back by hold_writes() (None: not holding), and how many holds are open.
        self._held: list[bytes] | None = None
        self._holds = 0

    def set_write_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._writing is not None:
            # A write under way keeps its own timeout; a lifted deadline (inf) changes nothing.
            self._writing.deadline = min(self._writing.deadline, deadline)

    def abort(self) -> None:
        """Close the connection now, discarding what the client has not taken (a reset)."""
        if self._aborted:
            return
        self._aborted = True
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.socket.close()  # wakes a blocked write with ClosedResourceError

    def hold_writes(self) -> None:
        """Keep what is written from now on in memory until :meth:`release_writes` (holds
        nest: the last release writes). Nothing is written, so nothing blocks meanwhile."""
        if self._held is None:
            self._held = []
        self._holds += 1

    async def release_writes(self) -> None:
        """End one hold; the last one writes everything held, in order, in one write.

        The write is shielded from cancellation (as hypercorn shields its own) and bounded
        by ``write_timeout``; if the client does not take it, or is gone, the connection is
        closed (hypercorn's reader then sees it end). Never raises.
        """
        self._holds -= 1
        if self._holds > 0:
            return
        await self._write_held()

    async def _write_held(self) -> None:
        # What is held, written now (shielded, bounded by write_timeout); never raises.
        held, self._held = self._held, None
        if not held:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.send_all(b"".join(held))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                self.abort()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None or not data:
            # Held (or nothing to write, as hypercorn's end of a response with a
            # Content-Length is): no socket call, no timed scope. Not a yield either: the
            # writes it stands for are each a checkpoint in hypercorn already.
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._aborted:
                raise trio.ClosedResourceError("the connection was closed")
            if self._held is not None and data:
                self._held.append(bytes(data))
            return
        view = memoryview(data)
        start = 0
        while True:
            if self._aborted:
                raise trio.ClosedResourceError("the connection was closed")
            chunk = view[start : start + _WRITE_CHUNK]
            deadline = min(trio.current_time() + self.write_timeout, self._deadline)
            with trio.CancelScope(deadline=deadline) as writing:
                self._writing = writing
                try:
                    await self._stream.send_all(chunk)
                finally:
                    self._writing = None
            if writing.cancelled_caught:
                self._cut_off()
            start += len(chunk)
            if start >= len(view):
                return

    def _cut_off(self) -> None:
        try:
            peer = repr_socket_addr(self.socket.family, self.socket.getpeername())
        except OSError:
            peer = "a client"
        if self._deadline <= trio.current_time():
            why = "its response was ending and it did not take the rest in time"
        else:
            why = f"it took no data for {self.write_timeout:g}s"
        logger.info("closed the connection of %s: %s", peer, why)
        self.abort()
        raise trio.BrokenResourceError(f"closed the connection: {why}")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # hypercorn may end a connection (Connection: close) while an answer is still held:
        # the answer goes first.
        await self._write_held()
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._write_held()
        await self._stream.aclose()


class _Connections:
    # The open client connections, to wait for them and to close what is left.
    def __init__(self) -> None:
        self._open: set[_ClientConnection] = set()
        self._none_open = trio.Event()

    def add(self, connection: _ClientConnection) -> None:
        self._open.add(connection)

    def discard(self, connection: _ClientConnection) -> None:
        self._open.discard(connection)
        if not self._open:
            self._none_open.set()

    async def wait_closed(self) -> None:
        if self._open:
            self._none_open = trio.Event()
            await self._none_open.wait()

    def abort_all(self) -> int:
        left = list(self._open)
        for connection in left:
            connection.abort()
        return len(left)


async def _serve_http(
    app: ASGIFramework,
    config: HypercornConfig,
    *,
    write_timeout: float,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    # hypercorn.trio.serve's loop (without lifespan events, which the app does not use), on
    # _ClientConnection streams. Once ``stop`` is set: no new connections, idle ones close,
    # in-flight responses get config.graceful_timeout, then every connection left is closed.
    # Cancelled (a second signal), it closes every connection at once.
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    listeners: list[trio.SocketListener] = []
    binds: list[str] = []
    for sock in config.create_sockets().insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    connections = _Connections()

    async def handle(stream: trio.SocketStream) -> None:
        connection = _ClientConnection(stream, write_timeout)
        connections.add(connection)
        # The tasks serving this connection's requests inherit it (the event stream uses it).
        CLIENT_CONNECTION.set(connection)
        try:
            # TCPServer is typed to take an SSLStream; it uses the SocketStream interface too.
            as_typed = cast("trio.SSLStream[trio.SocketStream]", connection)
            server = TCPServer(wrapped, config, context, ConnectionState({}), as_typed)
            await server.run()
        finally:
            connections.discard(connection)

    async with trio.open_nursery() as handlers:
        try:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=handlers)
                )
                task_status.started(binds)
                await stop.wait()
                accepting.cancel_scope.cancel()  # closes the listeners
            await context.terminated.set()  # idle kept-alive connections close now
            with trio.move_on_after(config.graceful_timeout):
                await connections.wait_closed()
        finally:
            left = connections.abort_all()
            if left:
                logger.info("closed %d connection(s) still open at shutdown", left)
            handlers.cancel_scope.cancel()
