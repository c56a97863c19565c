"""Per-column schema: what a field holds, shared by metadata, codec, controller and storage.

A schema is decided by the column, never by the rows a reader happens to select: once a column
has seen two per-row shapes it is jagged for good (types never depend on the data).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDictBase

from tq_loader.errors import SchemaError

__all__ = ["OBJECT_DTYPE", "FieldSchema", "dtype_name", "normalize_schema", "schema_of"]

OBJECT_DTYPE = "object"


class FieldSchema(msgspec.Struct, frozen=True, array_like=True):
    """Schema of one field (column).

    ``dtype`` is a torch dtype name without the ``torch.`` prefix (``"float32"``, ``"bfloat16"``)
    or ``"object"`` for non-tensor values. ``shape`` is the per-row shape; ``-1`` marks a dimension
    that varies between rows (jagged). ``is_nested``: rows differ in shape (returned as a jagged
    nested tensor when exactly one dimension varies). ``is_non_tensor``: str/bytes/numbers/dicts...
    """

    dtype: str
    shape: tuple[int, ...] = ()
    is_nested: bool = False
    is_non_tensor: bool = False

    def merge(self, other: FieldSchema) -> FieldSchema:
        """Schema after ``other`` is written into a column that has ``self``.

        Raises ``SchemaError`` on a dtype or tensor/non-tensor conflict; a different per-row shape
        (or rank) turns the column jagged, with ``-1`` where the sizes differ.
        """
        if self == other:
            return self
        if self.is_non_tensor != other.is_non_tensor or self.dtype != other.dtype:
            raise SchemaError(
                f"dtype conflict: column holds {self.dtype!r}, write has {other.dtype!r}; "
                "write this field with the column's dtype or use a new field name"
            )
        if self.is_non_tensor:
            return self
        if len(self.shape) != len(other.shape):
            raise SchemaError(
                f"rank conflict: column rows have shape {self.shape}, write has {other.shape}; "
                "rows of one field must have the same number of dimensions"
            )
        shape = tuple(a if a == b else -1 for a, b in zip(self.shape, other.shape))
        nested = self.is_nested or other.is_nested or shape != self.shape
        return FieldSchema(self.dtype, shape, nested, False)


_OBJECT = FieldSchema(OBJECT_DTYPE, (), False, True)


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"float32"``, ``"object"``) of a torch/numpy dtype, a dtype name or a Python type."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == OBJECT_DTYPE:
            return name
        found = getattr(torch, name, None)
        if isinstance(found, torch.dtype):
            return str(found).removeprefix("torch.")  # aliases: "float" -> "float32"
        raise SchemaError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32', or 'object'")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        np_dtype = np.dtype(dtype)
        return OBJECT_DTYPE if np_dtype.kind in "OUSV" else dtype_name(np_dtype.name)
    if isinstance(dtype, type):  # TransferQueue records a non-tensor column's Python type (str, dict, ...)
        return OBJECT_DTYPE
    raise SchemaError(f"cannot interpret {dtype!r} as a dtype; pass a torch.dtype or a name like 'int64'")


def _dims(shape: Iterable[Any]) -> tuple[int, ...]:
    """Per-row shape as ints; symbolic (ragged) sizes of a jagged tensor become -1."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def _merge_shapes(shapes: Sequence[Sequence[int]], field: str) -> tuple[tuple[int, ...], bool]:
    """Common per-row shape of ``shapes`` with -1 where they differ, and whether any differ."""
    if not shapes:
        return (), False
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise SchemaError(
            f"field {field!r}: rows have different ranks {sorted(ranks)}; give every row the same ndim"
        )
    arr = np.asarray(shapes, dtype=np.int64).reshape(len(shapes), ranks.pop())
    varies = (arr != arr[0]).any(axis=0)
    return tuple(-1 if v else int(d) for v, d in zip(varies, arr[0])), bool(varies.any())


def normalize_schema(meta: Any, field: str = "?") -> FieldSchema:
    """A FieldSchema from a FieldSchema, a wire list, or a TransferQueue-style schema dict."""
    if isinstance(meta, FieldSchema):
        return meta
    if isinstance(meta, Mapping):
        raw, non_tensor = meta.get("dtype"), meta.get("is_non_tensor")
        if raw is None and not non_tensor:
            raise SchemaError(
                f"field {field!r}: schema has no dtype; give one (e.g. 'float32') or is_non_tensor=True"
            )
        dtype = OBJECT_DTYPE if non_tensor or raw is None else dtype_name(raw)
        if dtype == OBJECT_DTYPE:
            return _OBJECT
        nested = bool(meta.get("is_nested", False))
        if meta.get("shape") is not None:
            shape = _dims(meta["shape"])
        else:
            shape, ragged = _merge_shapes(meta.get("per_sample_shapes") or [], field)
            nested = nested or ragged
        return FieldSchema(dtype, shape, nested or -1 in shape, False)
    if isinstance(meta, (list, tuple)) and len(meta) == 4:
        return FieldSchema(dtype_name(meta[0]), _dims(meta[1]), bool(meta[2]), bool(meta[3]))
    raise SchemaError(
        f"field {field!r}: cannot read schema {meta!r}; pass a FieldSchema or a dict with a dtype"
    )


def schema_of(value: Any, field: str = "?") -> FieldSchema:
    """Schema of one column (rows along dim 0), decided by its type and per-row shapes only."""
    if isinstance(value, (NonTensorData, NonTensorStack)):
        return _OBJECT
    if isinstance(value, TensorDictBase):
        raise SchemaError(f"field {field!r} is a nested TensorDict; flatten it first (td.flatten_keys('.'))")
    if isinstance(value, torch.Tensor):
        dtype = dtype_name(value.dtype)
        if not value.is_nested:
            if value.dim() == 0:
                raise SchemaError(f"field {field!r} is a 0-d tensor; a column needs a batch dimension")
            return FieldSchema(dtype, tuple(value.shape[1:]))
        if value.layout == torch.jagged:
            return FieldSchema(dtype, _dims(value.shape[1:]), True, False)
        shape, _ = _merge_shapes([tuple(t.shape) for t in value.unbind()], field)  # strided nested
        return FieldSchema(dtype, shape, True, False)
    if isinstance(value, np.ndarray) and value.dtype.kind not in "OUSV":
        if value.ndim == 0:
            raise SchemaError(f"field {field!r} is a 0-d array; a column needs a batch dimension")
        return FieldSchema(dtype_name(value.dtype), tuple(value.shape[1:]))
    if isinstance(value, (list, tuple)):
        is_tensor = [isinstance(v, torch.Tensor) for v in value]
        if value and all(is_tensor):
            dtypes = {v.dtype for v in value}
            if len(dtypes) > 1:
                raise SchemaError(
                    f"field {field!r}: rows have dtypes {sorted(map(str, dtypes))}; cast to one dtype"
                )
            shape, ragged = _merge_shapes([tuple(v.shape) for v in value], field)
            return FieldSchema(dtype_name(dtypes.pop()), shape, ragged, False)
        if any(is_tensor):
            raise SchemaError(f"field {field!r} mixes tensors and other values; use one kind per field")
    return _OBJECT
