"""Ports for test servers that are restarted on the same port (private to the tests)."""

from __future__ import annotations

import contextlib
import random
import socket


def free_port() -> int:
    """A free port *below* the kernel's ephemeral range. The server is restarted on the same
    port; a port from the ephemeral range could meanwhile be handed to some other socket as
    its source port (other tests connect all the time), and the restart could not bind."""
    low = 32768
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/sys/net/ipv4/ip_local_port_range") as ranges,
    ):
        low = int(ranges.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")
