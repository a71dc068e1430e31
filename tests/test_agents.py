"""The built-in demo agent (scripted by its prompt) and ``load_agent``; on virtual time."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
import trio

from trio_runs import (
    AgentMessage,
    Notification,
    RunCall,
    RunComplete,
    RunContext,
    RunProgress,
    SessionCoordinator,
    open_backend,
)
from trio_runs.agents import DEMO_HELP, DemoAgent, demo, load_agent

TIMEOUT = 120  # virtual seconds


async def run_prompts(
    prompts: list[str], agent: DemoAgent = demo
) -> tuple[list[RunComplete], dict[str, list[object]], list[Notification]]:
    """Run each prompt in its own session; the terminals, progress by run id, notices."""
    progress: dict[str, list[object]] = {}
    notices: list[Notification] = []
    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            ws = await backend.create_workspace("demo-agent", agent.coordinator_factory)

            async def watch() -> None:
                async with ws.events.subscribe() as events:
                    async for event in events:
                        item = event.payload
                        assert isinstance(item, RunProgress)
                        progress.setdefault(item.run_id, []).append(item.payload)

            async def notes() -> None:
                async with ws.notifications.subscribe() as subscription:
                    async for event in subscription:
                        notices.append(event.payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                nursery.start_soon(notes)
                await trio.testing.wait_all_tasks_blocked()
                ids = [
                    backend.send_message(ws.id, AgentMessage(f"s{i}", prompt))
                    for i, prompt in enumerate(prompts)
                ]
                terminals = [await backend.wait_run(run_id) for run_id in ids]
                await backend.close_workspace(ws.id)
    return terminals, progress, notices


async def test_words_stream_back_and_the_prompt_is_the_result(autojump_clock):
    [rc], progress, _ = await run_prompts(["hello brave new world"])
    assert rc.outcome == "completed"
    assert rc.result == "hello brave new world"
    assert progress[rc.run_id] == ["hello", "brave", "new", "world"]


async def test_sleep_ticks_once_a_second_then_completes(autojump_clock):
    start = trio.current_time()
    [rc], progress, _ = await run_prompts(["sleep 3"])
    assert rc.outcome == "completed"
    assert rc.result == "sleep 3"
    assert progress[rc.run_id] == ["tick 1", "tick 2", "tick 3"]
    assert trio.current_time() - start == pytest.approx(3, abs=0.5)


async def test_sleep_takes_fractions(autojump_clock):
    [rc], progress, _ = await run_prompts(["sleep 1.5"])
    assert rc.outcome == "completed"
    assert progress[rc.run_id] == ["tick 1", "tick 2"]


@pytest.mark.parametrize("prompt", ["sleep", "sleep x", "sleep -1", "sleep nan", "sleep 1 2"])
async def test_malformed_sleep_is_just_words(autojump_clock, prompt: str):
    [rc], progress, _ = await run_prompts([prompt])
    assert rc.outcome == "completed"
    assert rc.result == prompt
    assert progress[rc.run_id] == prompt.split()


async def test_fail_raises_mid_run(autojump_clock):
    [rc], progress, notices = await run_prompts(["fail"])
    assert rc.outcome == "failed"
    assert "mid-run" in (rc.error or "")
    assert progress[rc.run_id] == ["about to fail"]  # it had started
    assert [n.run_id for n in notices] == [rc.run_id]


async def test_fail_early_fails_in_prepare_before_the_run_starts(autojump_clock):
    called: list[RunCall] = []

    class Spy(DemoAgent):
        async def __call__(self, call: RunCall, ctx: RunContext) -> object:
            called.append(call)
            return await super().__call__(call, ctx)

    [rc], progress, _ = await run_prompts(["fail-early"], Spy())
    assert rc.outcome == "failed"
    assert "prepare" in (rc.error or "")
    assert called == []  # the agent never ran
    assert rc.run_id not in progress


async def test_a_mixed_batch_ends_once_each(autojump_clock):
    prompts = ["a b", "fail", "fail-early", "sleep 2", "done"]
    terminals, _, _ = await run_prompts(prompts)
    assert [rc.outcome for rc in terminals] == [
        "completed",
        "failed",
        "failed",
        "completed",
        "completed",
    ]


async def test_the_demo_agent_is_cancellable_while_sleeping(autojump_clock):
    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            ws = await backend.create_workspace("demo-cancel", demo.coordinator_factory)
            run_id = backend.send_message(ws.id, AgentMessage("s", "sleep 1000"))
            await trio.sleep(2)
            assert ws.coordinator is not None
            ws.coordinator.cancel("s")
            rc = await backend.wait_run(run_id)
    assert rc.outcome == "cancelled"


def test_word_delay_is_validated():
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="word_delay"):
            DemoAgent(bad)
    assert "word_delay=0.0" in repr(DemoAgent(0))


def test_help_text_documents_every_script():
    for script in ("sleep N", "fail", "fail-early", "progress"):
        assert script in DEMO_HELP


# -- load_agent ---------------------------------------------------------------------------


@pytest.fixture
def plugin_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("trio_runs_test_plugin")

    async def echo(call: RunCall, ctx: RunContext) -> object:
        return call.prompt[::-1]

    class Holder:
        agent = staticmethod(echo)

    module.echo = echo  # type: ignore[attr-defined]
    module.Holder = Holder  # type: ignore[attr-defined]
    module.not_callable = 3  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


async def test_load_agent_wraps_a_plain_agent(autojump_clock, plugin_module):
    factory = load_agent("trio_runs_test_plugin:Holder.agent")
    with trio.fail_after(TIMEOUT):
        async with open_backend() as backend:
            ws = await backend.create_workspace("plugin", factory)
            assert isinstance(ws.coordinator, SessionCoordinator)
            rc = await backend.run(ws.id, AgentMessage("s", "abc"))
    assert rc.result == "cba"


def test_load_agent_uses_a_coordinator_factory_when_there_is_one():
    assert load_agent("trio_runs.agents:demo") == demo.coordinator_factory


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like"),
        (":demo", "must look like"),
        ("trio_runs.agents:", "must look like"),
        ("surely_not_a_module_x:demo", "cannot import"),
        ("trio_runs.agents:nothing_here", "has no attribute"),
        ("trio_runs_test_plugin:not_callable", "neither an agent"),
    ],
)
def test_load_agent_explains_what_is_wrong(plugin_module, spec: str, message: str):
    with pytest.raises(ValueError, match=message):
        load_agent(spec)
