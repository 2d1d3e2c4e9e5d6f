"""G9: a 3-node cluster, every process given all nodes, nodes killed under load.

First the node the gateway is connected to is killed (it also leads the
submission queue and the registry stream, which the gateway declared there),
then, once it is back, the node that leads the most of our queues. Each loss
may cost at most 5 s of 503s; every process moves to a live node by itself;
every submission answered 200 reaches a terminal record that agrees with what
ran, and the queue's limit holds throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from broker.connection import Nodes, connect
from broker.errors import PublishRejected
from broker.publisher import RENEW_SECONDS, ConfirmedPublisher
from broker.topology import declare_queue
from tests.broker_node_sets import NodeSet
from tests.broker_nodes import RabbitNode
from tests.fault_support import CHAOS_ROUNDS, Load, Stack, assert_accounted, running_stack
from tests.store_support import eventually

MAX_REFUSED_SECONDS = 5.0  # G9
STEADY_SECONDS = 3.0
AFTER_LOSS_SECONDS = 7.0  # longer than the refusals may last, so they are all seen


def queues(node: RabbitNode) -> dict[str, tuple[str, list[str], list[str]]]:
    """Our replicated queues as ``node`` sees them: name -> (leader, members, online).

    (The workers' exclusive cancel queues are classic, of one node, and die with it.)
    """
    rows = node.ctl("list_queues", "name", "type", "leader", "members", "online")
    found: dict[str, tuple[str, list[str], list[str]]] = {}
    for line in rows.splitlines()[1:]:
        name, kind, leader, members, online = line.split("\t")
        if name.startswith("polos.") and kind in ("quorum", "stream"):
            found[name] = (leader, _names(members), _names(online))
    return found


def _names(listing: str) -> list[str]:
    return [part.strip() for part in listing.strip("[]").split(",") if part.strip()]


def node_at(nodes: list[RabbitNode], url: str) -> RabbitNode:
    port = URL(url).port
    return next(node for node in nodes if node.port == port)


async def _fully_replicated(live: RabbitNode, size: int) -> None:
    """Every queue of ours has ``size`` members and all of them are online."""

    async def replicated() -> bool:
        listing = await asyncio.to_thread(queues, live)
        return bool(listing) and all(
            len(members) == size and len(online) == size for _, members, online in listing.values()
        )

    try:
        await eventually(replicated, timeout=60, what=f"every queue on {size} online members")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {await asyncio.to_thread(queues, live)}") from None


async def _lose(
    nodes: list[RabbitNode], victim: RabbitNode, load: Load, stack: Stack, why: str
) -> None:
    ran = len(stack.probe.runs)
    killed = time.monotonic()
    await asyncio.to_thread(victim.kill9)
    await asyncio.sleep(AFTER_LOSS_SECONDS)
    refused = load.refused_for(killed)
    assert refused <= MAX_REFUSED_SECONDS, f"{refused:.1f}s of 503s after killing {why}"
    assert load.accepted_since(killed + refused) > 0, f"nothing accepted after killing {why}"
    assert node_at(nodes, stack.gateway_node) is not victim
    await eventually(
        lambda: len(stack.probe.runs) > ran + 10,
        timeout=10,
        what=f"executions to run on after killing {why}",
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RabbitNode]]:
    """One cluster for the module: starting three nodes takes a while."""
    with NodeSet() as nodes:
        yield nodes.cluster(3)


async def _restarted(nodes: list[RabbitNode], node: RabbitNode) -> None:
    await asyncio.to_thread(node.restart)
    await _fully_replicated(next(n for n in nodes if n is not node), 3)


@pytest.mark.timeout(120)
async def test_a_channel_first_used_while_its_queue_has_no_leader_recovers(
    cluster: list[RabbitNode], uid: str
) -> None:
    """RabbitMQ 3.10 nacks, for good, a channel whose first publish to a quorum queue
    came while the queue had no leader; the publisher replaces such a channel."""
    leader, other = cluster[0], cluster[1]
    declaring = await connect(Nodes([leader.url]), f"test-{uid}")
    await declare_queue(declaring, f"polos.test.{uid}", {"x-queue-type": "quorum"})
    publishing = await connect(Nodes([other.url]), f"test-{uid}")
    try:
        await asyncio.to_thread(leader.kill9)
        lost = time.monotonic()
        publisher = ConfirmedPublisher(publishing, confirm_timeout=5.0, channels=1)
        await publisher.start()
        refused_until = lost
        while time.monotonic() - lost < RENEW_SECONDS + 3.0:
            try:
                await publisher.publish(f"polos.test.{uid}", b"x", message_id=uid)
            except PublishRejected:
                refused_until = time.monotonic()
            await asyncio.sleep(0.05)
        # Without the replacement the nacks go on for as long as the channel lives.
        assert refused_until - lost < RENEW_SECONDS + 1.5, f"{refused_until - lost:.1f}s of nacks"
        await publisher.close()
    finally:
        await publishing.close()
        with contextlib.suppress(Exception):
            await declaring.close()  # its node was killed
        await _restarted(cluster, leader)


@pytest.mark.chaos
@pytest.mark.timeout(240 + 120 * CHAOS_ROUNDS)
async def test_losing_nodes_under_load_costs_seconds_of_503s_and_nothing_accepted(
    cluster: list[RabbitNode], tmp_path: Path
) -> None:
    nodes = cluster
    async with running_stack([node.url for node in nodes], tmp_path) as stack, Load(stack) as load:
        await asyncio.sleep(STEADY_SECONDS)
        # The broker's defaults on 3 nodes: every quorum queue and the stream on all three.
        await _fully_replicated(nodes[0], 3)

        down: RabbitNode | None = None
        for _ in range(CHAOS_ROUNDS):
            if down is not None:  # a longer (chaos) run: the last round's second loss
                await _restarted(nodes, down)
                await asyncio.sleep(STEADY_SECONDS)
            first = node_at(nodes, stack.gateway_node)
            await _lose(nodes, first, load, stack, "the gateway's node")
            await _restarted(nodes, first)
            await asyncio.sleep(STEADY_SECONDS)

            live = next(node for node in nodes if node is not first)
            listing = await asyncio.to_thread(queues, live)
            leaders = Counter(leader for leader, _, _ in listing.values())
            down = next(node for node in nodes if node.name == leaders.most_common(1)[0][0])
            await _lose(nodes, down, load, stack, f"the node leading {leaders[down.name]}")
        await load.stop()

        await stack.every_process_serves()
        await assert_accounted(load, stack)
