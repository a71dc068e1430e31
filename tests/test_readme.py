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


def many_runs_example() -> tuple[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    match = re.search(
        r"## Many runs: collect them, or subscribe before you submit\n.*?"
        r"```python\n(.*?)```\n\n```text\n(.*?)```",
        text,
        re.S,
    )
    assert match, "the README lost its many-runs example"
    return match.group(1), match.group(2).splitlines()


async def test_readme_many_runs_example_collects_every_run(
    autojump_clock, capsys: pytest.CaptureFixture[str]
):
    # The issue-14 guidance: subscribe with nursery.start, collect with as_completed.
    code, shown = many_runs_example()
    assert "await nursery.start(watch, ws)" in code
    assert "nursery.start_soon(" not in code
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("trio.run(main)", ""), str(README), "exec"), namespace)
    with trio.fail_after(60):
        await namespace["main"]()
    printed = capsys.readouterr().out.splitlines()
    # Progress and terminals travel apart: their interleaving is the scheduler's.
    assert sorted(printed) == sorted(shown)
    terminals = [line for line in printed if not line.startswith("progress")]
    assert terminals == [line for line in shown if not line.startswith("progress")]


def without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def test_every_relative_link_and_file_named_in_the_readme_exists():
    # The README once pointed at a DESIGN.md the repository does not ship.
    text = README.read_text(encoding="utf-8")
    root = README.parent
    targets = [
        target.split("#")[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(text))
        if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)
    ]
    # Files named in code spans, as `examples/quickstart.py` or `benchmarks/README.md`
    # (a placeholder such as WORKSPACE_ROOT/... is not a file of the repository).
    for span in re.findall(r"`([^`\n]+)`", text):
        for path in re.findall(
            r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.\w+|[\w.-]+\.md)(?![\w/])", span
        ):
            if not path.split("/")[0].isupper():
                targets.append(path)
    assert targets, "the check found nothing to check"
    missing = sorted({t for t in targets if t and not (root / t).exists()})
    assert missing == []
