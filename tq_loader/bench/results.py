"""What a run produces: one :class:`Row` per (case, system, metric), with its samples.

Every figure is the median of all samples (repetitions x rounds) with their min and max. Ratios
and targets are computed from rows of the same run only (``ratios.py``, ``targets.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KIND_BASELINE", "KIND_PEER", "KIND_TQ", "Row", "Skip", "find", "make_row"]

KIND_TQ = "tq_loader"  # what is being measured
KIND_PEER = "peer"  # another data system driven through the same calls (TransferQueue)
KIND_BASELINE = "baseline"  # a limit of the machine or of a plain library (ZMQ, torch, Ray)


@dataclass
class Row:
    case: str  # "simple", "complex", "small", "fields", "get_meta", "loader", "memory", ...
    system: str  # e.g. "tq_loader embedded", "TransferQueue 0.1.11", "raw pyzmq PUSH/PULL"
    metric: str  # e.g. "put", "get", "kv_put", "p50"
    unit: str  # "GB/s", "ops/s", "us", "x", "rows/s"
    median: float
    min: float
    max: float
    n: int
    kind: str = KIND_TQ
    samples: list[float] = field(default_factory=list)
    note: str = ""
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def higher_is_better(self) -> bool:
        return self.unit not in ("us", "ms", "s", "x")


@dataclass
class Skip:
    """A case or system that did not run, and why (printed and kept in the JSON)."""

    case: str
    system: str
    reason: str


def make_row(
    case: str,
    system: str,
    metric: str,
    unit: str,
    samples: Sequence[float],
    *,
    kind: str = KIND_TQ,
    note: str = "",
    nbytes: int = 0,
) -> Row:
    values = [float(s) for s in samples if math.isfinite(s)]
    if not values:
        raise ValueError(f"{case}/{system}/{metric}: no finite samples")
    return Row(
        case=case,
        system=system,
        metric=metric,
        unit=unit,
        median=float(statistics.median(values)),
        min=min(values),
        max=max(values),
        n=len(values),
        kind=kind,
        samples=values,
        note=note,
        bytes=nbytes,
    )


def find(
    rows: Iterable[Row], case: str, metric: str, system: str | None = None, kind: str | None = None
) -> Row | None:
    """The first row matching; ``system`` matches exactly, ``kind`` by kind."""
    for row in rows:
        if (
            (row.case, row.metric) == (case, metric)
            and (system is None or row.system == system)
            and (kind is None or row.kind == kind)
        ):
            return row
    return None
