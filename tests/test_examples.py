"""The examples the README points at run and show what they promise."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
import trio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / name))


async def test_quickstart_shows_one_of_each_ending(
    autojump_clock, capsys: pytest.CaptureFixture[str]
):
    with trio.fail_after(60):
        await load("quickstart.py")["main"]()
    out = capsys.readouterr().out
    assert "queued in session 'demo': ['wait in line']" in out
    terminals = [line for line in out.splitlines() if line.startswith("terminal")]
    assert len(terminals) == 3
    assert any("ok: completed" in line and "HELLO FROM TRIO" in line for line in terminals)
    assert any("fails: failed" in line and "refused" in line for line in terminals)
    assert any("queued: cancelled" in line and "error=None" in line for line in terminals)
    assert "late waiter queued: cancelled" in out


async def test_waiters_all_return_and_agree(autojump_clock, capsys: pytest.CaptureFixture[str]):
    with trio.fail_after(60):
        status = await load("waiters.py")["main"]()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "waiters returned: 200" in out
    assert "disagreed or went missing: 0" in out
