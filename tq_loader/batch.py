"""A put's batch, validated once: its row count, its columns in codec form, one schema per field.

Every layer of the put path (client, storage manager, codec) used to re-derive the row count and
the schemas from the user's data, and one of them (the dict -> TensorDict conversion that built
the returned metadata) disagreed with the codec. :func:`prepare_batch` is now the only place that
looks at the user's values; everything below takes the :class:`PreparedBatch` it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDictBase

from tq_loader import codec_objects as objects
from tq_loader.codec import batch_length
from tq_loader.errors import SchemaError
from tq_loader.schema import FieldSchema, schema_of

__all__ = ["PreparedBatch", "prepare_batch"]


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """``size`` rows; ``columns``: field -> column value the codec encodes (tensor, jagged nested
    tensor, list of tensors or list of plain values); ``schemas``: field -> its schema."""

    size: int
    columns: dict[str, Any]
    schemas: dict[str, FieldSchema]

    def select(self, fields: list[str]) -> PreparedBatch:
        return PreparedBatch(
            self.size, {f: self.columns[f] for f in fields}, {f: self.schemas[f] for f in fields}
        )

    def cast_to(self, columns: Mapping[str, FieldSchema]) -> tuple[PreparedBatch, list[tuple[str, str, str]]]:
        """This batch with tensor fields converted to ``columns``' dtypes where they differ; the
        ``(field, from, to)`` conversions made (the controller allowed only safe ones)."""
        changed: list[tuple[str, str, str]] = []
        cols, schemas = dict(self.columns), dict(self.schemas)
        for name, schema in self.schemas.items():
            target = columns.get(name)
            if target is None or target.is_non_tensor or schema.is_non_tensor or target.dtype == schema.dtype:
                continue
            dtype = getattr(torch, target.dtype)
            value = cols[name]
            cols[name] = [v.to(dtype) for v in value] if isinstance(value, list) else value.to(dtype)
            schemas[name] = FieldSchema(target.dtype, schema.shape, schema.is_nested, False)
            changed.append((name, schema.dtype, target.dtype))
        return (PreparedBatch(self.size, cols, schemas) if changed else self), changed


def _as_column(name: str, value: Any) -> Any:
    """A user column as a codec column value (tensors pass through; numpy and non-tensor data convert)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return objects.numpy_column(value, name)
    if isinstance(value, (NonTensorStack, NonTensorData)):
        return objects.non_tensor_rows(value, name)
    if isinstance(value, TensorDictBase):
        raise SchemaError(f"field {name!r} is a nested TensorDict; flatten it first (td.flatten_keys('.'))")
    if isinstance(value, (list, tuple)):
        return list(value)
    raise SchemaError(
        f"field {name!r}: a value of type {type(value).__name__} is not a column; pass a tensor, a numpy "
        "array, a NonTensorStack or a list with one value per row"
    )


def prepare_batch(data: Any) -> PreparedBatch:
    """Validate ``data`` (a TensorDict or a mapping field -> column) once for the whole put path."""
    if isinstance(data, PreparedBatch):
        return data
    if not isinstance(data, (TensorDictBase, Mapping)):
        raise SchemaError(
            f"data must be a TensorDict or a dict of field -> column, got {type(data).__name__}; "
            "wrap the columns in a dict"
        )
    columns: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            raise SchemaError(f"field names must be str, got {name!r} ({type(name).__name__})")
        columns[name] = _as_column(name, value)
    n = batch_length(columns)
    if isinstance(data, TensorDictBase) and data.batch_dims:
        rows = int(data.batch_size[0])
        if columns and rows != n:
            raise SchemaError(
                f"TensorDict batch size {tuple(data.batch_size)} does not match its columns' {n} rows"
            )
        n = rows
    schemas = {name: schema_of(value, name) for name, value in columns.items()}
    return PreparedBatch(n, columns, schemas)
