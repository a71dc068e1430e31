"""Node leases: which nodes are alive, and ending the runs of those that are not.

Every node process holds a *lease*: a Redis key with a TTL (``lease_ttl``, 10 s by default)
that it renews every ``lease_ttl / 3`` seconds. A lease that expires is gone for good: a
heartbeat only extends a lease that still exists, so a node that was stopped past its TTL
(SIGSTOP, a long pause, a partition) comes back *fenced*: every write it made under the old
lease is refused by Redis (and counted), and it carries on under a fresh *incarnation* — a
new node id and lease — for new work only.

Recovery: each heartbeat, a node also sweeps for incarnations whose lease is gone, declares
them dead, and gives each of their pending runs one abandoned terminal
(``RunComplete(..., abandoned=True)``), in one Lua step per sweep, so a dead node's runs
end within ``lease_ttl`` plus one heartbeat interval of its last heartbeat (plus the sweep
itself), and two sweeping nodes never end the same run twice. Right after Redis restarts,
every lease has expired: nobody sweeps until Redis has been up for 1.5 TTLs, so live nodes
take their leases back first (a lease that expired with its node never declared dead is
taken back, not fenced).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any, cast

import attrs
import coredis

from . import _scripts

__all__ = [
    "ABANDONED_ERROR",
    "DEFAULT_LEASE_TTL",
    "MAX_EXECUTIONS",
    "NodeLease",
    "RetentionLimits",
]

DEFAULT_LEASE_TTL = 10.0
"""Seconds a node's lease lives without a heartbeat (heartbeats come every third of it)."""

ABANDONED_ERROR = "abandoned: the node running it stopped (its lease expired)"

MAX_EXECUTIONS = 3
"""How many times a routed run of a workspace that reruns crashed runs may start, in all:
its node's death puts it back in its lane until then, and ends it abandoned after (a run
that kills every node it runs on must not take the cluster down one node at a time)."""
"""The ``error`` of a terminal given by recovery."""


def _positive(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen(kw_only=True)
class RetentionLimits:
    """How many terminals Redis keeps for late waiters: by count, by bytes and by age.

    The oldest terminals go first once any bound is passed; the terminal stream keeps about
    ``count`` entries. A run id stays taken (``DuplicateRun``) while its terminal is kept.
    """

    count: int = attrs.field(default=100_000, validator=_positive)
    bytes: int = attrs.field(default=256 * 1024 * 1024, validator=_positive)
    age: float = attrs.field(default=7 * 24 * 3600.0, validator=_positive)
    """Seconds."""

    def wire(self) -> dict[str, int]:
        """The limits as the Lua scripts take them."""
        return {
            "count": int(self.count),
            "bytes": int(self.bytes),
            "age": int(self.age * 1000),
            "stream": int(self.count),
        }


def _new_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class NodeLease:
    """This process's lease in Redis: its current node id, and the calls that keep it.

    Not a task of its own: the store's heartbeat loop calls :meth:`heartbeat` and
    :meth:`recover`. Every method is one bounded Redis call (the client's timeout) and
    raises the client's errors when Redis does not answer; a cancelled call changes nothing
    that a retry would not redo.
    """

    def __init__(
        self, client: coredis.Redis[str], prefix: str, ttl: float = DEFAULT_LEASE_TTL
    ) -> None:
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not ttl > 0:
            raise ValueError(f"lease_ttl must be a positive number, got {ttl!r}")
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl * 1000))
        self._node_id = _new_node_id()
        self._registered = False
        self._incarnations = 0
        self._register = client.register_script(_scripts.REGISTER)
        self._heartbeat = client.register_script(_scripts.HEARTBEAT)
        self._release = client.register_script(_scripts.RELEASE)
        self._recover = client.register_script(_scripts.RECOVER)

    @property
    def node_id(self) -> str:
        """The current incarnation's id (a new one after this process was fenced)."""
        return self._node_id

    @property
    def ttl(self) -> float:
        """Seconds the lease lives without a heartbeat."""
        return self._ttl_ms / 1000

    @property
    def ttl_ms(self) -> int:
        """The TTL in milliseconds, as the Lua scripts take it."""
        return self._ttl_ms

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: a third of the TTL."""
        return self.ttl / 3

    @property
    def registered(self) -> bool:
        """Whether the current incarnation's lease was taken in Redis."""
        return self._registered

    @property
    def incarnations(self) -> int:
        """How many leases this process has taken (one more after each fencing)."""
        return self._incarnations

    async def ensure_registered(self) -> None:
        """Take the current incarnation's lease if it was not taken yet."""
        if self._registered:
            return
        taken: object = await self._register(args=[self._prefix, self._node_id, self._ttl_ms])
        if not taken:  # a lease with this id already exists: never ours to reuse
            self.renew_identity()
            taken = await self._register(args=[self._prefix, self._node_id, self._ttl_ms])
        self._registered = bool(taken)
        self._incarnations += 1

    async def heartbeat(self) -> bool:
        """Extend the lease; ``False`` if this incarnation was declared dead (fenced).

        A lease that expired without the node being declared dead (Redis restarted, or no
        node swept meanwhile) is taken again: none of its runs was ended for it.
        """
        alive: object = await self._heartbeat(args=[self._prefix, self._node_id, self._ttl_ms])
        return bool(alive)

    def renew_identity(self) -> str:
        """Give up the current (expired) identity for a fresh one; returns the old id.

        Synchronous, so that nothing is written under the old id once it is known to be
        fenced; the new lease is taken by the next :meth:`ensure_registered`.
        """
        old = self._node_id
        self._node_id = _new_node_id()
        self._registered = False
        return old

    async def release(self) -> None:
        """Drop the lease now (a graceful exit): runs still owned are recovered at once."""
        if self._registered:
            await self._release(args=[self._prefix, self._node_id])
            self._registered = False

    async def recover(self, limits: RetentionLimits, max_runs: int = 1000) -> list[str]:
        """Declare dead every incarnation whose lease expired; end their runs abandoned.

        Returns the ids of the runs ended by this call (at most ``max_runs``). Does nothing
        until Redis has been up for one and a half TTLs: after a Redis restart every lease
        has expired, and live nodes get that long to take theirs back before anyone is
        declared dead.
        """
        info = cast(dict[str, object], await self._client.info("server"))
        uptime = info.get("uptime_in_seconds")
        if not isinstance(uptime, int | float | str) or float(uptime) < 1.5 * self.ttl:
            return []
        payload = json.dumps(
            {
                "limits": limits.wire(),
                "error": ABANDONED_ERROR,
                "max": max_runs,
                "executions": MAX_EXECUTIONS,
            }
        )
        done: object = await self._recover(args=[self._prefix, payload])
        return [str(run_id) for run_id in cast(list[object], done or [])]
