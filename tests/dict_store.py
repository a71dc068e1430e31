"""A second ``RunStore``, written from the protocol alone: a plain dict, no sharding, no
eviction, no reuse of ``RunLedger``'s code. The backend's battery runs against it too, so the
store protocol is a seam and not a description of ``RunLedger``."""

from __future__ import annotations

import trio

from trio_runs import DuplicateRun, LedgerStatistics, RunComplete, RunStore, UnknownRun
from trio_runs.ledger import OnVisible, RunState


class DictStore:
    """Every run in one dict: ``run_id -> [session_id, terminal or None, Event or None]``."""

    def __init__(self) -> None:
        self.runs: dict[str, list[object]] = {}
        self.counts = {"accepted": 0, "duplicates": 0, "completed": 0, "failed": 0, "cancelled": 0}

    def accept(self, run_id: str, session_id: str) -> None:
        if run_id in self.runs:
            raise DuplicateRun(run_id)
        self.runs[run_id] = [session_id, None, None]
        self.counts["accepted"] += 1

    def withdraw(self, run_id: str) -> None:
        entry = self.runs.get(run_id)
        if entry is None or entry[1] is not None:
            return
        del self.runs[run_id]
        self.counts["accepted"] -= 1
        if isinstance(entry[2], trio.Event):
            entry[2].set()  # its waiters find the run gone: UnknownRun

    def complete(self, rc: RunComplete, on_visible: OnVisible | None = None) -> bool:
        entry = self.runs.setdefault(rc.run_id, [rc.session_id, None, None])
        if entry[1] is not None:
            self.counts["duplicates"] += 1
            return False
        entry[1] = rc
        self.counts[rc.outcome] += 1
        if isinstance(entry[2], trio.Event):
            entry[2].set()
        if on_visible is not None:
            on_visible(rc)  # nothing to commit: visible at once
        return True

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def get(self, run_id: str) -> RunComplete | None:
        entry = self.runs.get(run_id)
        return None if entry is None else entry[1]  # type: ignore[return-value]

    async def wait(self, run_id: str) -> RunComplete:
        entry = self.runs.get(run_id)
        if entry is None:
            await trio.lowlevel.checkpoint()
            raise UnknownRun(run_id)
        if entry[1] is None:
            if entry[2] is None:
                entry[2] = trio.Event()
            event = entry[2]
            assert isinstance(event, trio.Event)
            await event.wait()
            if entry[1] is None:
                raise UnknownRun(run_id)
        else:
            await trio.lowlevel.checkpoint()
        rc = entry[1]
        assert isinstance(rc, RunComplete)
        return rc

    def state(self, run_id: str) -> RunState | None:
        entry = self.runs.get(run_id)
        if entry is None:
            return None
        return "pending" if entry[1] is None else "terminal"

    def session_of(self, run_id: str) -> str | None:
        entry = self.runs.get(run_id)
        return None if entry is None else str(entry[0])

    def pending_run_ids(self) -> list[str]:
        return [run_id for run_id, entry in self.runs.items() if entry[1] is None]

    def statistics(self) -> LedgerStatistics:
        pending = len(self.pending_run_ids())
        return LedgerStatistics(
            accepted_total=self.counts["accepted"],
            pending=pending,
            retained=len(self.runs) - pending,
            completed_total=self.counts["completed"],
            failed_total=self.counts["failed"],
            cancelled_total=self.counts["cancelled"],
            duplicates_suppressed=self.counts["duplicates"],
            evicted_total=0,
        )


def nonzero_outcomes(store: RunStore) -> dict[str, int]:
    """The store's terminal counts by outcome, leaving out the outcomes never recorded."""
    stats = store.statistics()
    counts = {
        "completed": stats.completed_total,
        "failed": stats.failed_total,
        "cancelled": stats.cancelled_total,
    }
    return {outcome: n for outcome, n in counts.items() if n}
