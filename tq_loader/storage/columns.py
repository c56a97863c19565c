"""Columns: vectorised row operations on decoded column values, and the storage unit's column stores.

A column value is one of (see :mod:`tq_loader.codec`): a dense tensor ``(B, ...)``; a jagged nested
tensor (``layout=torch.jagged``, any ragged dimension); a "rows" value (a strided nested tensor, or
a list of tensors for dtypes strided nested tensors lack); or a Python list (object column).

:func:`take_rows` picks rows (the storage manager splits a batch over units with it) and
:func:`assemble` scatters the parts that several units returned back into one column in request
order. Both cost a handful of tensor/numpy calls per column, never a Python step per row -- except
for "rows" columns (more than one ragged dimension), which have no flat representation to index.

:class:`DenseColumn` / :class:`NestedColumn` / :class:`ObjectColumn` hold one field of one
partition inside a storage unit, addressed by slot (see ``unit.py``): one preallocated tensor for
fixed-shape fields, per-row views into one private chunk per put for nested ones, Python objects.

The kind :func:`assemble` returns is decided by the column's schema, never by the rows selected:
a nested schema gives a jagged nested tensor even when the chosen rows happen to share a shape.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tq_loader.errors import SchemaError
from tq_loader.schema import FieldSchema

__all__ = [
    "Column", "DenseColumn", "NestedColumn", "ObjectColumn", "assemble", "jagged_view", "kind_of",
    "make_column", "make_rows", "num_rows", "object_array", "offsets_of", "ragged_range", "row_list",
    "take_rows", "target_kind", "torch_dtype",
]  # fmt: skip


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def index_copy(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_copy_(0, index, src)`` for every dtype (uint16/32/64 and float8 have no kernel:
    the bytes are copied through a same-size integer view)."""
    try:
        dst.index_copy_(0, index, src)
    except (RuntimeError, NotImplementedError):
        alias = _SAME_SIZE_INT.get(dst.element_size())
        if alias is None or dst.is_complex():
            raise
        dst.view(alias).index_copy_(0, index, src.view(alias))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"``); ``SchemaError`` for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SchemaError(f"unknown tensor dtype {name!r}; use a torch dtype name such as 'float32'")
    return dtype


def kind_of(value: Any) -> str:
    """``"dense"``, ``"jagged"``, ``"rows"`` or ``"object"``."""
    if isinstance(value, torch.Tensor):
        if not value.is_nested:
            return "dense"
        return "jagged" if value.layout == torch.jagged else "rows"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, torch.Tensor) for v in value):
            return "rows"
        return "object"
    raise SchemaError(f"{type(value).__name__} is not a column value (tensor, nested tensor or list)")


def target_kind(schema: FieldSchema) -> tuple[str, int]:
    """The kind (and ragged per-row dim, or -1) a column of ``schema`` is returned as."""
    if schema.is_non_tensor:
        return "object", -1
    ragged = [i for i, d in enumerate(schema.shape) if d < 0]
    if not schema.is_nested and not ragged:
        return "dense", -1
    if len(ragged) == 1:
        return "jagged", ragged[0]
    if not ragged and schema.shape:
        return "jagged", 0
    return "rows", -1


def num_rows(value: Any) -> int:
    return int(value.size(0)) if isinstance(value, torch.Tensor) else len(value)


def ragged_range(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    out_starts = np.cumsum(lens) - lens
    return np.repeat(starts - out_starts, lens) + np.arange(total, dtype=np.int64)


def offsets_of(lens: np.ndarray) -> torch.Tensor:
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return torch.from_numpy(offsets)


def _index(positions: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))


def _grow(n: int, cap: int, limit: int | None) -> int:
    """New capacity >= n: doubling, never beyond ``limit`` (the unit's row capacity) unless n is."""
    new = max(n, 2 * cap, 16)
    return max(n, min(new, limit)) if limit is not None else new


def jagged_view(nt: torch.Tensor) -> tuple[torch.Tensor, int, np.ndarray, np.ndarray]:
    """(values, ragged per-row dim, row starts in values, row lengths) of a jagged nested tensor."""
    offsets = nt.offsets().cpu().numpy().astype(np.int64, copy=False)
    lengths = nt.lengths()
    lens = np.diff(offsets) if lengths is None else lengths.cpu().numpy().astype(np.int64, copy=False)
    return nt.values(), nt._ragged_idx - 1, offsets[:-1], lens


def row_list(value: Any) -> list[Any]:
    """The rows of any column value as a list (tensors are views, not copies)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)


def object_array(rows: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``rows`` that never descends into rows that are themselves sequences."""
    return np.fromiter(rows, dtype=object, count=len(rows))


def make_rows(rows: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | list[torch.Tensor]:
    """A strided nested tensor of copies of ``rows`` (a list of clones for unsupported dtypes)."""
    try:
        return torch.nested.nested_tensor(rows, dtype=dtype)  # copies
    except RuntimeError:
        return [r.clone() for r in rows]


def take_rows(value: Any, positions: np.ndarray) -> Any:
    """Rows ``positions`` of ``value`` (same kind; tensors are fresh copies)."""
    positions = np.asarray(positions, dtype=np.int64)
    kind = kind_of(value)
    if kind == "dense":
        return value.index_select(0, _index(positions))
    if kind == "jagged":
        values, d, starts, lens = jagged_view(value)
        lens = lens[positions]
        idx = ragged_range(starts[positions], lens)
        picked = values.index_select(d, _index(idx))
        return torch.nested.nested_tensor_from_jagged(picked, offsets_of(lens), jagged_dim=d + 1)
    rows = row_list(value)
    picked = [rows[i] for i in positions.tolist()]
    if kind == "object":
        return picked
    if isinstance(value, torch.Tensor):
        return make_rows(picked, value.dtype)
    return [r.clone() for r in picked]


# --------------------------------------------------------------------------- assemble


def _check_cover(parts: Sequence[tuple[np.ndarray, Any]], n: int, field: str) -> None:
    seen = np.zeros(n, dtype=np.int64)
    for pos, value in parts:
        if len(pos) != num_rows(value):
            raise SchemaError(f"field {field!r}: a part has {num_rows(value)} rows for {len(pos)} positions")
        if len(pos) and (pos.min() < 0 or pos.max() >= n):
            raise SchemaError(f"field {field!r}: part positions outside range({n})")
        np.add.at(seen, pos, 1)
    if n and not (seen == 1).all():
        raise SchemaError(f"field {field!r}: parts do not cover each of the {n} rows exactly once")


def _check_dtype(value: Any, dtype: torch.dtype, field: str) -> None:
    got = value.dtype if isinstance(value, torch.Tensor) else (value[0].dtype if value else dtype)
    if got != dtype:
        raise SchemaError(f"field {field!r}: a storage unit returned {got}, the column's schema says {dtype}")


def _assemble_dense(parts, n: int, schema: FieldSchema, dtype: torch.dtype, field: str) -> torch.Tensor:
    shape = tuple(schema.shape)
    out = torch.empty((n, *shape), dtype=dtype)
    for pos, value in parts:
        if kind_of(value) != "dense":
            rows = row_list(value)
            if any(tuple(r.shape) != shape for r in rows):
                raise SchemaError(f"field {field!r}: rows do not have the column's shape {shape}")
            value = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=dtype)
        if tuple(value.shape[1:]) != shape:
            raise SchemaError(
                f"field {field!r}: a storage unit returned rows of shape {tuple(value.shape[1:])}, "
                f"the column's schema says {shape}"
            )
        index_copy(out, _index(pos), value)
    return out


def _ragged_parts(value: Any, d: int, field: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(values, starts, lens) of one part with rows laid end to end along per-row dim ``d``."""
    kind = kind_of(value)
    if kind == "jagged" and value._ragged_idx - 1 == d:
        values, _, starts, lens = jagged_view(value)
        return values, starts, lens
    if kind == "dense" and value.dim() > d + 1:
        b, size = value.size(0), value.size(d + 1)
        values = value.movedim(0, d).flatten(d, d + 1)
        return values, np.arange(b, dtype=np.int64) * size, np.full(b, size, dtype=np.int64)
    rows = row_list(value)  # ragged along another dim, or a "rows" value: per-row fallback
    if any(r.dim() <= d for r in rows):
        raise SchemaError(f"field {field!r}: rows have fewer dimensions than the column's schema")
    lens = np.asarray([r.size(d) for r in rows], dtype=np.int64)
    try:
        values = torch.cat(rows, dim=d)
    except RuntimeError as exc:
        raise SchemaError(f"field {field!r}: rows differ in a dimension other than {d}: {exc}") from None
    return values, np.cumsum(lens) - lens, lens


def _check_fixed_dims(shape: tuple[int, ...], want: tuple[int, ...], d: int, field: str) -> None:
    """``shape`` (values, ragged dim ``d``) against the schema's per-row shape (-1 = any size)."""
    bad = len(shape) != len(want) or any(
        w >= 0 and s != w for i, (s, w) in enumerate(zip(shape, want)) if i != d
    )
    if bad:
        got = tuple(-1 if i == d else s for i, s in enumerate(shape))
        raise SchemaError(
            f"field {field!r}: rows of shape {got} do not fit the column's schema {tuple(want)}"
        )


def _assemble_jagged(
    parts, n: int, schema: FieldSchema, d: int, dtype: torch.dtype, field: str
) -> torch.Tensor:
    if not parts:
        shape = [0 if s < 0 else s for s in schema.shape]
        return torch.nested.nested_tensor_from_jagged(
            torch.empty(shape, dtype=dtype), torch.zeros(1, dtype=torch.int64), jagged_dim=d + 1
        )
    chunks, src_start, lens, base = [], np.zeros(n, np.int64), np.zeros(n, np.int64), 0
    for pos, value in parts:
        values, starts, part_lens = _ragged_parts(value, d, field)
        _check_fixed_dims(tuple(values.shape), schema.shape, d, field)
        chunks.append(values)
        src_start[pos] = starts + base
        lens[pos] = part_lens
        base += values.size(d)
    try:
        values = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=d)
    except RuntimeError as exc:
        raise SchemaError(f"field {field!r}: parts differ in a non-ragged dimension: {exc}") from None
    gathered = values.index_select(d, _index(ragged_range(src_start, lens)))
    return torch.nested.nested_tensor_from_jagged(gathered, offsets_of(lens), jagged_dim=d + 1)


def assemble(
    parts: Sequence[tuple[np.ndarray, Any]], n: int, schema: FieldSchema, *, field: str = "?"
) -> Any:
    """One column of ``n`` rows: part ``(positions, value)`` supplies the rows at ``positions``.

    The positions of all parts must cover ``range(n)`` exactly once. Tensors come back in fresh,
    writable memory (never views of the parts). The result's kind follows ``schema`` (see
    :func:`target_kind`): dense tensor, jagged nested tensor, "rows" value or list.
    """
    parts = [(np.asarray(pos, dtype=np.int64).reshape(-1), value) for pos, value in parts]
    _check_cover(parts, n, field)
    kind, d = target_kind(schema)
    if kind == "object":
        out = np.empty(n, dtype=object)
        for pos, value in parts:
            if kind_of(value) != "object" and len(pos):
                raise SchemaError(
                    f"field {field!r} is a non-tensor column but a storage unit returned tensors"
                )
            out[pos] = object_array(row_list(value))
        return out.tolist()
    dtype = torch_dtype(schema.dtype)
    for _, value in parts:
        if num_rows(value):
            _check_dtype(value, dtype, field)
    if kind == "dense":
        return _assemble_dense(parts, n, schema, dtype, field)
    if kind == "jagged":
        return _assemble_jagged(parts, n, schema, d, dtype, field)
    out = np.empty(n, dtype=object)
    for pos, value in parts:
        out[pos] = object_array(row_list(value))
    return make_rows(out.tolist(), dtype)


# --------------------------------------------------------------------------- column stores


class Column:
    """Rows of one field of one partition, by slot; ``has[slot]``: whether the slot holds a value.

    ``write(slots, value, copy_objects) -> tensor bytes stored``; ``read(slots, copy_objects)``
    returns fresh values; ``rows`` (object array) is kept by the nested and object stores.
    """

    kind = ""
    rows: np.ndarray | None = None

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

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        raise NotImplementedError

    def read(self, slots: np.ndarray, copy_objects: bool) -> Any:
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
        data = torch.empty((cap, *self.schema.shape), dtype=self.dtype)
        data[: self.data.size(0)].copy_(self.data)
        self.data = data

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        if not isinstance(value, torch.Tensor):  # same-shape rows given as a list of tensors
            value = torch.stack(list(value))
        index_copy(self.data, _index(slots), value)
        self.has[slots] = True
        return slots.size * self.row_bytes

    def read(self, slots: np.ndarray, copy_objects: bool) -> torch.Tensor:
        return self.data.index_select(0, _index(slots))

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
        chunk = values.index_select(d, _index(ragged_range(starts, lens)))
        shapes = np.tile(np.asarray(values.shape, dtype=np.int64), (b, 1))
        shapes[:, d] = lens
        return chunk.split(lens.tolist(), dim=d), shapes
    rows = [r.clone() for r in row_list(value)]  # "rows": more than one ragged dim, no flat layout
    return rows, np.asarray([tuple(r.shape) for r in rows], dtype=np.int64).reshape(b, ndim)


class NestedColumn(Column):
    kind = "nested"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.dtype = torch_dtype(schema.dtype)
        self.rows = np.empty(0, dtype=object)
        self.shapes = np.zeros((0, len(schema.shape)), dtype=np.int64)

    @classmethod
    def from_dense(cls, dense: DenseColumn, schema: FieldSchema) -> NestedColumn:
        """The nested twin of a dense column (rows become views of its tensor)."""
        col = cls(schema)
        cap = dense.has.size
        col.has = dense.has.copy()
        col.rows = object_array(dense.data.unbind(0)) if cap else np.empty(0, dtype=object)
        col.rows[~col.has] = None
        col.shapes = np.tile(np.asarray(dense.schema.shape, dtype=np.int64), (cap, 1))
        return col

    def _resize(self, cap: int) -> None:
        shapes = np.zeros((cap, self.shapes.shape[1]), dtype=np.int64)
        shapes[: self.shapes.shape[0]] = self.shapes
        self.shapes = shapes

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        rows, shapes = _private_rows(value, self.shapes.shape[1])
        self.rows[slots] = object_array(rows)  # type: ignore[index]
        self.shapes[slots] = shapes
        self.has[slots] = True
        return int(shapes.prod(axis=1).sum()) * self.dtype.itemsize

    def read(self, slots: np.ndarray, copy_objects: bool) -> Any:
        kind, d = target_kind(self.schema)
        picked = self.rows[slots].tolist()  # type: ignore[index]
        if kind != "jagged":
            return make_rows(picked, self.dtype)
        if picked:
            values = torch.cat(picked, dim=d)  # a fresh copy
        else:
            values = torch.empty([max(s, 0) for s in self.schema.shape], dtype=self.dtype)
        lens = self.shapes[slots, d]
        return torch.nested.nested_tensor_from_jagged(values, offsets_of(lens), jagged_dim=d + 1)

    def nbytes(self) -> int:
        return int(self.shapes[self.has].prod(axis=1).sum()) * self.dtype.itemsize


class ObjectColumn(Column):
    kind = "object"

    def __init__(self, schema: FieldSchema) -> None:
        super().__init__(schema)
        self.rows = np.empty(0, dtype=object)

    def write(self, slots: np.ndarray, value: Any, copy_objects: bool) -> int:
        values = list(value)
        self.rows[slots] = object_array(copy.deepcopy(values) if copy_objects else values)
        self.has[slots] = True
        return 0

    def read(self, slots: np.ndarray, copy_objects: bool) -> list[Any]:
        values = self.rows[slots].tolist()
        return copy.deepcopy(values) if copy_objects else values


def make_column(schema: FieldSchema) -> Column:
    if schema.is_non_tensor:
        return ObjectColumn(schema)
    return DenseColumn(schema) if target_kind(schema)[0] == "dense" else NestedColumn(schema)
