"""Column stores: one field of one partition inside a storage unit, addressed by slot (see ``unit.py``).

* :class:`DenseColumn`: fixed-shape rows in ONE preallocated ``(capacity, *row_shape)`` tensor, grown
  geometrically; a put is one ``index_copy_``, a get one ``index_select``. Slots are reused after a
  drop, so reads copy -- except ``copy=False`` reads of one run of slots, which are views that pin
  their slots (``pins.py``) until they are gone.
* :class:`NestedColumn`: the rows of one put are copied into ONE private *chunk*, laid end to end
  along the ragged dim when the column is jagged; a slot records (chunk, start) and its row shape.
  A chunk is never written after the put (a row put again goes to a new chunk) and is freed when
  its last row is; so a read may hand out views of chunks (``copy=False``, for a reply that is sent
  as is): rows that lie together in a chunk are one slice, and a get of rows that were put together
  costs no copy at all. Columns with more than one ragged dim ("rows") keep a tensor per row.
* :class:`ObjectColumn`: Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch

from tq_loader import memory
from tq_loader.errors import SchemaError
from tq_loader.schema import FieldSchema
from tq_loader.storage.columns import (
    copy_rows,
    flat_rows,
    index_tensor,
    jagged_view,
    kind_of,
    make_rows,
    num_rows,
    object_array,
    offsets_of,
    row_list,
    take_rows,
    target_kind,
    torch_dtype,
)
from tq_loader.storage.pins import SlotPins
from tq_loader.storage.segments import gather

__all__ = ["Column", "DenseColumn", "NestedColumn", "ObjectColumn", "make_column"]


def _grow(n: int, cap: int, limit: int | None) -> int:
    """New capacity >= n: doubling, never beyond ``limit`` (the unit's row capacity) unless n is."""
    new = max(n, 2 * cap, 16)
    return max(n, min(new, limit)) if limit is not None else new


class Column:
    """Rows of one field of one partition, by slot; ``has[slot]``: whether the slot holds a value.

    ``write(slots, value, copy_objects, positions) -> tensor bytes stored`` stores rows ``positions``
    of ``value`` (``None``: all of them, in order) in ``slots``; ``read(slots, copy_objects, copy)``
    returns fresh values (``copy=False``: tensors may be read-only views of memory the store never
    writes again); ``rows`` (object array) is kept by the nested and object stores.
    """

    kind = ""
    rows: np.ndarray | None = None
    pins: SlotPins | None = None  # set by the unit: zero-copy reads pin the slots they view

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
            if self.rows is not None:
                rows = np.empty(cap, dtype=object)
                rows[: self.rows.size] = self.rows
                self.rows = rows
            has = np.zeros(cap, dtype=bool)
            has[: self.has.size] = self.has
            self.has = has

    def _resize(self, cap: int) -> None:
        """Grow this store's own arrays (``has`` and ``rows`` are grown by :meth:`ensure`)."""

    def clear(self, slots: np.ndarray) -> None:
        slots = slots[slots < self.has.size]
        self.has[slots] = False
        if self.rows is not None:
            self.rows[slots] = None  # release the rows' memory

    def write(
        self, slots: np.ndarray, value: Any, copy_objects: bool, positions: np.ndarray | None = None
    ) -> int:
        raise NotImplementedError

    def read(self, slots: np.ndarray, copy_objects: bool, copy: bool = True) -> Any:
        raise NotImplementedError

    def nbytes(self) -> int | None:
        return None  # Python objects have no meaningful flat size


class DenseColumn(Column):
    kind = "dense"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.dtype = torch_dtype(schema.dtype)
        self.data = torch.empty((0, *schema.shape), dtype=self.dtype)
        self.row_bytes = int(np.prod(schema.shape, dtype=np.int64)) * self.dtype.itemsize

    def _resize(self, cap: int) -> None:
        data = memory.empty((cap, *self.schema.shape), self.dtype)
        data[: self.data.size(0)].copy_(self.data)
        self.data = data

    def write(
        self, slots: np.ndarray, value: Any, copy_objects: bool, positions: np.ndarray | None = None
    ) -> int:
        if not isinstance(value, torch.Tensor):  # same-shape rows given as a list of tensors
            rows = list(value) if positions is None else [value[i] for i in positions.tolist()]
            value, positions = torch.stack(rows), None
        copy_rows(self.data, slots, value, positions)
        self.has[slots] = True
        return slots.size * self.row_bytes

    def read(self, slots: np.ndarray, copy_objects: bool, copy: bool = True) -> torch.Tensor:
        """Fresh rows; ``copy=False`` and slots that are one ascending run: a pinned view instead (its
        slots are not reused while it lives; a later put of the same rows' field does write it)."""
        if not copy and self.pins is not None and self.row_bytes and slots.size:
            start = int(slots[0])
            if int(slots[-1]) - start + 1 == slots.size and (slots.size == 1 or (np.diff(slots) == 1).all()):
                return self.pins.view(self.data, start, start + slots.size)
        out = memory.empty((slots.size, *self.schema.shape), self.dtype)  # a copy: slots are reused
        copy_rows(out, np.arange(slots.size), self.data, slots)
        return out

    def read_into(self, slots: np.ndarray, out: torch.Tensor, positions: np.ndarray) -> bool:
        """Copy the rows of ``slots`` to rows ``positions`` of ``out``; False if ``out`` does not fit."""
        if out.dtype != self.dtype or tuple(out.shape[1:]) != tuple(self.schema.shape):
            return False
        copy_rows(out, positions, self.data, slots)
        return True

    def nbytes(self) -> int:
        return int(self.has.sum()) * self.row_bytes


def _private_flat(
    value: Any, d: int, positions: np.ndarray | None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(chunk, starts, lens): rows ``positions`` of ``value`` (all if None) laid end to end along ``d``
    in ONE fresh tensor (one copy)."""
    kind = kind_of(value)
    if positions is not None:
        if kind == "jagged" and value._ragged_idx - 1 == d:
            values, _, starts, lens = jagged_view(value)
            starts, lens = starts[positions], lens[positions]
            chunk = gather([values], d, None, starts, lens, copy=True)
            return chunk, np.cumsum(lens) - lens, lens
        value = take_rows(value, positions, copy=False)
    if kind == "dense":  # copy straight into the flat layout
        b, size = value.size(0), value.size(d + 1)
        shape = list(value.shape[1:])
        shape[d] = b * size
        chunk = torch.empty(shape, dtype=value.dtype)
        chunk.unflatten(d, (b, size)).movedim(d, 0).copy_(value)
        return chunk, np.arange(b, dtype=np.int64) * size, np.full(b, size, dtype=np.int64)
    values, starts, lens = flat_rows(value, d)
    if kind == "jagged" and value._ragged_idx - 1 == d:  # views of the caller's rows: copy them
        chunk = gather([values], d, None, starts, lens, copy=True)
        return chunk, np.cumsum(lens) - lens, lens
    return values, starts, lens  # rows concatenated by flat_rows: already a fresh copy


def _private_rows(value: Any, ndim: int) -> tuple[Sequence[torch.Tensor], np.ndarray]:
    """Copies of ``value``'s rows, one tensor each (views into one fresh chunk where possible) and
    their shapes: for "rows" columns (more than one ragged dim), which have no flat layout."""
    kind, b = kind_of(value), num_rows(value)
    if kind == "dense":
        chunk = value.clone(memory_format=torch.contiguous_format)
        return chunk.unbind(0), np.tile(np.asarray(value.shape[1:], dtype=np.int64), (b, 1))
    if kind == "jagged":
        values, d, starts, lens = jagged_view(value)
        chunk = gather([values], d, None, starts, lens, copy=True)
        shapes = np.tile(np.asarray(values.shape, dtype=np.int64), (b, 1))
        shapes[:, d] = lens
        return chunk.split(lens.tolist(), dim=d), shapes
    rows = [r.clone() for r in row_list(value)]
    return rows, np.asarray([tuple(r.shape) for r in rows], dtype=np.int64).reshape(b, ndim)


class NestedColumn(Column):
    kind = "nested"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.dtype = torch_dtype(schema.dtype)
        self.rows = np.empty(0, dtype=object)  # per-row tensors of slots not in a chunk
        self.shapes = np.zeros((0, len(schema.shape)), dtype=np.int64)
        self.chunk_of = np.zeros(0, dtype=np.int64)  # chunk id of a slot's row, -1: in ``rows``
        self.start = np.zeros(0, dtype=np.int64)  # where the row starts in its chunk, along its dim
        self._chunks: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (values, ragged dim)
        self._live: dict[int, int] = {}  # id -> how many slots still hold a row in it
        self._next_chunk = 0

    @classmethod
    def from_dense(cls, dense: DenseColumn, schema: FieldSchema) -> NestedColumn:
        """The nested twin of a dense column (its tensor becomes one chunk, flat along dim ``d``)."""
        col = cls(schema)
        cap = dense.has.size
        col._resize(cap)
        col.rows = np.empty(cap, dtype=object)
        col.has = dense.has.copy()
        col.shapes[:] = np.asarray(dense.schema.shape, dtype=np.int64)
        slots = np.flatnonzero(col.has)
        d = max(target_kind(schema)[1], 0)
        if slots.size and dense.data.dim() >= d + 2:
            size = dense.data.size(d + 1)
            flat = dense.data.movedim(0, d).flatten(d, d + 1)  # a view for d == 0
            col._add_chunk(slots, flat, d, slots * size)
        elif slots.size:
            col.rows[slots] = object_array(dense.data[index_tensor(slots)].unbind(0))
        return col

    def _resize(self, cap: int) -> None:
        old = self.chunk_of.size
        shapes = np.zeros((cap, self.shapes.shape[1]), dtype=np.int64)
        shapes[:old] = self.shapes
        chunk_of = np.full(cap, -1, dtype=np.int64)
        chunk_of[:old] = self.chunk_of
        start = np.zeros(cap, dtype=np.int64)
        start[:old] = self.start
        self.shapes, self.chunk_of, self.start = shapes, chunk_of, start

    def _add_chunk(self, slots: np.ndarray, values: torch.Tensor, d: int, starts: np.ndarray) -> None:
        cid = self._next_chunk
        self._next_chunk += 1
        self._chunks[cid], self._live[cid] = (values, d), int(slots.size)
        self.chunk_of[slots], self.start[slots] = cid, starts

    def _release(self, slots: np.ndarray) -> None:
        """Forget the chunk rows of ``slots``; a chunk with no row left is freed."""
        ids = self.chunk_of[slots]
        ids = ids[ids >= 0]
        if ids.size:
            self.chunk_of[slots] = -1
            for cid, k in zip(*np.unique(ids, return_counts=True), strict=True):  # per chunk, not row
                left = self._live[int(cid)] - int(k)
                if left:
                    self._live[int(cid)] = left
                else:
                    del self._live[int(cid)], self._chunks[int(cid)]

    def clear(self, slots: np.ndarray) -> None:
        slots = slots[slots < self.has.size]
        self._release(slots)
        super().clear(slots)

    def write(
        self, slots: np.ndarray, value: Any, copy_objects: bool, positions: np.ndarray | None = None
    ) -> int:
        self._release(slots)  # rows written again: their old chunks may go
        kind, d = target_kind(self.schema)
        flat = None
        if kind == "jagged":
            try:
                flat = _private_flat(value, d, positions)
            except (SchemaError, RuntimeError):  # rows that do not fit one flat layout: kept per row
                flat = None
        if flat is None and positions is not None:
            value = take_rows(value, positions, copy=False)
        if flat is not None:
            chunk, starts, lens = flat
            shapes = np.tile(np.asarray(chunk.shape, dtype=np.int64), (slots.size, 1))
            shapes[:, d] = lens
            self._add_chunk(slots, chunk, d, starts)
            self.rows[slots] = None  # type: ignore[index]
        else:
            rows, shapes = _private_rows(value, self.shapes.shape[1])
            self.rows[slots] = object_array(rows)  # type: ignore[index]
        self.shapes[slots] = shapes
        self.has[slots] = True
        return int(shapes.prod(axis=1).sum()) * self.dtype.itemsize

    def _row_tensors(self, slots: np.ndarray) -> list[torch.Tensor]:
        """One tensor per slot (views): the per-row fallback for "rows" reads."""
        out = self.rows[slots].tolist()  # type: ignore[index]
        for i in np.flatnonzero(self.chunk_of[slots] >= 0).tolist():
            s = int(slots[i])
            values, d = self._chunks[int(self.chunk_of[s])]
            out[i] = values.narrow(d, int(self.start[s]), int(self.shapes[s, d]))
        return out

    def read(self, slots: np.ndarray, copy_objects: bool, copy: bool = True) -> Any:
        kind, d = target_kind(self.schema)
        if kind != "jagged":
            return make_rows(self._row_tensors(slots), self.dtype)  # copies
        lens = self.shapes[slots, d]
        ids = self.chunk_of[slots]
        chunk_ids, src = np.unique(ids, return_inverse=True)
        chunks = [self._chunks.get(c, (None, -1)) for c in chunk_ids.tolist()]  # per chunk, not per row
        if slots.size == 0:
            values = torch.empty([max(s, 0) for s in self.schema.shape], dtype=self.dtype)
        elif all(cd == d for _, cd in chunks):  # every row in a flat chunk along d: slices
            sources: list[torch.Tensor] = [c for c, _ in chunks]  # type: ignore[misc]
            values = gather(sources, d, src.reshape(-1), self.start[slots], lens, copy=copy)
            if not values.is_contiguous():
                values = values.contiguous()
        else:
            values = torch.cat(self._row_tensors(slots), dim=d)  # a fresh copy
        return torch.nested.nested_tensor_from_jagged(values, offsets_of(lens), jagged_dim=d + 1)

    def nbytes(self) -> int:
        return int(self.shapes[self.has].prod(axis=1).sum()) * self.dtype.itemsize


class ObjectColumn(Column):
    kind = "object"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.rows = np.empty(0, dtype=object)

    def write(
        self, slots: np.ndarray, value: Any, copy_objects: bool, positions: np.ndarray | None = None
    ) -> int:
        values = list(value) if positions is None else [value[i] for i in positions.tolist()]
        self.rows[slots] = object_array(deepcopy(values) if copy_objects else values)
        self.has[slots] = True
        return 0

    def read(self, slots: np.ndarray, copy_objects: bool, copy: bool = True) -> list[Any]:
        values = self.rows[slots].tolist()
        return deepcopy(values) if copy_objects else values


def make_column(schema: FieldSchema) -> Column:
    if schema.is_non_tensor:
        return ObjectColumn(schema)
    return DenseColumn(schema) if target_kind(schema)[0] == "dense" else NestedColumn(schema)
