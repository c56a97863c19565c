"""The in-memory columnar store of one storage unit; no networking (see ``service.py`` for that).

Rows are keyed by (partition, global index). Each partition maps ids to *slots* (sorted id array +
``searchsorted``, so a batch lookup is a few numpy calls) and keeps one column per field:

* fixed-shape tensor fields: ONE preallocated ``(capacity, *row_shape)`` tensor, grown
  geometrically; a put is one ``index_copy_``, a get one ``index_select``;
* nested (jagged / ragged) fields: the rows of a put copied into one private chunk (one copy per
  put); a get slices runs of rows out of the chunks (see ``stores.py``);
* non-tensor fields: an object array of Python values.

Freed slots go to a free list and are reused, so a stream of put/drop keeps memory flat (and
touched: no fresh page faults); ``drop_partition`` gives a partition's memory back. A column
follows the merged schema it is given: when the controller reports a field turned jagged (``-1``
dims), a dense column is converted once. Data is copied *into* the columns (received buffers are
never kept) and reads return fresh tensors, so callers may write to what they get.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from tq_loader.errors import CapacityError, NotFoundError, SchemaError
from tq_loader.ids import as_ids as _ids
from tq_loader.metadata import schema_of
from tq_loader.schema import FieldSchema
from tq_loader.stats import UnitStats
from tq_loader.storage.columns import num_rows, target_kind, torch_dtype
from tq_loader.storage.pins import SlotPins
from tq_loader.storage.stores import Column, NestedColumn, make_column

__all__ = ["SimpleStorageUnit"]

_MIN_SLOTS = 16  # initial size of an id index


def _first(ids: np.ndarray, k: int = 8) -> str:
    head = ids[:k].tolist()
    return f"{head}{' ...' if ids.size > k else ''} ({ids.size} rows)"


# --------------------------------------------------------------------------- id index


class _IdIndex:
    """Sorted global ids -> slots. Appending larger ids (the common case) is amortised O(batch)."""

    __slots__ = ("_keys", "_slots", "n")

    def __init__(self) -> None:
        self._keys = np.empty(_MIN_SLOTS, dtype=np.int64)
        self._slots = np.empty(_MIN_SLOTS, dtype=np.int64)
        self.n = 0

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id, -1 where absent."""
        n = self.n
        if n == 0 or ids.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        keys = self._keys[:n]
        pos = np.minimum(np.searchsorted(keys, ids), n - 1)
        return np.where(keys[pos] == ids, self._slots[pos], -1)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        return self._keys[: self.n].copy(), self._slots[: self.n].copy()

    @property
    def capacity(self) -> int:
        """Entries the index has room for (never more than twice the most it ever held, or 16)."""
        return int(self._keys.size)

    def _reserve(self, total: int) -> None:
        """Room for ``total`` entries: grows geometrically, and only when full."""
        if total <= self._keys.size:
            return
        size = max(total, 2 * self._keys.size)
        n = self.n
        keys, slots = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
        keys[:n], slots[:n] = self._keys[:n], self._slots[:n]
        self._keys, self._slots = keys, slots

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Add ``ids`` (unique, none present yet).

        Ids after every present one (the common case) are appended, amortised O(batch). Ids that
        interleave with present ones (rows written out of allocation order, normal with several
        producers) are merged into the same buffers, moving only the entries after the first new
        id. Either way the buffers grow only when full, so they stay within twice the most rows
        the index ever held.
        """
        if ids.size == 0:
            return
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        n, k = self.n, ids.size
        self._reserve(n + k)
        if n == 0 or ids[0] > self._keys[n - 1]:
            self._keys[n : n + k], self._slots[n : n + k] = ids, slots
        else:  # ids interleave with present ones: one O(n) merge into the same buffers
            keys = self._keys[:n]
            first = int(np.searchsorted(keys, ids[0]))  # present entries before it stay where they are
            new_pos = np.searchsorted(keys, ids) + np.arange(k)
            tail_keys, tail_slots = keys[first:].copy(), self._slots[first:n].copy()
            tail_pos = np.arange(first, n) + np.searchsorted(ids, tail_keys)
            self._keys[tail_pos], self._slots[tail_pos] = tail_keys, tail_slots
            self._keys[new_pos], self._slots[new_pos] = ids, slots
        self.n = n + k

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Remove those of ``ids`` that are present; returns their slots."""
        n = self.n
        if n == 0 or ids.size == 0:
            return np.empty(0, dtype=np.int64)
        keys = self._keys[:n]
        pos = np.minimum(np.searchsorted(keys, ids), n - 1)
        pos = np.unique(pos[keys[pos] == ids])
        slots = self._slots[pos].copy()
        keep = np.ones(n, dtype=bool)
        keep[pos] = False
        m = n - pos.size
        self._keys[:m], self._slots[:m] = keys[keep], self._slots[:n][keep]
        self.n = m
        return slots


# --------------------------------------------------------------------------- partitions


class _Partition:
    """Slots, id index and columns of one partition."""

    def __init__(self) -> None:
        self.index = _IdIndex()
        self.hwm = 0  # slots [0, hwm) have been used at least once
        self.free: list[np.ndarray] = []
        self.columns: dict[str, Column] = {}
        self.pins = SlotPins()  # slots zero-copy readers still view: reused only once they are gone

    @property
    def rows(self) -> int:
        return self.index.n

    def alloc(self, k: int) -> np.ndarray:
        """``k`` slots: reused ones first, then fresh ones past the high-water mark."""
        unpinned = self.pins.reclaim()
        if unpinned is not None:
            self.free.append(unpinned)
        free = np.concatenate(self.free) if len(self.free) > 1 else (self.free[0] if self.free else None)
        reuse = np.empty(0, dtype=np.int64) if free is None else free[: min(k, free.size)]
        self.free = [] if free is None or reuse.size == free.size else [free[reuse.size :]]
        fresh = np.arange(self.hwm, self.hwm + k - reuse.size, dtype=np.int64)
        self.hwm += fresh.size
        return np.concatenate((reuse, fresh))

    def release(self, slots: np.ndarray) -> None:
        if slots.size:
            for col in self.columns.values():
                col.clear(slots)
            reusable = self.pins.defer(slots)
            if reusable.size:
                self.free.append(reusable)


# --------------------------------------------------------------------------- the unit


class SimpleStorageUnit:
    """Columnar rows of many partitions, bounded by ``capacity_rows`` in total (``None``: unbounded)."""

    def __init__(self, capacity_rows: int | None = None) -> None:
        if capacity_rows is not None and capacity_rows < 1:
            raise ValueError(f"capacity_rows must be >= 1 or None, got {capacity_rows}")
        self.capacity_rows = capacity_rows
        self._parts: dict[str, _Partition] = {}
        self.rows = 0
        self._requests = {"put": 0, "get": 0, "drop": 0, "drop_partition": 0, "export": 0}
        self._bytes = {"in": 0, "out": 0}

    # ------------------------------------------------------------ capacity
    @property
    def free_rows(self) -> int | None:
        """Rows that may still be added (``None``: unbounded)."""
        return None if self.capacity_rows is None else self.capacity_rows - self.rows

    def new_row_count(self, partition_id: str, ids: Any) -> int:
        """How many of ``ids`` are not stored yet (a put of them needs that much free capacity)."""
        ids = np.unique(_ids(ids))
        part = self._parts.get(partition_id)
        return int(ids.size if part is None else (part.index.lookup(ids) < 0).sum())

    def has_room(self, new_rows: int) -> bool:
        return self.capacity_rows is None or self.rows + new_rows <= self.capacity_rows

    # ------------------------------------------------------------ put
    def put(
        self,
        partition_id: str,
        ids: Any,
        columns: Mapping[str, Any],
        schemas: Mapping[str, FieldSchema] | None = None,
        *,
        copy_objects: bool = True,
        positions: Any = None,
    ) -> dict[str, FieldSchema]:
        """Store ``columns`` (field -> column value, one row per id); returns the columns' schemas.

        ``schemas``: the merged schemas from the controller (a column turns jagged when they say
        so). All-or-nothing: a schema conflict raises ``SchemaError`` and a full unit
        ``CapacityError`` before anything changes. ``copy_objects=False`` adopts non-tensor rows
        without a deep copy (for freshly decoded data nobody else holds). ``positions``: row ``i``
        of this put is row ``positions[i]`` of every column (the columns of a whole batch, of which
        this unit takes some rows, are copied from in place: no gather first).
        """
        ids = _ids(ids)
        self._requests["put"] += 1
        if np.unique(ids).size != ids.size:
            raise SchemaError(f"partition {partition_id!r}: duplicate global indexes in one put")
        pos = None if positions is None else _ids(positions)
        if pos is not None and pos.size != ids.size:
            raise SchemaError(
                f"partition {partition_id!r}: {pos.size} row positions for {ids.size} global indexes"
            )
        schemas = dict(schemas or {})
        plan = self._plan(partition_id, ids, columns, schemas, pos)
        if ids.size == 0:
            return {name: schema for name, (schema, _) in plan.items()}
        part = self._parts.get(partition_id)
        slots = part.index.lookup(ids) if part is not None else np.full(ids.size, -1, dtype=np.int64)
        new = slots < 0
        n_new = int(new.sum())
        if not self.has_room(n_new):
            raise CapacityError(
                f"storage unit full: it holds {self.rows} of {self.capacity_rows} rows and partition "
                f"{partition_id!r} needs {n_new} more; clear consumed rows (clear_data / clear_partition) "
                "or raise storage.capacity_rows"
            )
        # ---- validated: from here on nothing raises
        if part is None:
            part = self._parts[partition_id] = _Partition()
        if n_new:
            fresh = part.alloc(n_new)
            slots[new] = fresh
            part.index.insert(ids[new], fresh)
            self.rows += n_new
        for name, (schema, value) in plan.items():
            col = part.columns.get(name)
            if col is None:
                col = part.columns[name] = make_column(schema)
            elif col.kind == "dense" and target_kind(schema)[0] != "dense":
                col = part.columns[name] = NestedColumn.from_dense(col, schema)  # type: ignore[arg-type]
            col.schema, col.pins = schema, part.pins
            col.ensure(part.hwm, self.capacity_rows)
            self._bytes["in"] += col.write(slots, value, copy_objects, pos)
        return {name: schema for name, (schema, _) in plan.items()}

    def _plan(
        self,
        pid: str,
        ids: np.ndarray,
        columns: Mapping[str, Any],
        schemas: dict[str, FieldSchema],
        positions: np.ndarray | None = None,
    ) -> dict[str, tuple[FieldSchema, Any]]:
        """Each field's schema after this put, validated against the data; raises before any change."""
        part = self._parts.get(pid)
        plan: dict[str, tuple[FieldSchema, Any]] = {}
        for name, value in columns.items():
            if not isinstance(name, str):
                raise SchemaError(f"partition {pid!r}: field names must be str, got {name!r}")
            rows = num_rows(value)
            if positions is None and rows != ids.size:
                raise SchemaError(
                    f"partition {pid!r}, field {name!r}: {rows} rows for {ids.size} global indexes"
                )
            if positions is not None and positions.size and (positions.min() < 0 or positions.max() >= rows):
                raise SchemaError(f"partition {pid!r}, field {name!r}: row positions outside its {rows} rows")
            col = None if part is None else part.columns.get(name)
            try:
                merged = col.schema if col is not None else None
                for other in (schemas.get(name), schema_of(value, name) if ids.size else None):
                    if other is not None:
                        merged = other if merged is None else merged.merge(other)
            except SchemaError as exc:
                raise SchemaError(f"partition {pid!r}, field {name!r}: {exc}") from None
            if merged is None:  # an empty column without a schema: nothing to store, nothing to learn
                continue
            if not merged.is_non_tensor:
                torch_dtype(merged.dtype)
            plan[name] = (merged, value)
        return plan

    # ------------------------------------------------------------ get
    def get(
        self,
        partition_id: str,
        ids: Any,
        fields: Iterable[str],
        *,
        copy_objects: bool = True,
        copy: bool = True,
    ) -> dict[str, Any]:
        """Field -> column value of rows ``ids`` in that order (fresh tensors; objects deep-copied
        unless ``copy_objects=False``). ``NotFoundError`` names the partition, field and rows missing.

        ``copy=False``: nested columns may return views of the unit's chunks, which it never writes
        again (for a reply that is encoded and sent at once; never write to them)."""
        ids = _ids(ids)
        self._requests["get"] += 1
        part, slots = self._slots(partition_id, ids)
        out: dict[str, Any] = {}
        for name in fields:
            col = part.columns.get(name)
            present = np.zeros(ids.size, dtype=bool) if col is None else col.present(slots)
            if col is None or not present.all():
                raise NotFoundError(
                    f"partition {partition_id!r}, field {name!r}: rows {_first(ids[~present])} have no "
                    "value for it; write the field for these rows first"
                )
            out[name] = col.read(slots, copy_objects, copy)
            self._bytes["out"] += _tensor_bytes(out[name])
        return out

    def read_into(self, partition_id: str, ids: Any, field: str, out: Any, positions: Any) -> bool:
        """Copy field ``field`` of rows ``ids`` into rows ``positions`` of the caller's tensor ``out``
        (one copy, no temporary); False (nothing written) when the column is not a dense one of
        ``out``'s dtype and row shape -- the caller then reads it with :meth:`get`."""
        ids, pos = _ids(ids), _ids(positions)
        part, slots = self._slots(partition_id, ids)
        col = part.columns.get(field)
        if col is None or col.kind != "dense" or pos.size != ids.size:
            return False
        present = col.present(slots)
        if not present.all():
            raise NotFoundError(
                f"partition {partition_id!r}, field {field!r}: rows {_first(ids[~present])} have no "
                "value for it; write the field for these rows first"
            )
        if not col.read_into(slots, out, pos):  # type: ignore[attr-defined]
            return False
        self._bytes["out"] += slots.size * col.row_bytes  # type: ignore[attr-defined]
        return True

    def _slots(self, pid: str, ids: np.ndarray) -> tuple[_Partition, np.ndarray]:
        part = self._parts.get(pid)
        if part is None:
            raise NotFoundError(
                f"partition {pid!r} has no rows in this storage unit (never written or cleared)"
            )
        slots = part.index.lookup(ids)
        if (slots < 0).any():
            raise NotFoundError(
                f"partition {pid!r}: rows {_first(ids[slots < 0])} are not stored in this unit "
                "(never written, or already cleared)"
            )
        return part, slots

    # ------------------------------------------------------------ drop
    def drop(self, partition_id: str, ids: Any) -> int:
        """Free the rows ``ids`` (unknown ones are ignored); returns how many were freed."""
        self._requests["drop"] += 1
        part = self._parts.get(partition_id)
        if part is None:
            return 0
        slots = part.index.remove(_ids(ids))
        part.release(slots)
        self.rows -= slots.size
        return int(slots.size)

    def drop_partition(self, partition_id: str) -> int:
        """Forget a partition (idempotent); returns how many rows were freed."""
        self._requests["drop_partition"] += 1
        part = self._parts.pop(partition_id, None)
        if part is None:
            return 0
        self.rows -= part.rows
        return part.rows

    # ------------------------------------------------------------ export, stats
    def export(self, partition_id: str) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, Any]]]:
        """All ids of a partition (ascending) and, per field, the ids having it and their values."""
        self._requests["export"] += 1
        part = self._parts.get(partition_id)
        if part is None:
            return np.empty(0, dtype=np.int64), {}
        ids, slots = part.index.items()
        fields: dict[str, tuple[np.ndarray, Any]] = {}
        for name, col in part.columns.items():
            present = col.present(slots)
            if present.any():
                fields[name] = (ids[present], col.read(slots[present], True))
        return ids, fields

    def partitions(self) -> list[str]:
        return list(self._parts)

    def schemas(self, partition_id: str) -> dict[str, FieldSchema]:
        part = self._parts.get(partition_id)
        return {} if part is None else {name: col.schema for name, col in part.columns.items()}

    def statistics(self) -> UnitStats:
        """A snapshot: rows, capacity, per-partition per-field rows/bytes, request and byte counters."""
        parts: dict[str, Any] = {}
        for pid, part in self._parts.items():
            fields = {
                name: {"kind": col.kind, "rows": int(col.has.sum()), "bytes": col.nbytes()}
                for name, col in part.columns.items()
            }
            parts[pid] = {
                "rows": part.rows,
                "slots": int(part.hwm),
                "index_capacity": part.index.capacity,  # <= max(16, 2 x most rows held): see _IdIndex
                "fields": fields,
            }
        return UnitStats(
            rows=self.rows,
            capacity_rows=self.capacity_rows,
            free_rows=self.free_rows,
            bytes=sum(f["bytes"] or 0 for p in parts.values() for f in p["fields"].values()),
            partitions=parts,
            requests=dict(self._requests),
            bytes_in=self._bytes["in"],
            bytes_out=self._bytes["out"],
        )


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.is_nested:
        if value.layout == torch.jagged:
            return int(value.values().nbytes)
        value = value.unbind()
    if isinstance(value, torch.Tensor):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(v.nbytes for v in value if isinstance(v, torch.Tensor))
    return 0
