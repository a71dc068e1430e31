"""The ``trio-runs`` command: ``serve``, ``run``, ``status``, ``follow``, ``cancel``, ``demo``.

``main(argv)`` returns the process exit status; nothing here calls ``sys.exit`` except the
``__main__`` guard. Conventions, the same for every command: what a command produces (a run's
result, or with ``--output json`` one JSON document) goes to stdout, and nothing else does;
progress and messages go to stderr. One exit status per meaning (``EXIT_*``, the table in
``--help`` and the README): 0 completed (or done), 1 failed, 2 usage or refused, 3 cancelled,
4 server unreachable or lost, 5 unknown run, 6 abandoned, 7 timed out, 130 interrupted
before anything was submitted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import trio

from . import __version__
from .agents import DEMO_HELP
from .backend import open_backend
from .errors import RedisUnavailable, StoreError
from .sqlite import SqliteRetention

if TYPE_CHECKING:
    from .events import RunComplete
    from .http.client import RunsClient, SseEvent
    from .http.schema import RunView, SessionView

__all__ = [
    "EXIT_ABANDONED",
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_LOST",
    "EXIT_OK",
    "EXIT_TIMED_OUT",
    "EXIT_UNKNOWN_RUN",
    "EXIT_USAGE",
    "main",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CANCELLED: Final = 3
EXIT_LOST: Final = 4
EXIT_UNKNOWN_RUN: Final = 5
# A run that a restarted server ended as failed *and* flagged abandoned (DESIGN.md, D3):
# whether its work happened is unknown, which is not the run's own failure.
EXIT_ABANDONED: Final = 6
# A run cut off by its deadline: failed, and flagged timed_out.
EXIT_TIMED_OUT: Final = 7
EXIT_INTERRUPTED: Final = 130

_EXIT_BY_OUTCOME: Final = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

_ENV_SERVER = "TRIO_RUNS_SERVER"
_ENV_TOKEN = "TRIO_RUNS_TOKEN"
_ENV_HOST = "TRIO_RUNS_HOST"
_ENV_PORT = "TRIO_RUNS_PORT"
_ENV_AGENT = "TRIO_RUNS_AGENT"
_ENV_DB = "TRIO_RUNS_DB"
_ENV_REDIS = "TRIO_RUNS_REDIS"

_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 8765
_DEFAULT_AGENT = "trio_runs.agents:demo"

_LOG_LEVELS = ["debug", "info", "warning", "error"]
_HELP_WIDTH = 100  # help is wrapped to the terminal, and never wider than this

_API_SUMMARY = """\
HTTP API (JSON under /v1; the OpenAPI document is at /v1/openapi.json):
  POST   /v1/workspaces                      {path} -> 201 {id, path}
  DELETE /v1/workspaces/{id}                 graceful close
  POST   /v1/workspaces/{id}/messages        {session_id, prompt, run_id?, deadline?} -> 202
  GET    /v1/runs/{run_id}                   {run_id, session_id, state, terminal?}
  GET    /v1/runs/{run_id}/wait?timeout=S    200 once ended, 202 after S s (S <= 60)
  POST   /v1/runs/{run_id}/cancel            cancel this run only -> the run
  POST   /v1/workspaces/{id}/sessions/{sid}/cancel
  DELETE /v1/workspaces/{id}/sessions/{sid}/queue
  GET    /v1/workspaces/{id}/sessions/{sid}  {busy, active, queued}
  GET    /v1/workspaces/{id}/events          Server-Sent Events (Last-Event-ID resumes)
  GET    /v1/runs/{run_id}/events            one run's events, then its terminal, late or live
  GET    /healthz, GET /metrics              health; Prometheus metrics
"""

_EXIT_CODES = """\
exit status (the same for every command):
  0  completed (with a result on stdout), or done
  1  failed: the run's error is on stderr
  2  usage or refused: bad arguments, or a request the server refused
  3  cancelled
  4  server unreachable or lost: no answer within --timeout (never hangs)
  5  unknown run: the server does not know that run id
  6  abandoned: the server stopped before the run ended; on restart it ended it abandoned
  7  timed out: the run did not end within its deadline (--deadline, or the server's)
  130  interrupted (Ctrl-C) before the run was submitted
"""


class _HelpFormatter(argparse.HelpFormatter):
    # Wraps prose to the terminal (never wider than _HELP_WIDTH); an indented line (a row of
    # a table, an example) keeps its layout, and wraps under its second column if too long.

    def __init__(self, prog: str) -> None:
        columns = shutil.get_terminal_size().columns
        super().__init__(prog, width=max(40, min(columns, _HELP_WIDTH) - 2))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                lines.extend(
                    textwrap.wrap(
                        " ".join(prose), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                lines.append("")
            elif line[0].isspace():
                flush()
                lines.extend(_wrap_row(indent + line.rstrip(), width))
            else:
                prose.append(line.strip())
        flush()
        return "\n".join(lines)


def _wrap_row(row: str, width: int) -> list[str]:
    # A table row "  key   description": continuation lines align with its last column.
    if len(row) <= width:
        return [row]
    indent = len(row) - len(row.lstrip())
    columns = [match.end() for match in re.finditer(r"\S {2,}(?=\S)", row)]
    hang = columns[-1] if columns and columns[-1] <= width - 24 else indent + 4
    return textwrap.wrap(row, width, subsequent_indent=" " * hang) or [row]


def _err(message: str) -> None:
    print(f"trio-runs: {message}", file=sys.stderr, flush=True)


_HTTP_MODULES: Final = ("httpx", "starlette", "hypercorn")


def _require(extra: str, modules: Sequence[str]) -> None:
    # Say plainly which extra a command needs, rather than fail with a traceback.
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise _UsageError(
            f"this command needs the {extra} extra ({', '.join(missing)} missing): "
            f"python -m pip install 'trio-runs[{extra}]'"
        )


def _http() -> ModuleType:
    # serve, run, status and cancel need the http extra (rich is the demo's alone).
    _require("http", _HTTP_MODULES)
    return importlib.import_module("trio_runs.http")


class _UsageError(Exception):
    pass


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


_DEFAULT_MAX_DEADLINE: Final = 86_400.0


def _max_deadline(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    value = _positive_float(text)
    if value > 1e9:
        raise argparse.ArgumentTypeError(f"must be at most 1e9 seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0: any free port), got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _list_limit(text: str) -> int:
    value = _positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"at most 1000, got {text!r}")
    return value


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get(_ENV_SERVER) or "http://127.0.0.1:8765",
        metavar="URL",
        help=f"the server's URL (default: ${_ENV_SERVER} or http://127.0.0.1:8765)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(_ENV_TOKEN) or None,
        help=f"bearer token, if the server requires one (default: ${_ENV_TOKEN})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up with exit status 4 when the server has not answered for this long "
        "(default: 10)",
    )
    parser.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text (default) or json: one JSON document on stdout, the run as "
        "'GET /v1/runs/{run_id}' shows it (for cancel --session, the session)",
    )


def _common_options() -> argparse.ArgumentParser:
    # Options every command takes after its name too. SUPPRESS: when not given after the
    # command, the value given before it (or the top-level default) stands.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=_LOG_LEVELS,
        help="log level of the trio_runs logger on stderr (default: warning; serve logs "
        "its own start and shutdown at info)",
    )
    return common


def _build_parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="trio-runs",
        description=textwrap.dedent(
            """\
            Run long jobs where every accepted run ends in exactly one terminal (completed,
            failed or cancelled) and every waiter observes it, even across processes.

            Start here:
              trio-runs demo
            """
        ),
        epilog="Run 'trio-runs COMMAND --help' for a command's options.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"trio-runs {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=_LOG_LEVELS,
        help="log level of the trio_runs logger on stderr (default: warning; serve logs "
        "its own start and shutdown at info); also accepted after the command",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common_options()]

    serve = commands.add_parser(
        "serve",
        help="serve workspaces and runs over HTTP",
        description="Serve trio-runs over HTTP (hypercorn on Trio) until SIGINT or SIGTERM. "
        "On shutdown, every accepted run gets its cancelled terminal before the "
        "process exits; a second signal skips the wait for clients to collect them.",
        epilog=f"{DEMO_HELP}\n{_API_SUMMARY}\nexit status: 0 stopped (every accepted run has "
        "its terminal), 1 could not serve (the address is in use, say), 2 usage or refused "
        "(a non-loopback address without a token, a token no client could match, an agent "
        "that cannot be loaded)",
        formatter_class=formatter,
        parents=common,
    )
    serve.add_argument(
        "--host",
        default=None,
        help=f"address to bind (default: ${_ENV_HOST} or {_DEFAULT_HOST})",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=None,
        help=f"port to bind; 0 picks a free one (default: ${_ENV_PORT} or {_DEFAULT_PORT})",
    )
    serve.add_argument(
        "--agent",
        default=None,
        metavar="MODULE:CALLABLE",
        help="the agent: an async 'agent(call, ctx)' or an object with a "
        f"'coordinator_factory(workspace)' method (default: ${_ENV_AGENT} or "
        f"{_DEFAULT_AGENT}, below)",
    )
    serve.add_argument(
        "--store",
        default=None,
        metavar="MODULE:CALLABLE",
        help="a callable that makes the run store (any RunStore implementation), called "
        "once at start-up (default: the in-memory RunLedger)",
    )
    serve.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help="the SQLite database that makes runs durable across restarts (default: "
        f"${_ENV_DB} or WORKSPACE_ROOT/.trio-runs/runs.db); ':memory:' keeps runs in memory "
        "only (nothing survives a restart)",
    )
    serve.add_argument(
        "--retain-count",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="keep at most N ended runs' terminals (default: 100000); a run id stays taken "
        "while its terminal is kept",
    )
    serve.add_argument(
        "--retain-bytes",
        type=_positive_int,
        default=1 << 30,
        metavar="BYTES",
        help="keep at most this many bytes of terminals, results included (default: 1 GiB)",
    )
    serve.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help=f"join the cluster on this Redis (redis://HOST:PORT/DB; default: ${_ENV_REDIS}): "
        "any number of nodes serve the same runs; see 'Scaling out' in the README",
    )
    _add_node_options(serve, "with --redis: ")
    serve.add_argument(
        "--retain-age",
        type=_positive_float,
        default=7 * 24 * 3600.0,
        metavar="SECONDS",
        help="keep no terminal longer than this (default: 604800, a week)",
    )
    serve.add_argument(
        "--workspace-root",
        default=".",
        metavar="DIR",
        help="workspace paths are resolved against this directory and must stay inside it "
        "(default: the current directory)",
    )
    serve.add_argument(
        "--token",
        default=os.environ.get(_ENV_TOKEN) or None,
        help="require 'Authorization: Bearer TOKEN' on every route but /healthz "
        f"(default: ${_ENV_TOKEN}); required to bind a non-loopback address. A token "
        "that is blank, has surrounding whitespace, or control or non-ASCII characters "
        "is refused",
    )
    serve.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=15.0,
        metavar="SECONDS",
        help="heartbeat interval of event streams (default: 15)",
    )
    serve.add_argument(
        "--close-grace",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="how long runs get to honour a cancellation when a workspace closes before "
        "they are cut off (they still end cancelled) (default: 10)",
    )
    serve.add_argument(
        "--max-deadline",
        type=_max_deadline,
        default=_DEFAULT_MAX_DEADLINE,
        metavar="SECONDS",
        help="the longest any run may take from its start: a run submitted with a longer "
        "deadline is refused (422 deadline_too_long), one without gets its workspace's "
        "default deadline capped by this; past it the run ends failed as timed out; "
        "'none' for no limit (default: 86400, a day)",
    )
    serve.add_argument(
        "--drain",
        type=_non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="on shutdown, how long to keep answering so that clients collect the "
        "terminals of the runs that were cancelled (default: 2)",
    )
    serve.add_argument(
        "--event-window",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="how many of each workspace's newest events (progress, notifications, "
        "terminals) are held for a client that resumes its event stream with Last-Event-ID "
        "or follows a run late; also at most 32 MiB of them (default: 1024)",
    )

    worker = commands.add_parser(
        "worker",
        help="run a cluster's work without serving HTTP (needs --redis)",
        description="Join the cluster on a Redis as a node that runs work and serves no "
        "HTTP: it claims runs any node accepted, each session's runs one at a time in "
        "acceptance order across the cluster, and runs them with the agent. On SIGINT or "
        "SIGTERM it stops claiming, cancels what it runs (each run ends cancelled) and "
        "leaves the cluster. See 'Scaling out' in the README.",
        epilog="exit status: 0 stopped (every run it claimed has its terminal), 2 usage "
        "(no --redis, an agent that cannot be loaded), 1 Redis could not be reached",
        formatter_class=formatter,
        parents=common,
    )
    worker.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help=f"the cluster's Redis (redis://HOST:PORT/DB; default: ${_ENV_REDIS})",
    )
    worker.add_argument(
        "--agent",
        default=None,
        metavar="MODULE:CALLABLE",
        help=f"the agent, as for serve (default: ${_ENV_AGENT} or {_DEFAULT_AGENT})",
    )
    _add_node_options(worker, "")
    worker.add_argument(
        "--close-grace",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="on shutdown, how long runs get to honour their cancellation (default: 10)",
    )

    run = commands.add_parser(
        "run",
        help="submit a prompt and wait for its run to end",
        description="Submit a prompt to a server and block until its run ends. Live "
        "progress goes to stderr; stdout gets the result alone (or, with --output json, "
        "the run). The ending comes from the server's authoritative /wait endpoint, "
        "never from live events alone. Ctrl-C, SIGTERM or SIGHUP cancels the run on the "
        "server before exiting (this run only: the other runs of its session go on); a "
        "second one exits at once. With --detach the run is left running on purpose.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
        parents=common,
    )
    _add_client_options(run)
    run.add_argument(
        "--workspace",
        default=".",
        metavar="PATH",
        help="workspace path, resolved on the server against its --workspace-root (default: .)",
    )
    run.add_argument("--session", required=True, metavar="SESSION", help="session id (its lane)")
    run.add_argument("--run-id", default=None, help="use this run id instead of a fresh UUID4")
    run.add_argument(
        "--deadline",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="the run may take this long from its start (time queued behind its session's "
        "other runs does not count); past it, it ends failed as timed out, exit status 7 "
        "(default: the workspace's default, within the server's --max-deadline)",
    )
    run.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label kept with the run, shown by status and ls and usable as ls's filter "
        "(repeatable; up to 16)",
    )
    run.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr, only the outcome"
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="submit the run, print its id on stdout and exit 0 without waiting: it runs on "
        "(follow it with 'follow RUN_ID', stop it with 'cancel --run RUN_ID')",
    )
    run.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt; '-' or nothing reads it from standard input",
    )

    status = commands.add_parser(
        "status",
        help="show a run's state (and its terminal once it ended)",
        description="Print a run's state (and its result or error once it ended). With "
        "--wait, block until it ends and exit with its outcome's status; without, exit 0 "
        "for any run the server knows.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
        parents=common,
    )
    _add_client_options(status)
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--wait", action="store_true", help="block until the run has ended")

    follow = commands.add_parser(
        "follow",
        help="print a run's progress, then its outcome (any run, running or ended)",
        description="Follow a run, whoever submitted it: its progress the server still holds "
        "(its --event-window) and then live goes to stderr, its result to stdout (or, with "
        "--output json, the run), and the exit status is the run's, as for 'run'. A run that "
        "already ended prints at once. A dropped connection is resumed where it broke; "
        "Ctrl-C stops following and leaves the run as it is.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
        parents=common,
    )
    _add_client_options(follow)
    follow.add_argument("run_id", metavar="RUN_ID")
    follow.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr, only the outcome"
    )

    cancel = commands.add_parser(
        "cancel",
        help="cancel one run, or a session's active run and its queue",
        description="With --run, cancel that run only: a queued one ends cancelled at once, "
        "an active one at its agent's next checkpoint, and the other runs of its session go "
        "on; prints the run (a run that already ended is left as it is). With --session, "
        "cancel the session's active run and drop its queued runs (each ends cancelled), "
        "or with --queue-only only drop the queue; prints the session. Exits 0 once the "
        "server took the cancellation.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
        parents=common,
    )
    _add_client_options(cancel)
    target = cancel.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", metavar="RUN_ID", help="cancel this run only")
    target.add_argument("--session", metavar="SESSION", help="cancel this session's runs")
    cancel.add_argument(
        "--workspace",
        default=None,
        metavar="PATH",
        help="the session's workspace path (with --session; default: .)",
    )
    cancel.add_argument(
        "--queue-only",
        action="store_true",
        help="with --session: drop the queued runs; let the active one finish",
    )
    cancel.set_defaults(usage_error=cancel.error)

    ls = commands.add_parser(
        "ls",
        help="list runs, newest first",
        description="List the runs the server's store knows, newest accepted first: running "
        "ones and ended ones (as far back as the store retains them), filtered by workspace "
        "path, session, state and label. Shows --limit runs; --all follows every page. "
        "With --output json, one JSON document: the runs and the cursor of the next page.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
        parents=common,
    )
    _add_client_options(ls)
    ls.add_argument(
        "--workspace",
        default=None,
        metavar="PATH",
        help="only runs of this workspace path (resolved on the server; open or not)",
    )
    ls.add_argument("--session", default=None, metavar="SESSION", help="only this session's runs")
    ls.add_argument(
        "--state",
        choices=["running", "ended"],
        default=None,
        help="running: no terminal yet; ended: completed, failed or cancelled",
    )
    ls.add_argument(
        "--label",
        type=_label,
        default=None,
        metavar="KEY=VALUE",
        help="only runs submitted with this label",
    )
    ls.add_argument(
        "--limit",
        type=_list_limit,
        default=20,
        metavar="N",
        help="show at most N runs (1 to 1000, default 20)",
    )
    ls.add_argument("--all", action="store_true", help="show every matching run, page by page")

    demo = commands.add_parser(
        "demo",
        help="the main job: a server and many client runs, checked end to end",
        description="Start an in-process server on a free loopback port and drive many "
        "client runs of the demo agent through it over HTTP: completions, failures before "
        "start and mid-run, cancels while queued and while active, a workspace closed "
        "mid-flight and late waiters. Shows live progress, then a table. Exits 1 if any "
        "run hung, ended twice, or ended differently than it must. Needs the demo extra "
        "(python -m pip install 'trio-runs[demo]').",
        formatter_class=formatter,
        parents=common,
    )
    demo.add_argument(
        "--runs", type=_positive_int, default=120, metavar="N", help="client runs (default: 120)"
    )
    demo.add_argument("--seed", type=int, default=0, help="shuffles the workload (default: 0)")
    demo.add_argument(
        "--hang-after",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="a waiter without its terminal after this long counts as hung (default: 30)",
    )
    demo.add_argument("--no-live", action="store_true", help="no live display, only the table")
    demo.add_argument(
        "--nodes",
        type=_cluster_nodes,
        default=None,
        metavar="N",
        help="run the demo across N >= 2 local node processes ('serve --redis' nodes, the "
        "last a 'worker' from 3 on) on a redis-server it starts, and kill one of them "
        "(SIGKILL) mid-demo: its runs must end abandoned within the lease, the runs queued "
        "behind them must go on elsewhere. Needs redis-server on PATH and the redis extra",
    )
    return parser


def _cluster_nodes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"a cluster needs at least 2 nodes, got {value}")
    return value


@contextmanager
def _logging(level: str | None, command: str) -> Iterator[None]:
    # Log to stderr for the duration of the command; restore the loggers afterwards, so
    # that calling main() in-process (tests, embedding) leaves no handler or level behind.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, server = logging.getLogger("trio_runs"), logging.getLogger("trio_runs.http")
    saved = (root.level, server.level)
    root.addHandler(handler)
    root.setLevel((level or "warning").upper())
    if level is None and command == "serve":
        # The server's own lifecycle at info; the library's per-run logs stay at warning.
        server.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        server.setLevel(saved[1])


def _add_node_options(parser: argparse.ArgumentParser, when: str) -> None:
    # What every cluster node takes, serve (``when``: "with --redis: ") and worker alike.
    parser.add_argument(
        "--redis-namespace",
        default="trio-runs",
        metavar="NAME",
        help="the cluster's key prefix in Redis, so clusters can share one (default: trio-runs)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help=f"{when}a node silent this long is dead and its runs end abandoned "
        "(default: 10; heartbeats every third of it)",
    )
    parser.add_argument(
        "--capacity",
        type=_positive_int,
        default=64,
        metavar="N",
        help=f"{when}the most runs this node runs at once (default: 64); 0 is not "
        "allowed: a node that should run nothing is not a cluster node",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-runs`` command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "cancel" and args.run is not None:
        given = {"--queue-only": args.queue_only, "--workspace": args.workspace is not None}
        for option in (name for name, present in given.items() if present):
            args.usage_error(f"argument {option}: not allowed with argument --run")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "worker": _worker,
        "run": _run,
        "status": _status,
        "follow": _follow,
        "cancel": _cancel,
        "ls": _ls,
        "demo": _demo,
    }
    try:
        with _logging(args.log_level, args.command):
            return commands[args.command](args)
    except _UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


# -- serve -------------------------------------------------------------------------------


_T = TypeVar("_T")


def _flag_env_default(given: _T | None, name: str, default: _T, convert: Callable[[str], _T]) -> _T:
    # The flag wins, then the environment variable (unset or empty: not given), then the
    # default. A bad value in the environment is a usage error that names the variable.
    if given is not None:
        return given
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return convert(text)
    except argparse.ArgumentTypeError as exc:
        raise _UsageError(f"${name}: {exc}") from None


def _sole_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _import_specs_from_cwd() -> None:
    # `--agent mymodule:agent` and `--store mymodule:make` name modules the way `python -m`
    # finds them: from the current directory first. An installed console script's
    # sys.path[0] is its bin directory instead, so without this the module next to you
    # would need PYTHONPATH=. to be found.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _serve(args: argparse.Namespace) -> int:
    http = _http()
    host = _flag_env_default(args.host, _ENV_HOST, _DEFAULT_HOST, str)
    port = _flag_env_default(args.port, _ENV_PORT, _DEFAULT_PORT, _port)
    agent = _flag_env_default(args.agent, _ENV_AGENT, _DEFAULT_AGENT, str)
    db = args.db if args.db is not None else (os.environ.get(_ENV_DB) or None)
    if db is not None and args.store is not None:
        raise _UsageError("--db and --store both name the run store: give one of them")
    redis_url = args.redis if args.redis is not None else (os.environ.get(_ENV_REDIS) or None)
    if redis_url is not None and (args.db is not None or args.store is not None):
        raise _UsageError("--redis names the run store: give no --db or --store with it")
    if redis_url is not None:
        db = None
    try:
        options = http.ServeOptions(
            host=host,
            port=port,
            agent=agent,
            store=args.store,
            db=db,
            retention=SqliteRetention(
                count=args.retain_count, bytes=args.retain_bytes, seconds=args.retain_age
            ),
            workspace_root=args.workspace_root,
            token=args.token,
            heartbeat=args.heartbeat,
            close_grace=args.close_grace,
            drain=args.drain,
            max_deadline=args.max_deadline,
            event_window=args.event_window,
        )
        http.check_bind(options.host, options.token)
        _import_specs_from_cwd()
        agents = importlib.import_module("trio_runs.agents")
        factory = agents.load_agent(options.agent)
        store = agents.load_store(options.store) if options.store is not None else None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None

    async def serve_main() -> None:
        # The cluster's store (and its tasks) opens before, and closes after, the nursery
        # the server runs in: nurseries must close in the reverse order they opened.
        async with AsyncExitStack() as stack:
            run_store = store
            coordinator_factory = factory
            node_work = None
            if redis_url is not None:
                redis = importlib.import_module("trio_runs.redis")
                joined = await stack.enter_async_context(
                    redis.open_redis_store(
                        redis_url,
                        namespace=args.redis_namespace,
                        lease_ttl=args.lease_ttl,
                        limits=redis.RetentionLimits(
                            count=args.retain_count, bytes=args.retain_bytes, age=args.retain_age
                        ),
                    )
                )
                _err(f"node {joined.node_id} joined {redis_url}")
                run_store = joined
                node = redis.ClusterNode(joined, factory, capacity=args.capacity)
                coordinator_factory = node.coordinator_factory
                node_work = node.serve
            nursery = await stack.enter_async_context(trio.open_nursery())
            server = await nursery.start(
                partial(
                    http.serve,
                    options,
                    coordinator_factory=coordinator_factory,
                    store=run_store,
                    handle_signals=True,
                    node_work=node_work,
                )
            )
            auth = " (bearer token required)" if options.token else ""
            print(
                f"trio-runs: serving on {server.url}{auth}; agent {options.agent}; "
                "Ctrl-C or SIGTERM to stop",
                flush=True,
            )

    try:
        trio.run(serve_main)
    except (StoreError, OSError, BaseExceptionGroup) as raised:
        # Start-up failures come out of the nursery wrapped in a group: unwrap the sole one.
        failure = _sole_leaf(raised)
        if isinstance(failure, StoreError):
            _err(f"cannot use the run database: {failure}")
            return EXIT_USAGE
        if isinstance(failure, OSError):
            _err(f"cannot serve on {options.host}:{options.port}: {failure}")
            return EXIT_FAILED
        raise
    if redis_url is not None:
        print(
            "trio-runs: stopped; every run this node ran has its terminal, and the runs "
            "waiting in their lanes go on on the cluster's other nodes",
            flush=True,
        )
    else:
        print("trio-runs: stopped; every accepted run has its terminal", flush=True)
    return EXIT_OK


# -- worker ------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    redis_url = args.redis if args.redis is not None else (os.environ.get(_ENV_REDIS) or None)
    if redis_url is None:
        raise _UsageError(f"worker needs the cluster's Redis: give --redis URL or ${_ENV_REDIS}")
    agent = _flag_env_default(args.agent, _ENV_AGENT, _DEFAULT_AGENT, str)
    try:
        _import_specs_from_cwd()
        agents = importlib.import_module("trio_runs.agents")
        factory = agents.load_agent(agent)
        redis = importlib.import_module("trio_runs.redis")
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    except ImportError as exc:
        raise _UsageError(f"the Redis mode needs the 'redis' extra: {exc}") from None

    async def worker_main() -> None:
        async with (
            redis.open_redis_store(
                redis_url, namespace=args.redis_namespace, lease_ttl=args.lease_ttl
            ) as store,
            open_backend(store, close_grace=args.close_grace) as backend,
            trio.open_nursery() as nursery,
        ):
            node = redis.ClusterNode(store, factory, capacity=args.capacity)
            _err(f"worker {store.node_id} joined {redis_url}; agent {agent}")
            print(
                f"trio-runs: worker running up to {args.capacity} runs at once; "
                "Ctrl-C or SIGTERM to stop",
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                nursery.start_soon(node.serve, backend)
                async for _ in signals:
                    break
            _err("worker stopping: cancelling its runs")
            nursery.cancel_scope.cancel()

    try:
        trio.run(worker_main)
    except (RedisUnavailable, BaseExceptionGroup) as raised:
        failure = _sole_leaf(raised)
        if isinstance(failure, RedisUnavailable):
            _err(str(failure))
            return EXIT_FAILED
        raise
    print("trio-runs: worker stopped; every run it claimed has its terminal", flush=True)
    return EXIT_OK


# -- run ---------------------------------------------------------------------------------


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt != "-":
        return str(args.prompt)
    if args.prompt is None and sys.stdin is not None and sys.stdin.isatty():
        raise _UsageError("no prompt: give one as an argument, or '-' to read standard input")
    text = sys.stdin.read() if sys.stdin is not None else ""
    if not text.strip():
        raise _UsageError("the prompt read from standard input is empty")
    return text.rstrip("\n")


def _show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _print_json(body: dict[str, Any]) -> None:
    print(json.dumps(body, indent=2), flush=True)


def _print_run(view: RunView, output: str) -> None:
    if output == "json":
        _print_json(view.to_dict())
        return
    lines = [f"run {view.run_id} (session {view.session_id}): {view.state}"]
    if view.terminal is not None and view.terminal.outcome == "completed":
        lines.append(f"result: {_show(view.terminal.result)}")
    elif view.terminal is not None and view.terminal.outcome == "failed":
        lines.append(f"error: {view.terminal.error}")
    print("\n".join(lines), flush=True)


def _print_session(view: SessionView, output: str) -> None:
    if output == "json":
        _print_json(view.to_dict())
        return
    active = f"active run {view.active}" if view.active else "idle"
    print(f"session {view.session_id}: {active}, {len(view.queued)} queued", flush=True)


def _ended(rc: RunComplete) -> RunView:
    # The run as 'GET /v1/runs/{run_id}' shows an ended one.
    view: RunView = _http().RunView.ended(rc)
    return view


def _outcome_status(rc: RunComplete) -> int:
    # An abandoned run failed, but not by its own doing: it gets a status of its own; so
    # does a run cut off by its deadline.
    if rc.abandoned:
        return EXIT_ABANDONED
    if rc.timed_out:
        return EXIT_TIMED_OUT
    return _EXIT_BY_OUTCOME[rc.outcome]


def _report_terminal(rc: RunComplete, output: str = "text") -> int:
    # stdout: the result alone (text) or the run (json); stderr: why there is no result.
    if output == "json":
        _print_run(_ended(rc), output)
    elif rc.outcome == "completed":
        print(_show(rc.result), flush=True)
    if rc.abandoned:
        _err(f"run {rc.run_id} was abandoned (whether its work happened is unknown): {rc.error}")
    elif rc.timed_out:
        _err(f"run {rc.run_id} {rc.error}")
    elif rc.outcome == "failed":
        _err(f"run {rc.run_id} failed: {rc.error}")
    elif rc.outcome == "cancelled":
        _err(f"run {rc.run_id} was cancelled")
    return _outcome_status(rc)


def _client_error_status(exc: Exception, args: argparse.Namespace, run_id: str = "") -> int:
    http = _http()
    if isinstance(exc, http.ServerLost):
        _err(f"server lost: {exc}")
        return EXIT_LOST
    assert isinstance(exc, http.ClientError)
    if exc.code == "run_not_found" and run_id:
        _err(f"no run {run_id!r} is known to {args.server}")
        return EXIT_UNKNOWN_RUN
    if exc.status >= 500 or exc.code in {"workspace_closing", "shutting_down"}:
        _err(f"the server could not take the request: {exc}")
        return EXIT_LOST
    _err(f"the server refused the request: {exc}")
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    http = _http()
    prompt = _read_prompt(args)
    from .coordinator import new_run_id

    run_id = args.run_id or new_run_id()
    try:
        client = http.RunsClient(args.server, token=args.token, timeout=args.timeout)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    status: int = trio.run(_run_main, client, args, prompt, run_id)
    return status


async def _run_main(client: RunsClient, args: argparse.Namespace, prompt: str, run_id: str) -> int:
    http = _http()
    status = EXIT_INTERRUPTED
    submitting = False
    interrupts = 0
    accepted = trio.Event()
    stream_done = trio.Event()
    workspace_id = ""

    def on_event(event: SseEvent) -> None:
        data = event.json()
        if event.event == "progress" and isinstance(data, dict) and not args.quiet:
            print(_show(data.get("payload")), file=sys.stderr, flush=True)
        elif event.event == "run_complete":
            stream_done.set()

    async def follow(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Live progress is best effort: a stream that breaks or is refused never affects
        # the outcome (and never keeps the run from being submitted).
        subscribed = _Started(task_status)
        try:
            await client.stream_events(
                workspace_id,
                on_event,
                run_id=run_id,
                task_status=cast("trio.TaskStatus[None]", subscribed),
            )
        except Exception as exc:
            logging.getLogger("trio_runs").debug("event stream ended: %r", exc)
        if not subscribed.done:
            task_status.started()
        stream_done.set()

    async def cancel_remote() -> None:
        # This run only: the session's other runs (queued behind it, say) go on. The run may
        # be accepted while its one request (submit and wait) is still out: try at once, and
        # again while the server does not know it yet.
        with trio.move_on_after(client.timeout):
            while True:
                try:
                    await client.cancel_run(run_id)
                    return
                except http.ClientError as exc:
                    if exc.code != "run_not_found" or accepted.is_set():
                        _err(f"could not cancel the run: {exc}")
                        return
                except Exception as exc:
                    _err(f"could not cancel the run: {exc}")
                    return
                with trio.move_on_after(0.2):
                    await accepted.wait()

    async def watch_interrupts(nursery: trio.Nursery) -> None:
        # SIGINT (Ctrl-C), SIGTERM (kill) and SIGHUP (the terminal went away) all mean "stop
        # this client": its run is cancelled on the server rather than orphaned.
        nonlocal interrupts
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            async for signum in signals:
                interrupts += 1
                if interrupts == 1 and submitting:
                    name = signal.Signals(signum).name
                    _err(f"{name}: cancelling run {run_id}; Ctrl-C again to quit")
                    nursery.start_soon(cancel_remote)
                    continue
                if interrupts > 1:
                    _err("quitting without waiting for the run's end")
                nursery.cancel_scope.cancel()
                return

    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(watch_interrupts, nursery)
        try:
            workspace_id = (await client.create_workspace(args.workspace)).id
            if args.detach:
                # Left running on purpose: the run id is what it takes to follow it later.
                submitting = True
                await _submit_detached(client, workspace_id, args, prompt, run_id)
                nursery.cancel_scope.cancel()
                return EXIT_OK
            with trio.move_on_after(min(2.0, client.timeout)):
                await nursery.start(follow)
            submitting = True
            # One request: submitted, and its terminal if the run ends within a poll.
            view = await _submit_reopening(
                client.submit_and_wait, client, workspace_id, args, prompt, run_id
            )
            accepted.set()
            if not args.quiet:
                _err(f"run {run_id} accepted (session {args.session})")
            terminal = view.terminal
            if terminal is None:
                terminal = await client.wait_terminal(run_id)
            # Let the last live progress lines arrive, briefly: the outcome is already known.
            with trio.move_on_after(0.5):
                await stream_done.wait()
            status = _report_terminal(terminal, args.output)
        except (http.ServerLost, http.ClientError) as exc:
            status = _client_error_status(exc, args)
        nursery.cancel_scope.cancel()
    return status


_STOP_SIGNALS: Final = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


async def _submit_reopening(
    submit: Callable[..., Awaitable[_T]],
    client: RunsClient,
    workspace_id: str,
    args: argparse.Namespace,
    prompt: str,
    run_id: str,
) -> _T:
    # Submit with ``submit`` (client.submit or client.submit_and_wait). If the server
    # restarted before acknowledging the run (workspaces do not survive a restart;
    # acknowledged runs do), open the workspace again and submit again: the run id is ours,
    # so this can never run it twice.
    options = {"deadline": args.deadline, "labels": dict(args.label)}
    try:
        return await submit(workspace_id, args.session, prompt, run_id, **options)
    except _http().ClientError as exc:
        if exc.code != "workspace_not_found":
            raise
    workspace_id = (await client.create_workspace(args.workspace)).id
    return await submit(workspace_id, args.session, prompt, run_id, resubmitting=True, **options)


async def _submit_detached(
    client: RunsClient, workspace_id: str, args: argparse.Namespace, prompt: str, run_id: str
) -> None:
    # --detach: submit (durably), print the run id (or the run, as JSON), wait for nothing.
    await _submit_reopening(client.submit, client, workspace_id, args, prompt, run_id)
    if args.output == "json":
        _print_run(await client.run(run_id), args.output)
    else:
        print(run_id, flush=True)
    if not args.quiet:
        _err(f"run {run_id} accepted (session {args.session}); detached: it runs on")


class _Started:
    # A task status that remembers whether started() was called.
    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.inner.started(value)


# -- status and cancel -------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    http = _http()

    async def status_main() -> RunView:
        async with http.RunsClient(args.server, token=args.token, timeout=args.timeout) as client:
            view: RunView = await client.run(args.run_id)
            if args.wait and view.terminal is None:
                view = _ended(await client.wait_terminal(args.run_id))
            return view

    try:
        view = trio.run(status_main)
    except (http.ServerLost, http.ClientError) as exc:
        return _client_error_status(exc, args, args.run_id)
    _print_run(view, args.output)
    if args.wait and view.terminal is not None:
        return _outcome_status(view.terminal)
    return EXIT_OK


def _follow(args: argparse.Namespace) -> int:
    http = _http()
    from contextlib import aclosing

    from . import events

    async def follow_main() -> RunComplete:
        terminal: RunComplete | None = None
        async with (
            http.RunsClient(args.server, token=args.token, timeout=args.timeout) as client,
            aclosing(client.follow(args.run_id)) as items,
        ):
            # To the end of the iteration (just after the terminal): the stream is then
            # closed in order.
            async for item in items:
                if isinstance(item, http.EventGap):
                    _err(f"(progress before event {item.first_id} is no longer held)")
                elif isinstance(item, events.RunProgress) and not args.quiet:
                    print(_show(item.payload), file=sys.stderr, flush=True)
                elif isinstance(item, events.RunComplete):
                    terminal = item
        if terminal is None:
            raise http.ServerLost(f"the stream of run {args.run_id} ended without its terminal")
        return terminal

    try:
        terminal = trio.run(follow_main)
    except (http.ServerLost, http.ClientError) as exc:
        return _client_error_status(exc, args, args.run_id)
    return _report_terminal(terminal, args.output)


def _cancel(args: argparse.Namespace) -> int:
    http = _http()

    async def cancel_main() -> RunView | SessionView:
        async with http.RunsClient(args.server, token=args.token, timeout=args.timeout) as client:
            if args.run is not None:
                run: RunView = await client.cancel_run(args.run)
                return run
            workspace = await client.create_workspace(args.workspace or ".")
            if args.queue_only:
                session: SessionView = await client.clear_queue(workspace.id, args.session)
            else:
                session = await client.cancel_session(workspace.id, args.session)
            return session

    try:
        view = trio.run(cancel_main)
    except (http.ServerLost, http.ClientError) as exc:
        return _client_error_status(exc, args, args.run or "")
    if args.run is not None:
        _print_run(cast("RunView", view), args.output)
    else:
        _print_session(cast("SessionView", view), args.output)
    return EXIT_OK


# -- ls ---------------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    http = _http()

    async def ls_main() -> tuple[list[RunView], str | None]:
        async with http.RunsClient(args.server, token=args.token, timeout=args.timeout) as client:
            runs: list[RunView] = []
            cursor: str | None = None
            while True:
                page = await client.list_runs(
                    path=args.workspace,
                    session_id=args.session,
                    state=args.state,
                    label=args.label,
                    cursor=cursor,
                    limit=1000 if args.all else args.limit,
                )
                runs.extend(page.runs)
                cursor = page.next_cursor
                if not args.all or cursor is None:
                    return runs, cursor

    try:
        runs, cursor = trio.run(ls_main)
    except (http.ServerLost, http.ClientError) as exc:
        return _client_error_status(exc, args)
    if args.output == "json":
        _print_json({"runs": [run.to_dict() for run in runs], "next_cursor": cursor})
        return EXIT_OK
    print(_runs_table(runs), flush=True)
    if cursor is not None:
        _err(f"more runs than --limit {args.limit}: use --all, or a larger --limit")
    return EXIT_OK


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def _took(view: RunView) -> str:
    # Wall time from start to end, or so far for an active run; "-" before it started.
    start = view.started_at
    end = view.terminal.ended_at if view.terminal is not None else None
    if start is None:
        return "-"
    elapsed = (end if end is not None else time.time()) - start
    return f"{max(elapsed, 0.0):.1f}s"


def _runs_table(runs: Sequence[RunView]) -> str:
    header = ("RUN_ID", "SESSION", "STATE", "ACCEPTED", "TOOK", "LABELS")
    rows = [header]
    for view in runs:
        state = view.state
        terminal = view.terminal
        if terminal is not None and terminal.reason is not None:
            state = f"{state} ({terminal.reason})"
        labels = ",".join(f"{key}={value}" for key, value in sorted(view.labels.items()))
        rows.append(
            (view.run_id, view.session_id, state, _when(view.accepted_at), _took(view), labels)
        )
    if len(rows) == 1:
        return "no runs"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


# -- demo -------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    # The demo extra is the http extra and rich, its live display and table.
    _require("demo", (*_HTTP_MODULES, "rich"))
    redis_binary = None
    if args.nodes is not None:
        # The cluster demo starts a redis-server of its own and node processes that need
        # the redis extra: say so before starting anything.
        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            raise _UsageError(
                "demo --nodes needs redis-server on PATH, to start a private one: install it "
                "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"
            )
        _require("redis", ("coredis",))
    from .http import demo

    return demo.main(
        runs=args.runs,
        seed=args.seed,
        hang_after=args.hang_after,
        live=not args.no_live,
        nodes=args.nodes,
        redis_binary=redis_binary,
    )


if __name__ == "__main__":
    sys.exit(main())
