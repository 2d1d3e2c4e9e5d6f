"""Which connection makes room at the limit, and when freed memory goes back: the
orderings, table-driven (the HTTP behaviour is in test_gateway_hostile.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from gateway import memory
from gateway.memory import Trim
from gateway.server import Doorman, GatewayProtocol


class Connection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def make_room(self) -> None:
        self.closed = True


class NoTrim(Trim):
    def __init__(self) -> None:
        super().__init__(trim=lambda: None)


def doorman(limit: int) -> tuple[Doorman, dict[str, Any]]:
    return Doorman(limit, NoTrim()), {}


def step(door: Doorman, conns: dict[str, Any], action: str, name: str) -> bool | None:
    conn = conns.setdefault(name, Connection(name))
    proto = cast(GatewayProtocol, conn)
    if action == "open":
        return door.admit(proto)
    getattr(door, {"works": "works", "waits": "waits", "closes": "leave"}[action])(proto)
    return None


CASES = [
    # (limit, steps, the one that refused or was closed to make room)
    (2, [("open", "a"), ("open", "b"), ("open", "c")], {"closed": ["a"], "refused": []}),
    (
        2,
        [("open", "a"), ("open", "b"), ("works", "a"), ("open", "c")],
        {"closed": ["b"], "refused": []},
    ),
    (
        2,
        [("open", "a"), ("open", "b"), ("works", "a"), ("works", "b"), ("open", "c")],
        {"closed": [], "refused": ["c"]},
    ),
    # a connection that has just finished a request waits from then: the other goes first
    (
        2,
        [("open", "a"), ("open", "b"), ("works", "a"), ("waits", "a"), ("open", "c")],
        {"closed": ["b"], "refused": []},
    ),
    # one that closed frees its place for good
    (
        2,
        [("open", "a"), ("open", "b"), ("closes", "a"), ("open", "c")],
        {"closed": [], "refused": []},
    ),
]


@pytest.mark.parametrize(("limit", "steps", "expected"), CASES)
def test_at_the_limit_the_longest_waiting_connection_goes_and_a_busy_one_never(
    limit: int, steps: list[tuple[str, str]], expected: dict[str, list[str]]
) -> None:
    door, conns = doorman(limit)
    refused = [name for action, name in steps if step(door, conns, action, name) is False]

    assert refused == expected["refused"]
    assert sorted(n for n, c in conns.items() if c.closed) == expected["closed"]
    assert door.open <= limit


async def test_a_burst_of_closed_connections_returns_memory_once_it_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "SETTLE_SECONDS", 0.05)
    calls: list[int] = []
    trim = Trim(trim=lambda: calls.append(1))
    for _ in range(1000):
        trim.opened()

    for _ in range(400):  # churn while the peak still holds: not over
        trim.closed()
        trim.opened()
    await asyncio.sleep(0.1)
    assert calls == []

    for _ in range(600):
        trim.closed()
    assert calls == []  # not while it is still going on
    await asyncio.sleep(0.1)
    assert calls == [1]

    for _ in range(100):  # too few to be worth a pause
        trim.opened()
    for _ in range(100):
        trim.closed()
    await asyncio.sleep(0.1)
    assert calls == [1]


def test_the_memory_release_is_found_on_this_system() -> None:
    # glibc (the Debian images and CI): the release is there, not silently absent.
    assert memory._malloc_trim() is not None
