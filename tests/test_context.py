"""Tests for ``trio_runs.context``: the run id and the run-complete marker.

Promises checked (DESIGN.md "Context" and the module docstrings): ``current_run_id()`` is
``""`` when unset and nesting restores; ``with_run_complete_marker`` attaches a *fresh* marker
every time; marking is a no-op and reading is ``False`` without a marker; and, the point of
the marker, a mark made in a child task started within the scope is visible to the parent.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_runs import (
    RunCompleteMarker,
    current_run_id,
    mark_run_complete_published,
    run_complete_published,
    with_run_complete_marker,
    with_run_id,
)

# -- run id ------------------------------------------------------------------------------


def test_current_run_id_is_empty_when_unset() -> None:
    """``current_run_id()`` is ``""`` outside any ``with_run_id``."""
    assert current_run_id() == ""


def test_with_run_id_sets_yields_and_restores() -> None:
    """``with_run_id`` yields the id, makes it current, and restores ``""`` on exit."""
    with with_run_id("run-1") as run_id:
        assert run_id == "run-1"
        assert current_run_id() == "run-1"
    assert current_run_id() == ""


def test_with_run_id_nesting_restores_the_outer_id() -> None:
    """An inner ``with_run_id`` shadows the outer one and restores it on exit."""
    with with_run_id("outer"):
        with with_run_id("inner"):
            assert current_run_id() == "inner"
        assert current_run_id() == "outer"
        with with_run_id(""):
            assert current_run_id() == ""
        assert current_run_id() == "outer"
    assert current_run_id() == ""


def test_with_run_id_restores_when_the_block_raises() -> None:
    """The previous run id is restored whatever happened inside the block."""
    with with_run_id("outer"):
        with pytest.raises(RuntimeError, match="boom"), with_run_id("inner"):
            raise RuntimeError("boom")
        assert current_run_id() == "outer"
    assert current_run_id() == ""


@pytest.mark.parametrize("bad", [None, 1, b"run", ["run"], object()])
def test_with_run_id_rejects_non_str(bad: object) -> None:
    """A run id that is not a ``str`` raises ``TypeError`` and changes nothing."""
    with with_run_id("outer"):
        with pytest.raises(TypeError, match="str"), with_run_id(bad):  # type: ignore[arg-type]
            pytest.fail("the block must not run")  # pragma: no cover
        assert current_run_id() == "outer"


async def test_run_id_is_visible_in_child_tasks(autojump_clock: trio.abc.Clock) -> None:
    """Trio copies the context at spawn: children (and grandchildren) see the run id, and a
    child's own ``with_run_id`` does not leak into the parent."""
    seen: list[str] = []

    async def grandchild() -> None:
        seen.append(current_run_id())

    async def child(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        seen.append(current_run_id())
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(grandchild)
        with with_run_id("child-own"):
            await trio.sleep(1)

    with trio.fail_after(10):
        with with_run_id("run-7"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)
                await nursery.start(child)
                await trio.testing.wait_all_tasks_blocked()
                assert current_run_id() == "run-7"
        assert seen == ["run-7"] * 4
        assert current_run_id() == ""


async def test_tasks_spawned_outside_the_scope_do_not_see_the_run_id(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The run id belongs to the context it was set in: a task spawned after the block
    ended sees ``""``."""
    seen: list[str] = []

    async def child() -> None:
        seen.append(current_run_id())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with with_run_id("scoped"):
                nursery.start_soon(child)
            nursery.start_soon(child)
    assert sorted(seen) == ["", "scoped"]


# -- marker ------------------------------------------------------------------------------


def test_without_a_marker_reading_is_false_and_marking_is_a_noop() -> None:
    """No marker: ``run_complete_published()`` is ``False`` and marking neither raises nor
    taints a marker attached later."""
    assert run_complete_published() is False
    mark_run_complete_published()
    assert run_complete_published() is False
    with with_run_complete_marker() as marker:
        assert marker.published is False
        assert run_complete_published() is False


def test_marker_is_fresh_unpublished_and_flagged_by_mark() -> None:
    """``with_run_complete_marker`` yields a new unpublished marker; marking flags it
    (idempotently) and ``run_complete_published()`` reads it."""
    with with_run_complete_marker() as marker:
        assert isinstance(marker, RunCompleteMarker)
        assert marker.published is False
        assert run_complete_published() is False
        mark_run_complete_published()
        assert marker.published is True
        assert run_complete_published() is True
        mark_run_complete_published()
        assert run_complete_published() is True
    assert run_complete_published() is False


def test_each_marker_scope_gets_a_new_marker() -> None:
    """A second scope after a published one starts unpublished with a different marker."""
    with with_run_complete_marker() as first:
        mark_run_complete_published()
    with with_run_complete_marker() as second:
        assert second is not first
        assert second.published is False
        assert run_complete_published() is False
    assert first.published is True


def test_inner_marker_does_not_inherit_and_restores_the_outer() -> None:
    """An inner marker is fresh even when the outer one is published; marking it does not
    mark the outer; leaving it restores the outer marker (and its state)."""
    with with_run_complete_marker() as outer:
        mark_run_complete_published()
        with with_run_complete_marker() as inner:
            assert inner is not outer
            assert run_complete_published() is False
        assert run_complete_published() is True

    with with_run_complete_marker() as outer:
        with with_run_complete_marker() as inner:
            mark_run_complete_published()
            assert inner.published is True
        assert outer.published is False
        assert run_complete_published() is False


def test_marker_scope_restores_when_the_block_raises() -> None:
    """Leaving a marker scope by an exception detaches it like a normal exit."""
    with with_run_complete_marker() as outer:
        with pytest.raises(RuntimeError, match="boom"), with_run_complete_marker():
            _mark_and_fail()
        assert run_complete_published() is False
        assert outer.published is False
    assert run_complete_published() is False


async def test_mark_in_child_task_is_visible_to_the_parent(
    autojump_clock: trio.abc.Clock,
) -> None:
    """THE key property: a mark made inside a child task started with ``start_soon`` within
    the marker scope is visible to the parent once the child has returned."""

    async def coordinator_like() -> None:
        await trio.sleep(1)  # really run as its own task, after a checkpoint
        mark_run_complete_published()

    with trio.fail_after(10):
        with with_run_complete_marker() as marker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(coordinator_like)
                await trio.testing.wait_all_tasks_blocked()
                assert run_complete_published() is False  # not marked yet
            assert run_complete_published() is True
            assert marker.published is True


async def test_mark_in_grandchild_task_is_visible_to_the_parent(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The marker is shared by reference through any depth of task spawning."""

    async def grandchild() -> None:
        mark_run_complete_published()

    async def child() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(grandchild)

    with trio.fail_after(10), with_run_complete_marker():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        assert run_complete_published() is True


async def test_child_spawned_in_the_scope_into_an_outer_nursery_marks_the_same_marker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A task spawned (into a longer-lived nursery) while the scope is active keeps the
    scope's marker: its mark reaches the yielded marker, not the parent's later context."""
    release = trio.Event()

    async def late_marker() -> None:
        await release.wait()
        mark_run_complete_published()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with with_run_complete_marker() as marker:
                nursery.start_soon(late_marker)
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert marker.published is True
            assert run_complete_published() is False  # the parent's context has no marker


async def test_concurrent_runs_have_independent_markers(autojump_clock: trio.abc.Clock) -> None:
    """Sibling tasks with their own marker scopes never see each other's marks."""
    results: dict[str, bool] = {}

    async def dispatch(name: str, marks: bool) -> None:
        with with_run_complete_marker():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_mark_after, 1, marks)  # both scopes overlap in time
            results[name] = run_complete_published()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dispatch, "marked", True)
            nursery.start_soon(dispatch, "unmarked", False)
    assert results == {"marked": True, "unmarked": False}


async def _mark_after(delay: float, marks: bool = True) -> None:
    await trio.sleep(delay)
    if marks:
        mark_run_complete_published()


def _mark_and_fail() -> None:
    mark_run_complete_published()
    raise RuntimeError("boom")
