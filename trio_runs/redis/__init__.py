"""Scale out on Redis: many nodes, one guarantee (DESIGN.md, "Distribution (Redis)").

Every node runs the same ``Backend``; the store is Redis-backed (:func:`open_redis_store`),
and node leases (:mod:`trio_runs.redis.lease`) turn a node's death into an ending for each
of its runs. Needs the ``redis`` extra (``coredis``).
"""

from __future__ import annotations

from .lease import ABANDONED_ERROR, DEFAULT_LEASE_TTL, NodeLease, RetentionLimits
from .store import RedisStore, RedisStoreStatistics, open_redis_store

__all__ = [
    "ABANDONED_ERROR",
    "DEFAULT_LEASE_TTL",
    "NodeLease",
    "RedisStore",
    "RedisStoreStatistics",
    "RetentionLimits",
    "open_redis_store",
]
