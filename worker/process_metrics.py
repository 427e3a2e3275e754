"""CPU and memory of the pool children, read from /proc at each scrape.

The worker's own process is covered by prometheus_client's ProcessCollector; the
children are other processes, so this collector reads their ``/proc/<pid>/stat``
when ``/metrics`` is scraped. Children are labelled by slot (0 .. POOL_PROCESSES-1),
not by pid, so a respawned child continues its slot's series and the label set
stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_proc_stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        return None
    return (utime + stime) / _TICKS, rss_pages * _PAGE


class PoolChildrenCollector(Collector):
    """Exports each pool slot's CPU time and resident memory."""

    def __init__(self, prefix: str, slot_pids: Callable[[], list[tuple[int, int]]]) -> None:
        self._prefix = prefix
        self._slot_pids = slot_pids

    def describe(self) -> list[object]:
        return []  # the families depend on the live pool: collected at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cpu = CounterMetricFamily(
            f"{self._prefix}_pool_child_cpu_seconds",
            "CPU time (user + system) of the pool child now in each slot.",
            labels=["slot"],
        )
        memory = GaugeMetricFamily(
            f"{self._prefix}_pool_child_resident_memory_bytes",
            "Resident memory of the pool child now in each slot.",
            labels=["slot"],
        )
        for slot, pid in self._slot_pids():
            reading = read_proc_stat(pid)
            if reading is not None:
                cpu.add_metric([str(slot)], reading[0])
                memory.add_metric([str(slot)], reading[1])
        yield cpu
        yield memory
