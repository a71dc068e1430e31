"""``Broker[T]``: in-process fan-out with a lossy lane and a must-deliver lane.

Publishing is synchronous on purpose. Terminal events are published from ``finally`` blocks
and from cancelled scopes, where any ``await`` would raise ``trio.Cancelled``; a sync publish
that never blocks can always run. The two lanes share one ordered queue per subscriber, so a
subscriber sees lossy and must-deliver events in the order they were published.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Generic, TypeVar

import attrs
import trio

from .errors import SubscriberOverflow
from .events import Event, EventType

__all__ = ["Broker", "BrokerStatistics", "Subscription"]

T = TypeVar("T")

_NEW, _OPEN, _CLOSED = 0, 1, 2


@attrs.frozen(kw_only=True)
class BrokerStatistics:
    """A snapshot of a :class:`Broker`, from :meth:`Broker.statistics`."""

    subscribers: int
    """Subscriptions currently registered."""
    backlog: int
    """Events queued for subscribers and not yet received, summed over subscribers."""
    drops: int
    """Lossy events dropped for full subscribers, ever."""
    overflows: int
    """Subscribers disconnected for exceeding ``max_backlog``, ever."""
    buffer_size: int | float
    """The lossy lane's per-subscriber limit (a construction-time setting)."""
    max_backlog: int | float
    """The must-deliver lane's per-subscriber limit (a construction-time setting)."""
    shut_down: bool
    """Whether :meth:`Broker.shutdown` was called."""


class Subscription(Generic[T]):
    """One subscriber's ordered queue of events; an async iterator and async context manager.

    Obtained from :meth:`Broker.subscribe`. Receiving ends (``StopAsyncIteration`` /
    ``trio.EndOfChannel``) only after every event queued before :meth:`Broker.shutdown` was
    delivered. A subscriber that overflowed ``max_backlog`` gets ``SubscriberOverflow`` from
    its next receive, never a silent gap. Leaving the ``async with`` block unsubscribes; a
    subscriber cancelled while receiving loses nothing and leaks nothing.
    """

    __slots__ = ("_broker", "_ended", "_overflow", "_queue", "_state", "_waiter", "dropped")

    def __init__(self, broker: Broker[T]) -> None:
        self._broker = broker
        self._queue: deque[Event[T]] = deque()
        self._waiter: trio.lowlevel.Task | None = None
        self._ended = False  # the broker shut down: end after draining
        self._state = _NEW
        self._overflow: SubscriberOverflow | None = None
        self.dropped = 0
        """Lossy events dropped for this subscriber because its buffer was full."""

    @property
    def backlog(self) -> int:
        """Events queued for this subscriber and not yet received."""
        return len(self._queue)

    # -- broker side -------------------------------------------------------------------

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _end(self) -> None:
        self._ended = True
        self._wake()

    # -- subscriber side ---------------------------------------------------------------

    def receive_nowait(self) -> Event[T]:
        """The next event, without waiting.

        Raises ``trio.WouldBlock`` when none is queued, ``trio.EndOfChannel`` once the broker
        shut down and the queue is drained, ``SubscriberOverflow`` after an overflow and
        ``trio.ClosedResourceError`` after unsubscribing.
        """
        if self._state != _OPEN:
            if self._state == _NEW:
                raise RuntimeError("enter the subscription first: async with broker.subscribe()")
            raise trio.ClosedResourceError("this subscription was closed")
        if self._overflow is not None:
            raise self._overflow
        if self._queue:
            return self._queue.popleft()
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> Event[T]:
        """Wait for the next event; the same endings as :meth:`receive_nowait`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            value = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        while True:
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already receiving here")
            self._waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                # Cancelled while parked: nothing was taken from the queue, so nothing is lost.
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            # Parking was this call's schedule point and cancel point, so what woke us is
            # handed over now, as a memory channel does: yielding a second time would cost
            # every event a whole extra scheduler pass before its subscriber sees it.
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue  # taken by a receive_nowait() elsewhere in the meantime: park again

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> Event[T]:
        if self._queue and self._state == _OPEN and self._overflow is None:
            # receive()'s path when an event is waiting, inlined: ``async for`` is how most
            # subscribers consume, and a coroutine frame less per event is measurable.
            await trio.lowlevel.checkpoint_if_cancelled()
            value = self._queue.popleft()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def payloads(self) -> AsyncIterator[T]:
        """The events' payloads alone, in order: ``async for progress in sub.payloads():``.

        An :class:`Event` is an envelope (``type``, ``payload``); on ``workspace.events`` its
        payload is a :class:`RunProgress`, whose own ``payload`` is what the agent emitted.
        Iterating this skips the envelope, so ``progress.payload`` is the agent's value
        (instead of ``event.payload.payload``). Same endings, and the same promise when
        cancelled, as iterating the subscription itself.
        """
        return _Payloads(self)

    def close(self) -> None:
        """Unsubscribe now: queued events are discarded and receiving raises afterwards."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._queue.clear()
        self._broker._subscribers.pop(self, None)
        self._wake()

    async def __aenter__(self) -> Subscription[T]:
        if self._state != _NEW:
            raise RuntimeError("a subscription can be entered only once")
        self._state = _OPEN
        broker = self._broker
        if broker._shut_down:
            self._ended = True
        else:
            broker._subscribers[self] = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Payloads(Generic[T]):
    __slots__ = ("_subscription",)

    def __init__(self, subscription: Subscription[T]) -> None:
        self._subscription = subscription

    def __aiter__(self) -> _Payloads[T]:
        return self

    async def __anext__(self) -> T:
        event = await self._subscription.__anext__()
        return event.payload


class Broker(Generic[T]):
    """Fan-out of ``Event[T]`` to every current subscriber, in publish order.

    :meth:`publish` is lossy: when a subscriber already holds ``buffer_size`` undelivered
    events the event is dropped for that subscriber only and counted. :meth:`publish_must_deliver`
    never blocks and never drops for a live subscriber; a subscriber whose backlog would exceed
    ``max_backlog`` is disconnected loudly (``SubscriberOverflow``) instead. Neither ever awaits.
    """

    __slots__ = (
        "_buffer_size",
        "_drop_count",
        "_max_backlog",
        "_overflow_count",
        "_shut_down",
        "_subscribers",
    )

    def __init__(self, buffer_size: int = 4096, max_backlog: int = 65536) -> None:
        if not _positive_int(buffer_size):
            raise ValueError(f"buffer_size must be a positive int or math.inf, got {buffer_size!r}")
        if not _positive_int(max_backlog):
            raise ValueError(f"max_backlog must be a positive int or math.inf, got {max_backlog!r}")
        if max_backlog < buffer_size:
            raise ValueError(
                f"max_backlog ({max_backlog}) must be at least buffer_size ({buffer_size})"
            )
        self._buffer_size: int | float = buffer_size
        self._max_backlog: int | float = max_backlog
        self._drop_count = 0
        self._overflow_count = 0
        # A dict keeps insertion order (fair, deterministic fan-out) with O(1) removal.
        self._subscribers: dict[Subscription[T], None] = {}
        self._shut_down = False

    @property
    def buffer_size(self) -> int | float:
        """How many undelivered events a subscriber may hold before lossy ones are dropped."""
        return self._buffer_size

    @property
    def max_backlog(self) -> int | float:
        """How many undelivered events a subscriber may hold before it is disconnected."""
        return self._max_backlog

    @property
    def drop_count(self) -> int:
        """Lossy events dropped, summed over subscribers."""
        return self._drop_count

    @property
    def overflow_count(self) -> int:
        """Subscribers disconnected for exceeding ``max_backlog``."""
        return self._overflow_count

    def statistics(self) -> BrokerStatistics:
        """A frozen snapshot of the broker's counters and settings."""
        return BrokerStatistics(
            subscribers=len(self._subscribers),
            backlog=sum(len(sub._queue) for sub in self._subscribers),
            drops=self._drop_count,
            overflows=self._overflow_count,
            buffer_size=self._buffer_size,
            max_backlog=self._max_backlog,
            shut_down=self._shut_down,
        )

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions are currently registered."""
        return len(self._subscribers)

    @property
    def is_shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shut_down

    def subscribe(self) -> Subscription[T]:
        """A subscription to use as ``async with broker.subscribe() as subscription:``.

        It is registered when the block is entered (no await happens before that, so nothing
        published afterwards is missed) and unregistered when the block is left, however it
        is left. On a broker that was shut down it is ended from the start.
        """
        return Subscription(self)

    def publish(self, type: EventType, payload: T) -> None:
        """Deliver to every subscriber with room; drop (and count) for any that is full.

        Never blocks, never raises for a slow subscriber; a no-op after shutdown.
        """
        if not self._subscribers:
            return
        # The Event is made only once a subscriber has room for it: under a flood most
        # publishes find every buffer full, and then cost no allocation at all.
        event: Event[T] | None = None
        limit = self._buffer_size
        dropped = 0
        for sub in self._subscribers:
            queue = sub._queue
            if len(queue) >= limit:
                sub.dropped += 1
                dropped += 1
                continue
            if event is None:
                event = Event(type, payload)
            queue.append(event)
            if sub._waiter is not None:
                sub._wake()
        if dropped:
            self._drop_count += dropped

    def publish_must_deliver(self, type: EventType, payload: T) -> None:
        """Queue for every subscriber, past ``buffer_size`` if need be, in publish order.

        Never blocks and never drops for a live subscriber. A subscriber whose backlog would
        exceed ``max_backlog`` is disconnected and told so by its next receive
        (``SubscriberOverflow``). A no-op after shutdown.
        """
        if not self._subscribers:
            return
        event = Event(type, payload)
        limit = self._max_backlog
        # Made only when a subscriber overflows (rare): not a list per terminal.
        overflowed: list[Subscription[T]] | None = None
        for sub in self._subscribers:
            queue = sub._queue
            if len(queue) >= limit:
                if overflowed is None:
                    overflowed = []
                overflowed.append(sub)
                continue
            queue.append(event)
            if sub._waiter is not None:
                sub._wake()
        if overflowed is not None:
            for sub in overflowed:
                self._overflow(sub)

    def _overflow(self, sub: Subscription[T]) -> None:
        backlog = len(sub._queue) + 1
        sub._overflow = SubscriberOverflow(backlog, int(self._max_backlog))
        sub._queue.clear()
        del self._subscribers[sub]
        self._overflow_count += 1
        sub._wake()

    def shutdown(self) -> None:
        """End every subscription once it has drained what is queued; later publishes no-op.

        Idempotent. Subscriptions made after this are ended from the start.
        """
        self._shut_down = True
        subscribers = list(self._subscribers)
        self._subscribers.clear()
        for sub in subscribers:
            sub._end()

    def __repr__(self) -> str:
        return (
            f"<Broker subscribers={self.subscriber_count} buffer_size={self.buffer_size} "
            f"max_backlog={self.max_backlog} drops={self.drop_count} "
            f"overflows={self.overflow_count}{' shut down' if self._shut_down else ''}>"
        )


def _positive_int(value: object) -> bool:
    if value == math.inf:
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
