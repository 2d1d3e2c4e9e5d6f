"""The event loop a role's process runs on: uvloop where installed, asyncio's on request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.settings import BrokerSettings
from observe.runtime import EventLoop, loop_factory, loop_name, run
from tests.worker_harness import worker_process


async def _which() -> str:
    await asyncio.sleep(0)
    return loop_name(asyncio.get_running_loop())


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_run_uses_the_loop_asked_for(choice: EventLoop, expected: str) -> None:
    assert run(_which(), choice) == expected


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_factory("auto") is None
    assert run(_which(), "auto") == "asyncio"
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_the_setting_names_one_of_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BrokerSettings().event_loop == "auto"
    monkeypatch.setenv("POLOS_EVENT_LOOP", "asyncio")
    assert BrokerSettings().event_loop == "asyncio"
    monkeypatch.setenv("POLOS_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        BrokerSettings()


@pytest.mark.parametrize(
    ("env", "expected"), [({}, "uvloop"), ({"POLOS_EVENT_LOOP": "asyncio"}, "asyncio")]
)
async def test_a_worker_process_says_which_loop_it_runs_on(
    amqp_url: str, uid: str, tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    log = tmp_path / "worker.log"
    process = worker_process(amqp_url, uid, "v1", log, "--burst", **env)
    try:
        code = await asyncio.to_thread(process.wait, 30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert f"event loop: {expected}" in text
