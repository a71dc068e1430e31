"""Run metadata and the stores' run listing (issue 14, "Runs in view").

Every terminal says what ended it when its agent did not (``reason``), when the run was
accepted, started (after its queue wait) and ended, which execution it was (``attempt``) and
the labels it was submitted with. Stores that list runs (``SupportsRunListing``) show the
same, newest accepted first, with filters and a cursor that stays correct while runs are
added; ``SqliteLedger`` keeps it across restarts and recovery, and migrates a v2 file.
"""

from __future__ import annotations

import gc
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    Backend,
    Broker,
    InvalidLabels,
    RunCall,
    RunComplete,
    RunLedger,
    RunQuery,
    SessionCoordinator,
    StoreError,
    SupportsRunListing,
    open_backend,
)
from trio_runs.ledger import SupportsRunMetadata, encode_cursor
from trio_runs.sqlite import SCHEMA_VERSION, open_sqlite_ledger
from trio_runs.testing import ScriptedAgent, raise_, return_, sleep

BOUND = 10.0  # seconds (mock or real) for any one wait


async def _wait(backend: Backend, run_id: str) -> RunComplete:
    with trio.fail_after(BOUND):
        return await backend.wait_run(run_id)


def _agent() -> ScriptedAgent:
    return ScriptedAgent(
        return_("ok"),
        scripts={"long": [sleep(3600)], "boom": [raise_(RuntimeError("boom"))]},
    )


async def _workspace(backend: Backend, path: str = "/w", **factory: object) -> str:
    ws = await backend.create_workspace(path, SessionCoordinator.factory(_agent(), **factory))  # type: ignore[arg-type]
    return ws.id


async def _until_active(backend: Backend, ws_id: str, session: str, run_id: str) -> None:
    sessions = backend.get_workspace(ws_id).sessions
    with trio.fail_after(BOUND):
        while sessions.active_run_id(session) != run_id:
            await trio.sleep(0.001)


def _ordered(rc: RunComplete, *, started: bool = True) -> None:
    assert rc.accepted_at is not None
    assert rc.ended_at is not None
    if started:
        assert rc.started_at is not None
        assert rc.accepted_at <= rc.started_at <= rc.ended_at
    else:
        assert rc.started_at is None
        assert rc.accepted_at <= rc.ended_at


# -- reasons, one per ending path ----------------------------------------------------------


async def test_an_agents_own_ending_has_no_reason_and_ordered_times(backend: Backend):
    ws = await _workspace(backend)
    done = await _wait(backend, backend.send_message(ws, AgentMessage("s", "hi")))
    failed = await _wait(backend, backend.send_message(ws, AgentMessage("s", "boom")))
    for rc in (done, failed):
        assert rc.reason is None
        assert rc.attempt == 1
        assert dict(rc.labels) == {}
        _ordered(rc)
    assert done.outcome == "completed"
    assert failed.outcome == "failed"


async def test_cancel_run_says_user_active_or_queued(backend: Backend):
    ws = await _workspace(backend)
    active = backend.send_message(ws, AgentMessage("s", "long"))
    queued = backend.send_message(ws, AgentMessage("s", "long"))
    await _until_active(backend, ws, "s", active)
    assert backend.cancel_run(queued)
    assert backend.cancel_run(active)
    q, a = await _wait(backend, queued), await _wait(backend, active)
    assert (q.cancelled, q.reason) == (True, "user")
    assert (a.cancelled, a.reason) == (True, "user")
    _ordered(a)
    _ordered(q, started=False)  # dropped from the queue: it never started


async def test_cancel_session_says_session_cancel(backend: Backend):
    ws = await _workspace(backend)
    active = backend.send_message(ws, AgentMessage("s", "long"))
    queued = backend.send_message(ws, AgentMessage("s", "long"))
    await _until_active(backend, ws, "s", active)
    backend.get_workspace(ws).sessions.cancel("s")
    for run_id in (active, queued):
        rc = await _wait(backend, run_id)
        assert (rc.cancelled, rc.reason) == (True, "session_cancel")


async def test_clear_queue_says_clear_queue_and_the_active_run_goes_on(backend: Backend):
    ws = await _workspace(backend)
    active = backend.send_message(ws, AgentMessage("s", "long"))
    queued = [backend.send_message(ws, AgentMessage("s", "long")) for _ in range(3)]
    await _until_active(backend, ws, "s", active)
    backend.get_workspace(ws).sessions.clear_queue("s")
    for run_id in queued:
        rc = await _wait(backend, run_id)
        assert (rc.cancelled, rc.reason, rc.started_at) == (True, "clear_queue", None)
    assert backend.ledger.state(active) == "pending"
    assert backend.cancel_run(active)
    assert (await _wait(backend, active)).reason == "user"


async def test_closing_the_workspace_says_shutdown(backend: Backend):
    ws = await _workspace(backend)
    active = backend.send_message(ws, AgentMessage("s", "long"))
    queued = backend.send_message(ws, AgentMessage("s", "long"))
    await _until_active(backend, ws, "s", active)
    with trio.fail_after(BOUND):
        await backend.close_workspace(ws, grace=1)
    for run_id in (active, queued):
        rc = await _wait(backend, run_id)
        assert (rc.cancelled, rc.reason) == (True, "shutdown")


async def test_closing_the_backend_says_shutdown(store, autojump_clock):
    async with open_backend(store) as backend:
        ws = await _workspace(backend)
        active = backend.send_message(ws, AgentMessage("s", "long"))
        await _until_active(backend, ws, "s", active)
    rc = store.get(active)
    assert rc is not None
    assert (rc.cancelled, rc.reason) == (True, "shutdown")


async def test_a_deadline_says_deadline(backend: Backend):
    ws = await _workspace(backend)
    rc = await _wait(backend, backend.send_message(ws, AgentMessage("s", "long", deadline=5)))
    assert (rc.timed_out, rc.reason, rc.outcome) == (True, "deadline", "failed")
    _ordered(rc)


async def test_a_run_that_ignores_cancel_and_completes_has_no_reason(backend: Backend):
    # Cancelled while it had already returned its result: completed wins, no reason.
    ws = await _workspace(backend)
    rc = await _wait(backend, backend.send_message(ws, AgentMessage("s", "hi")))
    assert not backend.cancel_run(rc.run_id)
    assert rc.reason is None


# -- labels --------------------------------------------------------------------------------


async def test_labels_reach_the_terminal_and_round_trip(backend: Backend):
    ws = await _workspace(backend)
    labels = {"team": "build", "ci.job-id": "42", "empty": ""}
    rc = await _wait(backend, backend.send_message(ws, AgentMessage("s", "hi", labels=labels)))
    assert dict(rc.labels) == labels
    again = RunComplete.from_json(rc.to_json())
    assert again.to_dict() == rc.to_dict()
    assert again.to_dict()["labels"] == labels
    with pytest.raises(TypeError):
        rc.labels["team"] = "other"  # type: ignore[index]


def test_labels_are_copied_not_shared():
    mine = {"a": "1"}
    msg = AgentMessage("s", "p", labels=mine)
    mine["a"] = "2"
    assert dict(msg.labels) == {"a": "1"}
    assert AgentMessage.from_json(msg.to_json()) == msg


def test_the_wire_shape_of_a_terminal_without_metadata_is_unchanged():
    assert RunComplete("s", "r").to_dict() == {
        "session_id": "s",
        "run_id": "r",
        "result": None,
        "error": None,
        "cancelled": False,
    }
    assert "labels" not in AgentMessage("s", "p").to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reason", "bored"),
        ("reason", 3),
        ("accepted_at", "now"),
        ("ended_at", float("inf")),
        ("attempt", 0),
        ("attempt", True),
        ("labels", {"a": 1}),
        ("labels", ["a"]),
    ],
)
def test_metadata_is_decoded_strictly(field: str, value: object):
    data = {"session_id": "s", "run_id": "r", field: value}
    with pytest.raises(ValueError, match=field):
        RunComplete.from_dict(data)


@pytest.mark.parametrize(
    "labels",
    [
        {str(i): "v" for i in range(17)},
        {"": "v"},
        {"k" * 65: "v"},
        {"sp ace": "v"},
        {"slash/": "v"},
        {"k\n": "v"},
        {"k": "v" * 257},
        {"k": "nul\x00"},
        {"k": "\ud800"},
    ],
)
async def test_bad_labels_are_refused_with_nothing_reserved(backend: Backend, labels):
    ws = await _workspace(backend)
    with pytest.raises(InvalidLabels):
        backend.send_message(ws, AgentMessage("s", "hi", run_id="r1", labels=labels))
    assert backend.ledger.state("r1") is None
    assert backend.ledger.statistics().accepted_total == 0
    assert backend.get_workspace(ws).sessions.queued_run_ids("s") == []
    # The same id is still free.
    assert (await _wait(backend, backend.send_message(ws, AgentMessage("s", "hi", "r1")))).result


async def test_sixteen_labels_at_the_limits_are_fine(backend: Backend):
    ws = await _workspace(backend)
    labels = {f"{i:02d}" + "k" * 62: "v" * 256 for i in range(16)}
    rc = await _wait(backend, backend.send_message(ws, AgentMessage("s", "hi", labels=labels)))
    assert dict(rc.labels) == labels


# -- listing on the backend's stores -------------------------------------------------------


@pytest.fixture(params=["RunLedger", "SqliteLedger", "RedisStore"])
async def listing_backend(
    request: pytest.FixtureRequest, tmp_path: Path, real_clock
) -> AsyncIterator[Backend]:
    if request.param == "RunLedger":
        async with open_backend(RunLedger()) as backend:
            yield backend
    elif request.param == "RedisStore":
        from trio_runs.redis import open_redis_store

        url, namespace = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        async with (
            open_redis_store(url, namespace=namespace) as store,
            open_backend(store) as backend,
        ):
            yield backend
    else:
        async with (
            open_sqlite_ledger(tmp_path / "runs.db") as store,
            open_backend(store) as backend,
        ):
            yield backend


async def test_listing_shows_what_the_terminal_says(listing_backend: Backend, tmp_path: Path):
    store = listing_backend.ledger
    assert isinstance(store, SupportsRunListing)
    assert isinstance(store, SupportsRunMetadata)
    ws = await _workspace(listing_backend, str(tmp_path / "a"))
    path = listing_backend.get_workspace(ws).path
    active = listing_backend.send_message(ws, AgentMessage("s", "long", labels={"k": "v"}))
    queued = listing_backend.send_message(ws, AgentMessage("s", "long"))
    await _until_active(listing_backend, ws, "s", active)
    info = await store.run_info(active)
    assert info is not None
    assert (info.state, info.workspace_path, dict(info.labels)) == ("pending", path, {"k": "v"})
    assert info.accepted_at is not None
    assert info.started_at is not None
    assert info.terminal is None
    waiting = await store.run_info(queued)
    assert waiting is not None
    assert waiting.started_at is None
    assert listing_backend.cancel_run(active)
    rc = await _wait(listing_backend, active)
    with trio.fail_after(BOUND):
        while (info := await store.run_info(active)) is None or info.state != "terminal":
            await trio.sleep(0.01)
    assert info.terminal is not None
    assert info.terminal.to_dict() == rc.to_dict()
    assert (info.accepted_at, info.started_at, info.attempt) == (
        rc.accepted_at,
        rc.started_at,
        rc.attempt,
    )
    assert listing_backend.cancel_run(queued)
    await _wait(listing_backend, queued)


async def test_listing_filters_and_pages_under_concurrent_accepts(
    listing_backend: Backend, tmp_path: Path
):
    store = listing_backend.ledger
    assert isinstance(store, SupportsRunListing)
    ws_a = await _workspace(listing_backend, str(tmp_path / "a"))
    ws_b = await _workspace(listing_backend, str(tmp_path / "b"))
    path_a = listing_backend.get_workspace(ws_a).path
    ids_a = []
    for i in range(30):
        msg = AgentMessage(f"s{i % 3}", "hi", labels={"parity": str(i % 2)})
        ids_a.append(listing_backend.send_message(ws_a, msg))
        await trio.sleep(0.0005)  # distinct acceptance times, mostly
    for run_id in ids_a:
        await _wait(listing_backend, run_id)
    pending_b = listing_backend.send_message(ws_b, AgentMessage("x", "long"))

    # Page through workspace a, 7 at a time, accepting more runs between pages.
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_runs(RunQuery(workspace_path=path_a, limit=7, cursor=cursor))
        assert len(page.runs) <= 7
        seen += [info.run_id for info in page.runs]
        listing_backend.send_message(ws_a, AgentMessage("later", "hi"))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    # Newest accepted first, each once, none skipped; runs accepted meanwhile sort before
    # the cursor, so they never shift a later page.
    accepted = {r: (await store.run_info(r)).accepted_at for r in ids_a}  # type: ignore[union-attr]
    expected = sorted(ids_a, key=lambda r: (accepted[r], r), reverse=True)
    assert seen == expected

    async def ids(**query: object) -> set[str]:
        page = await store.list_runs(RunQuery(limit=1000, **query))  # type: ignore[arg-type]
        return {info.run_id for info in page.runs}

    assert await ids(session_id="s1", workspace_path=path_a) == set(ids_a[1::3])
    assert await ids(label=("parity", "0"), workspace_path=path_a) == set(ids_a[0::2])
    assert await ids(label=("parity", "2")) == set()
    assert await ids(state="pending") >= {pending_b}
    assert pending_b not in await ids(state="terminal")
    assert set(ids_a) <= await ids(state="terminal")
    assert listing_backend.cancel_run(pending_b)
    await _wait(listing_backend, pending_b)


@pytest.mark.parametrize("store_kind", ["RunLedger", "SqliteLedger"])
async def test_bad_cursor_and_limit_are_value_errors(store_kind: str, tmp_path: Path, real_clock):
    for limit in (0, 1001, -1, True, 2.5):
        with pytest.raises(ValueError, match="limit"):
            RunQuery(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state"):
        RunQuery(state="ended")  # type: ignore[arg-type]
    async with open_sqlite_ledger(tmp_path / "runs.db") as durable:
        store = durable if store_kind == "SqliteLedger" else RunLedger()
        for cursor in ("", "not a cursor", "!!!", encode_cursor(1.0, "r")[:-3] + "x"):
            with pytest.raises(ValueError, match="cursor"):
                await store.list_runs(RunQuery(cursor=cursor))
        assert (await store.list_runs(RunQuery(cursor=encode_cursor(1.0, "r")))).runs == ()


# -- SqliteLedger: reruns, recovery, restarts, migration -----------------------------------


async def test_attempt_counts_each_rerun_after_a_crash(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    workspace = str(tmp_path / "w")
    call = RunCall("s", "long", "again", labels={"k": "v"}, accepted_at=1000.0)
    async with open_sqlite_ledger(db) as store:
        store.accept_rerunnable("again", "s", workspace, call)
        with trio.fail_after(BOUND):
            await store.flush()
    # Crashed twice: the first rerun never ends either.
    for attempt in (2, 3):
        async with open_sqlite_ledger(db) as store:
            info = await store.run_info("again")
            assert info is not None
            assert (info.state, info.attempt, dict(info.labels)) == ("pending", attempt, {"k": "v"})
            assert info.accepted_at == 1000.0
            if attempt == 3:
                async with open_backend(store) as backend:
                    factory = SessionCoordinator.factory(
                        ScriptedAgent(return_("ran")), after_crash="rerun"
                    )
                    await backend.create_workspace(workspace, factory)
                    rc = await _wait(backend, "again")
    assert (rc.result, rc.attempt, dict(rc.labels), rc.accepted_at) == (
        "ran",
        3,
        {"k": "v"},
        1000.0,
    )
    _ordered(rc)
    async with open_sqlite_ledger(db) as store:
        got = store.get("again")
        assert got is not None
        assert got.to_dict() == rc.to_dict()


async def test_metadata_survives_a_restart_and_recovery_says_abandoned(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store:
        store.accept_call(RunCall("s", "p", "ended", labels={"a": "1"}, accepted_at=10.0), "/w")
        store.accept_call(RunCall("s", "p", "crashed", labels={"b": "2"}, accepted_at=20.0), "/w")
        store.mark_started("ended", 11.0)
        rc = RunComplete(
            "s", "ended", result=1, accepted_at=10.0, started_at=11.0, ended_at=12.0,
            labels={"a": "1"},
        )  # fmt: skip
        store.complete(rc)
        with trio.fail_after(BOUND):
            await store.wait("ended")
            await store.flush()
    async with open_sqlite_ledger(db) as store:
        ended = await store.run_info("ended")
        assert ended is not None
        assert ended.terminal is not None
        assert ended.terminal.to_dict() == rc.to_dict()
        assert (ended.workspace_path, ended.started_at) == ("/w", 11.0)
        crashed = store.get("crashed")
        assert crashed is not None
        assert (crashed.abandoned, crashed.reason, crashed.accepted_at) == (True, "abandoned", 20.0)
        assert dict(crashed.labels) == {"b": "2"}
        assert crashed.ended_at is not None
        page = await store.list_runs(RunQuery(label=("b", "2")))
        assert [info.run_id for info in page.runs] == ["crashed"]
        assert [i.run_id for i in (await store.list_runs(RunQuery(workspace_path="/w"))).runs] == [
            "crashed",
            "ended",
        ]


_V2_SCHEMA = """
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    ended_at    REAL,
    terminal    TEXT,
    size        INTEGER NOT NULL DEFAULT 0,
    workspace   TEXT,
    call        TEXT
);
CREATE INDEX runs_pending ON runs(accepted_at) WHERE ended_at IS NULL;
PRAGMA user_version = 2;
"""


async def test_a_v2_file_is_migrated_in_place(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    old = RunComplete("s", "old", result="kept").to_json()
    now = time.time()  # recent enough to be within the age bound of retention
    with sqlite3.connect(db) as connection:
        connection.executescript(_V2_SCHEMA)
        connection.execute(
            "INSERT INTO runs VALUES ('old', 's', ?, ?, ?, ?, NULL, NULL)",
            (now - 20, now - 19, old, len(old)),
        )
        connection.execute(
            "INSERT INTO runs VALUES ('open', 's', ?, NULL, NULL, 0, NULL, NULL)", (now - 10,)
        )
    connection.close()
    async with open_sqlite_ledger(db) as store:
        assert store.get("old") == RunComplete("s", "old", result="kept")
        abandoned = store.get("open")
        assert abandoned is not None
        assert abandoned.reason == "abandoned"
        assert abandoned.accepted_at == now - 10
        page = await store.list_runs(RunQuery())
        assert [(i.run_id, i.accepted_at) for i in page.runs] == [
            ("open", now - 10),
            ("old", now - 20),
        ]
        store.accept_call(RunCall("t", "p", "new", labels={"x": "y"}, accepted_at=now), "/w")
        with trio.fail_after(BOUND):
            await store.flush()
        assert [i.run_id for i in (await store.list_runs(RunQuery(label=("x", "y")))).runs] == [
            "new"
        ]
        store.complete(RunComplete("t", "new", accepted_at=now, labels={"x": "y"}))
        with trio.fail_after(BOUND):
            await store.wait("new")
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        indexes = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
        assert {"runs_newest", "runs_workspace", "runs_session", "run_labels_match"} <= indexes
        labels = check.execute("SELECT key, value FROM run_labels WHERE run_id = 'new'")
        assert labels.fetchall() == [("x", "y")]
        (stored,) = check.execute("SELECT labels FROM runs WHERE run_id = 'new'").fetchone()
        assert json.loads(stored) == {"x": "y"}
    finally:
        check.close()


# -- RedisStore: recovery says abandoned ---------------------------------------------------


async def test_redis_recovery_says_abandoned_and_when(redis_url, namespace, real_clock):
    from trio_runs.redis import open_redis_store

    options = {"lease_ttl": 0.5, "unavailable_after": 1.0, "call_timeout": 1.0}
    with trio.fail_after(BOUND):
        async with (
            open_redis_store(redis_url, namespace=namespace, **options) as a,  # type: ignore[arg-type]
            open_redis_store(redis_url, namespace=namespace, **options) as b,  # type: ignore[arg-type]
        ):
            a.accept("r", "s")
            await a.flush()
            before = time.time()
            # As if node a had died: its lease gone, declared dead (what a sweep does).
            await a._client.eval(
                "redis.call('DEL', KEYS[1]); redis.call('SREM', KEYS[2], ARGV[1]);"
                " redis.call('SADD', KEYS[3], ARGV[1])",
                keys=[a._prefix + "lease:" + a.node_id, a._prefix + "nodes", a._prefix + "dead"],
                args=[a.node_id],
            )
            rc = await b.wait("r")
    assert (rc.abandoned, rc.reason) == (True, "abandoned")
    assert rc.ended_at is not None
    assert before - 1 <= rc.ended_at <= time.time() + 1


async def test_a_coordinators_own_run_carries_metadata_too(autojump_clock):
    ledger = RunLedger()
    coordinator = SessionCoordinator(
        ScriptedAgent(return_("ok")), run_completions=Broker(), ledger=ledger
    )
    with trio.fail_after(BOUND):
        rc = await coordinator.run("s", "hi")
    _ordered(rc)
    info = await ledger.run_info(rc.run_id)
    assert info is not None
    assert (info.accepted_at, info.started_at, info.workspace_path) == (
        rc.accepted_at,
        rc.started_at,
        None,
    )


async def test_retained_terminals_with_metadata_stay_invisible_to_the_garbage_collector(
    autojump_clock,
):
    """Labels, timestamps and workspace paths do not make held terminals tracked again: the
    ledger keeps them as tuples of atoms, like the terminals without metadata."""
    gc.collect()
    before = len(gc.get_objects())
    ledger = RunLedger(retain=20_000)
    for i in range(20_000):
        call = RunCall("s", "p", f"r{i}", labels={"team": f"t{i % 7}"}, accepted_at=1.0 + i)
        ledger.accept_call(call, "/w")
        ledger.mark_started(call.run_id, 2.0 + i)
        ledger.complete(
            RunComplete(
                "s",
                call.run_id,
                result=i,
                reason="user" if i % 2 else None,
                accepted_at=call.accepted_at,
                started_at=2.0 + i,
                ended_at=3.0 + i,
                labels=call.labels if i % 3 else {},
            )
        )
    # Twice: a collection untracks the (key, value) pairs, the next one the tuples holding them.
    gc.collect()
    gc.collect()
    assert ledger.terminal_count == 20_000
    assert len(gc.get_objects()) - before < 4_000
    oldest = await ledger.run_info("r0")
    assert oldest is not None
    assert oldest.terminal is not None
    assert (oldest.accepted_at, oldest.started_at, oldest.terminal.ended_at) == (1.0, 2.0, 3.0)
    assert (oldest.workspace_path, dict(oldest.labels)) == ("/w", {})
    assert dict((await ledger.run_info("r1")).labels) == {"team": "t1"}  # type: ignore[union-attr]


async def test_a_terminal_the_backend_records_itself_keeps_the_metadata(backend: Backend):
    """A pre-run failure (``prepare`` raised): the backend records the failed terminal, with
    the run's labels and acceptance time, and the hand-over to the coordinator as its start."""

    async def prepare(call: RunCall) -> None:
        raise RuntimeError("no sandbox")

    ws = await _workspace(backend, prepare=prepare)
    msg = AgentMessage("s", "hi", labels={"k": "v"})
    rc = await _wait(backend, backend.send_message(ws, msg))
    assert (rc.error, rc.reason, dict(rc.labels)) == ("no sandbox", None, {"k": "v"})
    _ordered(rc)


async def test_a_migration_that_fails_halfway_leaves_the_file_as_it_was(tmp_path: Path, real_clock):
    """Promise: the schema moves to the new version in one transaction. A v2 file holding an
    object in the way of the listing's indexes (a stand-in for a process killed mid-way)
    fails to open with a StoreError and is left at version 2, whole; once the obstacle is
    gone, it migrates."""
    db = tmp_path / "runs.db"
    now = time.time()
    with sqlite3.connect(db) as connection:
        connection.executescript(_V2_SCHEMA)
        connection.execute(
            "INSERT INTO runs VALUES ('open', 's', ?, NULL, NULL, 0, NULL, NULL)", (now - 10,)
        )
        connection.execute("CREATE TABLE runs_session (x)")  # the index's name, taken
    connection.close()
    with pytest.raises(StoreError, match="cannot be used"):
        async with open_sqlite_ledger(db):
            pass
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 2
        columns = [row[1] for row in check.execute("PRAGMA table_info(runs)")]
        assert "labels" not in columns  # the first step of the migration was rolled back
        assert check.execute("SELECT run_id FROM runs").fetchall() == [("open",)]
        check.execute("DROP TABLE runs_session")
        check.commit()
    finally:
        check.close()
    async with open_sqlite_ledger(db) as store:
        abandoned = store.get("open")
        assert abandoned is not None
        assert abandoned.reason == "abandoned"
