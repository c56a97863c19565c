"""Columns: vectorised row operations on decoded column values (the stores are in ``stores.py``).

A column value is one of (see :mod:`tq_loader.codec`): a dense tensor ``(B, ...)``; a jagged nested
tensor (``layout=torch.jagged``, any ragged dimension); a "rows" value (a strided nested tensor, or
a list of tensors for dtypes strided nested tensors lack); or a Python list (object column).

:func:`take_rows` picks rows (the storage manager splits a batch over units with it) and
:func:`assemble` scatters the parts that several units returned back into one column in request
order. Both cost a handful of tensor/numpy calls per column, never a Python step per row -- except
for "rows" columns (more than one ragged dimension), which have no flat representation to index.
Rows that lie next to each other move as slices (see :mod:`tq_loader.storage.segments`).

The kind :func:`assemble` returns is decided by the column's schema, never by the rows selected:
a nested schema gives a jagged nested tensor even when the chosen rows happen to share a shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tq_loader.errors import SchemaError
from tq_loader.metadata import schema_of
from tq_loader.schema import FieldSchema
from tq_loader.storage.segments import gather, ragged_range

__all__ = [
    "assemble", "copy_rows", "flat_rows", "index_copy", "index_tensor", "jagged_view", "kind_of", "make_rows", "num_rows",
    "object_array", "offsets_of", "ragged_range", "row_list", "row_runs", "take_rows", "target_kind", "torch_dtype",
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


def row_runs(dst_rows: np.ndarray, src_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs where both row lists advance by one together."""
    n = dst_rows.size
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    brk = np.flatnonzero((np.diff(dst_rows) != 1) | (np.diff(src_rows) != 1)) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    return starts, np.diff(np.concatenate((starts, [n])))


def copy_rows(
    dst: torch.Tensor, dst_rows: np.ndarray, src: torch.Tensor, src_rows: np.ndarray | None = None
) -> None:
    """``dst[dst_rows] = src[src_rows]`` (``src_rows`` None: all of ``src``) in ONE copy of the bytes.

    Rows that lie together in both become one slice copy (a put of consecutive ids into fresh
    slots is a handful of runs); a fragmented selection falls back to an indexed copy.
    """
    dst_rows = np.asarray(dst_rows, dtype=np.int64)
    if dst_rows.size == 1:  # a single row (the small-op path): no run analysis
        r = 0 if src_rows is None else int(src_rows[0])
        dst.narrow(0, int(dst_rows[0]), 1).copy_(src.narrow(0, r, 1))
        return
    whole = src_rows is None
    src_rows = np.arange(dst_rows.size, dtype=np.int64) if whole else np.asarray(src_rows, np.int64)
    starts, lens = row_runs(dst_rows, src_rows)
    if starts.size <= max(4, dst_rows.size // 16):  # long runs: slices, no index, no temporary
        for s, k in zip(starts.tolist(), lens.tolist(), strict=True):
            d, r = int(dst_rows[s]), int(src_rows[s])
            dst.narrow(0, d, k).copy_(src.narrow(0, r, k))
        return
    picked = src if whole else src.index_select(0, index_tensor(src_rows))
    index_copy(dst, index_tensor(dst_rows), picked)


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


def offsets_of(lens: np.ndarray) -> torch.Tensor:
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return torch.from_numpy(offsets)


def index_tensor(positions: np.ndarray) -> torch.Tensor:
    """An ``int64`` index tensor (what ``index_copy_`` needs) of ``positions``."""
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))


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


def take_rows(value: Any, positions: np.ndarray, *, copy: bool = True) -> Any:
    """Rows ``positions`` of ``value`` (same kind). Tensors are fresh copies; with ``copy=False`` a
    tensor may instead share memory with ``value`` (when the rows are one contiguous run)."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    kind = kind_of(value)
    if kind == "dense":
        if positions.size and (np.diff(positions) == 1).all():  # one run of rows: a slice
            run = value.narrow(0, int(positions[0]), positions.size)
            return run.clone(memory_format=torch.contiguous_format) if copy else run
        return value.index_select(0, index_tensor(positions))  # an index per row, not per element
    if kind == "jagged":
        values, d, starts, lens = jagged_view(value)
        lens = lens[positions]
        picked = gather([values], d, None, starts[positions], lens, copy=copy)
        if not picked.is_contiguous():  # a view across a non-leading ragged dim
            picked = picked.contiguous()
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
    for pos, value in parts:
        if len(pos) != num_rows(value):
            raise SchemaError(f"field {field!r}: a part has {num_rows(value)} rows for {len(pos)} positions")
        if len(pos) and (pos.min() < 0 or pos.max() >= n):
            raise SchemaError(f"field {field!r}: part positions outside range({n})")
    seen = np.bincount(np.concatenate([pos for pos, _ in parts] or [np.empty(0, np.int64)]), minlength=n)
    if n and not (seen == 1).all():
        raise SchemaError(f"field {field!r}: parts do not cover each of the {n} rows exactly once")


def _check_dtype(value: Any, dtype: torch.dtype, field: str) -> None:
    got = value.dtype if isinstance(value, torch.Tensor) else (value[0].dtype if value else dtype)
    if got != dtype:
        raise SchemaError(f"field {field!r}: a storage unit returned {got}, the column's schema says {dtype}")


def _assemble_dense(
    parts, n: int, schema: FieldSchema, dtype: torch.dtype, field: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    shape = tuple(schema.shape)
    if out is None or out.dtype != dtype or tuple(out.shape) != (n, *shape):
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
        copy_rows(out, pos, value)
    return out


def flat_rows(value: Any, d: int, field: str = "?") -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(values, starts, lens): ``value``'s rows as segments of one tensor along per-row dim ``d``.

    ``values`` shares memory with ``value`` for a jagged value ragged along ``d`` and (for ``d`` 0)
    a dense one; otherwise it is a fresh copy (rows laid end to end).
    """
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
    sources, src = [], np.zeros(n, np.int64)
    src_start, lens = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for j, (pos, value) in enumerate(parts):
        values, starts, part_lens = flat_rows(value, d, field)
        _check_fixed_dims(tuple(values.shape), schema.shape, d, field)
        sources.append(values)
        src[pos], src_start[pos], lens[pos] = j, starts, part_lens
    try:  # runs of rows that lie together in a part move as slices: one copy, no element index
        gathered = gather(sources, d, src, src_start, lens, copy=True)
    except RuntimeError as exc:
        raise SchemaError(f"field {field!r}: parts differ in a non-ragged dimension: {exc}") from None
    return torch.nested.nested_tensor_from_jagged(gathered, offsets_of(lens), jagged_dim=d + 1)


def assemble(
    parts: Sequence[tuple[np.ndarray, Any]],
    n: int,
    schema: FieldSchema,
    *,
    field: str = "?",
    out: torch.Tensor | None = None,
) -> Any:
    """One column of ``n`` rows: part ``(positions, value)`` supplies the rows at ``positions``.

    The positions of all parts must cover ``range(n)`` exactly once. Tensors come back in fresh,
    writable memory (never views of the parts). The result's kind follows ``schema`` (see
    :func:`target_kind`): dense tensor, jagged nested tensor, "rows" value or list. ``out``: where a
    dense column goes when it fits (e.g. reused, already touched memory).
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
        return _assemble_dense(parts, n, schema, dtype, field, out)
    if kind == "jagged":
        return _assemble_jagged(parts, n, schema, d, dtype, field)
    out = np.empty(n, dtype=object)
    for pos, value in parts:
        out[pos] = object_array(row_list(value))
    return make_rows(out.tolist(), dtype)


def column_schema(
    name: str, known: FieldSchema | None, parts: Sequence[tuple[np.ndarray, Any]]
) -> FieldSchema | None:
    """A column's schema: the metadata's (``known``), widened by what the stored parts hold (only if
    it is stale); None when there is neither a schema nor a row."""
    schema = known
    try:
        for pos, value in parts:
            if len(pos):
                seen = schema_of(value, name)
                schema = seen if schema is None else schema.merge(seen)
    except SchemaError as exc:
        raise SchemaError(f"field {name!r}: {exc}") from None
    return schema
