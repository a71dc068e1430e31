"""Tests for ``trio_runs.broker``: one test per promise of ``Broker`` and ``Subscription``.

Promises (DESIGN.md "Broker" and broker.py docstrings): ``subscribe()`` is an async context
manager yielding an async iterator, registered on entry and unregistered on exit however the
block is left (also on cancellation: nothing leaks, nothing is lost); ``publish`` is sync and
lossy per subscriber at ``buffer_size``; ``publish_must_deliver`` is sync, queues past
``buffer_size`` in order with lossy events and never drops, disconnecting a subscriber loudly
(``SubscriberOverflow``) past ``max_backlog``; ``shutdown`` drains then ends; receiving
rules (one receiver at a time, enter first); constructor validation.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_runs import Broker, Event, EventType, SubscriberOverflow

C = EventType.CREATED
U = EventType.UPDATED


def payloads(sub: Any) -> list[Any]:
    """Drain everything currently queued for ``sub`` without waiting."""
    out = []
    while True:
        try:
            out.append(sub.receive_nowait().payload)
        except trio.WouldBlock:
            return out


# -- subscribe ----------------------------------------------------------------------------


async def test_subscribe_is_an_async_context_manager_yielding_an_async_iterator(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``subscribe()`` returns an async context manager whose value is an async iterator of
    ``Event``\\ s; ``async for`` yields them in publish order."""
    broker: Broker[int] = Broker()
    cm = broker.subscribe()
    assert hasattr(cm, "__aenter__")
    assert hasattr(cm, "__aexit__")
    with trio.fail_after(10):
        async with cm as sub:
            assert hasattr(sub, "__aiter__")
            assert hasattr(sub, "__anext__")
            broker.publish(C, 1)
            broker.publish_must_deliver(U, 2)
            broker.shutdown()
            got = [event async for event in sub]
    assert got == [Event(C, 1), Event(U, 2)]
    assert all(isinstance(event, Event) for event in got)


async def test_subscription_is_registered_on_entry_only(autojump_clock: trio.abc.Clock) -> None:
    """A subscription is registered when the block is entered: events published before
    entry are not seen, events published right after entry (no await in between) are."""
    broker: Broker[str] = Broker()
    cm = broker.subscribe()
    broker.publish(C, "before subscribe() was entered")
    assert broker.subscriber_count == 0
    async with cm as sub:
        assert broker.subscriber_count == 1
        broker.publish(C, "after")
        broker.publish_must_deliver(C, "after, must")
        assert payloads(sub) == ["after", "after, must"]


async def test_every_subscriber_gets_every_event_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Fan-out: each current subscriber receives every event, in publish order."""
    broker: Broker[int] = Broker()
    async with broker.subscribe() as a, broker.subscribe() as b, broker.subscribe() as c:
        assert broker.subscriber_count == 3
        for i in range(10):
            if i % 3:
                broker.publish(C, i)
            else:
                broker.publish_must_deliver(C, i)
        assert payloads(a) == payloads(b) == payloads(c) == list(range(10))


async def test_leaving_the_block_unsubscribes(autojump_clock: trio.abc.Clock) -> None:
    """Leaving the block (normally or by an exception) unregisters the subscription, and a
    closed subscription raises ``ClosedResourceError`` when received from."""
    with trio.fail_after(10):
        broker: Broker[int] = Broker()
        async with broker.subscribe() as sub:
            broker.publish(C, 1)
        assert broker.subscriber_count == 0
        with pytest.raises(trio.ClosedResourceError):
            sub.receive_nowait()
        with pytest.raises(trio.ClosedResourceError):
            await sub.receive()

        counts: list[int] = []
        with pytest.raises(RuntimeError, match="boom"):
            await _subscribe_and_fail(broker, counts)
        assert counts == [1]
        assert broker.subscriber_count == 0
        broker.publish(C, 2)  # nobody left: nothing to drop either
        broker.publish_must_deliver(C, 3)
        assert broker.drop_count == 0


async def _subscribe_and_fail(broker: Broker[int], counts: list[int]) -> None:
    async with broker.subscribe():
        counts.append(broker.subscriber_count)
        raise RuntimeError("boom")


async def test_subscriber_cancelled_while_receiving_leaks_nothing_and_others_lose_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A subscriber task cancelled while parked in ``receive`` unsubscribes on the way out;
    other subscribers keep receiving every event."""
    broker: Broker[int] = Broker()
    got: list[int] = []
    outcome: list[bool] = []

    async def doomed(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            async with broker.subscribe() as sub:
                task_status.started(scope)
                async for event in sub:
                    got.append(event.payload)
        outcome.append(scope.cancelled_caught)

    with trio.fail_after(10):
        async with broker.subscribe() as survivor, trio.open_nursery() as nursery:
            scope = await nursery.start(doomed)
            assert broker.subscriber_count == 2
            broker.publish_must_deliver(C, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [1]
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert broker.subscriber_count == 1
            broker.publish(C, 2)
            broker.publish_must_deliver(C, 3)
            assert payloads(survivor) == [1, 2, 3]
        assert broker.subscriber_count == 0
        assert broker.drop_count == 0
        assert got == [1]
        assert outcome == [True]  # it was cancelled in receive, not ended


async def test_receive_cancelled_while_parked_loses_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A receive that times out took nothing: the next event still arrives afterwards."""
    broker: Broker[int] = Broker()
    with trio.fail_after(10):
        async with broker.subscribe() as sub:
            with trio.move_on_after(1) as scope:
                await sub.receive()
            assert scope.cancelled_caught
            broker.publish(C, 1)
            assert (await sub.receive()).payload == 1
            # And the same subscription can park again after a cancelled receive.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_publish_later, broker, 2)
                assert (await sub.receive()).payload == 2


async def _publish_later(broker: Broker[int], payload: int) -> None:
    await trio.sleep(1)
    broker.publish(C, payload)


async def test_event_published_as_the_receiver_is_cancelled_is_not_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Publishing to a parked receiver and cancelling it in the same tick: the event is
    either returned by that receive or still queued, never lost."""
    broker: Broker[int] = Broker()
    received: list[int] = []
    with trio.fail_after(10):
        async with broker.subscribe() as sub:
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def receiver() -> None:
                    with scope:
                        received.append((await sub.receive()).payload)

                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                broker.publish_must_deliver(C, 1)
                scope.cancel()
            assert received + payloads(sub) == [1]


# -- lossy publish ------------------------------------------------------------------------


async def test_lossy_publish_drops_exactly_when_buffer_is_full(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``publish`` drops an event for a subscriber that already holds ``buffer_size``
    undelivered events, counting it in ``drop_count`` and ``sub.dropped``; once the
    subscriber receives one, there is room again."""
    broker: Broker[int] = Broker(buffer_size=3)
    async with broker.subscribe() as sub:
        for i in range(3):
            broker.publish(C, i)
        assert sub.backlog == 3
        assert broker.drop_count == 0
        broker.publish(C, 3)  # full: dropped
        assert (broker.drop_count, sub.dropped, sub.backlog) == (1, 1, 3)
        assert sub.receive_nowait().payload == 0
        broker.publish(C, 4)  # room for exactly one
        broker.publish(C, 5)
        assert (broker.drop_count, sub.dropped, sub.backlog) == (2, 2, 3)
        assert payloads(sub) == [1, 2, 4]


async def test_lossy_drop_is_per_subscriber(autojump_clock: trio.abc.Clock) -> None:
    """A full subscriber loses events only for itself; ``drop_count`` sums over subscribers."""
    broker: Broker[int] = Broker(buffer_size=2)
    async with broker.subscribe() as slow, broker.subscribe() as fast:
        got_fast = []
        for i in range(5):
            broker.publish(C, i)
            got_fast += payloads(fast)
        assert got_fast == [0, 1, 2, 3, 4]
        assert payloads(slow) == [0, 1]  # drained: room for two more
        assert (slow.dropped, fast.dropped, broker.drop_count) == (3, 0, 3)
        async with broker.subscribe() as also_slow:
            for i in range(3):
                broker.publish(C, i)
                assert payloads(fast) == [i]
            assert (slow.dropped, also_slow.dropped, fast.dropped) == (4, 1, 0)
            assert broker.drop_count == 5
            assert payloads(slow) == payloads(also_slow) == [0, 1]


async def test_lossy_publish_wakes_a_parked_receiver(autojump_clock: trio.abc.Clock) -> None:
    """A subscriber waiting in ``receive`` is woken by a lossy publish."""
    broker: Broker[int] = Broker(buffer_size=1)
    got: list[int] = []
    with trio.fail_after(10):
        async with broker.subscribe() as sub, trio.open_nursery() as nursery:

            async def consume() -> None:
                async for event in sub:
                    got.append(event.payload)

            nursery.start_soon(consume)
            for i in range(5):
                await trio.testing.wait_all_tasks_blocked()
                broker.publish(C, i)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [0, 1, 2, 3, 4]
            assert broker.drop_count == 0
            broker.shutdown()


# -- must-deliver publish -------------------------------------------------------------------


async def test_must_deliver_queues_past_buffer_size_and_never_drops(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``publish_must_deliver`` queues beyond ``buffer_size`` and never counts a drop."""
    broker: Broker[int] = Broker(buffer_size=2, max_backlog=100)
    async with broker.subscribe() as sub:
        for i in range(50):
            broker.publish_must_deliver(C, i)
        assert sub.backlog == 50
        assert (broker.drop_count, sub.dropped, broker.overflow_count) == (0, 0, 0)
        assert payloads(sub) == list(range(50))


async def test_must_deliver_keeps_order_with_lossy_events(autojump_clock: trio.abc.Clock) -> None:
    """Lossy and must-deliver events share one ordered queue: a subscriber sees them in
    publish order; lossy ones are dropped while the backlog (must-deliver included) is at
    ``buffer_size`` or more."""
    broker: Broker[str] = Broker(buffer_size=2, max_backlog=10)
    async with broker.subscribe() as sub:
        broker.publish(C, "a")
        broker.publish(C, "b")
        broker.publish_must_deliver(C, "c")  # past buffer_size
        broker.publish(C, "d")  # dropped: backlog 3 >= 2
        broker.publish_must_deliver(C, "e")
        assert payloads(sub) == ["a", "b", "c", "e"]
        assert broker.drop_count == 1
        broker.publish(C, "f")
        broker.publish_must_deliver(C, "g")
        broker.publish(C, "h")  # dropped: backlog 2 >= 2
        assert payloads(sub) == ["f", "g"]
        assert broker.drop_count == 2


async def test_must_deliver_wakes_a_parked_receiver(autojump_clock: trio.abc.Clock) -> None:
    """A subscriber waiting in ``receive`` gets a must-deliver event."""
    broker: Broker[int] = Broker()
    with trio.fail_after(10):
        async with broker.subscribe() as sub, trio.open_nursery() as nursery:
            nursery.start_soon(_publish_later, broker, 0)
            assert (await sub.receive()).payload == 0
            nursery.start_soon(_publish_must_later, broker, 1)
            assert (await sub.receive()).payload == 1


async def _publish_must_later(broker: Broker[int], payload: int) -> None:
    await trio.sleep(1)
    broker.publish_must_deliver(C, payload)


async def test_backlog_past_max_backlog_overflows_loudly(autojump_clock: trio.abc.Clock) -> None:
    """A must-deliver event that would take a subscriber past ``max_backlog`` disconnects
    it: its next receive raises ``SubscriberOverflow`` (every time), ``overflow_count``
    increments, it is unregistered; another subscriber is unaffected."""
    with trio.fail_after(10):
        broker: Broker[int] = Broker(buffer_size=2, max_backlog=4)
        async with broker.subscribe() as slow, broker.subscribe() as fast:
            got_fast = []
            for i in range(4):
                broker.publish_must_deliver(C, i)
                got_fast += payloads(fast)
            assert slow.backlog == 4  # exactly max_backlog is still fine
            assert broker.overflow_count == 0
            broker.publish_must_deliver(C, 4)
            got_fast += payloads(fast)
            assert broker.overflow_count == 1
            assert broker.subscriber_count == 1
            with pytest.raises(SubscriberOverflow) as info:
                await slow.receive()
            assert info.value.max_backlog == 4
            assert info.value.backlog == 5
            with pytest.raises(SubscriberOverflow):
                slow.receive_nowait()
            with pytest.raises(SubscriberOverflow):
                async for _ in slow:
                    pass  # pragma: no cover
            # It is disconnected: later events don't count it again, the other gets everything.
            for i in range(5, 10):
                broker.publish_must_deliver(C, i)
                got_fast += payloads(fast)
            assert broker.overflow_count == 1
            assert got_fast == list(range(10))
            assert fast.dropped == 0
        assert broker.subscriber_count == 0


async def test_lossy_publish_never_overflows(autojump_clock: trio.abc.Clock) -> None:
    """Lossy events are dropped at ``buffer_size``; they never disconnect a subscriber."""
    broker: Broker[int] = Broker(buffer_size=2, max_backlog=2)
    async with broker.subscribe() as sub:
        for i in range(10):
            broker.publish(C, i)
        assert broker.overflow_count == 0
        assert broker.drop_count == 8
        assert payloads(sub) == [0, 1]


async def test_unlimited_buffer_and_backlog(autojump_clock: trio.abc.Clock) -> None:
    """``math.inf`` is accepted for both limits: nothing is ever dropped or overflowed."""
    broker: Broker[int] = Broker(buffer_size=math.inf, max_backlog=math.inf)  # type: ignore[arg-type]
    async with broker.subscribe() as sub:
        for i in range(1000):
            broker.publish(C, i)
            broker.publish_must_deliver(C, i)
        assert (broker.drop_count, broker.overflow_count, sub.backlog) == (0, 0, 2000)


# -- shutdown -----------------------------------------------------------------------------


async def test_shutdown_drains_queued_events_then_ends(autojump_clock: trio.abc.Clock) -> None:
    """After ``shutdown`` a subscription still yields what was queued, then ends
    (``StopAsyncIteration`` for ``async for``, ``EndOfChannel`` for ``receive``)."""
    broker: Broker[int] = Broker(buffer_size=2)
    with trio.fail_after(10):
        async with broker.subscribe() as sub:
            broker.publish(C, 1)
            broker.publish_must_deliver(C, 2)
            broker.publish_must_deliver(C, 3)
            broker.shutdown()
            assert broker.is_shut_down
            assert [e.payload async for e in sub] == [1, 2, 3]
            with pytest.raises(trio.EndOfChannel):
                await sub.receive()
            with pytest.raises(trio.EndOfChannel):
                sub.receive_nowait()


async def test_shutdown_ends_a_parked_receiver(autojump_clock: trio.abc.Clock) -> None:
    """A subscriber waiting in ``async for`` is woken by ``shutdown`` and its loop ends."""
    broker: Broker[int] = Broker()
    got: list[int] = []
    ended = trio.Event()

    async def consume() -> None:
        async with broker.subscribe() as sub:
            async for event in sub:
                got.append(event.payload)
        ended.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            broker.publish(C, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert not ended.is_set()
            broker.shutdown()
            await ended.wait()
    assert got == [1]


async def test_publishes_after_shutdown_are_noops(autojump_clock: trio.abc.Clock) -> None:
    """After ``shutdown`` both publishes do nothing: no delivery, no drop, no overflow."""
    with trio.fail_after(10):
        broker: Broker[int] = Broker(buffer_size=1, max_backlog=1)
        async with broker.subscribe() as sub:
            broker.publish(C, 1)
            broker.shutdown()
            broker.publish(C, 2)
            broker.publish_must_deliver(C, 3)
            broker.publish_must_deliver(C, 4)
            assert (broker.drop_count, broker.overflow_count) == (0, 0)
            assert [e.payload async for e in sub] == [1]


async def test_subscribing_after_shutdown_gives_an_ended_subscription(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A subscription entered after ``shutdown`` (even if created before) is ended from the
    start and never registered."""
    broker: Broker[int] = Broker()
    early = broker.subscribe()
    broker.shutdown()
    broker.shutdown()  # idempotent
    with trio.fail_after(10):
        async with broker.subscribe() as sub, early as early_sub:
            assert broker.subscriber_count == 0
            broker.publish_must_deliver(C, 1)
            assert [e async for e in sub] == []
            assert [e async for e in early_sub] == []
            with pytest.raises(trio.EndOfChannel):
                await sub.receive()


# -- sync publish -------------------------------------------------------------------------


def test_publish_methods_are_sync() -> None:
    """``publish`` and ``publish_must_deliver`` are plain functions, not coroutines."""
    broker: Broker[int] = Broker()
    assert not inspect.iscoroutinefunction(broker.publish)
    assert not inspect.iscoroutinefunction(broker.publish_must_deliver)
    assert broker.publish(C, 1) is None
    assert broker.publish_must_deliver(C, 1) is None


async def test_publish_works_from_a_cancelled_scope_and_a_finally_block(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Publishing needs no ``await``: it works inside a cancelled scope and in the
    ``finally`` block of a task being cancelled (where terminals are published)."""
    broker: Broker[str] = Broker()

    async def worker(task_status: trio.TaskStatus[None]) -> None:
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            broker.publish_must_deliver(C, "terminal from finally")
            broker.publish(C, "lossy from finally")

    with trio.fail_after(10):
        async with broker.subscribe() as sub:
            with trio.CancelScope() as scope:
                scope.cancel()
                broker.publish_must_deliver(C, "from cancelled scope")
                broker.publish(C, "lossy from cancelled scope")
                await trio.sleep(0)  # raises Cancelled: an await here would not publish
                pytest.fail("unreachable")  # pragma: no cover
            async with trio.open_nursery() as nursery:
                await nursery.start(worker)
                nursery.cancel_scope.cancel()
            assert payloads(sub) == [
                "from cancelled scope",
                "lossy from cancelled scope",
                "terminal from finally",
                "lossy from finally",
            ]


# -- receive rules ------------------------------------------------------------------------


async def test_two_tasks_receiving_the_same_subscription_is_busy(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While one task is waiting in ``receive``, another task's receive raises
    ``trio.BusyResourceError``; the first receiver is unaffected."""
    broker: Broker[int] = Broker()
    got: list[int] = []
    with trio.fail_after(10):
        async with broker.subscribe() as sub, trio.open_nursery() as nursery:

            async def first() -> None:
                got.append((await sub.receive()).payload)

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await sub.receive()
            broker.publish(C, 1)
        assert got == [1]


async def test_receiving_without_entering_raises_runtime_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A subscription not entered with ``async with`` refuses to receive, and cannot be
    entered twice."""
    with trio.fail_after(10):
        broker: Broker[int] = Broker()
        sub = broker.subscribe()
        broker.publish_must_deliver(C, 1)
        with pytest.raises(RuntimeError, match="async with"):
            await sub.receive()
        with pytest.raises(RuntimeError):
            sub.receive_nowait()
        with pytest.raises(RuntimeError):
            await sub.__anext__()
        async with sub:
            with pytest.raises(RuntimeError):
                await sub.__aenter__()
        with pytest.raises(RuntimeError):
            async with sub:
                pass  # pragma: no cover
        assert broker.subscriber_count == 0


async def test_receive_nowait_would_block_when_empty(autojump_clock: trio.abc.Clock) -> None:
    """``receive_nowait`` raises ``trio.WouldBlock`` when nothing is queued."""
    broker: Broker[int] = Broker()
    async with broker.subscribe() as sub:
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
        broker.publish(C, 1)
        assert sub.receive_nowait() == Event(C, 1)
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()


# -- constructor --------------------------------------------------------------------------


def test_defaults() -> None:
    """``Broker()`` defaults to ``buffer_size=4096`` and ``max_backlog=65536``, with zeroed
    counters and no subscribers."""
    broker: Broker[int] = Broker()
    assert (broker.buffer_size, broker.max_backlog) == (4096, 65536)
    assert (broker.drop_count, broker.overflow_count, broker.subscriber_count) == (0, 0, 0)
    assert not broker.is_shut_down


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": -1}, "buffer_size"),
        ({"buffer_size": 1.5}, "buffer_size"),
        ({"buffer_size": True}, "buffer_size"),
        ({"buffer_size": "8"}, "buffer_size"),
        ({"buffer_size": None}, "buffer_size"),
        ({"buffer_size": -math.inf}, "buffer_size"),
        ({"buffer_size": math.nan}, "buffer_size"),
        ({"max_backlog": 0}, "max_backlog"),
        ({"max_backlog": -5}, "max_backlog"),
        ({"max_backlog": 2.0}, "max_backlog"),
        ({"max_backlog": False}, "max_backlog"),
        ({"buffer_size": 10, "max_backlog": 9}, "max_backlog"),
        ({"buffer_size": math.inf, "max_backlog": 100}, "max_backlog"),
        ({"buffer_size": 70000}, "max_backlog"),  # below the default max_backlog (65536)
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], field: str) -> None:
    """Non-positive or non-int limits, and ``max_backlog < buffer_size``, raise ValueError."""
    with pytest.raises(ValueError, match=field):
        Broker(**kwargs)


def test_constructor_accepts_equal_limits() -> None:
    """``max_backlog == buffer_size`` is valid."""
    broker: Broker[int] = Broker(buffer_size=7, max_backlog=7)
    assert (broker.buffer_size, broker.max_backlog) == (7, 7)


# -- property -----------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("lossy")),
        st.tuples(st.just("must")),
        st.tuples(st.just("read"), st.integers(min_value=0, max_value=6)),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(ops=ops, buffer_size=st.integers(min_value=1, max_value=5))
def test_random_publishes_and_reads_match_the_model(
    ops: list[tuple[Any, ...]], buffer_size: int
) -> None:
    """For any mix of lossy / must-deliver publishes and a consumer task reading at random
    points (parked in ``receive`` when it wants more than is queued): every must-deliver
    event is received exactly once and in order, received events keep publish order, and a
    lossy event is dropped exactly when the subscriber holds ``buffer_size`` events."""
    trio.run(_scenario, ops, buffer_size, clock=trio.testing.MockClock(autojump_threshold=0))


async def _scenario(ops: list[tuple[Any, ...]], buffer_size: int) -> None:
    broker: Broker[tuple[str, int]] = Broker(buffer_size=buffer_size, max_backlog=1000)
    received: list[tuple[str, int]] = []
    published: list[tuple[str, int]] = []
    demand_send, demand_recv = trio.open_memory_channel[int](math.inf)
    # The model: the subscriber's queue, and how many events the consumer still wants.
    model_queue: deque[tuple[str, int]] = deque()
    model_received: list[tuple[str, int]] = []
    model_drops = 0
    demand = 0

    with trio.fail_after(60):
        async with broker.subscribe() as sub:
            async with trio.open_nursery() as nursery:

                async def consumer() -> None:
                    async for wanted in demand_recv:
                        for _ in range(wanted):
                            received.append((await sub.receive()).payload)

                nursery.start_soon(consumer)
                for seq, (op, *args) in enumerate(ops):
                    if op == "read":
                        demand += args[0]
                        demand_send.send_nowait(args[0])
                    else:
                        item = (op, seq)
                        published.append(item)
                        if op == "lossy":
                            broker.publish(C, item)
                            if len(model_queue) >= buffer_size:
                                model_drops += 1
                            else:
                                model_queue.append(item)
                        else:
                            broker.publish_must_deliver(C, item)
                            model_queue.append(item)
                    while demand and model_queue:
                        model_received.append(model_queue.popleft())
                        demand -= 1
                    await trio.testing.wait_all_tasks_blocked()
                    assert received == model_received
                    assert sub.backlog == len(model_queue)
                    assert broker.drop_count == sub.dropped == model_drops
                nursery.cancel_scope.cancel()  # the consumer may be parked in receive
            # Cancelling a parked consumer lost nothing: the rest is still queued.
            leftovers = payloads(sub)

    assert leftovers == list(model_queue)
    seen = [*received, *leftovers]
    must_published = [item for item in published if item[0] == "must"]
    assert [item for item in seen if item[0] == "must"] == must_published  # once, in order
    assert seen == sorted(seen, key=lambda item: item[1])  # publish order preserved
    assert len(seen) == len(set(seen))  # nothing twice
    lossy_published = sum(1 for item in published if item[0] == "lossy")
    lossy_seen = sum(1 for item in seen if item[0] == "lossy")
    assert lossy_published - lossy_seen == model_drops == broker.drop_count
