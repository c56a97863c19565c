"""Batch metadata: which rows of which partitions a request is about, and the schema of their fields.

Columnar so that a batch of B rows costs O(F) numpy calls, never B Python objects: global indexes,
partition ids and production status are read-only numpy arrays, custom meta is an optional object
array (``None`` = every row empty). Arrays are never written in place -- a change replaces the
array -- so derived batches (chunks, selections, copies) share them safely.

Behaviour follows TransferQueue's columnar ``BatchMeta``/``KVBatchMeta``, except: ``select_fields``
rejects unknown names (``NotFoundError``), ``concat`` keeps equal ``extra_info`` values instead of
refusing scalars, ``union`` de-duplicates by (partition, global index), and ``is_end_of_stream``
marks the last batch of a sealed partition. Both classes have a pickle-free wire form.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import TensorDictBase

from tq_loader._meta_util import (
    _WIRE_VERSION,
    _arr_from_wire,
    _arr_to_wire,
    _check_plain,
    _chunk_slices,
    _custom_array,
    _frozen,
    _int_array,
    _merge_extra_info,
    _values_equal,
)
from tq_loader.errors import NotFoundError, ProtocolError, SchemaError
from tq_loader.schema import FieldSchema, dtype_name, normalize_schema, schema_of

__all__ = [
    "NOT_PRODUCED",
    "READY_FOR_CONSUME",
    "BatchMeta",
    "KVBatchMeta",
    "SampleMeta",
    "dtype_name",
    "normalize_schema",
    "schema_of",
]

NOT_PRODUCED, READY_FOR_CONSUME = 0, 1

# ---------------------------------------------------------------- per-row views


class SampleMeta(msgspec.Struct, frozen=True):
    """Read-only view of one row of a BatchMeta, made on demand (copies; edits do not write back)."""

    global_index: int
    partition_id: str
    fields: dict[str, FieldSchema]
    production_status: int
    custom_meta: dict[str, Any]
    batch_index: int

    @property
    def is_ready(self) -> bool:
        return self.production_status == READY_FOR_CONSUME

    @property
    def field_names(self) -> list[str]:
        return sorted(self.fields)


class _SampleList(Sequence):
    """``BatchMeta.samples``: indexable, sized, iterable; builds a SampleMeta per access."""

    __slots__ = ("_batch",)

    def __init__(self, batch: BatchMeta) -> None:
        self._batch = batch

    def __len__(self) -> int:
        return self._batch.size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._batch._sample(j) for j in range(*i.indices(len(self)))]
        return self._batch._sample(i)


# ---------------------------------------------------------------- BatchMeta


class BatchMeta:
    """Metadata of a batch of rows: indexes, partitions, production status, field schemas, custom meta."""

    __slots__ = ("_custom", "_eos", "_gidx", "_pids", "_schema", "_status", "extra_info")

    def __init__(
        self,
        global_indexes: Any,
        partition_ids: Any,
        field_schema: Mapping[str, Any] | None = None,
        production_status: Any = None,
        extra_info: dict[str, Any] | None = None,
        custom_meta: Sequence[dict[str, Any]] | None = None,
        *,
        end_of_stream: bool = False,
    ) -> None:
        gidx = _int_array(global_indexes, "global_indexes")
        n = gidx.size
        if isinstance(partition_ids, str):  # one partition for every row
            pids = np.full(n, partition_ids)
        else:
            pids = np.array(np.asarray(partition_ids, dtype=str).reshape(-1))
        if pids.size != n:
            raise SchemaError(f"length mismatch: {n} global_indexes but {pids.size} partition_ids")
        status = (
            np.zeros(n, np.int8)
            if production_status is None
            else _int_array(production_status, "production_status", np.int8, "iub")
        )
        if status.size != n:
            raise SchemaError(f"production_status has {status.size} entries for {n} rows")
        schema = {name: normalize_schema(m, name) for name, m in (field_schema or {}).items()}
        custom = None if custom_meta is None else _custom_array(custom_meta, n, deep=True)
        self._init(gidx, pids, status, schema, custom, copy.deepcopy(extra_info or {}), bool(end_of_stream))

    def _init(self, gidx, pids, status, schema, custom, extra_info, eos) -> None:
        self._gidx, self._pids, self._status = _frozen(gidx), _frozen(pids), _frozen(status)
        self._schema: dict[str, FieldSchema] = schema
        self._custom: np.ndarray | None = custom  # object array of dict|None (None = {}), or None
        self.extra_info: dict[str, Any] = extra_info
        self._eos: bool = eos

    @classmethod
    def _make(cls, gidx, pids, status, schema, custom, extra_info, eos) -> BatchMeta:
        """Build from arrays the caller owns, without validation or copies (the hot path)."""
        out = object.__new__(cls)
        out._init(gidx, pids, status, schema, custom, extra_info, eos)
        return out

    def _derive(self, key: Any, schema: dict[str, FieldSchema] | None = None) -> BatchMeta:
        """Rows ``key`` (slice -> views, index array -> copies) of this batch as a new batch."""
        custom = None if self._custom is None else self._custom[key]  # written only after a copy
        return BatchMeta._make(
            self._gidx[key], self._pids[key], self._status[key], dict(self._schema if schema is None else schema),
            custom, copy.deepcopy(self.extra_info), self._eos,
        )  # fmt: skip

    @classmethod
    def empty(cls, extra_info: dict[str, Any] | None = None, *, end_of_stream: bool = False) -> BatchMeta:
        """A batch of no rows (e.g. the final answer of a drained, sealed partition)."""
        return cls([], [], extra_info=extra_info, end_of_stream=end_of_stream)

    # ------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return int(self._gidx.size)

    def __len__(self) -> int:
        return self.size

    @property
    def global_indexes(self) -> list[int]:
        """The rows' global indexes as a list (TransferQueue's type; ``+`` concatenates, ``==`` compares).

        A fresh list per access: hot paths use :attr:`global_index_array` instead.
        """
        return self._gidx.tolist()

    @property
    def partition_ids(self) -> list[str]:
        """Each row's partition as a list of str (TransferQueue's type); see :attr:`partition_id_array`."""
        return self._pids.tolist()

    @property
    def global_index_array(self) -> np.ndarray:
        """Read-only int64 array of the rows' global indexes (no copy: the fast accessor)."""
        return self._gidx

    @property
    def partition_id_array(self) -> np.ndarray:
        """Read-only str array: each row's partition (no copy: the fast accessor)."""
        return self._pids

    @property
    def production_status(self) -> np.ndarray:
        """Read-only int8 array: 1 (READY_FOR_CONSUME) where the row's fields are produced."""
        return self._status

    @property
    def field_schema(self) -> dict[str, FieldSchema]:
        return dict(self._schema)

    @property
    def field_names(self) -> list[str]:
        return sorted(self._schema)

    @property
    def is_ready(self) -> bool:
        return self.size > 0 and bool((self._status == READY_FOR_CONSUME).all())

    @property
    def is_end_of_stream(self) -> bool:
        """True when the controller marks this as the last batch of a sealed partition."""
        return self._eos

    @property
    def samples(self) -> Sequence[SampleMeta]:
        return _SampleList(self)

    @property
    def custom_meta(self) -> list[dict[str, Any]]:
        return self.get_all_custom_meta()

    def _sample(self, i: Any) -> SampleMeta:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"row index must be an int, got {type(i).__name__}")
        pos = int(i) + self.size if i < 0 else int(i)
        if not 0 <= pos < self.size:
            raise IndexError(f"row {i} out of range for a batch of {self.size}")
        meta = None if self._custom is None else self._custom[pos]
        return SampleMeta(
            int(self._gidx[pos]), str(self._pids[pos]), dict(self._schema), int(self._status[pos]),
            copy.deepcopy(meta) if meta else {}, pos,
        )  # fmt: skip

    def __getitem__(self, item: Any) -> SampleMeta | BatchMeta:
        if isinstance(item, slice):
            return self._derive(item)
        if isinstance(item, (bool, float, str, bytes)):
            raise TypeError(f"BatchMeta indexes are ints, slices or index lists, not {type(item).__name__}")
        if isinstance(item, (int, np.integer)):
            return self._sample(item)
        return self.select_samples(item)

    # ------------------------------------------------------------ row / field selection

    def _positions(self, indexes: Any) -> np.ndarray:
        """Validated row positions from a list/array/tensor of ints or a boolean mask."""
        if isinstance(indexes, torch.Tensor):
            indexes = indexes.detach().cpu().numpy()
        arr = np.asarray(indexes)
        if arr.dtype == np.bool_ and arr.shape == (self.size,):
            return np.flatnonzero(arr)
        pos = _int_array(arr, "sample indexes")
        if pos.size and (pos.min() < 0 or pos.max() >= self.size):
            raise SchemaError(
                f"sample indexes must lie in [0, {self.size}), got min {pos.min()} max {pos.max()}"
            )
        return pos

    def select_samples(self, indexes: Any) -> BatchMeta:
        """New batch of the rows at ``indexes`` (positions in this batch), in that order."""
        return self._derive(self._positions(indexes))

    def select_fields(self, names: Iterable[str]) -> BatchMeta:
        """New batch with the same rows and only the fields ``names``."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self._schema]
        if missing:
            raise NotFoundError(f"fields {missing} not in this batch (it has {self.field_names})")
        return self._derive(slice(None), {n: self._schema[n] for n in names})

    def chunk(self, chunks: int) -> list[BatchMeta]:
        """Split into ``chunks`` contiguous batches; the first ``size % chunks`` are one row longer."""
        return [self._derive(s) for s in _chunk_slices(self.size, chunks)]

    def chunk_by_partition(self) -> list[BatchMeta]:
        """One batch per partition, in order of first appearance, rows keeping their order."""
        if self.size == 0:
            return []
        if (self._pids == self._pids[0]).all():
            return [self.copy()]
        _, first, group = np.unique(self._pids, return_index=True, return_inverse=True)
        rank = np.empty_like(first)
        rank[np.argsort(first)] = np.arange(first.size)
        group = rank[group.reshape(-1)]
        order = np.argsort(group, kind="stable")
        cuts = np.cumsum(np.bincount(group, minlength=first.size))[:-1]
        return [self._derive(part) for part in np.split(order, cuts)]

    @classmethod
    def concat(cls, data: Iterable[BatchMeta], validate: bool = True) -> BatchMeta:
        """One batch of all rows of ``data`` in order; fields must match (``SchemaError`` otherwise)."""
        data = list(data)
        eos = any(b._eos for b in data)
        parts = [b for b in data if b.size > 0]
        if not data:
            return cls.empty()
        parts = parts or data[:1]  # all empty: keep the first one's fields and extra_info
        schema = dict(parts[0]._schema)
        if validate:
            for i, part in enumerate(parts[1:], start=1):
                if part._schema.keys() != schema.keys():
                    raise SchemaError(
                        f"concat: batch {i} has fields {part.field_names}, batch 0 has {sorted(schema)}; "
                        "select_fields() the same fields first"
                    )
                for name, fs in part._schema.items():
                    try:
                        schema[name] = schema[name].merge(fs)
                    except SchemaError as e:
                        raise SchemaError(f"concat: field {name!r} of batch {i}: {e}") from e
        customs = [p._custom for p in parts]
        custom = None
        if any(c is not None for c in customs):
            filled = [np.full(p.size, None, object) if c is None else c for p, c in zip(parts, customs)]
            custom = np.concatenate(filled)
        return cls._make(
            np.concatenate([p._gidx for p in parts]), np.concatenate([p._pids for p in parts]),
            np.concatenate([p._status for p in parts]), schema, custom,
            _merge_extra_info([p.extra_info for p in parts]), eos,
        )  # fmt: skip

    def _rows_in(self, other: BatchMeta) -> np.ndarray:
        """Mask over ``other``'s rows whose (partition, global index) is also in this batch."""
        found = np.zeros(other.size, dtype=bool)
        for pid in np.unique(other._pids):
            mine, theirs = self._pids == pid, other._pids == pid
            found[theirs] = np.isin(other._gidx[theirs], self._gidx[mine])
        return found

    def union(self, other: BatchMeta) -> BatchMeta:
        """This batch plus the rows of ``other`` it does not hold yet (same fields required)."""
        if other is None or other.size == 0:
            return self.copy()
        if self.size == 0:
            return other.copy()
        new = np.flatnonzero(~self._rows_in(other))
        return BatchMeta.concat([self, other.select_samples(new)])

    def reorder(self, indexes: Any) -> None:
        """Permute the rows in place: row ``i`` becomes the old row ``indexes[i]``."""
        pos = np.asarray(indexes.detach().cpu() if isinstance(indexes, torch.Tensor) else indexes)
        if pos.shape != (self.size,) or pos.dtype == np.bool_:
            raise SchemaError(f"reorder needs {self.size} int indexes, got shape {pos.shape} ({pos.dtype})")
        pos = self._positions(pos)
        if np.unique(pos).size != self.size:
            raise SchemaError("reorder indexes must be a permutation of range(size); got duplicates")
        self._gidx, self._pids, self._status = (
            _frozen(a[pos]) for a in (self._gidx, self._pids, self._status)
        )
        if self._custom is not None:
            self._custom = self._custom[pos]

    def copy(self) -> BatchMeta:
        """Independent copy (arrays are immutable and shared; extra_info is deep-copied)."""
        return self._derive(slice(None))

    # ------------------------------------------------------------ fields, custom meta, extra info

    def add_fields(self, tensor_dict: TensorDictBase, set_all_ready: bool = True) -> BatchMeta:
        """Record the columns of ``tensor_dict`` as fields of every row (in place); marks rows ready."""
        if not isinstance(tensor_dict, TensorDictBase):
            raise SchemaError(f"add_fields needs a TensorDict, got {type(tensor_dict).__name__}")
        batch = tuple(tensor_dict.batch_size)
        if not batch or batch[0] != self.size:
            raise SchemaError(
                f"add_fields: TensorDict batch_size {batch} does not match batch size {self.size}"
            )
        schema = dict(self._schema)
        for name in tensor_dict.keys():  # noqa: SIM118 (iterating a TensorDict walks rows, not keys)
            schema[name] = schema_of(tensor_dict.get(name), name)
        self._schema = schema
        if set_all_ready:
            self._status = _frozen(np.full(self.size, READY_FOR_CONSUME, np.int8))
        return self

    def update_custom_meta(
        self, custom_meta: Sequence[dict[str, Any]] | Mapping[int, dict[str, Any]] | None
    ) -> None:
        """Merge per-row dicts into custom meta: a list aligned with the rows, or {global_index: dict}."""
        if custom_meta is None:
            return
        if isinstance(custom_meta, Mapping):  # TransferQueue's older {global_index: meta} form
            where = {g: i for i, g in enumerate(self._gidx.tolist())}
            missing = [g for g in custom_meta if g not in where]
            if missing:
                raise NotFoundError(f"custom_meta for global indexes {missing} not in this batch")
            pairs = [(where[g], meta) for g, meta in custom_meta.items()]
        else:
            if len(custom_meta) != self.size:
                raise SchemaError(f"custom_meta has {len(custom_meta)} entries for a batch of {self.size}")
            pairs = enumerate(custom_meta)
        arr = np.full(self.size, None, object) if self._custom is None else self._custom.copy()
        for pos, meta in pairs:
            if meta is not None and not isinstance(meta, Mapping):
                raise SchemaError(f"custom_meta of row {pos} must be a dict, got {type(meta).__name__}")
            if meta:
                arr[pos] = {**(arr[pos] or {}), **copy.deepcopy(dict(meta))}
        self._custom = arr

    def get_all_custom_meta(self) -> list[dict[str, Any]]:
        """Deep copy of every row's custom meta, in row order."""
        if self._custom is None:
            return [{} for _ in range(self.size)]
        return [copy.deepcopy(m) if m else {} for m in self._custom]

    def clear_custom_meta(self) -> None:
        self._custom = None

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return self.extra_info.get(key, default)

    def set_extra_info(self, key: str, value: Any) -> None:
        self.extra_info[key] = value

    def update_extra_info(self, info_dict: Mapping[str, Any]) -> None:
        self.extra_info.update(info_dict)

    def remove_extra_info(self, key: str) -> Any:
        return self.extra_info.pop(key, None)

    def clear_extra_info(self) -> None:
        self.extra_info.clear()

    def has_extra_info(self, key: str) -> bool:
        return key in self.extra_info

    def get_all_extra_info(self) -> dict[str, Any]:
        return copy.deepcopy(self.extra_info)

    # ------------------------------------------------------------ comparison, wire form

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchMeta):
            return NotImplemented
        return (
            np.array_equal(self._gidx, other._gidx)
            and np.array_equal(self._pids, other._pids)
            and np.array_equal(self._status, other._status)
            and self._schema == other._schema
            and self._eos == other._eos
            and _values_equal(self.extra_info, other.extra_info)
            and _values_equal(self.get_all_custom_meta(), other.get_all_custom_meta())
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = np.unique(self._pids[:1000]).tolist()
        return (
            f"BatchMeta(size={self.size}, fields={self.field_names}, partitions={parts}, "
            f"is_ready={self.is_ready}, end_of_stream={self._eos})"
        )

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict (raw bytes for arrays, lists for schemas); see :meth:`from_wire`."""
        _check_plain(self.extra_info, "extra_info")
        pids: dict[str, Any] = {"names": [], "codes": None}
        if self.size and (self._pids == self._pids[0]).all():
            pids["names"] = [str(self._pids[0])]
        elif self.size:
            names, codes = np.unique(self._pids, return_inverse=True)
            pids = {"names": names.tolist(), "codes": _arr_to_wire(codes.reshape(-1), "<i4")}
        return {
            "v": _WIRE_VERSION,
            "global_indexes": _arr_to_wire(self._gidx, "<i8"),
            "partition_ids": pids,
            "production_status": _arr_to_wire(self._status, "|i1"),
            "field_schema": [
                [n, s.dtype, list(s.shape), s.is_nested, s.is_non_tensor] for n, s in self._schema.items()
            ],
            "custom_meta": None if self._custom is None else self._custom.tolist(),
            "extra_info": dict(self.extra_info),
            "end_of_stream": self._eos,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> BatchMeta:
        """Inverse of :meth:`to_wire`; ``ProtocolError`` on a malformed dict."""
        try:
            if d["v"] != _WIRE_VERSION:
                raise ProtocolError(f"BatchMeta wire version {d['v']!r}, this side speaks {_WIRE_VERSION}")
            gidx = _arr_from_wire(d["global_indexes"], "<i8", None, "global_indexes")
            n = gidx.size
            names = np.asarray(d["partition_ids"]["names"], dtype=str).reshape(-1)
            codes = d["partition_ids"]["codes"]
            codes = (
                np.zeros(n, np.intp) if codes is None else _arr_from_wire(codes, "<i4", n, "partition codes")
            )
            if n and (codes.min() < 0 or codes.max() >= names.size):
                raise ProtocolError(f"partition_ids: codes outside the {names.size} partition names")
            pids = names[codes]
            status = _arr_from_wire(d["production_status"], "|i1", n, "production_status")
            schema = {name: normalize_schema(rest, name) for name, *rest in d["field_schema"]}
            custom = None if d["custom_meta"] is None else _custom_array(d["custom_meta"], n, deep=False)
            extra_info = d["extra_info"]
            if not isinstance(extra_info, dict):
                raise ProtocolError(f"extra_info must be a map, got {type(extra_info).__name__}")
            return cls._make(gidx, pids, status, schema, custom, extra_info, bool(d["end_of_stream"]))
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ProtocolError(f"malformed BatchMeta wire form: {type(e).__name__}: {e}") from e


from tq_loader.metadata_kv import KVBatchMeta  # noqa: E402  (re-export; it builds on the helpers above)
