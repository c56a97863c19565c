"""Timing helpers kept for ``benchmarks/backends.py``; the suite's own are in ``tq_loader.bench.workloads``."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from tq_loader.bench.workloads import timed as _timed

__all__ = ["gib_per_s", "median", "timed"]

GiB = float(1 << 30)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (garbage collection held off; the result freed off the clock)."""
    seconds, result = _timed(fn)
    del result
    return seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def gib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / GiB / seconds if seconds > 0 else float("nan")
