"""``SqliteLedger``'s own promises (DESIGN D1 to D5) on a real file, in one process: what is on
disk after a flush, recovery on open, ids taken across restarts, nothing visible before its
commit, a failing disk, retention by count/bytes/age, the cache bound, and refusals at open.
Crashes of a real server process are in ``test_crash.py``."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from trio_runs import (
    AgentMessage,
    DuplicateRun,
    RunCall,
    RunComplete,
    SessionCoordinator,
    StoreError,
    UnknownRun,
    open_backend,
)
from trio_runs.sqlite import (
    ABANDONED_ERROR,
    SCHEMA_VERSION,
    SqliteRetention,
    open_sqlite_ledger,
)
from trio_runs.testing import ScriptedAgent, return_, sleep

BOUND = 10.0  # real seconds


def rows(path: Path) -> dict[str, tuple[str, str | None]]:
    """What another reader of the file sees: run id -> (session, terminal JSON or None)."""
    with sqlite3.connect(path) as connection:
        return {
            run_id: (session_id, terminal)
            for run_id, session_id, terminal in connection.execute(
                "SELECT run_id, session_id, terminal FROM runs"
            )
        }


async def test_an_acceptance_is_on_disk_when_flush_returns(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store:
        store.accept("r1", "s")
        with trio.fail_after(BOUND):
            await store.flush()
        assert rows(db) == {"r1": ("s", None)}
        store.complete(RunComplete("s", "r1", result={"answer": 42}))
        with trio.fail_after(BOUND):
            await store.flush()
        _, terminal = rows(db)["r1"]
        assert terminal is not None
        assert RunComplete.from_json(terminal).result == {"answer": 42}


async def test_recovery_ends_every_unended_run_abandoned_before_it_serves(
    tmp_path: Path, real_clock
):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store:
        for run_id in ("a", "b"):
            store.accept(run_id, "s")
        store.accept("done", "s")
        store.complete(RunComplete("s", "done", result=1))
        with trio.fail_after(BOUND):
            await store.flush()
        # Leave as a crash would: "a" and "b" accepted, never ended. (Closing the store
        # commits what was decided; it decides nothing for them.)
    async with open_sqlite_ledger(db) as store:
        assert store.recovered == 2
        assert store.pending_run_ids() == []
        for run_id in ("a", "b"):
            rc = store.get(run_id)
            assert rc is not None
            assert (rc.outcome, rc.abandoned, rc.error) == ("failed", True, ABANDONED_ERROR)
            with trio.fail_after(BOUND):
                assert await store.wait(run_id) == rc
        assert store.get("done") == RunComplete("s", "done", result=1)
    async with open_sqlite_ledger(db) as store:
        assert store.recovered == 0  # recovered once, durably


async def test_ids_stay_taken_across_restarts(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store:
        store.accept("mine", "s")
        store.complete(RunComplete("s", "mine", result="first"))
    async with open_sqlite_ledger(db) as store:
        with pytest.raises(DuplicateRun):
            store.accept("mine", "s")
        assert store.state("mine") == "terminal"
        assert store.get("mine") == RunComplete("s", "mine", result="first")


async def test_nothing_is_visible_before_its_commit(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db) as store:
        store.accept("r", "s")
        with trio.fail_after(BOUND):
            await store.flush()
        announced: list[RunComplete] = []
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer's commit must wait for this
        try:
            assert store.complete(RunComplete("s", "r", result="x"), announced.append)
            assert store.complete(RunComplete("s", "r", error="again")) is False
            await trio.sleep(0.2)
            assert store.state("r") == "ending"
            assert store.get("r") is None
            assert announced == []
            assert store.pending_run_ids() == ["r"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        with trio.fail_after(BOUND):
            rc = await store.wait("r")
        assert rc.result == "x"
        assert announced == [rc]


async def test_a_failing_disk_refuses_new_work_and_recovers(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db, busy_timeout=0.05) as store:
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            store.accept("r", "s")
            with trio.fail_after(BOUND), pytest.raises(StoreError, match="failing"):
                await store.flush()
            with pytest.raises(StoreError):
                store.accept("other", "s")
            assert store.state("other") is None  # refused: nothing recorded
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        with trio.fail_after(BOUND):
            while True:  # the writer retries what was decided, then takes work again
                try:
                    await store.flush()
                    break
                except StoreError:
                    await trio.sleep(0.05)
        assert rows(db) == {"r": ("s", None)}
        store.accept("other", "s")


async def test_retention_by_count_bytes_and_age(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    retention = SqliteRetention(count=3, bytes=10_000, seconds=3600)
    async with open_sqlite_ledger(db, retention=retention) as store:
        for n in range(5):
            store.complete(RunComplete("s", f"r{n}", result=n))
        with trio.fail_after(BOUND):
            await store.wait("r4")
            await store.flush()
            await store.flush()  # the evictions are writes too
        assert [store.state(f"r{n}") for n in range(5)] == [None, None] + ["terminal"] * 3
        assert store.statistics().evicted_total == 2
        store.accept("r0", "s")  # an evicted id is free again
        store.withdraw("r0")
        store.complete(RunComplete("s", "big", result="x" * 20_000))
        with trio.fail_after(BOUND):
            await store.wait("big")
            await store.flush()
        # Its waiter got it; then the byte bound took the oldest first, and 'big' alone is
        # over the bound, so it went too.
        assert store.statistics().retained == 0
    async with open_sqlite_ledger(db) as store:
        for n in range(3):
            store.complete(RunComplete("s", f"old{n}"))
    async with open_sqlite_ledger(db, retention=SqliteRetention(seconds=0.2)) as store:
        with trio.fail_after(BOUND):
            while store.statistics().retained:
                await trio.sleep(0.05)
        with trio.fail_after(BOUND):
            await store.flush()
    assert rows(db) == {}


async def test_a_timed_out_terminal_keeps_its_flag_on_disk(tmp_path: Path, real_clock):
    """``RunComplete.timed_out`` round-trips through the store: cached, cold and reopened."""
    db = tmp_path / "runs.db"
    timed_out = RunComplete("s", "late", error="timed out", timed_out=True)
    async with open_sqlite_ledger(db, cache_bytes=1) as store:
        store.accept("late", "s")
        store.complete(timed_out)
        with trio.fail_after(BOUND):
            assert await store.wait("late") == timed_out
            await store.flush()
    _, terminal = rows(db)["late"]
    assert terminal is not None
    assert RunComplete.from_json(terminal) == timed_out
    async with open_sqlite_ledger(db) as store:
        with trio.fail_after(BOUND):
            assert await store.wait("late") == timed_out


async def test_results_live_on_disk_with_a_bounded_cache(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db, cache_bytes=100_000) as store:
        for n in range(20):
            store.complete(RunComplete("s", f"r{n}", result="y" * 30_000))
        with trio.fail_after(BOUND):
            await store.wait("r19")
        assert store._cache_bytes <= 100_000
        with trio.fail_after(BOUND):
            cold = await store.wait("r0")  # read back from disk, in a worker thread
        assert cold.result == "y" * 30_000
        assert store.get("r1") is not None


async def test_a_result_that_cannot_be_stored_is_a_failure_everybody_sees(
    tmp_path: Path, real_clock
):
    async with open_sqlite_ledger(tmp_path / "runs.db") as store:
        store.accept("r", "s")
        seen: list[RunComplete] = []
        assert store.complete(RunComplete("s", "r", result={1, 2}), seen.append)
        with trio.fail_after(BOUND):
            rc = await store.wait("r")
        assert rc.outcome == "failed"
        assert rc.error == "result is not a JSON value: set at $"
        assert seen == [rc]


async def test_a_second_opener_is_refused(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    async with open_sqlite_ledger(db):
        with pytest.raises(StoreError, match="in use by another process"):
            async with open_sqlite_ledger(db):
                pass


async def test_a_file_that_is_not_a_run_database_is_refused(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot be used as a run database"):
        async with open_sqlite_ledger(db):
            pass
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        async with open_sqlite_ledger(newer):
            pass


async def test_a_closed_store_refuses_work(tmp_path: Path, real_clock):
    async with open_sqlite_ledger(tmp_path / "runs.db") as store:
        pass
    with pytest.raises(StoreError, match="closed"):
        store.accept("r", "s")
    with pytest.raises(UnknownRun):
        await store.wait("r")


async def test_a_backend_on_sqlite_runs_submits_cancels_and_closes(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    agent = ScriptedAgent(sleep(0.05), return_("ok"), scripts={"long": [sleep(60)]})
    async with open_sqlite_ledger(db) as store, open_backend(store) as backend:
        ws = await backend.create_workspace(tmp_path, SessionCoordinator.factory(agent))
        with trio.fail_after(BOUND):
            done = await backend.submit(ws.id, AgentMessage("s", "hi"))
            long = await backend.submit(ws.id, AgentMessage("t", "long"))
            assert (await backend.wait_run(done)).result == "ok"
            assert backend.cancel_run(long)
            assert (await backend.wait_run(long)).cancelled
            queued = await backend.submit(ws.id, AgentMessage("u", "long"))
            await backend.close_workspace(ws.id, grace=1)
            assert (await backend.wait_run(queued)).cancelled
    assert {run_id: t is not None for run_id, (_, t) in rows(db).items()} == {
        done: True,
        long: True,
        queued: True,
    }


async def test_a_run_accepted_to_rerun_runs_again_after_a_crash(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    workspace = str(tmp_path / "w")
    call = RunCall("s", "the prompt", "again")
    async with open_sqlite_ledger(db) as store:
        store.accept_rerunnable("again", "s", workspace, call)
        store.accept("gone", "s")  # accepted without the policy: abandoned on recovery
        with trio.fail_after(BOUND):
            await store.flush()
        # The process dies here: neither run ends (leaving the store ends no run).
    agent = ScriptedAgent(return_("ran again"))
    async with open_sqlite_ledger(db) as store:
        assert store.state("again") == "pending"  # not abandoned: it is to run again
        assert store.get("gone").abandoned  # type: ignore[union-attr]
        async with open_backend(store) as backend:
            assert backend.rerunnable_paths() == [workspace]
            factory = SessionCoordinator.factory(agent, after_crash="rerun")
            await backend.create_workspace(workspace, factory)
            with trio.fail_after(BOUND):
                rc = await backend.wait_run("again")
            assert (rc.outcome, rc.result) == ("completed", "ran again")
            assert backend.rerunnable_paths() == []
    # At least once: here, exactly once more, as the run's second execution.
    assert agent.calls == [attrs.evolve(call, execution=2)]
    async with open_sqlite_ledger(db) as store:
        assert store.recovered == 0
        assert store.get("again") == rc


async def test_a_rerun_coordinator_stores_what_it_takes_to_run_again(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    agent = ScriptedAgent(sleep(60))
    async with open_sqlite_ledger(db) as store, open_backend(store) as backend:
        factory = SessionCoordinator.factory(agent, after_crash="rerun")
        ws = await backend.create_workspace(tmp_path / "w", factory)
        with trio.fail_after(BOUND):
            run_id = await backend.submit(ws.id, AgentMessage("s", "long one", deadline=90))
        with sqlite3.connect(db) as connection:
            stored = connection.execute(
                "SELECT workspace, call FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        assert stored[0] == ws.path
        assert RunCall.from_json(stored[1]) == RunCall("s", "long one", run_id, deadline=90)
        await backend.close_workspace(ws.id, grace=0.1)


async def test_a_version_1_database_is_migrated(tmp_path: Path, real_clock):
    db = tmp_path / "runs.db"
    with sqlite3.connect(db) as connection:
        connection.executescript(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, session_id TEXT NOT NULL,"
            " accepted_at REAL NOT NULL, ended_at REAL, terminal TEXT,"
            " size INTEGER NOT NULL DEFAULT 0);"
            "INSERT INTO runs (run_id, session_id, accepted_at) VALUES ('old', 's', 1.0);"
            "PRAGMA user_version = 1;"
        )
    async with open_sqlite_ledger(db) as store:
        assert store.get("old").abandoned  # type: ignore[union-attr]
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
    assert {"workspace", "call"} <= columns


async def test_opening_under_an_autojumping_clock_warns(tmp_path: Path, autojump_clock):
    """Virtual time and a writer thread do not mix: say so where it starts, not as a
    mysterious TooSlowError later."""
    with pytest.warns(RuntimeWarning, match="autojumping MockClock"):
        async with open_sqlite_ledger(tmp_path / "runs.db"):
            pass


async def test_opening_on_the_real_clock_does_not_warn(tmp_path: Path, real_clock):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with open_sqlite_ledger(tmp_path / "runs.db"):
            pass
