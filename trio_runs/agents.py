"""Built-in agents, and how ``trio-runs serve --agent module:callable`` finds one.

``demo`` (``trio_runs.agents:demo``) is scriptable from the prompt, so every path of the run
lifecycle can be exercised from a shell:

- any prompt: its words are streamed back as progress events, one at a time, and the prompt
  is the run's result;
- ``sleep N``: runs for ``N`` seconds (a decimal number), emitting ``tick 1``, ``tick 2``, …
  once a second, then returns the prompt;
- ``fail``: emits one progress event, then raises mid-run (a *failed* terminal);
- ``fail-early``: fails in the coordinator's ``prepare`` hook, before the run starts: the
  agent is never called and the dispatcher's fallback publishes the failed terminal.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Final

import trio

from .backend import CoordinatorFactory, Workspace
from .coordinator import Agent, Coordinator, RunContext, SessionCoordinator
from .events import RunCall
from .ledger import RunStore

__all__ = ["DemoAgent", "demo", "load_agent", "load_store"]

DEMO_HELP: Final = """\
The built-in demo agent (trio_runs.agents:demo) is scripted by the prompt:
  any words     streams each word back as a progress event; the result is the prompt
  sleep N       runs N seconds (decimals allowed), a "tick K" progress event each second
  fail          raises mid-run: the run ends failed
  fail-early    fails in prepare, before the run starts: the run ends failed
"""


class DemoAgent:
    """An agent scripted by its prompt (see the module docstring); never touches the disk.

    Call it as an agent (``await demo(call, ctx)``); :meth:`coordinator_factory` builds the
    coordinator that also runs its :meth:`prepare` hook, which is how ``fail-early`` fails
    before the run starts.
    """

    def __init__(self, word_delay: float = 0.05) -> None:
        if not (isinstance(word_delay, int | float) and math.isfinite(word_delay)) or (
            word_delay < 0
        ):
            raise ValueError(f"word_delay must be a finite number >= 0, got {word_delay!r}")
        self.word_delay = float(word_delay)
        """Seconds between two streamed words."""

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        """Run one prompt: stream, sleep or fail as the prompt says; returns the prompt."""
        words = call.prompt.split()
        seconds = _sleep_seconds(words)
        if seconds is not None:
            tick = 0
            remaining = seconds
            while remaining > 0:
                step = min(1.0, remaining)
                await trio.sleep(step)
                remaining -= step
                tick += 1
                ctx.emit(f"tick {tick}")
            return call.prompt
        if words == ["fail"]:
            ctx.emit("about to fail")
            await trio.sleep(self.word_delay)
            raise RuntimeError("the demo agent failed mid-run, as the prompt 'fail' asked")
        for word in words:
            ctx.emit(word)
            await trio.sleep(self.word_delay)
        return call.prompt

    async def prepare(self, call: RunCall) -> None:
        """The pre-run hook: raises for the prompt ``fail-early``, else does nothing."""
        await trio.lowlevel.checkpoint()
        if call.prompt.split() == ["fail-early"]:
            raise RuntimeError(
                "the demo agent failed in prepare, before the run started "
                "(the prompt 'fail-early' asked)"
            )

    def coordinator_factory(self, workspace: Workspace) -> Coordinator:
        """A ``SessionCoordinator`` for ``workspace`` running this agent and its prepare hook."""
        return SessionCoordinator(
            self,
            run_completions=workspace.run_completions,
            ledger=workspace.ledger,
            events=workspace.events,
            prepare=self.prepare,
        )

    def __repr__(self) -> str:
        return f"<DemoAgent word_delay={self.word_delay}>"


def _sleep_seconds(words: list[str]) -> float | None:
    if len(words) != 2 or words[0] != "sleep":
        return None
    try:
        seconds = float(words[1])
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


demo = DemoAgent()
"""The built-in demo agent (``trio_runs.agents:demo``), the default of ``trio-runs serve``."""


def load_agent(spec: str) -> CoordinatorFactory:
    """The coordinator factory named by ``"module:attribute"`` (like uvicorn's app path).

    The attribute may be dotted. It must be an async agent ``agent(call, ctx)`` (run by a
    ``SessionCoordinator``), or an object with a ``coordinator_factory(workspace)`` method.
    Raises ``ValueError`` with a clear message when the spec cannot be loaded.
    """
    target = _load(spec, "--agent", "agent")
    factory = getattr(target, "coordinator_factory", None)
    if callable(factory):
        made: Callable[[Workspace], Coordinator | None] = factory
        return made
    if callable(target):
        agent: Agent = target
        return SessionCoordinator.factory(agent)
    raise ValueError(f"{spec!r} is neither an agent nor has a coordinator_factory method")


def load_store(spec: str) -> RunStore:
    """The store made by the callable named by ``"module:attribute"`` (called with no arguments).

    Raises ``ValueError`` with a clear message when the spec cannot be loaded, or when what
    it makes does not implement ``RunStore``.
    """
    make = _load(spec, "--store", "store")
    if not callable(make):
        raise ValueError(f"{spec!r} is not callable: --store names a function or class")
    try:
        store = make()
    except Exception as exc:
        raise ValueError(f"{spec!r} failed to make a store: {exc!r}") from None
    if not isinstance(store, RunStore):
        raise ValueError(f"{spec!r} made {type(store).__name__}, which does not implement RunStore")
    return store


def _load(spec: str, option: str, what: str) -> object:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"{option} must look like 'package.module:callable', got {spec!r}")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {what} module {module_name!r}: {exc}") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return target
