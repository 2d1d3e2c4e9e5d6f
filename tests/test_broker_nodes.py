"""Private RabbitMQ nodes (tests/broker_nodes.py): settings, faults and a cluster.

What other tests build on: a node really runs the settings asked for, serves
AMQP on its own URL, refuses connections while its app is stopped, keeps a
durable quorum queue through a SIGKILL, and three nodes form one cluster that
places a quorum queue on all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import AMQPConnectionError
from pamqp.common import FieldTable

from tests.broker_node_sets import cluster_members, load_state
from tests.broker_nodes import RabbitNode, amqp_answers
from tests.conftest import REPO_ROOT, ClusterFactory, NodeFactory

QUORUM: FieldTable = {"x-queue-type": "quorum"}


async def publish_confirmed(url: str, queue: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue,
                mandatory=True,
            )


async def drain(url: str, queue: str, count: int) -> list[bytes]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        bodies = []
        for _ in range(count):
            message = await declared.get(timeout=5)
            await message.ack()
            bodies.append(message.body)
        return bodies


def queue_members(node: RabbitNode, queue: str) -> list[str]:
    rows = json.loads(node.ctl("list_queues", "name", "members", "--formatter", "json"))
    return sorted(next(row["members"] for row in rows if row["name"] == queue))


async def test_node_runs_with_its_own_consumer_timeout_and_serves_amqp(
    rabbit_node: NodeFactory,
) -> None:
    node = rabbit_node(consumer_timeout_ms=60000)

    assert node.port != 5672
    assert node.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,60000}"
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), queue.name)
        message = await queue.get(timeout=5)
        await message.ack()
    assert message.body == b"hello"


async def test_stop_app_refuses_connections_until_start_app(rabbit_node: NodeFactory) -> None:
    node = rabbit_node()

    node.stop_app()

    assert not amqp_answers(node.port)
    with pytest.raises((AMQPConnectionError, OSError)):
        await aio_pika.connect(node.url, timeout=3)
    node.start_app()
    connection = await aio_pika.connect(node.url, timeout=5)
    await connection.close()


async def test_kill9_and_restart_keep_a_durable_quorum_queues_messages(
    rabbit_node: NodeFactory,
) -> None:
    node = rabbit_node()
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("kept", durable=True, arguments=QUORUM)
    bodies = [f"m{i}".encode() for i in range(5)]
    await publish_confirmed(node.url, "kept", bodies)
    pid = node.os_pid()

    node.kill9()

    assert not amqp_answers(node.port)
    node.restart()
    assert node.os_pid() not in (None, pid)
    assert await drain(node.url, "kept", len(bodies)) == bodies


# About 12 s on 2 quiet cores, 20 s on busy ones: bounded well inside CI's budget.
@pytest.mark.timeout(120)
async def test_three_nodes_form_one_cluster_holding_a_quorum_queue_on_each(
    rabbit_cluster: ClusterFactory,
) -> None:
    nodes = rabbit_cluster(3)
    names = sorted(node.name for node in nodes)

    assert cluster_members(nodes[2]) == names
    connection = await aio_pika.connect(nodes[0].url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            "spread", durable=True, arguments={**QUORUM, "x-quorum-initial-group-size": 3}
        )
    assert queue_members(nodes[1], "spread") == names
    await publish_confirmed(nodes[0].url, "spread", [b"across"])
    assert await drain(nodes[2].url, "spread", 1) == [b"across"]


def test_nodes_of_a_process_that_dies_without_teardown_are_removed(tmp_path: Path) -> None:
    # A node killed mid-boot, before it writes its pid file: the watchdog must
    # find the VM by its marker, and a VM left behind would load the shared machine.
    script = (
        "import os\n"
        "from tests.broker_node_sets import NodeSet\n"
        "nodes = NodeSet()\n"
        "node = nodes.node(start=False)\n"
        "node.launch()\n"
        "print(node.home, flush=True)\n"
        "os._exit(1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    home = Path(done.stdout.strip())
    assert home.name.startswith("polos-rabbit-"), done.stderr
    node = load_state(home)[0]

    deadline = time.monotonic() + 20
    while home.exists() and time.monotonic() < deadline:
        time.sleep(0.2)

    assert not home.exists()
    assert node.os_pid() is None
