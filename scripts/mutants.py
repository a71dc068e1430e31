"""Mutation check: plant known bugs in a private copy of trio_runs and see which tests catch them.

Usage: ``python scripts/mutants.py [NAME ...] [-- PYTEST ARGS]``. For each mutant the library
is copied to a temporary directory, one deliberate bug is planted, and the test suite runs
against the copy (``PYTHONPATH``). A mutant that no test catches is a hole in the proof.
The working tree is never modified.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, [(old, new), ...]): each `old` must occur in the file exactly once.
MUTANTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "drop-fallback": (
        "backend.py",
        [
            (
                "        if not run_complete_published():\n            # A pre-run failure",
                "        if False:\n            # A pre-run failure",
            )
        ],
    ),
    "fallback-always": (
        "backend.py",
        [
            (
                "        if not run_complete_published():\n            # A pre-run failure",
                "        if True:\n            # A pre-run failure",
            )
        ],
    ),
    "cancel-as-error": (
        "coordinator.py",
        [
            (
                "                call, session_id, run_id, started_at=started_at, reason=reason, "
                "cancelled=True\n",
                "                call, session_id, run_id, started_at=started_at, reason=reason, "
                "error='cancelled'\n",
            )
        ],
    ),
    "clear-queue-loses-run": (
        "coordinator.py",
        [
            (
                "        self._publish(\n"
                "            accept,\n"
                "            stamped_terminal(\n"
                "                call, accept.session_id, call.run_id, started_at=None, "
                "reason=reason, cancelled=True\n"
                "            ),\n"
                "        )\n",
                "        pass\n",
            )
        ],
    ),
    "flood-drops-terminal": (
        "broker.py",
        [
            ("        limit = self._max_backlog\n", "        limit = self._buffer_size\n"),
            (
                "                overflowed.append(sub)\n                continue",
                "                continue",
            ),
        ],
    ),
    "withdraw-leaves-trace": (
        "ledger.py",
        [
            (
                "        pending = self._pending.pop(run_id, None)\n"
                "        if pending is not None:\n"
                "            self._accepted_total -= 1\n",
                "        pending = None\n"
                "        if pending is not None:\n"
                "            self._accepted_total -= 1\n",
            )
        ],
    ),
    "reservation-never-closed": (
        "backend.py",
        [("            _close_reservation(accept)\n", "")],
    ),
    "counters-forget-closed-workspaces": (
        "backend.py",
        [
            (
                "            self._closed_drops += "
                "workspace.notifications.drop_count + workspace.events.drop_count\n",
                "",
            )
        ],
    ),
    "terminal-visible-before-commit": (
        "_terminals.py",
        [
            (
                "    return store.complete(rc, announce)\n",
                "    first = store.complete(rc)\n"
                "    if first and announce is not None:\n"
                "        announce(rc)\n"
                "    return first\n",
            )
        ],
    ),
    "acknowledge-before-durable": (
        "backend.py",
        [("        await self._ledger.flush()\n", "")],
    ),
    "sqlite-visible-before-commit": (
        "sqlite.py",
        [
            (
                "        self._ending[run_id] = (waiting, rc, on_visible)\n",
                "        self._ending[run_id] = (waiting, rc, None)\n"
                "        if on_visible is not None:\n"
                "            on_visible(rc)\n",
            )
        ],
    ),
    "sqlite-no-recovery": (
        "sqlite.py",
        [("            await trio.to_thread.run_sync(_recover, writer, abandoned, reruns)\n", "")],
    ),
    "deadline-never-fires": (
        "coordinator.py",
        [
            (
                "deadline=math.inf if accept._deadline is None else now + accept._deadline",
                "deadline=math.inf",
            )
        ],
    ),
    "timeout-as-cancelled": (
        "coordinator.py",
        [("        elif _timed_out(accept, scope):\n", "        elif False:\n")],
    ),
    "sigterm-orphans-run": (
        "cli.py",
        [('for name in ("SIGINT", "SIGTERM", "SIGHUP")', 'for name in ("SIGINT",)')],
    ),
    "as-completed-skips-ended-runs": (
        "backend.py",
        [
            (
                "                    self._ended.append(run_id)\n",
                "                    self._left -= 1\n",
            )
        ],
    ),
    "non-json-result-passes": (
        "_encoding.py",
        [
            (
                "    result, error = rc.result, rc.error\n",
                "    return rc  # a non-JSON result passes silently\n"
                "    result, error = rc.result, rc.error\n",
            )
        ],
    ),
    "cancel-reason-lost": (
        "coordinator.py",
        [
            (
                "                accept._cancel_requested = True\n"
                "                accept._cancel_reason = reason\n"
                "                accept._scope.cancel()\n"
                "            else:\n"
                "                self._drop(session, accept, reason)\n",
                "                accept._cancel_requested = True\n"
                "                accept._scope.cancel()\n"
                "            else:\n"
                "                self._drop(session, accept, reason)\n",
            )
        ],
    ),
    "listing-skips-page-boundary": (
        "ledger.py",
        [
            (
                "    last = shown[-1] if len(newest) > query.limit else None\n",
                "    last = newest[query.limit] if len(newest) > query.limit else None\n",
            )
        ],
    ),
    "replay-skips-the-event-after-last-event-id": (
        "http/journal.py",
        [
            (
                "entries = tuple(entry for entry in held if entry.id > last_event_id)",
                "entries = tuple(entry for entry in held if entry.id > last_event_id + 1)",
            )
        ],
    ),
    "terminal-numbered-before-its-progress": (
        "http/journal.py",
        [('                    _drain(journal, progress, "progress")\n', "")],
    ),
    "fresh-stream-hides-where-it-begins": (
        "http/sse.py",
        [("        if self.last_event_id is None and sent > 0:\n", "        if False:\n")],
    ),
    "multiplexed-terminal-goes-to-the-wrong-caller": (
        "http/client.py",
        [
            (
                "            self._finish(pending, line.terminal)\n",
                "            self._finish(sent[len(sent) - 1 - line.index], line.terminal)\n",
            )
        ],
    ),
    "cancelled-caller-cancels-the-whole-batch": (
        "http/client.py",
        [
            (
                '        if pending.state == "accepted" and not self.closing:\n'
                "            self.nursery.start_soon(self._cancel, pending.run_id)\n",
                '        if pending.state == "accepted" and not self.closing:\n'
                "            for other in list(self.live):\n"
                "                self.nursery.start_soon(self._cancel, other.run_id)\n",
            )
        ],
    ),
    "abandoned-unsent-prompt-is-sent-anyway": (
        "http/client.py",
        [("                queue.remove(pending)\n", "                pass\n")],
    ),
    "held-answer-dropped-on-close": (
        "http/server.py",
        [
            (
                "        await self._write_held()\n        await self._stream.send_eof()\n",
                "        await self._stream.send_eof()\n",
            ),
            (
                "        await self._write_held()\n        await self._stream.aclose()\n",
                "        await self._stream.aclose()\n",
            ),
        ],
    ),
    "sqlite-migration-not-atomic": (
        "sqlite.py",
        [
            ('["BEGIN IMMEDIATE;", *steps', "[*steps"),
            ('script + "\\nCOMMIT;"', "script"),
        ],
    ),
    "cluster-lane-never-freed": (
        "redis/_scripts.py",
        [("  if redis.call('GET', active) == id then\n", "  if false then\n")],
    ),
    "cluster-queued-run-owned-by-its-acceptor": (
        "redis/_scripts.py",
        [
            (
                "      if op[10] then redis.call('HSET', run, 'r', '1') end\n",
                "      if op[10] then redis.call('HSET', run, 'r', '1') end\n"
                "      redis.call('SADD', P .. 'node:' .. node .. ':runs', id)\n",
            )
        ],
    ),
    "cluster-cancel-never-reaches-the-running-node": (
        "redis/store.py",
        [
            (
                "        if node != self._lease.node_id or run is None or not run.claimed:\n",
                "        if True:\n",
            )
        ],
    ),
    "cluster-leaving-node-cancels-queued-runs": (
        "redis/cluster.py",
        [
            (
                "            if run_id not in self._node._here:\n"
                "                routed.scope.cancel()",
                "            self._store.cancel_run(routed.session_id, run_id)",
            )
        ],
    ),
    # R2: a session's lane starts a run only while none of its runs is active. Without both
    # guards a run accepted behind an active one is readied and claimed at once.
    "cluster-session-runs-two-at-once": (
        "redis/_scripts.py",
        [
            (
                "      if redis.call('RPUSH', P .. 'lane:' .. session, id) == 1\n"
                "          and redis.call('EXISTS', P .. 'active:' .. session) == 0 then\n",
                "      if redis.call('RPUSH', P .. 'lane:' .. session, id) >= 1 then\n",
            ),
            (
                "  if redis.call('EXISTS', P .. 'active:' .. session) == 0 then\n"
                "    while true do\n",
                "  if true then\n    while true do\n",
            ),
        ],
    ),
    "cluster-rerun-policy-ignored": (
        "redis/cluster.py",
        [('rerun=local.after_crash == "rerun"', "rerun=False")],
    ),
    "cluster-zombie-keeps-running-a-run-recovery-ended": (
        "redis/store.py",
        [("            and (run.claimed or not run.routed)\n", "            and False\n")],
    ),
    "cluster-progress-stays-on-its-node": (
        "redis/cluster.py",
        [("        self._store.forward_progress(path, progress)\n", "        pass\n")],
    ),
    "cluster-lost-claim-forgotten": (
        "redis/store.py",
        [('        mine = "1" if self._claim_uncertain else "0"\n', '        mine = "0"\n')],
    ),
    "cluster-claim-fences-an-expired-lease": (
        "redis/_scripts.py",
        [
            (
                "  if redis.call('SISMEMBER', P .. 'nodes', node) == 0 then\n    return {'fenced'}",
                "  if true then\n    return {'fenced'}",
            )
        ],
    ),
    "cluster-cancel-catches-runs-accepted-after-it": (
        "redis/_scripts.py",
        [
            (
                "        return tonumber(redis.call('HGET', run, 'x') or '0') < fence\n",
                "        return true\n",
            )
        ],
    ),
}


def plant(target: Path, edits: list[tuple[str, str]]) -> None:
    text = target.read_text(encoding="utf-8")
    for old, new in edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"{target.name}: expected the mutation site once, found {count}")
        text = text.replace(old, new)
    target.write_text(text, encoding="utf-8")


def run(name: str, pytest_args: list[str]) -> list[str]:
    filename, edits = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        # A whole copy, run from inside it: `python -m pytest` puts the current directory
        # first on sys.path, so the mutant shadows the installed package.
        for entry in ("trio_runs", "tests", "examples", "benchmarks"):
            if (ROOT / entry).is_dir():
                shutil.copytree(ROOT / entry, Path(tmp) / entry)
        for entry in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / entry, Path(tmp) / entry)
        plant(Path(tmp) / "trio_runs" / filename, edits)
        env = {**os.environ, "PYTHONPATH": tmp}
        probe = [sys.executable, "-c", "import trio_runs; print(trio_runs.__file__)"]
        where = subprocess.run(probe, cwd=tmp, env=env, capture_output=True, text=True, check=True)
        if not where.stdout.startswith(tmp):
            raise SystemExit(f"the mutant is not the package under test: {where.stdout.strip()}")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *pytest_args]
        result = subprocess.run(
            cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        caught = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)))
        if not caught and result.returncode != 0:
            tail = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
            caught = [f"(the suite failed, exit {result.returncode}: {tail[0]})"]
        return caught


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        names, pytest_args = argv[:split], argv[split + 1 :]
    else:
        names, pytest_args = argv, []
    survivors = 0
    for name in names or list(MUTANTS):
        caught = run(name, pytest_args)
        survivors += not caught
        print(f"{name}: {'SURVIVED' if not caught else f'caught by {len(caught)} test(s)'}")
        for test in caught[:8]:
            print(f"    {test}")
        if len(caught) > 8:
            print(f"    ... and {len(caught) - 8} more")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
