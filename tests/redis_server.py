"""A private ``redis-server`` for the tests: started on a free loopback port in a directory of
its own, with AOF on (``appendfsync always``), and stopped, paused or restarted at will.

Tests that need Redis take the ``redis_url`` fixture (tests/conftest.py): the server named by
``TRIO_RUNS_TEST_REDIS_URL`` (``.ci/run`` starts one), else one of these for the session.
Without ``redis-server`` they are skipped with the reason — except where
``TRIO_RUNS_REQUIRE_REDIS=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ports import free_port

BINARY = shutil.which("redis-server")
STARTUP_TIMEOUT = 20.0


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; every method bounds its own wait."""

    def __init__(self, directory: Path, *, aof: bool = True, port: int | None = None) -> None:
        if BINARY is None:
            raise RuntimeError("redis-server is not installed")
        self.directory = directory
        self.aof = aof
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert BINARY is not None
        args = [
            BINARY,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """SIGKILL and start again on the same port and files (AOF replays what it had)."""
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def required() -> bool:
    """Whether a missing Redis fails the tests (CI) instead of skipping them."""
    return os.environ.get("TRIO_RUNS_REQUIRE_REDIS", "") == "1"


# -- fixtures (imported by the test modules that need Redis) -------------------------------

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis to test against: ``TRIO_RUNS_TEST_REDIS_URL``, else a private ``redis-server``
    for the session; skipped without one (a failure where ``TRIO_RUNS_REQUIRE_REDIS=1``)."""
    given = os.environ.get("TRIO_RUNS_TEST_REDIS_URL", "")
    if given:
        yield given
        return
    if BINARY is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if required():
            pytest.fail(f"{reason}, and TRIO_RUNS_REQUIRE_REDIS=1")
        pytest.skip(reason)
    with RedisServer(tmp_path_factory.mktemp("redis"), aof=False) as server:
        yield server.url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` (AOF on) this test may pause, kill and restart."""
    if BINARY is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if required():
            pytest.fail(f"{reason}, and TRIO_RUNS_REQUIRE_REDIS=1")
        pytest.skip(reason)
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for this test: its keys never meet another test's."""
    return "t" + uuid.uuid4().hex[:16]
