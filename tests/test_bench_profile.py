"""Reading py-spy's collapsed stacks: where the busy time goes, and how much was idle."""

from __future__ import annotations

from bench.profile import summarize_profile

RUNNER = (
    "process 1:python -m dispatcher;_run_module_as_main (<frozen runpy>);run (asyncio/runners.py)"
)


def test_idle_samples_on_either_loop_are_left_out_of_the_busy_time() -> None:
    collapsed = "\n".join(
        [
            # asyncio's loop waiting in select, uvloop's under the runner, and busy work
            f"{RUNNER};Runner.run (asyncio/runners.py);_run_once (asyncio/base_events.py);"
            "select (selectors.py) 30",
            f"{RUNNER};Runner.run (asyncio/runners.py) 20",
            f"{RUNNER};Runner.run (asyncio/runners.py);handle (dispatcher/owner.py);"
            "decode (schemas/dispatch.py) 40",
            f"{RUNNER};Runner.run (asyncio/runners.py);handle (dispatcher/owner.py) 10",
        ]
    )
    text = summarize_profile(collapsed)
    assert "samples: 100; event loop idle (in select, or in uvloop's own code): 50.0%" in text
    self_part = text.split("inclusive time")[0]
    assert "80.0%  decode (schemas/dispatch.py)" in self_part
    assert "20.0%  handle (dispatcher/owner.py)" in self_part
    assert "Runner.run" not in self_part
    assert "100.0%  handle (dispatcher/owner.py)" in text.split("inclusive time")[1]
