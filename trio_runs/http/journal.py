"""A workspace's event journal: every event it publishes, numbered, the newest kept for replay.

The workspace's brokers deliver only to subscribers that exist when an event is published;
a client whose connection drops misses what happened meanwhile, and a client that arrives
late sees nothing of what came before. The journal is the one subscriber that is always
there: it gives each event (progress, notification, terminal) the next id of the workspace
(1, 2, 3, ... for the workspace's whole life, never reused), keeps the newest ``window``
events (at most ``window_bytes`` of encoded data, the newest one always), and hands each
on to its own live broker, which the event streams read. A stream that resumes after an id
(SSE ``Last-Event-ID``) replays what is still held after it, then goes live; one that
resumes from before the window is told so (:attr:`Replay.first_id`) instead of getting a
silent hole.

Ordering: a terminal is numbered only after every progress and notification its workspace
published before it, so a run's progress always has smaller ids than its terminal.

Delivery to readers keeps the brokers' rules: progress and notifications are lossy for a
reader that falls behind, terminals are must-deliver up to the workspace's ``max_backlog``
(past it the reader is disconnected, loudly). The journal's own tasks live in the
``open_journal`` block and end when the workspace's brokers shut down (the workspace
closed): nothing of it outlives its workspace.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, Protocol

import attrs
import msgspec
import trio

from .._encoding import checked_terminal, json_problem
from ..broker import Broker, Subscription
from ..errors import SubscriberOverflow
from ..events import EventType, RunComplete

__all__ = [
    "DEFAULT_EVENT_WINDOW",
    "DEFAULT_WINDOW_BYTES",
    "EntryKind",
    "Journal",
    "JournalEntry",
    "JournalStatistics",
    "Replay",
    "open_journal",
]

logger = logging.getLogger("trio_runs.http")

DEFAULT_EVENT_WINDOW: Final = 1024
"""How many of a workspace's newest events are held for replay, unless told otherwise."""

DEFAULT_WINDOW_BYTES: Final = 32 * 1024 * 1024
"""How many bytes of encoded event data a workspace's window holds at most (32 MiB); the
newest event is held whatever its size."""

EntryKind = Literal["progress", "notification", "run_complete", "error"]


@attrs.frozen(slots=True)
class JournalEntry:
    """One numbered event: its SSE ``id``, ``event`` name and JSON ``data``.

    ``id`` is 0 only for an ``error`` entry, which is never held nor replayed: it tells the
    live readers that the journal itself fell behind (see :class:`Journal`).
    """

    id: int
    kind: EntryKind
    run_id: str | None
    session_id: str | None
    data: bytes
    """The event's data as compact JSON (UTF-8)."""

    @property
    def size(self) -> int:
        """Bytes this entry counts against the window's byte bound."""
        return len(self.data)


@attrs.frozen(slots=True)
class Replay:
    """What a reader resuming after an id gets: the held entries after it, in id order.

    ``first_id`` is set when events after the resume point are no longer held (they fell
    out of the window): the first id the journal still holds (or will give next, if it holds
    nothing). ``None``: nothing was missed.
    """

    entries: tuple[JournalEntry, ...]
    first_id: int | None
    after: int
    """The id live events continue after (a live entry up to it was replayed, or is older)."""


@attrs.frozen(slots=True)
class JournalStatistics:
    """A snapshot of a :class:`Journal`, from :meth:`Journal.statistics`."""

    last_id: int
    """The id of the newest event (0: none yet)."""
    held: int
    """Events held for replay."""
    held_bytes: int
    """Bytes of encoded data held."""
    window: int
    """The count bound (a construction-time setting)."""
    window_bytes: int
    """The byte bound (a construction-time setting)."""
    readers: int
    """Live readers subscribed now."""


class WorkspaceBrokers(Protocol):
    """What a journal reads of a workspace: its id and three brokers."""

    @property
    def id(self) -> str: ...

    @property
    def run_completions(self) -> Broker[Any]: ...

    @property
    def notifications(self) -> Broker[Any]: ...

    @property
    def events(self) -> Broker[Any]: ...


# msgspec encodes an event about 13 times faster than json.dumps (about 1 us against 11 for a
# small progress event), and the journal encodes every event once, readers or not.
_ENCODER: Final = msgspec.json.Encoder()


def _encode(kind: EntryKind, payload: object) -> bytes | None:
    # Never raises: the journal's tasks must not die of one odd value. Nothing is converted
    # either (no repr, no str): the library refuses a value that is not JSON at emit and at
    # the terminal, so what still is not here came from a coordinator publishing on the
    # brokers itself. A terminal is then shown as the failed terminal the stores record for
    # it; a lossy event (progress, notification) is dropped, and the drop logged.
    if kind == "run_complete" and isinstance(payload, RunComplete):
        payload = checked_terminal(payload)
    try:
        to_dict: Callable[[], dict[str, Any]] | None = getattr(payload, "to_dict", None)
        data = to_dict() if to_dict is not None else {"payload": payload}
    except Exception:
        logger.warning("dropped a %s event that cannot be shown as JSON", kind, exc_info=True)
        return None
    problem = json_problem(data)
    if problem is not None:
        logger.warning(
            "dropped a %s event of run %s: it is not a JSON value (%s)",
            kind,
            getattr(payload, "run_id", None),
            problem,
        )
        return None
    return _ENCODER.encode(data)


def _check_bound(name: str, value: object) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Journal:
    """The numbered events of one workspace and the newest ones held for replay.

    Made by :func:`open_journal`. :meth:`append` is synchronous and never blocks (it runs
    from the journal's own tasks); :attr:`live` is the broker readers subscribe to, *before*
    calling :meth:`replay`, so that what they replay and what they then receive live meet
    without a gap (an entry in both is recognised by its id).
    """

    def __init__(
        self,
        workspace_id: str,
        *,
        window: int = DEFAULT_EVENT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        buffer_size: int = 4096,
        max_backlog: int = 65536,
    ) -> None:
        self.workspace_id = workspace_id
        """The id of the workspace whose events these are."""
        self._window = _check_bound("window", window)
        self._window_bytes = _check_bound("window_bytes", window_bytes)
        self._held: deque[JournalEntry] = deque()
        self._held_bytes = 0
        self._last_id = 0
        # Events before this id are known to be incomplete (the journal fell behind once):
        # a reader resuming from before it is told, as if they had left the window.
        self._horizon = 1
        self.live: Broker[JournalEntry] = Broker(
            buffer_size=min(buffer_size, max_backlog), max_backlog=max_backlog
        )
        """The readers' broker: progress and notifications lossy, terminals must-deliver."""
        self._ended = trio.Event()

    @property
    def last_id(self) -> int:
        """The id of the newest event (0 before the first)."""
        return self._last_id

    @property
    def ended(self) -> bool:
        """Whether the journal took its last event (its workspace closed, or it was stopped)."""
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        """Wait until :attr:`ended`; cancelling the wait changes nothing."""
        await self._ended.wait()

    def _end(self) -> None:
        # Idempotent: the readers' broker ends (each reader drains what it has, then ends).
        self.live.shutdown()
        self._ended.set()

    def statistics(self) -> JournalStatistics:
        """A frozen snapshot of the journal."""
        return JournalStatistics(
            last_id=self._last_id,
            held=len(self._held),
            held_bytes=self._held_bytes,
            window=self._window,
            window_bytes=self._window_bytes,
            readers=self.live.subscriber_count,
        )

    def append(self, kind: EntryKind, payload: object) -> JournalEntry | None:
        """Number ``payload`` as the workspace's next event, hold it, and hand it to readers.

        The oldest held events are let go while more than ``window`` are held or their
        data exceeds ``window_bytes`` (the newest is always held). Never blocks. A lossy
        event whose payload is not a JSON value is dropped (logged), never converted:
        ``None``, and no id is used up.
        """
        data = _encode(kind, payload)
        if data is None:
            return None
        self._last_id += 1
        entry = JournalEntry(
            id=self._last_id,
            kind=kind,
            run_id=getattr(payload, "run_id", None),
            session_id=getattr(payload, "session_id", None),
            data=data,
        )
        held = self._held
        held.append(entry)
        self._held_bytes += entry.size
        while len(held) > self._window or (self._held_bytes > self._window_bytes and len(held) > 1):
            self._held_bytes -= held.popleft().size
        if kind == "run_complete":
            self.live.publish_must_deliver(EventType.CREATED, entry)
        else:
            self.live.publish(EventType.CREATED, entry)
        return entry

    def holds_run(self, run_id: str) -> bool:
        """Whether any held event is of this run."""
        return any(entry.run_id == run_id for entry in self._held)

    def replay(self, last_event_id: int) -> Replay:
        """The held entries with an id above ``last_event_id``, and whether some are missing.

        An id above :attr:`last_id` was never sent on this workspace (the client got it
        elsewhere): it is answered as one from before the window, with everything held and
        a gap, never by skipping the events that will get those ids.
        """
        held = self._held
        first = max(held[0].id if held else self._last_id + 1, self._horizon)
        if last_event_id > self._last_id:
            return Replay(tuple(held), first, self._last_id)
        entries = tuple(entry for entry in held if entry.id > last_event_id)
        return Replay(entries, first if last_event_id + 1 < first else None, last_event_id)

    def _fell_behind(self, error: SubscriberOverflow) -> None:
        # The journal's own subscription to the terminals overflowed: terminals were lost
        # before they got ids. Nothing held can be trusted to be complete any more, so a
        # resume from before now is a gap, and every live reader is disconnected loudly.
        logger.error("event journal of workspace %s fell behind: %s", self.workspace_id, error)
        self._held.clear()
        self._held_bytes = 0
        self._horizon = self._last_id + 1
        data = json.dumps({"error": {"code": "subscriber_overflow", "message": str(error)}})
        entry = JournalEntry(id=0, kind="error", run_id=None, session_id=None, data=data.encode())
        self.live.publish_must_deliver(EventType.CREATED, entry)


def _drain(journal: Journal, subscription: Subscription[Any], kind: EntryKind) -> None:
    # Take what is already queued, without waiting (the lossy lanes never overflow).
    while True:
        try:
            event = subscription.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, SubscriberOverflow):
            return
        journal.append(kind, event.payload)


async def _pump_lossy(journal: Journal, subscription: Subscription[Any], kind: EntryKind) -> None:
    # Never holds an event across a checkpoint (``async for`` would: it yields after taking
    # one), so that a terminal's task, draining this queue, numbers every event published
    # before the terminal ahead of it. receive() is only called on an empty queue: it parks,
    # and hands over what woke it without yielding again.
    while True:
        _drain(journal, subscription, kind)
        try:
            event = await subscription.receive()
        except trio.EndOfChannel:
            return
        journal.append(kind, event.payload)


@asynccontextmanager
async def open_journal(
    workspace: WorkspaceBrokers,
    *,
    window: int = DEFAULT_EVENT_WINDOW,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
) -> AsyncIterator[Journal]:
    """Journal ``workspace``'s events from now on, inside this block.

    Subscribed to the workspace's brokers before the block's body runs: every event they
    publish afterwards is numbered. Once the workspace's brokers shut down (the workspace
    closed) and its last events are numbered, the readers' broker is shut down too, so each
    reader gets what is queued for it and then its end; leaving the block waits for that.
    Cancelled, the journal stops at once and its readers end the same way. Readers get the
    workspace's own lossy buffer and must-deliver backlog bounds.
    """
    journal = Journal(
        workspace.id,
        window=window,
        window_bytes=window_bytes,
        buffer_size=int(min(workspace.events.buffer_size, 1 << 30)),
        max_backlog=int(min(workspace.run_completions.max_backlog, 1 << 30)),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_pump, journal, workspace)
            yield journal
    finally:
        journal._end()


async def _pump(
    journal: Journal,
    workspace: WorkspaceBrokers,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Numbers the workspace's events until its brokers shut down, then ends the readers'.
    try:
        async with (
            workspace.events.subscribe() as progress,
            workspace.notifications.subscribe() as notifications,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_pump_lossy, journal, progress, "progress")
            nursery.start_soon(_pump_lossy, journal, notifications, "notification")
            await nursery.start(_pump_terminals, journal, workspace, progress, notifications)
            task_status.started()
    finally:
        journal._end()


async def _pump_terminals(
    journal: Journal,
    workspace: WorkspaceBrokers,
    progress: Subscription[Any],
    notifications: Subscription[Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    first = True
    while True:
        try:
            async with workspace.run_completions.subscribe() as completions:
                if first:
                    first = False
                    task_status.started()
                async for event in completions:
                    # Everything published before this terminal is numbered before it.
                    _drain(journal, progress, "progress")
                    _drain(journal, notifications, "notification")
                    journal.append("run_complete", event.payload)
            return
        except SubscriberOverflow as exc:
            journal._fell_behind(exc)  # then subscribe again: the journal goes on
