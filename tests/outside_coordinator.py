"""A coordinator written outside the package, to the ``Coordinator`` protocol alone.

No ``SessionCoordinator``, no ``AcceptedRun``, no private helper: its own reservation, its own
serial lanes (one ``trio.Lock`` per session: Trio's locks are fair, so runs start in the order
their tasks asked), its own cancel scopes, and it publishes every terminal itself (store
first, then ``run_completions``, then the marker). It does not implement the optional
capabilities (``SupportsCancelRun``, ``SupportsLaneQueries``).

``plugin`` is what ``trio-runs serve --agent outside_coordinator:plugin`` loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import trio

from trio_runs import (
    Attachment,
    Broker,
    EventType,
    RunCall,
    RunComplete,
    RunStore,
    Workspace,
    mark_run_complete_published,
    new_run_id,
)


class Ticket:
    """The reservation: the ``Reservation`` protocol and nothing more."""

    def __init__(self, session_id: str, sequence: int) -> None:
        self.session_id = session_id
        self.sequence = sequence
        self.closed = False

    def close(self) -> None:
        self.closed = True


class LockLaneCoordinator:
    """Runs ``agent(call)`` (no context argument) one run at a time per session."""

    def __init__(self, agent, store: RunStore, run_completions: Broker[RunComplete]) -> None:
        self.agent = agent
        self.store = store
        self.run_completions = run_completions
        self.sequence = 0
        self.locks: dict[str, trio.Lock] = {}
        self.scopes: dict[str, set[trio.CancelScope]] = {}
        self.open: dict[str, int] = {}

    def _publish(self, rc: RunComplete) -> None:
        # Decided now; fanned out once the store made it durable (on_visible).
        self.store.complete(rc, self._announce)
        mark_run_complete_published()

    def _announce(self, rc: RunComplete) -> None:
        self.run_completions.publish_must_deliver(EventType.UPDATED, rc)

    async def run(
        self,
        session_id: str,
        prompt: str,
        *,
        run_id: str = "",
        attachments: Sequence[Attachment] = (),
    ) -> RunComplete:
        run_id = run_id or new_run_id()
        self.store.accept(run_id, session_id)
        ticket = self.begin_accepted(session_id)
        try:
            return await self.run_accepted(ticket, RunCall(session_id, prompt, run_id))
        finally:
            ticket.close()

    def begin_accepted(self, session_id: str, call: RunCall | None = None) -> Ticket:
        self.sequence += 1
        self.open[session_id] = self.open.get(session_id, 0) + 1
        return Ticket(session_id, self.sequence)

    async def run_accepted(self, accept: Ticket, call: RunCall) -> RunComplete:
        session_id = accept.session_id
        lock = self.locks.setdefault(session_id, trio.Lock())
        scope = trio.CancelScope()
        self.scopes.setdefault(session_id, set()).add(scope)
        try:
            with scope:
                async with lock:
                    try:
                        result = await self.agent(call)
                    except Exception as exc:
                        if scope.cancel_called:
                            raise
                        self._publish(RunComplete(session_id, call.run_id, error=str(exc)))
                        raise
                    rc = RunComplete(session_id, call.run_id, result=result)
                    self._publish(rc)
                    return rc
            rc = RunComplete(session_id, call.run_id, cancelled=True)
            self._publish(rc)
            return rc
        except BaseException:
            if self.store.state(call.run_id) == "pending":
                # Cancelled from outside (shutdown): the run still ends, cancelled.
                self._publish(RunComplete(session_id, call.run_id, cancelled=True))
            raise
        finally:
            self.scopes[session_id].discard(scope)
            self.open[session_id] -= 1

    def cancel(self, session_id: str) -> None:
        for scope in self.scopes.get(session_id, ()):
            scope.cancel()

    def cancel_all(self) -> None:
        for session_id in list(self.scopes):
            self.cancel(session_id)

    def is_session_busy(self, session_id: str) -> bool:
        return self.open.get(session_id, 0) > 0

    def is_busy(self) -> bool:
        return any(self.open.values())

    def queued_prompts(self, session_id: str) -> int:
        return 0

    def queued_prompts_list(self, session_id: str) -> list[str]:
        return []

    def clear_queue(self, session_id: str) -> None:
        pass


async def sleepy_agent(call: RunCall) -> object:
    """``sleep N`` sleeps N seconds; ``fail`` raises; anything else returns the prompt."""
    words = call.prompt.split()
    if words == ["fail"]:
        raise RuntimeError("asked to fail")
    if len(words) == 2 and words[0] == "sleep" and math.isfinite(float(words[1])):
        await trio.sleep(float(words[1]))
    await trio.lowlevel.checkpoint()
    return call.prompt


class Plugin:
    """What ``--agent`` loads: an object with a ``coordinator_factory(workspace)`` method."""

    def coordinator_factory(self, workspace: Workspace) -> LockLaneCoordinator:
        return LockLaneCoordinator(sleepy_agent, workspace.ledger, workspace.run_completions)


plugin = Plugin()
