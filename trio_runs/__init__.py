"""trio-runs: every accepted run ends in exactly one terminal ``RunComplete``.

Completed, failed or cancelled, and every waiter for that run id observes it, in bounded
time, exactly once: when the run fails before it starts, is cancelled while queued or just
after being accepted, when live events are dropped under load, when the waiter arrives late,
and when the workspace shuts down. Cancellation is never reported as an error.
"""

from __future__ import annotations

from ._histogram import Histogram
from .backend import Backend, BackendStatistics, CoordinatorFactory, Workspace, open_backend
from .broker import Broker, BrokerStatistics, Subscription
from .context import (
    RunCompleteMarker,
    current_run_id,
    mark_run_complete_published,
    run_complete_published,
    with_run_complete_marker,
    with_run_id,
)
from .coordinator import (
    AcceptedRun,
    AfterCrash,
    Agent,
    Coordinator,
    CoordinatorStatistics,
    Prepare,
    Reservation,
    RetryPolicy,
    RunContext,
    SessionCoordinator,
    SupportsAfterCrash,
    SupportsCancelRun,
    SupportsDeadlines,
    SupportsLaneQueries,
    SupportsStatistics,
    new_run_id,
)
from .errors import (
    AgentNotInitialized,
    BackendClosed,
    DuplicateRun,
    EmptyPrompt,
    InvalidRunId,
    InvalidSessionId,
    NotSupported,
    RedisUnavailable,
    SessionMissing,
    StoreError,
    SubscriberOverflow,
    TrioRunsError,
    UnknownRun,
    WorkspaceClosing,
    WorkspaceNotFound,
)
from .events import (
    AgentMessage,
    Attachment,
    Event,
    EventType,
    Notification,
    NotificationType,
    RunCall,
    RunComplete,
    RunProgress,
)
from .ledger import LedgerStatistics, RunLedger, RunStore, SupportsRerun

__version__ = "0.1.0"

__all__ = [
    "AcceptedRun",
    "AfterCrash",
    "Agent",
    "AgentMessage",
    "AgentNotInitialized",
    "Attachment",
    "Backend",
    "BackendClosed",
    "BackendStatistics",
    "Broker",
    "BrokerStatistics",
    "Coordinator",
    "CoordinatorFactory",
    "CoordinatorStatistics",
    "DuplicateRun",
    "EmptyPrompt",
    "Event",
    "EventType",
    "Histogram",
    "InvalidRunId",
    "InvalidSessionId",
    "LedgerStatistics",
    "NotSupported",
    "Notification",
    "NotificationType",
    "Prepare",
    "RedisUnavailable",
    "Reservation",
    "RetryPolicy",
    "RunCall",
    "RunComplete",
    "RunCompleteMarker",
    "RunContext",
    "RunLedger",
    "RunProgress",
    "RunStore",
    "SessionCoordinator",
    "SessionMissing",
    "StoreError",
    "SubscriberOverflow",
    "Subscription",
    "SupportsAfterCrash",
    "SupportsCancelRun",
    "SupportsDeadlines",
    "SupportsLaneQueries",
    "SupportsRerun",
    "SupportsStatistics",
    "TrioRunsError",
    "UnknownRun",
    "Workspace",
    "WorkspaceClosing",
    "WorkspaceNotFound",
    "__version__",
    "current_run_id",
    "mark_run_complete_published",
    "new_run_id",
    "open_backend",
    "run_complete_published",
    "with_run_complete_marker",
    "with_run_id",
]
