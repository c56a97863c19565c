"""Controller state as plain data (checkpoints, ``ImportState``), validated before it is used.

Arrays travel as (dtype string, shape, bytes) and are checked for dtype, shape and consistency
(ascending unique ids, tags and keys naming existing rows) before any partition is rebuilt.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from tq_loader.controller.state import PartitionState, RowIdAllocator
from tq_loader.errors import ProtocolError, SchemaError
from tq_loader.schema import OBJECT_DTYPE, FieldSchema, dtype_name

__all__ = ["PackedArray", "PartitionSnapshot", "export_partition", "partition_from_state"]


class PackedArray(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A numpy array as plain data (checkpoints, ``ImportState``): dtype string, shape, C-order bytes."""

    dtype: str
    shape: list[int]
    data: bytes


def _pack(arr: np.ndarray) -> PackedArray:
    return PackedArray(arr.dtype.str, list(arr.shape), np.ascontiguousarray(arr).tobytes())


def _unpack(packed: PackedArray, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The array, checked to have exactly ``dtype`` and ``shape`` (bools hold only 0/1)."""
    want = np.dtype(dtype)
    if (
        packed.dtype != want.str
        or tuple(packed.shape) != shape
        or len(packed.data) != want.itemsize * int(np.prod(shape, dtype=object))
    ):
        raise ProtocolError(
            f"{what}: expected a {want.str} array of shape {shape}, got {packed.dtype} {tuple(packed.shape)} "
            f"in {len(packed.data)} bytes; the state is corrupt or from another version"
        )
    if want.kind == "b" and packed.data and max(packed.data) > 1:
        raise ProtocolError(f"{what}: bool array holds bytes other than 0 and 1")
    return np.frombuffer(packed.data, dtype=want).reshape(shape).copy()


class PartitionSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One partition's state as plain data: live rows only (dead slots are not saved)."""

    partition_id: str
    sealed: bool
    aborted: str | None
    rows_cleared: int
    next_ordinal: int
    ids: PackedArray  # int64 (n,), ascending
    ordinals: PackedArray  # int64 (n,), ascending
    fields: list[str]  # column order of ``produced``
    schemas: dict[str, FieldSchema]
    produced: PackedArray  # bool (n, len(fields))
    consumed: dict[str, PackedArray]  # task -> bool (n,)
    tag_ids: PackedArray  # int64 (len(tags),)
    tags: list[dict[str, Any]]
    keys: list[str]
    key_ids: PackedArray  # int64 (len(keys),)


def _check_sorted_unique(arr: np.ndarray, what: str) -> None:
    if arr.size and (arr[0] < 0 or (np.diff(arr) <= 0).any()):
        raise ProtocolError(f"{what} must be non-negative and strictly ascending")


def export_partition(self: PartitionState) -> dict[str, Any]:
    """The live rows' state as plain data (bytes for arrays); inverse of :func:`partition_from_state`."""
    return msgspec.to_builtins(snapshot(self), builtin_types=(bytes,))


def snapshot(self: PartitionState) -> PartitionSnapshot:
    """The live rows' state as a typed struct."""
    live = np.flatnonzero(self._live[: self._n])
    cols = np.fromiter(self._fields.values(), dtype=np.intp, count=len(self._fields))
    keys, key_ids = self.list_keys()
    return PartitionSnapshot(
        partition_id=self.partition_id, sealed=self.sealed, aborted=self.aborted,
        rows_cleared=self._n_cleared, next_ordinal=self._next_ord,
        ids=_pack(self._ids[live]), ordinals=_pack(self._ord[live]),
        fields=list(self._fields), schemas={name: self._schemas[name] for name in self._fields},
        produced=_pack(self._prod[np.ix_(live, cols)]),
        consumed={task: _pack(vec[live]) for task, vec in self._consumed.items()},
        tag_ids=_pack(np.fromiter(self._tags, dtype=np.int64, count=len(self._tags))),
        tags=[dict(tag) for tag in self._tags.values()], keys=keys, key_ids=_pack(key_ids),
    )  # fmt: skip


def partition_from_state(state: Any, allocator: RowIdAllocator) -> PartitionState:
    """Rebuild a partition from :func:`export_partition`; anything inconsistent raises first."""
    try:
        snap = msgspec.convert(state, PartitionSnapshot)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed partition state: {exc}") from None
    return from_snapshot(snap, allocator)


def from_snapshot(snap: PartitionSnapshot, allocator: RowIdAllocator) -> PartitionState:
    """Rebuild a partition from a validated snapshot struct."""
    where = f"partition {snap.partition_id!r}"
    n, nf = len(snap.ids.data) // 8, len(snap.fields)
    ids = _unpack(snap.ids, "<i8", (n,), f"{where} ids")
    ords = _unpack(snap.ordinals, "<i8", (n,), f"{where} ordinals")
    _check_sorted_unique(ids, f"{where} ids")
    _check_sorted_unique(ords, f"{where} ordinals")
    if n and (ids[-1] >= allocator.next_id or ords[-1] >= snap.next_ordinal):
        raise ProtocolError(f"{where}: row ids or ordinals lie beyond the saved allocator positions")
    if not snap.partition_id or min(snap.rows_cleared, snap.next_ordinal) < 0 or len(set(snap.fields)) != nf:
        raise ProtocolError(f"{where}: empty id, negative counter or repeated field names")
    if set(snap.fields) != set(snap.schemas):
        raise ProtocolError(f"{where}: fields {snap.fields} do not match schemas {sorted(snap.schemas)}")
    for name, schema in snap.schemas.items():
        obj = schema.dtype == OBJECT_DTYPE
        bad = obj != schema.is_non_tensor or (obj and (schema.is_nested or schema.shape))
        if bad or any(d < -1 for d in schema.shape) or (not obj and dtype_name(schema.dtype) != schema.dtype):
            raise SchemaError(f"{where}, field {name!r}: invalid schema {schema}")
    prod = _unpack(snap.produced, "|b1", (n, nf), f"{where} production matrix")
    consumed = {t: _unpack(v, "|b1", (n,), f"{where} consumption of {t!r}") for t, v in snap.consumed.items()}
    tag_ids = _unpack(snap.tag_ids, "<i8", (len(snap.tags),), f"{where} tag ids")
    key_ids = _unpack(snap.key_ids, "<i8", (len(snap.keys),), f"{where} key ids")
    for what, sub in (("tag", tag_ids), ("key", key_ids)):
        if np.unique(sub).size != sub.size or not np.isin(sub, ids).all():
            raise ProtocolError(f"{where}: {what} ids repeat or name rows that do not exist")
    if len(set(snap.keys)) != len(snap.keys):
        raise ProtocolError(f"{where}: repeated keys")
    part = PartitionState(snap.partition_id, allocator)
    part.sealed, part.aborted = snap.sealed, snap.aborted
    part._grow_fields(nf)
    part._grow_rows(n)
    cap = part._ids.shape[0]
    part._ids[:n], part._ord[:n], part._live[:n], part._prod[:n, :nf] = ids, ords, True, prod
    for task, vec in consumed.items():
        part._consumed[task] = np.zeros(cap, dtype=bool)
        part._consumed[task][:n] = vec
    part._n = part._n_live = n
    part._n_cleared, part._next_ord = snap.rows_cleared, snap.next_ordinal
    part._fields = {name: j for j, name in enumerate(snap.fields)}
    part._schemas = {name: snap.schemas[name] for name in snap.fields}
    part._tags = dict(zip(tag_ids.tolist(), snap.tags, strict=True))
    part._key_to_id = dict(zip(snap.keys, key_ids.tolist(), strict=True))
    part._id_to_key = {gid: key for key, gid in part._key_to_id.items()}
    return part
