"""Waiting is never silent: what a consumer waits for, logged at INFO at a growing interval.

A stream's consumer legitimately waits -- for producers, for a seal -- but a misspelled partition or
field name waits forever too. While a dataset waits for a batch, :class:`WaitLog` logs (first after
``log_wait_after`` seconds, then at doubling intervals up to :data:`MAX_INTERVAL_S`) the partition,
the fields, how many rows are ready for the task and how many are wanted, and whether the partition
is sealed -- all from the public client API (``get_production_status``,
``get_consumption_status``, ``get_partition_list``, ``statistics``). Bound a wait with
``StreamingDataset(timeout=...)``; :func:`describe_wait` is also the text of that timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tq_loader.errors import TQError

__all__ = ["MAX_INTERVAL_S", "WaitLog", "WaitTarget", "describe_wait", "next_row_id", "partition_info"]

log = logging.getLogger(__name__)

MAX_INTERVAL_S = 300.0


@dataclass(frozen=True)
class WaitTarget:
    """What one batch request waits for."""

    partition_id: str
    data_fields: tuple[str, ...]
    task_name: str
    wanted: int  # rows the controller needs ready to cut the batch (batch_size x dp_size for a round)
    batch_index: int
    dp_rank: int


class WaitLog:
    """Schedules the INFO reports of one wait: after ``first`` s, then doubling (``None``: never)."""

    def __init__(
        self,
        client: Any,
        target: WaitTarget,
        first: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.target, self.clock = client, target, clock
        self.started = clock()
        self.interval = first
        self.due = None if first is None else self.started + first
        self.reports = 0

    def delay(self) -> float | None:
        """Seconds until the next report is due (``None``: no report is ever due)."""
        if self.due is None:
            return None
        return max(0.0, self.due - self.clock())

    def tick(self) -> None:
        """Log the status if a report is due, and schedule the next one."""
        now = self.clock()
        if self.due is None or self.interval is None or now < self.due:
            return
        log.info("%s", describe_wait(self.client, self.target, now - self.started))
        self.reports += 1
        self.interval = min(max(self.interval * 2, 1e-3), MAX_INTERVAL_S)
        self.due = now + self.interval


def describe_wait(client: Any, target: WaitTarget, waited: float) -> str:
    """One line: what the consumer waits for and what the cluster has (never raises a TQError)."""
    head = (
        f"StreamingDataset has waited {waited:.1f}s for batch {target.batch_index} of partition "
        f"{target.partition_id!r} (task {target.task_name!r}, dp_rank {target.dp_rank}, fields "
        f"{list(target.data_fields)})"
    )
    try:
        ids, produced = client.get_production_status(list(target.data_fields), target.partition_id)
    except TQError as exc:
        return f"{head}; its status is unavailable: {exc}"
    if ids is None or produced is None or len(ids) == 0:
        return (
            f"{head}: the partition has no rows (none written yet, or all cleared; is its name right?){_known(client)}; "
            f"{_sealed(client, target.partition_id)}"
        )
    complete = produced.bool().all(dim=1)
    ready = int(complete.sum()) - _consumed_of(client, target, ids, complete)
    parts = [
        f"{head}: {ready} rows ready with these fields, {target.wanted} wanted, {len(ids)} in the partition"
    ]
    missing = [f for j, f in enumerate(target.data_fields) if not bool(produced[:, j].any())]
    if missing:
        parts.append(f"no row has field(s) {missing} yet (is the name right?)")
    parts.append(_sealed(client, target.partition_id))
    return "; ".join(parts)


def _consumed_of(client: Any, target: WaitTarget, ids: Any, complete: Any) -> int:
    """Complete rows the task already consumed (0 when the status is unavailable)."""
    try:
        cids, consumed = client.get_consumption_status(target.task_name, target.partition_id)
    except TQError:
        return 0
    if cids is None or consumed is None:
        return 0
    done = {int(i) for i, c in zip(cids.tolist(), consumed.tolist()) if c}
    return sum(1 for i, ok in zip(ids.tolist(), complete.tolist()) if ok and int(i) in done)


def partition_info(client: Any, partition_id: str) -> dict[str, Any] | None:
    """The controller's statistics of one partition (``sealed``, ``rows_live``, ``rows_cleared``, ...)
    from the public ``statistics()``; ``None`` for a partition the controller does not know."""
    if hasattr(client, "partition_info"):
        found = client.partition_info(partition_id)
        return None if found is None else found.to_dict()
    tables = client.statistics()["controller"]["partitions"]  # a client without it (a test double)
    found = tables.get("partitions", tables).get(partition_id)
    return None if found is None else dict(found)


def next_row_id(client: Any) -> int:
    """The next global row id the controller will allocate (ids are never reused)."""
    if hasattr(client, "next_row_id"):
        return int(client.next_row_id())
    return int(client.statistics()["controller"]["partitions"]["next_row_id"])


def _sealed(client: Any, partition_id: str) -> str:
    try:
        info = partition_info(client, partition_id) or {}
    except (TQError, KeyError, TypeError, AttributeError):
        return "sealed: unknown"
    if info.get("aborted"):
        return f"aborted: {info['aborted']}"
    if info.get("sealed"):
        return "sealed (the stream ends once these rows are consumed)"
    return "open (more rows may come; a producer seals it to end the stream)"


def _known(client: Any) -> str:
    try:
        names = sorted(client.get_partition_list())
    except TQError:
        return ""
    shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    return f"; known partitions: [{shown}]"
