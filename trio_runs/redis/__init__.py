"""Scale out on Redis: many nodes, one guarantee (DESIGN.md, "Distribution (Redis)").

Every node runs the same ``Backend``; the store is Redis-backed (:func:`open_redis_store`),
node leases (:mod:`trio_runs.redis.lease`) turn a node's death into an ending for each
of its runs, and :mod:`trio_runs.redis.cluster` keeps each session's lane in Redis, so that
any node accepts a run and any node with room runs it, one run per session at a time.
Needs the ``redis`` extra (``coredis``).
"""

from __future__ import annotations

from .cluster import DEFAULT_CAPACITY, ClusterCoordinator, ClusterNode, ClusterNodeStatistics
from .lease import ABANDONED_ERROR, DEFAULT_LEASE_TTL, MAX_EXECUTIONS, NodeLease, RetentionLimits
from .store import ClaimedRun, RedisStore, RedisStoreStatistics, open_redis_store

__all__ = [
    "ABANDONED_ERROR",
    "DEFAULT_CAPACITY",
    "DEFAULT_LEASE_TTL",
    "MAX_EXECUTIONS",
    "ClaimedRun",
    "ClusterCoordinator",
    "ClusterNode",
    "ClusterNodeStatistics",
    "NodeLease",
    "RedisStore",
    "RedisStoreStatistics",
    "RetentionLimits",
    "open_redis_store",
]
