"""Helpers for testing agents and services built on trio-runs.

- :class:`ScriptedAgent` — an agent written as a script of steps (:func:`emit`,
  :func:`sleep`, :func:`raise_`, :func:`wait_for`, :func:`return_`), so a test reads as a story.
- :class:`FaultyCoordinator` and :func:`failing_prepare` — inject a failure at a chosen point
  of the dispatch path.
- :class:`TerminalRecorder` — records every terminal a workspace publishes and checks the
  guarantee with :meth:`TerminalRecorder.assert_exactly_once`.
- :func:`autojump_clock` — the virtual clock the tests of this project run on.

The pytest plugin (``trio_runs.pytest_plugin``, registered automatically on install) gives
the fixture ``trio_runs_backend``; the virtual clock fixture, ``autojump_clock``, is
pytest-trio's.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import TracebackType

import attrs
import trio
import trio.testing

from .backend import Workspace
from .broker import Subscription
from .context import mark_run_complete_published
from .coordinator import Coordinator, Prepare, Reservation, RunContext
from .errors import SubscriberOverflow
from .events import Attachment, RunCall, RunComplete

__all__ = [
    "FaultPoint",
    "FaultyCoordinator",
    "ScriptedAgent",
    "Step",
    "TerminalRecorder",
    "autojump_clock",
    "emit",
    "failing_prepare",
    "raise_",
    "return_",
    "sleep",
    "wait_for",
]


def autojump_clock() -> trio.testing.MockClock:
    """A virtual clock that jumps ahead whenever every task is blocked (sleeps cost nothing)."""
    return trio.testing.MockClock(autojump_threshold=0)


# -- scripted agents ---------------------------------------------------------------------


@attrs.frozen
class _Emit:
    payload: object


@attrs.frozen
class _Sleep:
    seconds: float


@attrs.frozen
class _Raise:
    exc: BaseException | type[BaseException]


@attrs.frozen
class _WaitFor:
    event: trio.Event


@attrs.frozen
class _Return:
    value: object


Step = _Emit | _Sleep | _Raise | _WaitFor | _Return
"""One step of a :class:`ScriptedAgent`'s script; build them with the functions below."""
_STEP_TYPES = (_Emit, _Sleep, _Raise, _WaitFor, _Return)


def emit(payload: object) -> Step:
    """Publish ``payload`` as lossy progress (``ctx.emit``)."""
    return _Emit(payload)


def sleep(seconds: float) -> Step:
    """Sleep ``seconds`` (virtual seconds under an autojump clock)."""
    if seconds < 0:
        raise ValueError(f"cannot sleep a negative time: {seconds!r}")
    return _Sleep(seconds)


def raise_(exc: BaseException | type[BaseException]) -> Step:
    """Raise ``exc`` (an instance, or a class instantiated with the run id as message)."""
    return _Raise(exc)


def wait_for(event: trio.Event) -> Step:
    """Block until ``event`` is set: the test decides when the run may go on."""
    return _WaitFor(event)


def return_(value: object) -> Step:
    """End the run successfully with ``value`` as its result (later steps are skipped)."""
    return _Return(value)


def _instantiate(exc: BaseException | type[BaseException], detail: str) -> BaseException:
    return exc(detail) if isinstance(exc, type) else exc


class ScriptedAgent:
    """An agent that plays a script of steps; without a ``return_`` step it returns ``None``.

    ``scripts`` may map prompts to their own script; other prompts play ``steps``. The agent
    records what happened so tests can assert on it: :attr:`calls`, :attr:`started`,
    :attr:`finished` and :attr:`cancelled` (run ids), and :attr:`max_concurrent_per_session`,
    which would show a session running two runs at once.
    """

    def __init__(self, *steps: Step, scripts: Mapping[str, Sequence[Step]] | None = None) -> None:
        for step in [*steps, *(s for script in (scripts or {}).values() for s in script)]:
            if not isinstance(step, _STEP_TYPES):
                raise TypeError(f"a script is made of Steps, got {step!r}")
        self.steps: tuple[Step, ...] = steps
        self.scripts: dict[str, tuple[Step, ...]] = {
            k: tuple(v) for k, v in (scripts or {}).items()
        }
        self.calls: list[RunCall] = []
        """Every call received, attempts included, in order."""
        self.started: list[str] = []
        """Run ids in the order their agent started (one entry per attempt)."""
        self.finished: list[str] = []
        """Run ids whose script ran to its end or to a ``return_``."""
        self.cancelled: list[str] = []
        """Run ids whose agent was interrupted by a cancellation."""
        self.max_concurrent_per_session = 0
        self._running: dict[str, int] = defaultdict(int)
        self._started_events: dict[str, trio.Event] = defaultdict(trio.Event)

    async def wait_started(self, run_id: str) -> None:
        """Wait until the agent has started for ``run_id``."""
        await self._started_events[run_id].wait()

    async def __call__(self, call: RunCall, ctx: RunContext) -> object:
        self.calls.append(call)
        self.started.append(call.run_id)
        self._started_events[call.run_id].set()
        self._running[call.session_id] += 1
        self.max_concurrent_per_session = max(
            self.max_concurrent_per_session, self._running[call.session_id]
        )
        try:
            result = await self._play(self.scripts.get(call.prompt, self.steps), call, ctx)
        except trio.Cancelled:
            self.cancelled.append(call.run_id)
            raise
        finally:
            self._running[call.session_id] -= 1
        self.finished.append(call.run_id)
        return result

    async def _play(self, steps: Iterable[Step], call: RunCall, ctx: RunContext) -> object:
        for step in steps:
            if isinstance(step, _Emit):
                ctx.emit(step.payload)
            elif isinstance(step, _Sleep):
                await trio.sleep(step.seconds)
            elif isinstance(step, _WaitFor):
                await step.event.wait()
            elif isinstance(step, _Raise):
                raise _instantiate(step.exc, call.run_id)
            else:
                return step.value
        return None


# -- fault injection ---------------------------------------------------------------------


class FaultPoint(enum.Enum):
    """Where :class:`FaultyCoordinator` fails a run."""

    BEGIN_ACCEPTED = "begin_accepted"
    """``begin_accepted`` raises: the submission must be refused with nothing half-done."""
    BEFORE_RUN = "before_run"
    """``run_accepted`` raises before the real coordinator sees the run: a pre-run error."""
    AFTER_TERMINAL = "after_terminal"
    """The real coordinator ran the run and published its terminal, then this raises."""
    MARK_WITHOUT_PUBLISH = "mark_without_publish"
    """The marker is flagged but nothing is published, then this raises (a buggy coordinator)."""


class FaultyCoordinator:
    """Wraps a coordinator and makes chosen runs fail at a chosen :class:`FaultPoint`.

    ``when(call)`` picks the runs (default: every run); for ``BEGIN_ACCEPTED`` without a call
    handed over, ``when`` receives a call with only the session id and an empty prompt.
    Everything else is delegated unchanged. :attr:`injected` counts the faults raised.
    """

    def __init__(
        self,
        inner: Coordinator,
        point: FaultPoint,
        exc: BaseException | type[BaseException] = RuntimeError,
        *,
        when: Callable[[RunCall], bool] | None = None,
    ) -> None:
        self.inner = inner
        self.point = point
        self.exc = exc
        self.when = when or (lambda call: True)
        self.injected = 0

    def _fault(self, call: RunCall) -> BaseException | None:
        if not self.when(call):
            return None
        self.injected += 1
        return _instantiate(self.exc, f"injected fault at {self.point.value}")

    async def run(
        self,
        session_id: str,
        prompt: str,
        *,
        run_id: str = "",
        attachments: Sequence[Attachment] = (),
    ) -> RunComplete:
        """Delegated unchanged."""
        return await self.inner.run(session_id, prompt, run_id=run_id, attachments=attachments)

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> Reservation:
        """Delegated, unless this is the fault point."""
        if self.point is FaultPoint.BEGIN_ACCEPTED:
            fault = self._fault(call if call is not None else RunCall(session_id, ""))
            if fault is not None:
                raise fault
        return self.inner.begin_accepted(session_id, call)

    async def run_accepted(self, accept: Reservation, call: RunCall) -> RunComplete:
        """Delegated, with the fault injected before or after as configured."""
        if self.point is FaultPoint.BEFORE_RUN:
            fault = self._fault(call)
            if fault is not None:
                await trio.lowlevel.checkpoint()
                raise fault
        elif self.point is FaultPoint.MARK_WITHOUT_PUBLISH:
            fault = self._fault(call)
            if fault is not None:
                mark_run_complete_published()
                await trio.lowlevel.checkpoint()
                raise fault
        rc = await self.inner.run_accepted(accept, call)
        if self.point is FaultPoint.AFTER_TERMINAL:
            fault = self._fault(call)
            if fault is not None:
                raise fault
        return rc

    def cancel(self, session_id: str) -> None:
        """Delegated unchanged."""
        self.inner.cancel(session_id)

    def cancel_all(self) -> None:
        """Delegated unchanged."""
        self.inner.cancel_all()

    def is_session_busy(self, session_id: str) -> bool:
        """Delegated unchanged."""
        return self.inner.is_session_busy(session_id)

    def is_busy(self) -> bool:
        """Delegated unchanged."""
        return self.inner.is_busy()

    def queued_prompts(self, session_id: str) -> int:
        """Delegated unchanged."""
        return self.inner.queued_prompts(session_id)

    def queued_prompts_list(self, session_id: str) -> list[str]:
        """Delegated unchanged."""
        return self.inner.queued_prompts_list(session_id)

    def clear_queue(self, session_id: str) -> None:
        """Delegated unchanged."""
        self.inner.clear_queue(session_id)


def failing_prepare(
    exc: BaseException | type[BaseException] = RuntimeError,
    *,
    when: Callable[[str], bool] | None = None,
) -> Prepare:
    """A ``prepare`` hook that raises for the runs ``when(run_id)`` picks (default: all)."""
    pick = when or (lambda run_id: True)

    async def prepare(call: RunCall) -> None:
        await trio.lowlevel.checkpoint()
        run_id = call.run_id
        if pick(run_id):
            raise _instantiate(exc, f"prepare failed for {run_id}")

    return prepare


# -- recording terminals -----------------------------------------------------------------


class TerminalRecorder:
    """Records every terminal published on a workspace's ``run_completions``.

    ``async with TerminalRecorder(workspace) as recorder:`` subscribes on entry, so nothing
    published after that is missed. It starts no task: what has arrived is taken whenever the
    record is read (:attr:`terminals`, :attr:`by_run`, :meth:`poll`) or waited on
    (:meth:`wait_for`), and once more on exit. (Read it at least every ``max_backlog``
    terminals, 65,536 by default, or the subscription overflows, which the record reports.)
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._terminals: list[RunComplete] = []
        self._by_run: dict[str, list[RunComplete]] = defaultdict(list)
        self.overflow: SubscriberOverflow | None = None
        """Set if the recorder fell ``max_backlog`` behind and was disconnected."""
        self._subscription: Subscription[RunComplete] | None = None

    @property
    def terminals(self) -> list[RunComplete]:
        """Every terminal received so far, in order."""
        self.poll()
        return self._terminals

    @property
    def by_run(self) -> dict[str, list[RunComplete]]:
        """Terminals received per run id (more than one would break the guarantee)."""
        self.poll()
        return self._by_run

    def _record(self, rc: RunComplete) -> None:
        self._terminals.append(rc)
        self._by_run[rc.run_id].append(rc)

    def poll(self) -> int:
        """Take every terminal that has arrived; returns how many were new. Never blocks."""
        subscription = self._subscription
        taken = 0
        while subscription is not None:
            try:
                event = subscription.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            except SubscriberOverflow as overflow:
                self.overflow = overflow
                break
            self._record(event.payload)
            taken += 1
        return taken

    async def __aenter__(self) -> TerminalRecorder:
        if self._subscription is not None:
            raise RuntimeError("a TerminalRecorder can be entered only once")
        subscription = self.workspace.run_completions.subscribe()
        self._subscription = await subscription.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poll()
        assert self._subscription is not None
        self._subscription.close()

    def terminal_for(self, run_id: str) -> RunComplete | None:
        """The (first) terminal recorded for ``run_id``, if any."""
        found = self.by_run.get(run_id)
        return found[0] if found else None

    async def wait_for(self, run_id: str) -> RunComplete:
        """Wait until a terminal for ``run_id`` is recorded, and return it.

        Raises ``LookupError`` if the workspace shut down without one (a broken guarantee)
        and ``SubscriberOverflow`` if the recorder was disconnected.
        """
        if self._subscription is None:
            raise RuntimeError("enter the recorder first: async with TerminalRecorder(ws)")
        self.poll()
        while not self._by_run.get(run_id):
            if self.overflow is not None:
                raise self.overflow
            try:
                event = await self._subscription.receive()
            except trio.EndOfChannel:
                raise LookupError(
                    f"the workspace shut down with no terminal for {run_id}"
                ) from None
            self._record(event.payload)
        return self._by_run[run_id][0]

    def assert_exactly_once(self, run_ids: Collection[str]) -> None:
        """Fail unless each of ``run_ids`` has exactly one terminal and no run has two.

        The message lists every run with none and every run with more than one.
        """
        by_run = self.by_run
        missing = sorted(r for r in run_ids if not by_run.get(r))
        repeated = {r: len(t) for r, t in by_run.items() if len(t) > 1}
        problems = []
        if self.overflow is not None:
            problems.append(f"the recorder overflowed: {self.overflow}")
        if missing:
            problems.append(f"{len(missing)} run(s) without a terminal: {missing[:20]}")
        if repeated:
            problems.append(f"run(s) with more than one terminal: {repeated}")
        if problems:
            raise AssertionError("; ".join(problems))
