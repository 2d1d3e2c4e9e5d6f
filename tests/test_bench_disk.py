"""The benchmark's disk readings: whole disks only, flushes where the kernel counts
them, and a stall told from a busy disk that completes nothing."""

from __future__ import annotations

import pytest

from bench import disk

# /proc/diskstats: major minor name, then reads (4), writes (4), in flight, io_ticks,
# weighted, discards (4), flushes (2) on Linux 5.5 and newer.
DISKSTATS = "\n".join(
    [
        " 254 0 vda 81123 11657 3309978 49272 1286903 234205 18317736 164519"
        " 0 136956 237008 15456 85 7490256 3105 354845 20110",
        " 254 1 vda1 80000 11000 3300000 49000 1286000 234000 18300000 164000"
        " 0 136000 236000 15000 80 7490000 3000 354000 20000",
        "   7 0 loop0 10 0 80 1 0 0 0 0 0 4 1 0 0 0 0",
        " 259 0 nvme0n1 5 0 40 1 100 2 800 50 0 70 51 0 0 0 0",
    ]
)
STAT_LINE = "cpu  1000 0 500 90000 250 0 30 7 0 0"


def test_a_reading_sums_whole_disks_and_skips_partitions_and_loop_devices() -> None:
    reading = disk.parse(DISKSTATS, STAT_LINE, {"vda", "loop0", "nvme0n1"} - {"loop0"})
    assert reading.writes == 1286903 + 100  # vda and nvme0n1, not vda1 nor loop0
    assert reading.flushes == 354845  # nvme0n1's kernel line has no flush fields
    assert reading.busy_ms == {"vda": 136956, "nvme0n1": 70}
    assert reading.iowait_s == pytest.approx(250 / disk._TICKS)


@pytest.mark.parametrize(
    ("busy_ms", "writes", "stalled"),
    [
        (250, 0, True),  # busy the whole sample, nothing completed
        (240, 4, True),  # at the limits
        (240, 5, False),  # writes completed: slow, not stopped
        (200, 0, False),  # idle for part of it: nothing asked of it
        (0, 0, False),  # an idle disk
    ],
)
def test_a_stall_is_a_busy_disk_that_completes_nothing(
    busy_ms: int, writes: int, stalled: bool
) -> None:
    # The busiest disk decides; another one idle beside it changes nothing.
    before = disk.Reading(1000, 10, {"vda": 5000, "vdb": 70}, 1.0)
    after = disk.Reading(1000 + writes, 10, {"vda": 5000 + busy_ms, "vdb": 70}, 1.1)
    assert disk.stalled(before, after, 0.25) is stalled


def test_per_execution_figures_and_the_table() -> None:
    watch = disk.Watch(
        first=disk.Reading(writes=0, flushes=0, busy_ms={}, iowait_s=0.0),
        last=disk.Reading(writes=5000, flushes=1500, busy_ms={}, iowait_s=0.6),
        started=0.0,
        ended=15.0,
        stalled_s=0.75,
        longest_stall_s=0.5,
    )
    per = watch.per_execution(1000)
    assert per is not None
    assert (per["writes"], per["flushes"], per["stalled_s"], per["longest_stall_s"]) == (
        5.0,
        1.5,
        0.75,
        0.5,
    )
    assert watch.per_execution(0) is None
    table = disk.disk_table([("ours", "open loop, 440/s", per), ("peer", "closed loop", {})])
    assert "| ours | open loop, 440/s | 5.00 | 1.50 |" in table
    assert "0.75 of 15 (0.50)" in table
    assert "peer" not in table  # a phase without readings has no row


async def test_watching_reads_the_machine_it_runs_on() -> None:
    async with disk.watching() as watch:
        pass
    if watch.first is None:
        pytest.skip("no /proc/diskstats here")
    assert watch.last is not None
    assert watch.last.writes >= watch.first.writes
    assert watch.ended >= watch.started
