"""The benchmark reads a dispatcher's ledger records from its metrics text: every
queue's and kind's ``_total`` sample summed, nothing else, and None when a tree
older than the metric serves none."""

from __future__ import annotations

from bench.broker_work import describe, ledger_records

METRICS = """\
# HELP polos_queue_ledger_records_total Ledger records the broker confirmed
# TYPE polos_queue_ledger_records_total counter
polos_queue_ledger_records_total{kind="record",project="p",queue="a"} 120.0
polos_queue_ledger_records_total{kind="checkpoint",project="p",queue="a"} 3.0
polos_queue_ledger_records_total{kind="record",project="p",queue="b"} 77.0
polos_queue_ledger_records_created{kind="record",project="p",queue="a"} 1.79e+09
polos_queue_ledger_bytes_total{project="p",queue="a"} 50000.0
polos_queue_transitions_total{project="p",queue="a",status="admitted"} 400.0
"""


def test_every_queues_records_and_checkpoints_are_summed_and_nothing_else() -> None:
    assert ledger_records(METRICS) == 200


def test_a_dispatcher_that_wrote_no_record_yet_counts_zero() -> None:
    # prometheus-client declares a labelled counter before its first sample.
    declared = "\n".join(line for line in METRICS.splitlines() if line.startswith("#"))
    assert ledger_records(declared) == 0
    assert ledger_records(declared.replace("records_total counter", "records counter")) == 0


def test_a_dispatcher_without_the_metric_gives_no_figure() -> None:
    older = "\n".join(line for line in METRICS.splitlines() if "ledger_records" not in line)
    assert ledger_records(older) is None
    assert ledger_records("") is None


def test_the_progress_line_names_the_ledgers_share_only_when_counted() -> None:
    per = {
        "executions": 100,
        "enqueues": 2.8,
        "enqueues_by_queue": {"results": 0.6, "submit": 1.0},
        "deliveries": 2.8,
        "acks": 2.7,
        "publishes_broker_wide": 2.8,
    }
    assert "ledger" not in describe(per)
    assert "ledger records 0.45" in describe({**per, "ledger_records": 0.45})
