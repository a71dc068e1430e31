"""The event journal's rules, and the streams that replay from it (virtual clock).

Promises defended: every event of a workspace gets the next id (1, 2, 3, ...) whatever its
kind; the newest ``window`` events (and at most ``window_bytes`` of data, the newest always)
are held; a resume after an id replays exactly the held events after it, and says so (a
gap) when some of them are gone; a terminal is numbered after the progress published before
it; a stream that resumes meets the live events without a gap or a duplicate, even when events
keep coming while it replays; a run's stream ends with its terminal, from the store when the
journal cannot give it. The workspace is faked by its three brokers; no sockets.
"""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from test_http_stall import sse_events, stream_into

from trio_runs import Broker, EventType, RunComplete, RunProgress, open_backend
from trio_runs.agents import demo
from trio_runs.http.journal import Journal, Replay, open_journal
from trio_runs.http.schema import ApiError, CreateWorkspace, SubmitMessage
from trio_runs.http.service import open_run_service
from trio_runs.http.sse import EventStream, RunEventStream, parse_last_event_id


def fake_workspace() -> Any:
    """What a journal reads of a workspace: its id and three brokers."""
    return SimpleNamespace(
        id="ws", run_completions=Broker(), notifications=Broker(), events=Broker()
    )


def close(workspace: Any) -> None:
    """What closing a workspace does to its brokers once every run ended."""
    for broker in (workspace.run_completions, workspace.notifications, workspace.events):
        broker.shutdown()


def progress(run_id: str, payload: object) -> RunProgress:
    return RunProgress("s", run_id, payload)


def ids(journal: Journal, after: int) -> list[int]:
    return [entry.id for entry in journal.replay(after).entries]


def sse_ids(frames: list[bytes]) -> list[tuple[int | None, str]]:
    """``(id, event)`` of each event frame, in order (``None``: a frame without an id)."""
    seen = []
    for frame in frames:
        lines = frame.decode().splitlines() if frame != b"<eof>" else []
        fields = dict(line.split(": ", 1) for line in lines if line and line[0] != ":")
        if "event" in fields:
            seen.append((int(fields["id"]) if "id" in fields else None, fields["event"]))
    return seen


# -- the journal on its own ---------------------------------------------------------------


def test_every_event_gets_the_next_id_and_the_newest_window_is_held():
    journal = Journal("ws", window=3)
    for i in range(5):
        kind = "run_complete" if i == 4 else "progress"
        assert journal.append(kind, progress("r", i)).id == i + 1
    assert journal.last_id == 5
    assert ids(journal, 0) == [3, 4, 5]
    assert journal.statistics().held == 3


def test_a_resume_replays_exactly_what_is_held_after_its_id():
    journal = Journal("ws", window=3)
    for i in range(5):
        journal.append("progress", progress("r", i))
    # Held: 3, 4, 5. After 2 (or later), nothing was missed.
    assert journal.replay(2).first_id is None
    assert ids(journal, 2) == [3, 4, 5]
    assert ids(journal, 3) == [4, 5]
    assert ids(journal, 5) == []
    # After 1, event 2 is gone: the replay says the first id still held.
    assert journal.replay(1).first_id == 3
    assert journal.replay(0).first_id == 3


def test_an_id_the_workspace_never_sent_is_a_gap_with_everything_held():
    """A client's id from elsewhere never makes the stream skip the events that will get
    those ids: it is told of a gap and given everything held."""
    journal = Journal("ws")
    assert journal.replay(0) == Replay((), None, 0)  # nothing sent, nothing missed
    assert journal.replay(3) == Replay((), 1, 0)
    journal.append("progress", progress("r", 1))
    replay = journal.replay(7)
    assert ([e.id for e in replay.entries], replay.first_id, replay.after) == ([1], 1, 1)


def test_the_byte_bound_lets_old_events_go_but_always_holds_the_newest():
    journal = Journal("ws", window=100, window_bytes=300)
    for i in range(10):
        journal.append("progress", progress("r", "x" * 50 + str(i)))
    stats = journal.statistics()
    assert stats.held_bytes <= 300
    assert ids(journal, 0)[-1] == 10
    assert journal.replay(0).first_id == ids(journal, 0)[0] > 1
    journal.append("progress", progress("r", "y" * 1000))  # alone bigger than the bound
    assert ids(journal, 0) == [11]


def test_an_unencodable_payload_is_dropped_not_converted_and_never_stops_the_journal(caplog):
    journal = Journal("ws")
    for odd in ({(1, 2): "tuple key"}, {1, 2}, b"raw", float("nan"), (1, 2)):
        assert journal.append("progress", progress("r", odd)) is None
    assert "not a JSON value" in caplog.text
    entry = journal.append("progress", progress("r", "next"))
    assert entry is not None
    assert entry.id == 1  # nothing was numbered for the dropped ones
    assert json.loads(entry.data)["payload"] == "next"
    # A terminal is never dropped: one carrying a bad result is shown failed, as stored.
    ended = journal.append("run_complete", RunComplete("s", "r", result={1, 2}))
    assert ended is not None
    shown = json.loads(ended.data)
    assert shown["result"] is None
    assert shown["error"].startswith("result is not a JSON value: set at $")


@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [(None, None, None), ("7", None, 7), (None, "0", 0), ("7", "3", 7), (" 12 ", None, 12)],
)
def test_last_event_id_comes_from_the_header_first(header, query, expected):
    assert parse_last_event_id(header, query) == expected


@pytest.mark.parametrize("bad", ["", "-1", "x", "1.5", "٣", "1" * 19])
def test_a_malformed_last_event_id_is_a_422_even_beside_a_good_one(bad: str):
    for header, query in ((bad, None), (None, bad), ("1", bad), (bad, "1")):
        with pytest.raises(ApiError) as info:
            parse_last_event_id(header, query)
        assert (info.value.status, info.value.code) == (422, "invalid_last_event_id")


# -- the journal fed by a workspace's brokers -----------------------------------------------


async def test_a_terminal_is_numbered_after_the_progress_published_before_it(autojump_clock):
    """Even when the journal's tasks get to run only after everything was published (the
    brokers are separate queues), each run's progress gets smaller ids than its terminal."""
    workspace = fake_workspace()
    with trio.fail_after(5):
        async with open_journal(workspace) as journal:
            for run in ("a", "b"):
                for i in range(3):
                    workspace.events.publish(EventType.CREATED, progress(run, i))
                workspace.run_completions.publish_must_deliver(
                    EventType.CREATED, RunComplete("s", run, result=run)
                )
            await trio.testing.wait_all_tasks_blocked()
            workspace.events.publish(EventType.CREATED, progress("c", 0))
            workspace.run_completions.publish_must_deliver(EventType.CREATED, RunComplete("s", "c"))
            close(workspace)
    entries = journal.replay(0).entries
    assert [e.id for e in entries] == list(range(1, 11))
    for run in "abc":
        mine = [e for e in entries if e.run_id == run]
        assert [e.kind for e in mine][-1] == "run_complete"
        assert all(e.id < mine[-1].id for e in mine[:-1])
    assert journal.ended


async def test_a_resumed_stream_meets_the_live_events_without_gap_or_duplicate(autojump_clock):
    """Events published while the stream is still sending its replay (its client is slow)
    are sent after it, once each, in id order."""
    workspace = fake_workspace()
    frames: list[bytes] = []
    blocked = trio.Event()
    with trio.fail_after(10):
        async with open_journal(workspace) as journal:
            for i in range(5):
                workspace.events.publish(EventType.CREATED, progress("r", i))
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                stream = EventStream(journal, last_event_id=2)
                await nursery.start(partial(stream_into, stream, frames, blocked=blocked))
                # The stream is stuck sending event 3 of its replay: more events come.
                for i in range(5, 8):
                    workspace.events.publish(EventType.CREATED, progress("r", i))
                    await trio.testing.wait_all_tasks_blocked()
                blocked.set()
                await trio.testing.wait_all_tasks_blocked()
                close(workspace)
    assert sse_ids(frames) == [(i, "progress") for i in range(3, 9)] + [(None, "end")]
    payloads = [data["payload"] for kind, data in sse_events(frames) if kind == "progress"]
    assert payloads == list(range(2, 8))


async def test_a_stream_resumed_from_before_the_window_opens_with_a_gap(autojump_clock):
    workspace = fake_workspace()
    frames: list[bytes] = []
    with trio.fail_after(10):
        async with open_journal(workspace, window=2) as journal:
            for i in range(5):
                workspace.events.publish(EventType.CREATED, progress("r", i))
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                stream = EventStream(journal, last_event_id=1)
                await nursery.start(partial(stream_into, stream, frames))
                close(workspace)
    events = sse_events(frames)
    assert events[0] == ("gap", {"last_event_id": 1, "first_id": 4})
    assert sse_ids(frames) == [(None, "gap"), (4, "progress"), (5, "progress"), (None, "end")]


async def test_a_runs_stream_sends_its_held_progress_then_its_terminal(autojump_clock):
    workspace = fake_workspace()
    terminal = RunComplete("s", "mine", result="done")
    frames: list[bytes] = []

    async def never(run_id: str) -> RunComplete:
        raise AssertionError("the journal holds the terminal")

    with trio.fail_after(10):
        async with open_journal(workspace) as journal:
            for run in ("mine", "other"):
                workspace.events.publish(EventType.CREATED, progress(run, run))
            workspace.run_completions.publish_must_deliver(EventType.CREATED, terminal)
            await trio.testing.wait_all_tasks_blocked()
            stream = RunEventStream(
                "mine", journal, ended=lambda run_id: terminal, wait_ended=never
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(stream_into, stream, frames))
            close(workspace)
    assert sse_events(frames) == [
        ("progress", progress("mine", "mine").to_dict()),
        ("run_complete", terminal.to_dict()),
        ("end", {"reason": "run_ended"}),
    ]


async def test_a_live_runs_stream_ends_with_its_terminal(autojump_clock):
    workspace = fake_workspace()
    terminal = RunComplete("s", "mine", result="done")
    frames: list[bytes] = []

    async def never(run_id: str) -> RunComplete:
        raise AssertionError("the journal delivers the terminal live")

    with trio.fail_after(60):
        async with open_journal(workspace) as journal:
            stream = RunEventStream("mine", journal, ended=lambda run_id: None, wait_ended=never)
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(stream_into, stream, frames))
                await trio.sleep(20)  # heartbeats meanwhile
                workspace.events.publish(EventType.CREATED, progress("mine", 1))
                workspace.run_completions.publish_must_deliver(EventType.CREATED, terminal)
            close(workspace)
    assert [kind for kind, _ in sse_events(frames)] == ["progress", "run_complete", "end"]
    assert b": heartbeat\n\n" in frames


async def test_a_run_no_journal_holds_gets_its_terminal_from_the_store(autojump_clock):
    terminal = RunComplete("s", "gone", error="boom")
    frames: list[bytes] = []
    ended: list[RunComplete] = []

    async def wait_ended(run_id: str) -> RunComplete:
        await trio.sleep_until(40)  # the run ends later: heartbeats meanwhile
        ended.append(terminal)
        return terminal

    stream = RunEventStream(
        "gone", None, ended=lambda run_id: ended[0] if ended else None, wait_ended=wait_ended
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(stream_into, stream, frames))
    assert sse_events(frames) == [
        ("run_complete", terminal.to_dict()),
        ("end", {"reason": "run_ended"}),
    ]
    assert sse_ids(frames)[0] == (None, "run_complete")  # not in any window: no id
    assert frames.count(b": heartbeat\n\n") >= 2
    assert json.loads(json.dumps(terminal.to_dict())) == terminal.to_dict()


# -- the service: a journal per workspace, in its nursery, gone with the workspace ----------


async def test_each_workspace_has_a_journal_that_ends_with_it(autojump_clock, tmp_path):
    """Promise: ``open_run_service`` keeps a journal for each workspace it opens, from before
    the workspace is handed out (its first run's events are numbered from 1); closing the
    workspace ends its journal, and a late follower of its run still gets the terminal, from
    the store."""
    frames: list[bytes] = []
    with trio.fail_after(30):
        async with (
            open_backend() as backend,
            open_run_service(backend, demo.coordinator_factory, workspace_root=tmp_path) as service,
        ):
            view, _ = await service.create_workspace(CreateWorkspace(path="w"))
            assert service.journal_statistics()[0] == 3  # its three broker subscriptions
            run_id = await service.submit(view.id, SubmitMessage(session_id="s", prompt="a b"))
            await service.wait(run_id, 10)
            journal = await service.journal(service.workspace(view.id))
            await service.close_workspace(view.id)
            assert journal.ended  # with every event numbered
            assert [(e.id, e.kind) for e in journal.replay(0).entries] == [
                (1, "progress"),
                (2, "progress"),
                (3, "run_complete"),
            ]
            assert service.journal_statistics()[0] == 0
            stream = await service.run_events(run_id, heartbeat=15)
            assert stream.journal is None  # no open workspace holds it any more
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(stream_into, stream, frames))
    assert [kind for kind, _ in sse_events(frames)] == ["run_complete", "end"]
    assert sse_events(frames)[0][1]["result"] == "a b"
