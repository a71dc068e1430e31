"""``serve``: a backend and its HTTP API, served by hypercorn on Trio, with graceful shutdown.

The backend (and so every workspace and run) lives in the ``serve`` call: nothing outlives
it. Shutdown, on :meth:`RunningServer.request_shutdown` or the first SIGINT/SIGTERM, goes in
order: new workspaces and runs are refused (503), every workspace is closed so every accepted
run gets its cancelled terminal, clients get a bounded drain period to collect those
terminals, then the HTTP server stops (in-flight responses get hypercorn's graceful timeout).
A second signal cuts the drain short; the runs still end with their terminals.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import signal
from functools import partial
from typing import cast

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework

from ..agents import load_agent, load_store
from ..backend import CoordinatorFactory, open_backend
from ..ledger import RunStore
from .app import create_app
from .service import RunService
from .sse import DEFAULT_HEARTBEAT

__all__ = ["BindRefused", "RunningServer", "ServeOptions", "check_bind", "is_loopback", "serve"]

logger = logging.getLogger("trio_runs.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_AGENT = "trio_runs.agents:demo"


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    _non_negative(_, attribute, value)
    if value == 0:
        raise ValueError(f"{attribute.name} must be > 0")


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
    """

    host: str = DEFAULT_HOST
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    agent: str = DEFAULT_AGENT
    store: str | None = None
    """``"module:callable"`` making the run store; ``None``: the in-memory ``RunLedger``."""
    workspace_root: str = "."
    token: str | None = attrs.field(default=None, validator=_token)
    heartbeat: float = attrs.field(default=DEFAULT_HEARTBEAT, validator=_positive)
    close_grace: float = attrs.field(default=10.0, validator=_non_negative)
    drain: float = attrs.field(default=2.0, validator=_non_negative)
    graceful_timeout: float = attrs.field(default=3.0, validator=_non_negative)


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
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until shutdown is requested; start with ``await nursery.start(serve, …)``.

    ``coordinator_factory`` overrides ``options.agent`` and ``store`` overrides
    ``options.store`` (default: an in-memory ``RunLedger``). With ``handle_signals`` (main thread
    only), the first SIGINT/SIGTERM starts the graceful shutdown and a second one cuts its
    drain short. Raises ``BindRefused`` before binding anything for a non-loopback host
    without a token, and ``ValueError`` for an agent that cannot be loaded. When it returns,
    every run it accepted has its terminal.
    """
    token = options.token
    check_bind(options.host, token)
    factory = coordinator_factory if coordinator_factory is not None else load_agent(options.agent)
    if store is None and options.store is not None:
        store = load_store(options.store)
    config = HypercornConfig()
    config.bind = [_bind_address(options.host, options.port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("trio_runs.http.hypercorn")
    config.graceful_timeout = options.graceful_timeout
    shutdown = trio.Event()
    stop_http = trio.Event()
    async with open_backend(store, close_grace=options.close_grace) as backend:
        service = RunService(
            backend,
            factory,
            workspace_root=options.workspace_root,
            close_grace=options.close_grace,
        )
        app = cast(ASGIFramework, create_app(service, token=token, heartbeat=options.heartbeat))
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(_watch_signals, shutdown, outer.cancel_scope)
            async with trio.open_nursery() as http:
                binds: list[str] = await http.start(
                    partial(
                        hypercorn_serve, app, config, shutdown_trigger=stop_http.wait, mode="asgi"
                    )
                )
                url = binds[0]
                logger.info("serving on %s", url)
                task_status.started(RunningServer(url, service, shutdown))
                await shutdown.wait()
                await service.shutdown(options.drain)
                stop_http.set()
            outer.cancel_scope.cancel()
    logger.info("server stopped")


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
