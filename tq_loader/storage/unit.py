"""The in-memory columnar store of one storage unit; no networking (see ``service.py`` for that).

Rows are keyed by (partition, global index). Each partition maps ids to *slots* (sorted id array +
``searchsorted``, so a batch lookup is a few numpy calls) and keeps one column per field:

* fixed-shape tensor fields: ONE preallocated ``(capacity, *row_shape)`` tensor, grown
  geometrically; a put is one ``index_copy_``, a get one ``index_select``;
* nested (jagged / ragged) fields: per-row tensors, each a view into one private chunk copied
  per put (one clone + one split per put, one ``cat`` per get);
* non-tensor fields: an object array of Python values.

Freed slots go to a free list and are reused, so a stream of put/drop keeps memory flat (and
touched: no fresh page faults); ``drop_partition`` gives a partition's memory back. A column
follows the merged schema it is given: when the controller reports a field turned jagged (``-1``
dims), a dense column is converted once. Data is copied *into* the columns (received buffers are
never kept) and reads return fresh tensors, so callers may write to what they get.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tq_loader.errors import CapacityError, NotFoundError, SchemaError
from tq_loader.metadata import schema_of
from tq_loader.schema import FieldSchema
from tq_loader.storage.columns import (
    jagged_view,
    kind_of,
    make_rows,
    num_rows,
    object_array,
    offsets_of,
    ragged_range,
    row_list,
    target_kind,
    torch_dtype,
)

__all__ = ["SimpleStorageUnit"]

_MIN_SLOTS = 16


def _grow(n: int, cap: int, limit: int | None) -> int:
    """New capacity >= n: doubling, never beyond ``limit`` (the unit's row capacity) unless n is."""
    new = max(n, 2 * cap, _MIN_SLOTS)
    return max(n, min(new, limit)) if limit is not None else new


def _idx(slots: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))


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

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Add ``ids`` (unique, none present yet)."""
        if ids.size == 0:
            return
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        n, total = self.n, self.n + ids.size
        if n == 0 or ids[0] > self._keys[n - 1]:
            if total > self._keys.size:
                size = max(total, 2 * self._keys.size)
                self._keys = np.concatenate((self._keys[:n], np.empty(size - n, dtype=np.int64)))
                self._slots = np.concatenate((self._slots[:n], np.empty(size - n, dtype=np.int64)))
            self._keys[n:total], self._slots[n:total] = ids, slots
        else:  # ids interleave with present ones: one O(n) merge
            pos = np.searchsorted(self._keys[:n], ids)
            keys, vals = np.insert(self._keys[:n], pos, ids), np.insert(self._slots[:n], pos, slots)
            size = max(total, 2 * self._keys.size)
            self._keys, self._slots = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            self._keys[:total], self._slots[:total] = keys, vals
        self.n = total

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


# --------------------------------------------------------------------------- columns


class _Column:
    """Rows of one field of one partition; ``has[slot]`` says whether the slot holds a value."""

    kind = ""

    def __init__(self, schema: FieldSchema) -> None:
        self.schema = schema
        self.has = np.zeros(0, dtype=bool)

    def present(self, slots: np.ndarray) -> np.ndarray:
        inside = slots < self.has.size
        out = np.zeros(slots.size, dtype=bool)
        out[inside] = self.has[slots[inside]]
        return out

    def ensure(self, n: int, limit: int | None) -> None:
        if n > self.has.size:
            cap = _grow(n, self.has.size, limit)
            self._resize(cap)
            has = np.zeros(cap, dtype=bool)
            has[: self.has.size] = self.has
            self.has = has

    def _resize(self, cap: int) -> None:
        raise NotImplementedError

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        """Store ``value``'s rows at ``slots``; returns the tensor bytes stored."""
        raise NotImplementedError

    def read(self, slots: np.ndarray, copy_objects: bool) -> Any:
        raise NotImplementedError

    def clear(self, slots: np.ndarray) -> None:
        slots = slots[slots < self.has.size]
        self.has[slots] = False

    def nbytes(self) -> int | None:
        raise NotImplementedError


class _DenseColumn(_Column):
    kind = "dense"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.dtype = torch_dtype(schema.dtype)
        self.data = torch.empty((0, *schema.shape), dtype=self.dtype)
        self.row_bytes = int(np.prod(schema.shape, dtype=np.int64)) * self.dtype.itemsize

    def _resize(self, cap: int) -> None:
        data = torch.empty((cap, *self.schema.shape), dtype=self.dtype)
        data[: self.data.size(0)].copy_(self.data)
        self.data = data

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        if not isinstance(value, torch.Tensor):  # same-shape rows given as a list of tensors
            value = torch.stack(list(value))
        self.data.index_copy_(0, _idx(slots), value)
        self.has[slots] = True
        return slots.size * self.row_bytes

    def read(self, slots: np.ndarray, copy_objects: bool) -> torch.Tensor:
        return self.data.index_select(0, _idx(slots))

    def nbytes(self) -> int:
        return int(self.has.sum()) * self.row_bytes


def _private_rows(value: Any, ndim: int) -> tuple[Sequence[torch.Tensor], np.ndarray]:
    """Copies of ``value``'s rows (views into one fresh chunk where possible) and their shapes."""
    kind, b = kind_of(value), num_rows(value)
    if kind == "dense":
        chunk = value.clone(memory_format=torch.contiguous_format)
        return chunk.unbind(0), np.tile(np.asarray(value.shape[1:], dtype=np.int64), (b, 1))
    if kind == "jagged":
        values, d, starts, lens = jagged_view(value)
        chunk = values.index_select(d, _idx(ragged_range(starts, lens)))
        shapes = np.tile(np.asarray(values.shape, dtype=np.int64), (b, 1))
        shapes[:, d] = lens
        return chunk.split(lens.tolist(), dim=d), shapes
    rows = [r.clone() for r in row_list(value)]  # "rows": more than one ragged dim, no flat layout
    return rows, np.asarray([tuple(r.shape) for r in rows], dtype=np.int64).reshape(b, ndim)


class _NestedColumn(_Column):
    kind = "nested"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.dtype = torch_dtype(schema.dtype)
        self.rows = np.empty(0, dtype=object)
        self.shapes = np.zeros((0, len(schema.shape)), dtype=np.int64)

    @classmethod
    def from_dense(cls, dense: _DenseColumn, schema: FieldSchema) -> _NestedColumn:
        """The nested twin of a dense column (rows become views of its tensor)."""
        col = cls(schema)
        cap = dense.has.size
        col.has = dense.has.copy()
        col.rows = object_array(dense.data.unbind(0)) if cap else np.empty(0, dtype=object)
        col.rows[~col.has] = None
        col.shapes = np.tile(np.asarray(dense.schema.shape, dtype=np.int64), (cap, 1))
        return col

    def _resize(self, cap: int) -> None:
        rows, shapes = np.empty(cap, dtype=object), np.zeros((cap, self.shapes.shape[1]), dtype=np.int64)
        rows[: self.rows.size], shapes[: self.rows.size] = self.rows, self.shapes
        self.rows, self.shapes = rows, shapes

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        rows, shapes = _private_rows(value, self.shapes.shape[1])
        self.rows[slots] = object_array(rows)
        self.shapes[slots] = shapes
        self.has[slots] = True
        return int(shapes.prod(axis=1).sum()) * self.dtype.itemsize

    def read(self, slots: np.ndarray, copy_objects: bool) -> Any:
        kind, d = target_kind(self.schema)
        picked = self.rows[slots].tolist()
        if kind != "jagged":
            return make_rows(picked, self.dtype)
        if picked:
            values = torch.cat(picked, dim=d)  # a fresh copy
        else:
            values = torch.empty([max(s, 0) for s in self.schema.shape], dtype=self.dtype)
        lens = self.shapes[slots, d]
        return torch.nested.nested_tensor_from_jagged(values, offsets_of(lens), jagged_dim=d + 1)

    def clear(self, slots: np.ndarray) -> None:
        slots = slots[slots < self.has.size]
        self.has[slots] = False
        self.rows[slots] = None  # release the memory of the rows

    def nbytes(self) -> int:
        return int(self.shapes[self.has].prod(axis=1).sum()) * self.dtype.itemsize


class _ObjectColumn(_Column):
    kind = "object"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.rows = np.empty(0, dtype=object)

    def _resize(self, cap: int) -> None:
        rows = np.empty(cap, dtype=object)
        rows[: self.rows.size] = self.rows
        self.rows = rows

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        values = list(value)
        self.rows[slots] = object_array(copy.deepcopy(values) if copy_objects else values)
        self.has[slots] = True
        return 0

    def read(self, slots: np.ndarray, copy_objects: bool) -> list[Any]:
        values = self.rows[slots].tolist()
        return copy.deepcopy(values) if copy_objects else values

    def clear(self, slots: np.ndarray) -> None:
        slots = slots[slots < self.has.size]
        self.has[slots] = False
        self.rows[slots] = None

    def nbytes(self) -> None:
        return None  # Python objects have no meaningful flat size


def _new_column(schema: FieldSchema) -> _Column:
    if schema.is_non_tensor:
        return _ObjectColumn(schema)
    return _DenseColumn(schema) if target_kind(schema)[0] == "dense" else _NestedColumn(schema)


# --------------------------------------------------------------------------- partitions


class _Partition:
    """Slots, id index and columns of one partition."""

    def __init__(self) -> None:
        self.index = _IdIndex()
        self.ids_at = np.zeros(0, dtype=np.int64)  # slot -> global id, -1 = free
        self.hwm = 0  # slots [0, hwm) have been used at least once
        self.free: list[np.ndarray] = []
        self.columns: dict[str, _Column] = {}

    @property
    def rows(self) -> int:
        return self.index.n

    def alloc(self, k: int, limit: int | None) -> np.ndarray:
        """``k`` slots: reused ones first, then fresh ones past the high-water mark."""
        free = np.concatenate(self.free) if len(self.free) > 1 else (self.free[0] if self.free else None)
        reuse = np.empty(0, dtype=np.int64) if free is None else free[: min(k, free.size)]
        self.free = [] if free is None or reuse.size == free.size else [free[reuse.size :]]
        fresh = np.arange(self.hwm, self.hwm + k - reuse.size, dtype=np.int64)
        self.hwm += fresh.size
        if self.hwm > self.ids_at.size:
            ids_at = np.full(_grow(self.hwm, self.ids_at.size, limit), -1, dtype=np.int64)
            ids_at[: self.ids_at.size] = self.ids_at
            self.ids_at = ids_at
        return np.concatenate((reuse, fresh))

    def release(self, slots: np.ndarray) -> None:
        if slots.size:
            self.ids_at[slots] = -1
            self.free.append(slots)
            for col in self.columns.values():
                col.clear(slots)


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
    ) -> dict[str, FieldSchema]:
        """Store ``columns`` (field -> column value, one row per id); returns the columns' schemas.

        ``schemas``: the merged schemas from the controller (a column turns jagged when they say
        so). All-or-nothing: a schema conflict raises ``SchemaError`` and a full unit
        ``CapacityError`` before anything changes. ``copy_objects=False`` adopts non-tensor rows
        without a deep copy (for freshly decoded data nobody else holds).
        """
        ids = _ids(ids)
        self._requests["put"] += 1
        if np.unique(ids).size != ids.size:
            raise SchemaError(f"partition {partition_id!r}: duplicate global indexes in one put")
        schemas = dict(schemas or {})
        plan = self._plan(partition_id, ids, columns, schemas)
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
            fresh = part.alloc(n_new, self.capacity_rows)
            slots[new] = fresh
            part.index.insert(ids[new], fresh)
            part.ids_at[fresh] = ids[new]
            self.rows += n_new
        for name, (schema, value) in plan.items():
            col = part.columns.get(name)
            if col is None:
                col = part.columns[name] = _new_column(schema)
            elif col.kind == "dense" and target_kind(schema)[0] != "dense":
                col = part.columns[name] = _NestedColumn.from_dense(col, schema)  # type: ignore[arg-type]
            col.schema = schema
            col.ensure(part.hwm, self.capacity_rows)
            self._bytes["in"] += col.write(slots, value, copy_objects)
        return {name: schema for name, (schema, _) in plan.items()}

    def _plan(
        self, pid: str, ids: np.ndarray, columns: Mapping[str, Any], schemas: dict[str, FieldSchema]
    ) -> dict[str, tuple[FieldSchema, Any]]:
        """Each field's schema after this put, validated against the data; raises before any change."""
        part = self._parts.get(pid)
        plan: dict[str, tuple[FieldSchema, Any]] = {}
        for name, value in columns.items():
            if not isinstance(name, str):
                raise SchemaError(f"partition {pid!r}: field names must be str, got {name!r}")
            if num_rows(value) != ids.size:
                raise SchemaError(
                    f"partition {pid!r}, field {name!r}: {num_rows(value)} rows for {ids.size} global indexes"
                )
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
        self, partition_id: str, ids: Any, fields: Iterable[str], *, copy_objects: bool = True
    ) -> dict[str, Any]:
        """Field -> column value of rows ``ids`` in that order (fresh tensors; objects deep-copied
        unless ``copy_objects=False``). ``NotFoundError`` names the partition, field and rows missing."""
        ids = _ids(ids)
        self._requests["get"] += 1
        part, slots = self._slots(partition_id, ids)
        out: dict[str, Any] = {}
        for name in fields:
            col = part.columns.get(name)
            if col is None:
                raise NotFoundError(
                    f"partition {partition_id!r}: no row in this storage unit has field {name!r}; "
                    "write the field before reading it"
                )
            present = col.present(slots)
            if not present.all():
                raise NotFoundError(
                    f"partition {partition_id!r}, field {name!r}: rows {_first(ids[~present])} have no "
                    "value for it; write the field for these rows first"
                )
            out[name] = col.read(slots, copy_objects)
            self._bytes["out"] += _tensor_bytes(out[name])
        return out

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

    def statistics(self) -> dict[str, Any]:
        """A snapshot: rows, capacity, per-partition per-field rows/bytes, request and byte counters."""
        parts: dict[str, Any] = {}
        for pid, part in self._parts.items():
            fields = {
                name: {"kind": col.kind, "rows": int(col.has.sum()), "bytes": col.nbytes()}
                for name, col in part.columns.items()
            }
            parts[pid] = {"rows": part.rows, "slots": int(part.hwm), "fields": fields}
        return {
            "rows": self.rows,
            "capacity_rows": self.capacity_rows,
            "free_rows": self.free_rows,
            "bytes": sum(f["bytes"] or 0 for p in parts.values() for f in p["fields"].values()),
            "partitions": parts,
            "requests": dict(self._requests),
            "bytes_in": self._bytes["in"],
            "bytes_out": self._bytes["out"],
        }


def _ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise SchemaError(f"global indexes must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int64, copy=False)


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
