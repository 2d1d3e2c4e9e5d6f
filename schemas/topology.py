"""Names and arguments of everything declared on the broker.

Submission queues are quorum queues, one per (project, queue_name), consumed by
a single active dispatcher. The registry is a stream every process replays.
Work queues are quorum queues, one per (project, deployment).
"""

from __future__ import annotations

import hashlib
from typing import Any

REGISTRY_STREAM = "polos.registry"
DEAD_LETTER_EXCHANGE = "polos.dlx"
DEAD_LETTER_QUEUE = "polos.dead"

SUBMIT_PREFIX = "polos.submit."
WORK_PREFIX = "polos.work."

PROJECT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Bounded so a work queue name (``polos.work.<project>.<deployment>``) always fits
# AMQP's 255-byte shortstr: 11 + 64 + 1 + 100 bytes.
DEPLOYMENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"
MAX_WORKFLOW_ID_LENGTH = 128

# The longest run_timeout_seconds any deployment may configure. Queue arguments
# derive from it, and they must be identical in every process that declares a
# queue (RabbitMQ refuses a redeclare with other values), so it is a constant.
MAX_RUN_TIMEOUT_CAP_S = 7 * 24 * 3600

# RabbitMQ's x-consumer-timeout (3.12+) must outlive the longest run: a
# submission stays unacknowledged from admission until its execution is
# terminal. 3.10/3.11 store the argument and ignore it; there the broker-wide
# consumer_timeout (rabbitmq.conf, see compose/) must be raised instead.
CONSUMER_TIMEOUT_MS = (MAX_RUN_TIMEOUT_CAP_S + 3600) * 1000


def submit_queue(project_id: str, queue_name: str) -> str:
    return f"{SUBMIT_PREFIX}{project_id}.{queue_name}"


def work_queue(project_id: str, deployment_id: str) -> str:
    return f"{WORK_PREFIX}{project_id}.{deployment_id}"


def replicated(arguments: dict[str, Any], replicas: int | None) -> dict[str, Any]:
    """``arguments`` asking for ``replicas`` copies of the queue (None: the broker's default).

    RabbitMQ compares these on every redeclare, so every process of a
    deployment must be configured alike (``POLOS_QUORUM_GROUP_SIZE``); a queue
    that exists with another count is used as it is (see ``broker.topology``).
    """
    if replicas is None:
        return arguments
    kind = arguments.get("x-queue-type")
    if kind == "quorum":
        return {**arguments, "x-quorum-initial-group-size": replicas}
    if kind == "stream":
        return {**arguments, "x-initial-cluster-size": replicas}
    return arguments


def submit_queue_arguments(*, max_length: int, replicas: int | None = None) -> dict[str, Any]:
    """Arguments of a submission queue.

    These are fixed at declaration (RabbitMQ refuses a redeclare with different
    values), so nothing here may depend on a single submission: the queue's
    concurrency limit lives in the registry stream, never in an argument.
    """
    arguments = {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-consumer-timeout": CONSUMER_TIMEOUT_MS,
    }
    return replicated(arguments, replicas)


WORK_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-consumer-timeout": CONSUMER_TIMEOUT_MS,
}
DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
# Retention: the stream drops whole segments, oldest first, beyond the maximum;
# readers append a snapshot of the whole registry once the events since the last
# one outgrow REGISTRY_SNAPSHOT_EVERY_BYTES, so what is kept always holds one
# (``broker/registry.py``). A stream declared before these were set keeps growing
# until a policy sets them (README, "Deployments").
REGISTRY_MAX_BYTES = 8 * 1024 * 1024
REGISTRY_SEGMENT_BYTES = 1024 * 1024
REGISTRY_SNAPSHOT_EVERY_BYTES = 1024 * 1024


def registry_stream_arguments(
    *, max_bytes: int = REGISTRY_MAX_BYTES, segment_bytes: int = REGISTRY_SEGMENT_BYTES
) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": segment_bytes,
    }


REGISTRY_STREAM_ARGUMENTS: dict[str, Any] = registry_stream_arguments()

# -- dispatch -------------------------------------------------------------------

RESULTS_PREFIX = "polos.results."
# Direct exchange: routing key = the work queue name, so a cancel reaches every
# worker of that deployment (each binds an exclusive queue) and no one else.
CANCEL_EXCHANGE = "polos.cancel"
# Topic exchange of lifecycle events, in batches; see ``event_batch_routing_key``.
EVENTS_EXCHANGE = "polos.events"


def results_queue(project_id: str, queue_name: str) -> str:
    """Where workers report on executions of one submission queue (and where the
    owning dispatcher keeps its ``dispatched`` markers)."""
    return f"{RESULTS_PREFIX}{project_id}.{queue_name}"


# Only the owner of the submission queue consumes its results queue; single
# active consumer makes a stale consumer (an owner that is letting go) block a
# new one instead of splitting the results between them.
RESULTS_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-consumer-timeout": CONSUMER_TIMEOUT_MS,
}


# A word of an event routing key longer than this (UTF-8 bytes) is shortened to
# its first EVENT_WORD_KEEP bytes + "~" + EVENT_WORD_HASH hex digits of its
# sha256, so the key always fits AMQP's 255-byte shortstr: 3 * 64 + 60 (the
# execution id's own bound, far above a 36-byte UUID) + 3 dots = 255. 64 keeps
# every valid project id (<= 64 characters) whole.
EVENT_WORD_MAX_BYTES = 64
EVENT_ID_MAX_BYTES = 60
EVENT_WORD_KEEP = 40
EVENT_WORD_HASH = 10


def _topic_word(value: str, limit: int = EVENT_WORD_MAX_BYTES) -> str:
    # Topic routing splits on dots; queue names and workflow ids may contain them.
    word = value.replace(".", "_") or "_"
    # Cheap test first: a str of n characters is at most 4n UTF-8 bytes.
    if len(word) * 4 <= limit:
        return word
    raw = word.encode()
    if len(raw) <= limit:
        return word
    digest = hashlib.sha256(raw).hexdigest()[:EVENT_WORD_HASH]
    # Cut on a character boundary: drop a split multi-byte character.
    head = raw[:EVENT_WORD_KEEP].decode(errors="ignore")
    return f"{head}~{digest}"


def event_batch_routing_key(project_id: str) -> str:
    """The routing key of an ``EventBatch``: its project (one word).

    A batch carries the events of one project, whatever their queues and
    workflows, so ``<project>.#`` (or ``#``) is what a follower binds; finer
    bindings of the single-event keys below match no batch.
    """
    return _topic_word(project_id)


def event_routing_key(project_id: str, queue_name: str, workflow_id: str, execution_id: str) -> str:
    """The key single lifecycle events had before batches (still accepted by the recorder):
    ``<project>.<queue>.<workflow>.<execution_id>``, dots inside words replaced by ``_``.

    Bind ``acme.#`` for a project, ``acme.emails.#`` for a queue,
    ``*.*.summarize.*`` for a workflow, ``#.<execution_id>`` for one execution.

    The key always fits AMQP's 255-byte limit: a word longer than
    ``EVENT_WORD_MAX_BYTES`` UTF-8 bytes (after the dot replacement; 60 for the
    execution id, so never a generated one) becomes its
    first ``EVENT_WORD_KEEP`` bytes (whole characters), ``~``, and the first
    ``EVENT_WORD_HASH`` hex digits of the sha256 of the whole word. That is
    deterministic, so a binding on such a long name uses the shortened form
    (this function gives it); the event body carries the exact values.
    """
    return ".".join(
        (
            _topic_word(project_id),
            _topic_word(queue_name),
            _topic_word(workflow_id),
            _topic_word(execution_id, EVENT_ID_MAX_BYTES),
        )
    )


# -- execution store ---------------------------------------------------------------

# Every recorder consumes this one queue (competing consumers: run more to
# scale). Bound to every event; it keeps events while Redis or the recorders
# are down, so nothing published after its first declaration is lost.
RECORDER_QUEUE = "polos.recorder"
RECORDER_BINDING_KEY = "#"
RECORDER_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
}
