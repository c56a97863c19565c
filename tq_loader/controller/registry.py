"""All partitions of one controller, sharing one row-id allocator.

Sharing the allocator is what makes global row ids unique across partitions: an id names one row of
one partition for the controller's lifetime, even after that partition is dropped.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from tq_loader.controller.snapshot import PartitionSnapshot, from_snapshot, snapshot
from tq_loader.controller.state import PartitionState, RowIdAllocator
from tq_loader.errors import NotFoundError, ProtocolError, SchemaError, TQError
from tq_loader.stats import RegistryStats

__all__ = ["STATE_VERSION", "ControllerSnapshot", "ControllerState"]

STATE_VERSION = 1

_SHOW_PARTITIONS = 20


class ControllerSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole controller state as plain data (partitions in creation order)."""

    version: int
    next_row_id: int
    partitions: list[PartitionSnapshot]


class ControllerState:
    """Partition id -> :class:`PartitionState`, in creation order. Not thread-safe (one event loop)."""

    def __init__(self, allocator: RowIdAllocator | None = None) -> None:
        self.allocator = allocator if allocator is not None else RowIdAllocator()
        self._partitions: dict[str, PartitionState] = {}

    def __contains__(self, partition_id: object) -> bool:
        return partition_id in self._partitions

    def __len__(self) -> int:
        return len(self._partitions)

    def create(self, partition_id: str, exist_ok: bool = True) -> PartitionState:
        """Create a partition (or return the existing one when ``exist_ok``)."""
        if not isinstance(partition_id, str) or not partition_id:
            raise SchemaError(f"partition ids must be non-empty str, got {partition_id!r}")
        existing = self._partitions.get(partition_id)
        if existing is not None:
            if not exist_ok:
                raise TQError(
                    f"partition {partition_id!r} already exists; use it, drop it first, or pick a new id"
                )
            return existing
        state = self._partitions[partition_id] = PartitionState(partition_id, self.allocator)
        return state

    def get(self, partition_id: str) -> PartitionState:
        """The partition, or ``NotFoundError`` listing the known ones."""
        state = self._partitions.get(partition_id)
        if state is None:
            known = list(self._partitions)
            shown = ", ".join(repr(p) for p in known[:_SHOW_PARTITIONS])
            more = f" and {len(known) - _SHOW_PARTITIONS} more" if len(known) > _SHOW_PARTITIONS else ""
            raise NotFoundError(
                f"unknown partition {partition_id!r}; known partitions: [{shown}{more}]. "
                "Put data into it first (which creates it) or check the id"
            )
        return state

    def get_or_create(self, partition_id: str) -> PartitionState:
        return self.create(partition_id, exist_ok=True)

    def drop(self, partition_id: str, missing_ok: bool = True) -> PartitionState | None:
        """Forget a partition; returns its state (None if unknown and ``missing_ok``). Ids are not reused."""
        state = self._partitions.pop(partition_id, None)
        if state is None and not missing_ok:
            self.get(partition_id)  # raises the informative NotFoundError
        return state

    def list(self) -> list[str]:
        """Partition ids in creation order."""
        return list(self._partitions)

    def statistics(self) -> RegistryStats:
        """A snapshot of every partition plus the allocator's position."""
        return RegistryStats(
            num_partitions=len(self._partitions),
            next_row_id=self.allocator.next_id,
            partitions={pid: state.statistics() for pid, state in self._partitions.items()},
        )

    # ------------------------------------------------------------------ checkpoints
    def export_state(self) -> dict[str, Any]:
        """Every partition and the allocator position as plain data (msgpack-able; arrays as bytes)."""
        snap = ControllerSnapshot(
            STATE_VERSION, self.allocator.next_id, [snapshot(part) for part in self._partitions.values()]
        )
        return msgspec.to_builtins(snap, builtin_types=(bytes,))

    def import_state(self, state: Any) -> None:
        """Replace every partition with those of ``state`` (from :meth:`export_state`); all-or-nothing.

        The allocator resumes at the saved position, or later if this controller already handed out
        higher ids (ids are never reused, so a stale id from before the import cannot alias a row).
        Malformed or inconsistent state raises ``ProtocolError`` / ``SchemaError`` and changes nothing.
        """
        try:
            snap = msgspec.convert(state, ControllerSnapshot)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"malformed controller state: {exc}") from None
        if snap.version != STATE_VERSION:
            raise ProtocolError(
                f"controller state version {snap.version} is not supported (expected {STATE_VERSION}); "
                "load it with the tq_loader version that saved it"
            )
        if snap.next_row_id < 0:
            raise ProtocolError(f"controller state: negative next row id {snap.next_row_id}")
        allocator = self.allocator.resumed_at(max(snap.next_row_id, self.allocator.next_id))
        partitions: dict[str, PartitionState] = {}
        for part_snap in snap.partitions:
            if part_snap.partition_id in partitions:
                raise ProtocolError(f"controller state: partition {part_snap.partition_id!r} appears twice")
            partitions[part_snap.partition_id] = from_snapshot(part_snap, allocator)
        ids = np.concatenate(
            [np.empty(0, np.int64)] + [p.production_status(None, [])[0] for p in partitions.values()]
        )
        if ids.size and (ids.max() >= snap.next_row_id or np.unique(ids).size != ids.size):
            raise ProtocolError(
                "controller state: a row id lies beyond the saved next row id or belongs to two partitions"
            )
        self.allocator, self._partitions = allocator, partitions
