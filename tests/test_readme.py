"""The README's code is true: its 20-line example runs and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## In 20 lines\n\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its example"
    return match.group(1)


def test_readme_example_is_at_most_20_lines():
    assert len(readme_example().strip().splitlines()) <= 20


async def test_readme_example_runs(autojump_clock, capsys: pytest.CaptureFixture[str]):
    code = readme_example().replace("trio.run(main)", "")
    namespace: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), namespace)
    with trio.fail_after(60):
        await namespace["main"]()
    assert capsys.readouterr().out.strip() == "completed HELLO WORLD"


def test_readme_names_both_commands():
    text = README.read_text(encoding="utf-8")
    assert 'python -m pip install -e ".[test]" && trio-runs demo' in text
    assert 'python -m pip install -e ".[test]" && python -m pytest' in text
