"""Broker work per execution, from the broker's own counters (no management plugin).

RabbitMQ 3.10's global counters (``rabbit_global_counters``) split deliveries
and acks by queue type but not enqueues (``messages_routed`` counts a copy per
queue of every type), and they are broker-wide: on a shared node other users
add to them. So the quorum-queue figures come from the queues themselves:
every quorum queue of the run's vhost is asked, through ``rabbitmqctl eval``,
for its state machine's (``rabbit_fifo``) book of

- publishers (``enqueuer``): the next sequence number of each channel that
  enqueued into it. One per enqueue, copies by ``BCC`` included, so the
  difference between two readings is the enqueues in between;
- consumers: the next delivery id of each (deliveries) and how many of its
  deliveries are still unsettled (so settled = acknowledged or returned).

That is exact for the vhost, whatever else the broker does. A channel or
consumer that goes away between two readings takes its counts with it
(``gone`` says how many did); the benchmark's processes keep theirs for the
whole phase. The records are found by their shape (a map of ``enqueuer`` /
``consumer`` records), which holds from 3.10 to 4.x; a queue whose state
cannot be read is counted in ``unreadable``. Publishes received come from
the global counters (broker-wide: the run prints how many quorum deliveries
happened outside its vhost meanwhile, a measure of that noise).

Checked against known counts: ``tests/test_bench_broker_work.py`` publishes N
messages to a quorum queue, then N more with a ``BCC`` copy to a second one,
and reads 2N and N enqueues.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from schemas.topology import RECORDER_QUEUE, RESULTS_PREFIX, SUBMIT_PREFIX, WORK_PREFIX

# One expression for ``rabbitmqctl eval``; ``{vhost}`` is an Erlang binary literal.
# Lines: ``e <queue> <channel> <next seq>``, ``c <queue> <consumer> <next id> <unsettled>``,
# ``x <queue>`` (unreadable), ``g <labels> <counter> <value>`` (global counters).
_ERLANG = """
V = {vhost},
Book = fun(S) ->
  L = tuple_to_list(S),
  {{[{{P, element(2, E)}} || M <- L, is_map(M), {{P, E}} <- maps:to_list(M),
      is_tuple(E), tuple_size(E) > 1, element(1, E) =:= enqueuer],
   [{{K, element(4, C), maps:size(element(5, C))}} || M <- L, is_map(M),
      {{K, C}} <- maps:to_list(M), is_tuple(C), tuple_size(C) > 4,
      element(1, C) =:= consumer, is_integer(element(4, C)), is_map(element(5, C))]}}
end,
Queues = lists:append([begin
  {{Name, _}} = amqqueue:get_pid(Q),
  {{resource, _, queue, QN}} = amqqueue:get_name(Q),
  case catch ra:local_query({{Name, node()}}, Book) of
    {{ok, {{_, {{Enq, Con}}}}, _}} ->
      [io_lib:format("e ~s ~w ~b~n", [QN, P, N]) || {{P, N}} <- Enq] ++
      [io_lib:format("c ~s ~w ~b ~b~n", [QN, K, N, O]) || {{K, N, O}} <- Con];
    _ -> [io_lib:format("x ~s~n", [QN])]
  end
 end || Q <- rabbit_amqqueue:list(V), amqqueue:get_type(Q) =:= rabbit_quorum_queue]),
Global = [io_lib:format("g ~s ~s ~b~n",
            [lists:join("/", [atom_to_list(element(2, T)) || T <- Labels]), K, Value])
          || {{Labels, Counters}} <- maps:to_list(rabbit_global_counters:overview()),
             {{K, Value}} <- maps:to_list(Counters)],
io:put_chars([Queues, Global]),
ok.
"""

_KINDS = (
    (SUBMIT_PREFIX, "submit"),
    (WORK_PREFIX, "work"),
    (RESULTS_PREFIX, "results"),
    (RECORDER_QUEUE, "events"),
    ("bench.celery.", "celery"),
)


def queue_kind(name: str) -> str:
    for prefix, kind in _KINDS:
        if name.startswith(prefix):
            return kind
    return "other"


@dataclass(slots=True)
class Reading:
    """One look at the vhost's quorum queues and the broker's global counters."""

    enqueuers: dict[tuple[str, str], int] = field(default_factory=dict)
    consumers: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Reading:
        reading = cls()
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            try:
                if kind == "e":
                    queue, who, seq = rest.rsplit(" ", 2)
                    reading.enqueuers[(queue, who)] = int(seq)
                elif kind == "c":
                    queue, who, next_id, out = rest.rsplit(" ", 3)
                    reading.consumers[(queue, who)] = (int(next_id), int(out))
                elif kind == "x":
                    reading.unreadable.add(rest)
                elif kind == "g":
                    labels, name, value = rest.rsplit(" ", 2)
                    reading.counters[f"{labels} {name}"] = int(value)
            except ValueError:
                continue
        return reading


def _erlang_binary(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'<<"{escaped}"/utf8>>'


def read(vhost: str, *, node: str | None = None) -> Reading | None:
    """The counters now; None when ``rabbitmqctl`` cannot ask (remote broker, no rights)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    argv = ["rabbitmqctl", *(("-n", node) if node else ()), "eval"]
    argv.append(_ERLANG.format(vhost=_erlang_binary(vhost)))
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return Reading.parse(out)


async def read_async(vhost: str | None) -> Reading | None:
    if vhost is None:
        return None
    return await asyncio.to_thread(read, vhost)


@dataclass(slots=True)
class Work:
    """What the broker did between two readings, for the vhost's quorum queues."""

    enqueues: dict[str, int] = field(default_factory=dict)  # by queue kind
    deliveries: dict[str, int] = field(default_factory=dict)
    acks: dict[str, int] = field(default_factory=dict)
    publishes: int = 0  # broker-wide: messages received over AMQP 0-9-1
    outside_deliveries: int = 0  # broker-wide quorum deliveries not in this vhost
    gone: int = 0  # channels or consumers that went away meanwhile (their counts lost)
    unreadable: int = 0

    @property
    def total_enqueues(self) -> int:
        return sum(self.enqueues.values())

    @property
    def total_deliveries(self) -> int:
        return sum(self.deliveries.values())

    @property
    def total_acks(self) -> int:
        return sum(self.acks.values())

    def per(self, count: int, *, purged: int = 0, purged_kind: str = "submit") -> dict[str, Any]:
        """Figures per execution (``count`` of them); ``purged``: submissions enqueued into
        queues of ``purged_kind`` and purged unrun (a saturation phase's backlog), taken
        out of the enqueues (their queued events, a fraction each, stay in)."""
        if count <= 0:
            return {}
        enqueues = dict(self.enqueues)
        if purged:
            enqueues[purged_kind] = max(0, enqueues.get(purged_kind, 0) - purged)

        def each(values: Mapping[str, int]) -> dict[str, float]:
            return {k: round(v / count, 3) for k, v in sorted(values.items()) if v}

        return {
            "executions": count,
            "enqueues": round(sum(enqueues.values()) / count, 3),
            "enqueues_by_queue": each(enqueues),
            "deliveries": round(self.total_deliveries / count, 3),
            "deliveries_by_queue": each(self.deliveries),
            "acks": round(self.total_acks / count, 3),
            "acks_by_queue": each(self.acks),
            "publishes_broker_wide": round(self.publishes / count, 3),
            "outside_deliveries": self.outside_deliveries,
            "purged": purged,
            "gone": self.gone,
            "unreadable": self.unreadable,
        }


_SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=5)


def _add(into: dict[str, int], queue: str, value: int) -> None:
    if value:
        kind = queue_kind(queue)
        into[kind] = into.get(kind, 0) + value


def work_between(before: Reading, after: Reading) -> Work:
    work = Work(unreadable=len(after.unreadable))
    for key, seq in after.enqueuers.items():
        # A channel's first enqueue carries sequence number 1.
        _add(work.enqueues, key[0], seq - before.enqueuers.get(key, 1))
    for key, (next_id, out) in after.consumers.items():
        was_next, was_out = before.consumers.get(key, (0, 0))
        _add(work.deliveries, key[0], next_id - was_next)
        _add(work.acks, key[0], (next_id - out) - (was_next - was_out))
    work.gone = len(before.enqueuers.keys() - after.enqueuers.keys()) + len(
        before.consumers.keys() - after.consumers.keys()
    )

    def delta(name: str) -> int:
        return after.counters.get(name, 0) - before.counters.get(name, 0)

    work.publishes = delta("amqp091 messages_received_total")
    quorum = delta("amqp091/rabbit_quorum_queue messages_delivered_total")
    work.outside_deliveries = max(0, quorum - work.total_deliveries)
    return work


LEDGER_RECORDS = "polos_queue_ledger_records_total"
# The family's declaration, there before its first sample (no record written yet);
# prometheus-client names it with or without the suffix, by version.
_LEDGER_TYPES = ("# TYPE polos_queue_ledger_records ", f"# TYPE {LEDGER_RECORDS} ")


def ledger_records(metrics: str) -> int | None:
    """The ledger records a dispatcher's ``GET /metrics`` text counts, all queues and
    kinds; None if it does not declare them (a tree from before the metric)."""
    total: float | None = None
    for line in metrics.splitlines():
        if line.startswith((f"{LEDGER_RECORDS}{{", f"{LEDGER_RECORDS} ")):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(_LEDGER_TYPES):
            total = total or 0.0
    return None if total is None else int(total)


async def scrape_ledger_records(port: int) -> int | None:
    """``ledger_records`` of the dispatcher serving metrics on ``port``; None if it
    cannot be read (not up, an older tree)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics", timeout=_SCRAPE_TIMEOUT) as response,
        ):
            if response.status != 200:
                return None
            return ledger_records(await response.text())
    except (aiohttp.ClientError, TimeoutError):
        return None


def describe(per: Mapping[str, Any]) -> str:
    """One line for the progress output."""
    if not per:
        return "broker work: not counted"

    def parts(name: str) -> str:
        by = per.get(f"{name}_by_queue", {})
        inner = ", ".join(f"{k} {v:.2f}" for k, v in by.items())
        return f"{name} {per[name]:.2f}" + (f" ({inner})" if inner else "")

    ledger = per.get("ledger_records")
    text = (
        f"per execution ({per['executions']:,}): quorum {parts('enqueues')}"
        + (f" [of the results: ledger records {ledger:.2f}]" if ledger is not None else "")
        + f"; {parts('deliveries')}; {parts('acks')}; "
        f"publishes received {per['publishes_broker_wide']:.2f} (broker-wide)"
    )
    notes = []
    if per.get("purged"):
        notes.append(f"{per['purged']:,} purged submissions left out")
    if per.get("outside_deliveries"):
        notes.append(f"{per['outside_deliveries']:,} quorum deliveries outside the vhost")
    if per.get("gone"):
        notes.append(f"{per['gone']} channels/consumers gone")
    if per.get("unreadable"):
        notes.append(f"{per['unreadable']} queues unreadable")
    return text + (f" [{'; '.join(notes)}]" if notes else "")


def broker_table(rows: Sequence[tuple[str, str, Mapping[str, Any]]]) -> str:
    """Markdown: (system, load, per-execution figures) per phase that counted them."""
    counted = [(s, m, per) for s, m, per in rows if per]
    if not counted:
        return ""
    lines = [
        "| system | load | executions | quorum enqueues | deliveries | acks "
        "| publishes (broker-wide) | enqueues by queue |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for system, load, per in counted:
        by = ", ".join(f"{k} {v:.2f}" for k, v in per.get("enqueues_by_queue", {}).items())
        if (ledger := per.get("ledger_records")) is not None:
            by += f" (of the results: ledger records {ledger:.2f})"
        lines.append(
            f"| {system} | {load} | {per['executions']:,} | {per['enqueues']:.2f} "
            f"| {per['deliveries']:.2f} | {per['acks']:.2f} "
            f"| {per['publishes_broker_wide']:.2f} | {by} |"
        )
    return "\n".join(lines)
