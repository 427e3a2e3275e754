"""Statistics shared by the benchmark suite and the peer scripts (standard library only)."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float:
    """The sample at fraction ``p`` (0-1) of the sorted values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]
