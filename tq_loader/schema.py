"""Per-column schema: what a field holds, shared by metadata, codec, controller and storage.

A schema is decided by the column, never by the rows a reader happens to select: once a column
has seen two per-row shapes it is jagged for good (types never depend on the data).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any, ClassVar

import msgspec
import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDictBase

from tq_loader.errors import SchemaError

__all__ = [
    "OBJECT_DTYPE",
    "FieldSchema",
    "dtype_name",
    "normalize_schema",
    "numpy_dtype_error",
    "numpy_torch_dtype",
    "schema_of",
]

OBJECT_DTYPE = "object"


class FieldSchema(msgspec.Struct, frozen=True, array_like=True):
    """Schema of one field (column).

    ``dtype`` is a torch dtype name without the ``torch.`` prefix (``"float32"``, ``"bfloat16"``)
    or ``"object"`` for non-tensor values. ``shape`` is the per-row shape; ``-1`` marks a dimension
    that varies between rows (jagged). ``is_nested``: rows differ in shape (returned as a jagged
    nested tensor when exactly one dimension varies). ``is_non_tensor``: str/bytes/numbers/dicts...

    The attributes are the wire form (a 4-element msgpack array). TransferQueue code reads a
    schema as a dict, so a FieldSchema is also a read-only Mapping with TransferQueue's keys and
    value types: ``fs["dtype"]`` is a ``torch.dtype`` (``None`` for a non-tensor field),
    ``fs["shape"]`` the per-row shape (``None`` for a non-tensor field), ``fs["is_nested"]``,
    ``fs["is_non_tensor"]``; ``dict(fs)`` gives the dict, and a FieldSchema compares equal to it.
    TransferQueue's per-batch ``per_sample_shapes`` is not a key: a schema describes the column,
    not one batch's rows (see ``BatchMeta.get_shapes``).
    """

    dtype: str
    shape: tuple[int, ...] = ()
    is_nested: bool = False
    is_non_tensor: bool = False

    _KEYS: ClassVar[tuple[str, ...]] = ("dtype", "shape", "is_nested", "is_non_tensor")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The column's ``torch.dtype``, or ``None`` for a non-tensor (object) column."""
        return None if self.is_non_tensor or self.dtype == OBJECT_DTYPE else getattr(torch, self.dtype)

    # ------------------------------------------------ read-only Mapping (TransferQueue's dict form)

    def __getitem__(self, key: str) -> Any:
        if key == "dtype":
            return self.torch_dtype
        if key == "shape":
            return None if self.is_non_tensor else self.shape
        if key == "is_nested":
            return self.is_nested
        if key == "is_non_tensor":
            return self.is_non_tensor
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def keys(self) -> KeysView[str]:
        return KeysView(self)  # type: ignore[arg-type]

    def values(self) -> ValuesView[Any]:
        return ValuesView(self)  # type: ignore[arg-type]

    def items(self) -> ItemsView[str, Any]:
        return ItemsView(self)  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._KEYS else default

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FieldSchema):
            return (self.dtype, self.shape, self.is_nested, self.is_non_tensor) == (
                other.dtype, other.shape, other.is_nested, other.is_non_tensor,
            )  # fmt: skip
        if isinstance(other, Mapping):  # TransferQueue-style dict
            return dict(self) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape, self.is_nested, self.is_non_tensor))

    def castable_into(self, column: FieldSchema) -> bool:
        """Whether values of this (tensor) schema convert to ``column``'s dtype without changing kind
        of number downward (torch's ``can_cast``: int -> float yes, float -> int no)."""
        if self.is_non_tensor or column.is_non_tensor or self.dtype == column.dtype:
            return False
        try:
            return bool(torch.can_cast(getattr(torch, self.dtype), getattr(torch, column.dtype)))
        except (AttributeError, TypeError, RuntimeError):
            return False

    def merge(self, other: FieldSchema, *, cast: bool = False) -> FieldSchema:
        """Schema after ``other`` is written into a column that has ``self``.

        Raises ``SchemaError`` on a dtype or tensor/non-tensor conflict -- unless ``cast`` and the
        write's values convert safely to the column's dtype (then the column keeps its dtype and the
        writer casts); a different per-row shape (or rank) turns the column jagged, with ``-1`` where
        the sizes differ.
        """
        if self == other:
            return self
        if cast and other.castable_into(self):
            other = FieldSchema(self.dtype, other.shape, other.is_nested, False)
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


Mapping.register(FieldSchema)  # a Struct cannot also subclass an ABC; the methods above are the interface

_OBJECT = FieldSchema(OBJECT_DTYPE, (), False, True)


def numpy_torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype a numeric numpy dtype maps to, or ``None`` (strings, objects, dates, records...)."""
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        return None
    found = getattr(torch, dtype.name, None)
    return found if isinstance(found, torch.dtype) else None  # float128 / complex256 have none


def numpy_dtype_error(dtype: np.dtype, field: str, where: str = "") -> SchemaError:
    """The error for a numpy dtype no column can hold, naming the field and saying what to convert to."""
    if dtype.kind == "M":
        unit = np.datetime_data(dtype)[0]
        fix = (
            f"convert it to int64 (arr.astype('int64'): {unit!r} units since 1970-01-01) or to strings "
            "(np.datetime_as_string(arr))"
        )
    elif dtype.kind == "m":
        unit = np.datetime_data(dtype)[0]
        fix = (
            f"convert it to int64 (arr.astype('int64'): a count of {unit!r} units) or to float seconds "
            "(arr / np.timedelta64(1, 's'))"
        )
    elif dtype.fields is not None or dtype.kind == "V":
        fix = "put each record field in its own column (arr['name']) or convert the records with arr.tolist()"
    elif dtype.kind == "f":
        fix = "cast it to float64 (arr.astype('float64'))"
    elif dtype.kind == "c":
        fix = "cast it to complex128 (arr.astype('complex128'))"
    elif dtype.kind in "OUS":
        fix = "store it as a list of values (arr.tolist()) or as a column of its own"
    else:
        fix = "convert it to a numeric, bool, str or bytes array"
    at = f" at {where}" if where else ""
    return SchemaError(f"field {field!r}: numpy dtype {dtype}{at} is not supported; {fix}")


def dtype_name(dtype: Any, field: str = "?") -> str:
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
        raise SchemaError(
            f"field {field!r}: unknown dtype {dtype!r}; use a torch dtype name such as 'float32', or 'object'"
        )
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        np_dtype = np.dtype(dtype)
        if np_dtype.kind in "OUS":
            return OBJECT_DTYPE
        found = numpy_torch_dtype(np_dtype)
        if found is None:
            raise numpy_dtype_error(np_dtype, field)
        return dtype_name(found)
    if isinstance(dtype, type):  # TransferQueue records a non-tensor column's Python type (str, dict, ...)
        return OBJECT_DTYPE
    raise SchemaError(
        f"field {field!r}: cannot interpret {dtype!r} as a dtype; pass a torch.dtype or a name like 'int64'"
    )


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
        dtype = OBJECT_DTYPE if non_tensor or raw is None else dtype_name(raw, field)
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
        return FieldSchema(dtype_name(meta[0], field), _dims(meta[1]), bool(meta[2]), bool(meta[3]))
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
    if isinstance(value, np.ndarray) and value.dtype.kind not in "OUS":
        if value.ndim == 0:
            raise SchemaError(f"field {field!r} is a 0-d array; a column needs a batch dimension")
        return FieldSchema(dtype_name(value.dtype, field), tuple(value.shape[1:]))
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
