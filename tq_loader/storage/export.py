"""The wire form of a storage unit's export (checkpoints), shared by the unit and the client side.

An ``ExportRows`` reply is a ``RowsReply`` whose ``global_indexes`` are all the partition's rows and
whose columns come in pairs per field: the field's values, then an int64 column named
:data:`EXPORT_IDS_PREFIX` + field with the rows that have it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tq_loader import protocol as p
from tq_loader.codec import ColumnSpec, decode_columns, encode_columns
from tq_loader.errors import ProtocolError

__all__ = ["EXPORT_IDS_PREFIX", "decode_export", "encode_export"]

EXPORT_IDS_PREFIX = "\x00ids:"  # a field name no user writes (NUL), so it cannot clash


def encode_export(
    ids: np.ndarray, fields: Mapping[str, tuple[np.ndarray, Any]]
) -> tuple[p.RowsReply, list[memoryview]]:
    """The reply for ``(ids, {field: (ids_having_field, value)})``."""
    specs: list[ColumnSpec] = []
    bufs: list[memoryview] = []
    for name, (field_ids, value) in fields.items():
        s, b = encode_columns({name: value, EXPORT_IDS_PREFIX + name: torch.from_numpy(field_ids)})
        specs.extend(s)
        bufs.extend(b)
    return p.RowsReply(global_indexes=p.ids_to_wire(ids), columns=specs), bufs


def decode_export(
    reply: p.RowsReply, buffers: Sequence[Any]
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, Any]]]:
    """``(ids, {field: (ids_having_field, value)})`` from an ``ExportRows`` reply."""
    columns = decode_columns(reply.columns, buffers, copy=True)
    fields: dict[str, tuple[np.ndarray, Any]] = {}
    for name, value in columns.items():
        if name.startswith(EXPORT_IDS_PREFIX):
            continue
        field_ids = columns.get(EXPORT_IDS_PREFIX + name)
        if not isinstance(field_ids, torch.Tensor) or field_ids.dtype != torch.int64:
            raise ProtocolError(f"export reply: field {name!r} comes without its int64 row ids")
        fields[name] = (field_ids.numpy().copy(), value)
    return p.ids_from_wire(reply.global_indexes), fields
