"""Several broker addresses, the order they are tried in, and the waits between rounds.

Pure: what a broker test cannot stage on demand (which node fails when, what
a random draw gives) is fed to ``Nodes``, ``Backoff`` and ``retry`` directly.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from pydantic import ValidationError

from broker.connection import Backoff, Nodes, parse_urls, retry
from broker.errors import BrokerUnavailable
from broker.settings import BrokerSettings
from dispatcher import Settings as DispatcherSettings
from gateway.settings import Settings as GatewaySettings
from recorder.settings import RecorderSettings
from schemas.topology import (
    REGISTRY_STREAM_ARGUMENTS,
    WORK_QUEUE_ARGUMENTS,
    replicated,
    submit_queue_arguments,
)
from worker import WorkerSettings

A = "amqp://u:secret@rabbit-1:5672/vh"
B = "amqp://u:secret@rabbit-2:5672/vh"
C = "amqp://u:secret@rabbit-3:5673/vh"


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        (A, (A,)),
        (f"{A},{B},{C}", (A, B, C)),
        (f" {A} , {B} ", (A, B)),
        (f"{A};{B}", (A, B)),  # kombu's other separator
        (f"{A},,{B},", (A, B)),
        ("amqps://u:p@h/", ("amqps://u:p@h/",)),
    ],
)
def test_one_or_several_broker_urls_are_read_in_order(value: str, urls: tuple[str, ...]) -> None:
    assert parse_urls(value) == urls


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "no broker URL"),
        (" , ", "no broker URL"),
        (f"{A},rabbit-2:5672", "broker URL 2 of 2"),
        ("http://u:secret@h/", "not an amqp"),
        ("amqp://u:secret@h:notaport/", "not a URL"),
        ("amqp:///vh", "with a host"),
    ],
)
def test_a_bad_broker_url_is_refused_by_position_without_its_password(
    value: str, says: str
) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_urls(value)
    assert "secret" not in str(caught.value)


def test_every_process_takes_the_same_list_of_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLOS_AMQP_URL", f"{A},{B},{C}")
    for settings_class in (GatewaySettings, DispatcherSettings, WorkerSettings, RecorderSettings):
        settings = settings_class()
        assert isinstance(settings, BrokerSettings)
        assert settings.broker_nodes().urls == (A, B, C), settings_class


def test_a_bad_list_fails_at_start_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # A list of hosts in one URL, the form that failed with "port can't be converted".
    monkeypatch.setenv("POLOS_AMQP_URL", "amqp://u:secret@h1:5672,h2:5672/vh")
    with pytest.raises(ValidationError, match="broker URL 2 of 2") as caught:
        GatewaySettings()
    assert "secret" not in str(caught.value)


RECONNECT = "POLOS_RECONNECT_INTERVAL_SECONDS"
WORKER_RECONNECT = "POLOS_WORKER_RECONNECT_INTERVAL_SECONDS"
DISPATCHER_RECONNECT = "POLOS_DISPATCHER_RECONNECT_MAX_SECONDS"


@pytest.mark.parametrize(
    ("settings_class", "env", "seconds"),
    [
        (WorkerSettings, {}, 1.0),
        (DispatcherSettings, {}, 1.0),
        (WorkerSettings, {WORKER_RECONNECT: "0.4"}, 0.4),
        (DispatcherSettings, {DISPATCHER_RECONNECT: "0.6"}, 0.6),
        (WorkerSettings, {RECONNECT: "0.3", WORKER_RECONNECT: "0.4"}, 0.3),
        (DispatcherSettings, {RECONNECT: "0.3", DISPATCHER_RECONNECT: "0.6"}, 0.3),
        (GatewaySettings, {RECONNECT: "0.3"}, 0.3),
        (RecorderSettings, {RECONNECT: "0.3"}, 0.3),
        (GatewaySettings, {WORKER_RECONNECT: "0.4", DISPATCHER_RECONNECT: "0.6"}, 1.0),
    ],
)
def test_former_reconnect_settings_are_still_honoured(
    monkeypatch: pytest.MonkeyPatch,
    settings_class: type[BrokerSettings],
    env: dict[str, str],
    seconds: float,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert settings_class().reconnect_interval_seconds == seconds


# -- the rotation ------------------------------------------------------------------


def test_nodes_are_tried_in_the_order_given_starting_with_the_first() -> None:
    nodes = Nodes((A, B, C))
    seen = [nodes.current]
    for _ in range(5):
        nodes.moved_on()
        seen.append(nodes.current)
    assert seen == [A, B, C, A, B, C]


@pytest.mark.parametrize(
    ("count", "events", "waits"),
    [
        # One node: every failure is a whole round.
        (1, ["fail", "fail", "fail"], [True, True, True]),
        # Three nodes: the lost node's two peers are tried at once, then a wait.
        (3, ["fail", "fail", "fail", "fail"], [False, False, True, False]),
        # A success starts the count again: the next loss goes on at once.
        (
            3,
            ["fail", "fail", "ok", "fail", "fail", "fail"],
            [False, False, None, False, False, True],
        ),
        (2, ["fail", "ok", "fail", "fail"], [False, None, False, True]),
    ],
)
def test_a_wait_comes_only_after_every_node_failed_in_a_row(
    count: int, events: list[str], waits: list[bool | None]
) -> None:
    nodes = Nodes([A, B, C][:count])
    got: list[bool | None] = []
    for event in events:
        if event == "ok":
            nodes.connected()
            got.append(None)
        else:
            got.append(nodes.moved_on())
    assert got == waits


def test_after_a_success_the_next_connection_starts_on_that_node() -> None:
    nodes = Nodes((A, B, C))
    nodes.moved_on()  # A did not answer
    nodes.connected()  # B did
    assert nodes.current == B
    assert nodes.position == 1


# -- the backoff -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.0, [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]),  # the lowest draw: half of each ceiling
        (1.0, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]),  # the highest: the ceiling, capped
    ],
)
def test_backoff_doubles_to_its_cap_within_its_jitter_bounds(
    draw: float, expected: list[float]
) -> None:
    backoff = Backoff(1.0, draw=lambda: draw)
    assert [round(backoff.next(), 6) for _ in expected] == expected


def test_backoff_starts_over_after_a_reset() -> None:
    backoff = Backoff(2.0, draw=lambda: 1.0)
    for _ in range(6):
        backoff.next()
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)


def test_backoff_never_exceeds_its_cap_and_spreads_processes_apart() -> None:
    rng = random.Random(7)
    processes = [Backoff(2.0, draw=rng.random) for _ in range(50)]
    rounds = [[p.next() for p in processes] for _ in range(10)]
    for ceiling, waits in zip(
        itertools.chain([0.1, 0.2, 0.4, 0.8, 1.6], itertools.repeat(2.0)), rounds, strict=False
    ):
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
    # Not in lockstep: fifty processes that lost the broker together come back apart.
    assert max(rounds[-1]) - min(rounds[-1]) > 0.5


def test_a_cap_below_the_first_wait_is_the_only_wait() -> None:
    backoff = Backoff(0.05, draw=lambda: 1.0)
    assert [backoff.next() for _ in range(3)] == [0.05, 0.05, 0.05]


# -- the retry loop ------------------------------------------------------------------


async def test_retry_runs_the_attempt_until_it_succeeds() -> None:
    failures = iter([BrokerUnavailable("down"), BrokerUnavailable("down")])

    async def attempt() -> str:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "up"

    waits: list[float] = []
    backoff = Backoff(0.01, draw=lambda: 1.0)
    original = backoff.next

    def recorded() -> float:
        waits.append(original())
        return waits[-1]

    backoff.next = recorded  # type: ignore[method-assign]
    assert await retry(attempt, what="test", backoff=backoff) == "up"
    assert waits == [0.01, 0.01]


async def test_retry_raises_what_it_is_told_not_to_retry() -> None:
    async def attempt() -> None:
        raise KeyError("a bug, not the broker")

    with pytest.raises(KeyError):
        await retry(
            attempt,
            what="test",
            backoff=Backoff(0.01),
            retry_on=lambda exc: isinstance(exc, BrokerUnavailable),
        )


async def test_retry_gives_up_when_told_to_stop_while_waiting() -> None:
    stop = asyncio.Event()
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        asyncio.get_running_loop().call_later(0.05, stop.set)
        raise BrokerUnavailable("down")

    async with asyncio.timeout(2):
        with pytest.raises(BrokerUnavailable, match="stopped"):
            await retry(attempt, what="test", backoff=Backoff(30.0, first=30.0), stop=stop)
    assert calls == 1


# -- replication arguments -----------------------------------------------------------


def test_the_replica_count_goes_into_quorum_queues_and_the_stream_only_when_set() -> None:
    assert replicated(WORK_QUEUE_ARGUMENTS, None) == WORK_QUEUE_ARGUMENTS
    assert replicated(WORK_QUEUE_ARGUMENTS, 3)["x-quorum-initial-group-size"] == 3
    assert replicated(REGISTRY_STREAM_ARGUMENTS, 3) == {
        **REGISTRY_STREAM_ARGUMENTS,
        "x-initial-cluster-size": 3,
    }
    assert replicated({"x-queue-type": "classic"}, 3) == {"x-queue-type": "classic"}
    assert submit_queue_arguments(max_length=5, replicas=5)["x-quorum-initial-group-size"] == 5
    assert "x-quorum-initial-group-size" not in submit_queue_arguments(max_length=5)
    assert WORK_QUEUE_ARGUMENTS.get("x-quorum-initial-group-size") is None  # not mutated


def test_every_process_reads_the_same_replica_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLOS_QUORUM_GROUP_SIZE", "3")
    for settings_class in (GatewaySettings, DispatcherSettings, WorkerSettings, RecorderSettings):
        assert settings_class().quorum_group_size == 3
    monkeypatch.setenv("POLOS_QUORUM_GROUP_SIZE", "0")
    with pytest.raises(ValidationError):
        GatewaySettings()


async def test_retry_gives_up_after_its_attempts_with_the_last_error() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise BrokerUnavailable(f"down {calls}")

    with pytest.raises(BrokerUnavailable, match="down 3"):
        await retry(attempt, what="test", backoff=Backoff(0.01), attempts=3)
    assert calls == 3
