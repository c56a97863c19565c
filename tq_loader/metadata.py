"""Batch metadata: which rows of which partitions a request is about, and the schema of their fields.

Columnar so that a batch of B rows costs O(F) numpy calls, never B Python objects: global indexes,
partition ids and production status are read-only numpy arrays, custom meta is an optional object
array (``None`` = every row empty). Arrays are never written in place -- a change replaces the
array -- so derived batches (chunks, selections, copies) share them safely. The one exception is
``custom_meta``: as in TransferQueue it is a live list whose dicts the caller may edit, so reading
it gives the batch its own copy first (see :func:`tq_loader._meta_util.own_custom`).

Behaviour follows TransferQueue 0.1.11's columnar ``BatchMeta``/``KVBatchMeta`` (public types:
lists of ints/str, dict-like field schemas with torch dtypes, live custom meta), except:
``select_fields`` rejects unknown names (``NotFoundError``), ``concat`` joins differing list /
tensor ``extra_info`` values instead of refusing them, ``production_status`` is read-only (assign
a new array instead of writing into it), ``get_shapes`` of a jagged field marks the varying
dimensions with -1 (one-time warning), and ``is_end_of_stream`` marks the last batch of a sealed
partition. Both classes have a pickle-free wire form.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import TensorDictBase

from tq_loader import _meta_util as rows
from tq_loader import args
from tq_loader._meta_util import (
    RowMetaMixin,
    _chunk_slices,
    _custom_array,
    _frozen,
    _int_array,
    _merge_extra_info,
    _values_equal,
    warn_once,
)
from tq_loader.errors import NotFoundError, SchemaError
from tq_loader.schema import FieldSchema, dtype_name, normalize_schema, schema_of

__all__ = [
    "NOT_PRODUCED",
    "READY_FOR_CONSUME",
    "BatchMeta",
    "KVBatchMeta",
    "SampleMeta",
    "dtype_name",
    "extract_field_schema",
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


def extract_field_schema(data: TensorDictBase | Mapping[str, Any]) -> dict[str, FieldSchema]:
    """Schema of every column of ``data`` (TransferQueue's helper; entries read like its dicts)."""
    if not isinstance(data, (TensorDictBase, Mapping)):
        raise SchemaError(f"extract_field_schema needs a TensorDict or a dict, got {type(data).__name__}")
    return {name: schema_of(data.get(name), name) for name in data.keys()}  # noqa: SIM118


# ---------------------------------------------------------------- BatchMeta


class BatchMeta(RowMetaMixin):
    """Metadata of a batch of rows: indexes, partitions, production status, field schemas, custom meta."""

    __slots__ = ("_backend", "_custom", "_eos", "_gidx", "_pids", "_schema", "_status", "extra_info")

    def __init__(
        self,
        global_indexes: Any,
        partition_ids: Any,
        field_schema: Mapping[str, Any] | None = None,
        production_status: Any = None,
        extra_info: dict[str, Any] | None = None,
        custom_meta: Sequence[dict[str, Any]] | None = None,
        _custom_backend_meta: Sequence[dict[str, Any]] | None = None,
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
        custom = None if custom_meta is None else _custom_array(custom_meta, n, deep=True)
        backend = None if _custom_backend_meta is None else rows.backend_list(_custom_backend_meta, n)
        self._init(
            gidx, pids, self._status_array(production_status, n), self._schema_dict(field_schema), custom,
            copy.deepcopy(extra_info or {}), bool(end_of_stream), backend,
        )  # fmt: skip

    @staticmethod
    def _status_array(production_status: Any, n: int) -> np.ndarray:
        if production_status is None:
            return np.zeros(n, np.int8)
        status = _int_array(production_status, "production_status", np.int8, "iub")
        if status.size != n:
            raise SchemaError(f"production_status has {status.size} entries for {n} rows")
        return status

    @staticmethod
    def _schema_dict(field_schema: Mapping[str, Any] | None) -> dict[str, FieldSchema]:
        return {name: normalize_schema(m, name) for name, m in (field_schema or {}).items()}

    def _init(self, gidx, pids, status, schema, custom, extra_info, eos, backend=None) -> None:
        self._gidx, self._pids, self._status = _frozen(gidx), _frozen(pids), _frozen(status)
        self._schema: dict[str, FieldSchema] = schema
        # None (every row empty), an object array of dict|None shared with derived batches (never
        # written), or -- once ``custom_meta`` was read -- this batch's own live list of dicts.
        self._custom: np.ndarray | list[dict[str, Any]] | None = custom
        self._backend: list[dict[str, Any]] | None = backend  # TransferQueue's _custom_backend_meta
        self.extra_info: dict[str, Any] = extra_info
        self._eos: bool = eos

    @classmethod
    def _make(cls, gidx, pids, status, schema, custom, extra_info, eos, backend=None) -> BatchMeta:
        """Build from arrays the caller owns, without validation or copies (the hot path)."""
        out = object.__new__(cls)
        out._init(gidx, pids, status, schema, custom, extra_info, eos, backend)
        return out

    def _derive(self, key: Any, schema: dict[str, FieldSchema] | None = None) -> BatchMeta:
        """Rows ``key`` (slice -> views, index array -> copies) of this batch as a new batch."""
        fields = None if schema is None else list(schema)  # select_fields also narrows the backend meta
        return BatchMeta._make(
            self._gidx[key], self._pids[key], self._status[key], dict(self._schema if schema is None else schema),
            rows.custom_rows(self._custom, key, self.size), copy.deepcopy(self.extra_info), self._eos,
            rows.backend_rows(self._backend, key, fields),
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
        """Read-only int8 array: 1 (READY_FOR_CONSUME) where the row's fields are produced.

        TransferQueue's array is writable; here it is shared with derived batches, so writing into
        it raises -- assign a new one instead (``meta.production_status = new_array``).
        """
        return self._status

    @production_status.setter
    def production_status(self, value: Any) -> None:
        self._status = _frozen(self._status_array(value, self.size))

    @property
    def field_schema(self) -> dict[str, FieldSchema]:
        """Field -> schema; each schema reads like TransferQueue's dict (``["dtype"]`` is a torch dtype)."""
        return dict(self._schema)

    @field_schema.setter
    def field_schema(self, value: Mapping[str, Any]) -> None:
        self._schema = self._schema_dict(value)

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

    def _sample(self, i: Any) -> SampleMeta:
        pos = self._position(i)
        meta = rows.custom_row(self._custom, pos)
        return SampleMeta(
            int(self._gidx[pos]), str(self._pids[pos]), dict(self._schema), int(self._status[pos]),
            copy.deepcopy(meta) if meta else {}, pos,
        )  # fmt: skip

    def _position(self, i: Any) -> int:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"row index must be an int, got {type(i).__name__}")
        pos = int(i) + self.size if i < 0 else int(i)
        if not 0 <= pos < self.size:
            raise IndexError(f"row {i} out of range for a batch of {self.size}")
        return pos

    def __getitem__(self, item: Any) -> BatchMeta:
        """Rows as a new batch: ``b[i]`` (one row, as TransferQueue), a slice, or a list of positions."""
        if isinstance(item, slice):
            return self._derive(item)
        if isinstance(item, (bool, float, str, bytes)):
            raise TypeError(f"BatchMeta indexes are ints, slices or index lists, not {type(item).__name__}")
        if isinstance(item, (int, np.integer)):
            pos = self._position(item)
            return self._derive(slice(pos, pos + 1))
        return self.select_samples(item)

    # ------------------------------------------------------------ row / field selection

    def _positions(self, indexes: Any, arg: str = "sample_indices") -> np.ndarray:
        """Validated row positions from a list/array/tensor of ints or a boolean mask."""
        if isinstance(indexes, torch.Tensor):
            indexes = indexes.detach().cpu().numpy()
        arr = np.asarray(indexes)
        if arr.dtype == np.bool_ and arr.shape == (self.size,):
            return np.flatnonzero(arr)
        pos = _int_array(arr, arg)
        if pos.size and (pos.min() < 0 or pos.max() >= self.size):
            raise SchemaError(f"{arg} must lie in [0, {self.size}), got min {pos.min()} max {pos.max()}")
        return pos

    def select_samples(self, sample_indices: Any) -> BatchMeta:
        """New batch of the rows at ``sample_indices`` (positions in this batch), in that order."""
        return self._derive(self._positions(sample_indices))

    def select_fields(self, field_names: Iterable[str]) -> BatchMeta:
        """New batch with the same rows and only the fields ``field_names``.

        Unknown names raise ``NotFoundError`` (TransferQueue silently leaves them out).
        """
        names = args.names("field_names", field_names)
        missing = [n for n in names if n not in self._schema]
        if missing:
            raise NotFoundError(
                f"fields {missing} not in this batch (it has {self.field_names}); select only fields "
                "it has, e.g. [f for f in names if f in meta.field_names]"
            )
        return self._derive(slice(None), {n: self._schema[n] for n in names})

    def get_dtypes(self, field_name: str) -> list[torch.dtype | None]:
        """Each row's torch dtype of ``field_name`` (``None`` for a non-tensor field)."""
        return [self._field(field_name).torch_dtype] * self.size

    def get_shapes(self, field_name: str) -> list[tuple[int, ...] | None]:
        """Each row's shape of ``field_name`` (``None`` for a non-tensor field).

        A jagged field's per-row sizes are not tracked in metadata: its varying dimensions are -1
        (TransferQueue lists each row's exact shape; read them from the data, e.g. ``offsets()``).
        """
        schema = self._field(field_name)
        if schema.is_non_tensor:
            return [None] * self.size
        if schema.is_nested:
            warn_once(
                ("get_shapes", field_name),
                f"BatchMeta.get_shapes({field_name!r}): the field is jagged and tq_loader's metadata does "
                f"not track per-row sizes, so its varying dimensions read -1 ({schema.shape}). Read the "
                "exact row shapes from the data (e.g. td[name].offsets() of the jagged tensor).",
            )
        return [schema.shape] * self.size

    def _field(self, name: str) -> FieldSchema:
        args.name("field_name", name)
        try:
            return self._schema[name]
        except KeyError:
            raise NotFoundError(f"field {name!r} not in this batch (it has {self.field_names})") from None

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
        return cls._make(
            np.concatenate([p._gidx for p in parts]), np.concatenate([p._pids for p in parts]),
            np.concatenate([p._status for p in parts]), schema,
            rows.concat_custom([(p._custom, p.size) for p in parts]),
            _merge_extra_info([p.extra_info for p in parts]), eos,
            rows.concat_backend([(p._backend, p.size) for p in parts]),
        )  # fmt: skip

    def union(self, other: BatchMeta | None) -> BatchMeta:
        """The columns of this batch and ``other`` for the same rows, as TransferQueue merges them.

        Both must hold the same rows in the same order (else ``SchemaError``, a ``ValueError``).
        ``other``'s field schemas replace this batch's for fields both have; production status is
        the AND of both; each row's custom meta and ``extra_info`` are merged with ``other`` winning.
        An empty side gives a copy of the other. To append rows, use :meth:`concat`.
        """
        if other is None or (isinstance(other, BatchMeta) and other.size == 0):
            return self.copy()
        if not isinstance(other, BatchMeta):
            raise SchemaError(f"union needs a BatchMeta as other, got {type(other).__name__}")
        if self.size == 0:
            return other.copy()
        for what, mine, theirs in (
            ("global_indexes", self._gidx, other._gidx),
            ("partition_ids", self._pids, other._pids),
        ):
            if not np.array_equal(mine, theirs):
                raise SchemaError(
                    f"union: {what} do not match (this batch {mine[:8].tolist()}..., other "
                    f"{theirs[:8].tolist()}..., sizes {mine.size} and {theirs.size}); union merges the "
                    "fields of the same rows in the same order -- use BatchMeta.concat to append rows"
                )
        extra = copy.deepcopy(self.extra_info)
        extra.update(copy.deepcopy(other.extra_info))
        return BatchMeta._make(
            self._gidx, self._pids, np.minimum(self._status, other._status), {**self._schema, **other._schema},
            rows.union_rows(self._custom, other._custom, self.size), extra, self._eos or other._eos,
            rows.union_backend(self._backend, other._backend, self.size),
        )  # fmt: skip

    def reorder(self, indices: Any) -> None:
        """Permute the rows in place: row ``i`` becomes the old row ``indices[i]``."""
        pos = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices)
        if pos.shape != (self.size,) or pos.dtype == np.bool_:
            raise SchemaError(
                f"reorder: indices must be {self.size} ints, got shape {pos.shape} ({pos.dtype})"
            )
        pos = self._positions(pos, "indices")
        if np.unique(pos).size != self.size:
            raise SchemaError("reorder indexes must be a permutation of range(size); got duplicates")
        self._gidx, self._pids, self._status = (
            _frozen(a[pos]) for a in (self._gidx, self._pids, self._status)
        )
        self._custom = rows.permute(self._custom, pos)
        self._backend = rows.permute(self._backend, pos)

    def copy(self) -> BatchMeta:
        """Independent copy (arrays are immutable and shared; extra_info is deep-copied)."""
        return self._derive(slice(None))

    def produced_with(self, schemas: Mapping[str, FieldSchema]) -> BatchMeta:
        """A copy whose rows are all produced and also carry ``schemas`` (what a put returns); the
        custom meta is shared copy-on-write, not copied per row."""
        out = self._derive(
            slice(None), {**self._schema, **self._schema_dict(args.mapping("schemas", schemas))}
        )
        out._status = _frozen(np.ones(self.size, np.int8))
        return out

    # ------------------------------------------------------------ fields, custom meta, extra info

    def add_fields(self, tensor_dict: TensorDictBase, set_all_ready: bool = True) -> BatchMeta:
        """Record the columns of ``tensor_dict`` as fields of every row (in place); marks rows ready."""
        if not isinstance(tensor_dict, TensorDictBase):
            raise SchemaError(
                f"add_fields: tensor_dict must be a TensorDict, got {type(tensor_dict).__name__}"
            )
        set_all_ready = args.flag("set_all_ready", set_all_ready)
        batch = tuple(tensor_dict.batch_size)
        if not batch or batch[0] != self.size:
            raise SchemaError(
                f"add_fields: TensorDict batch_size {batch} does not match batch size {self.size}"
            )
        self._schema = {**self._schema, **extract_field_schema(tensor_dict)}
        if set_all_ready:
            self._status = _frozen(np.full(self.size, READY_FOR_CONSUME, np.int8))
        return self

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

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle (Ray, multiprocessing) through ``_make`` so the arrays come back read-only."""
        state = (self._gidx, self._pids, self._status, self._schema, self._custom, self.extra_info)
        return (BatchMeta._make, (*state, self._eos, self._backend))

    def __repr__(self) -> str:
        parts = np.unique(self._pids[:1000]).tolist()
        return (
            f"BatchMeta(size={self.size}, fields={self.field_names}, partitions={parts}, "
            f"is_ready={self.is_ready}, end_of_stream={self._eos})"
        )

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict (raw bytes for arrays, lists for schemas); see :meth:`from_wire`."""
        return rows.batch_to_wire(self)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any] | rows.BatchMetaWire) -> BatchMeta:
        """Inverse of :meth:`to_wire` (or of :meth:`to_struct`); ``ProtocolError`` on a malformed form."""
        if isinstance(d, rows.BatchMetaWire):
            return cls._make(*rows.batch_parts_from_struct(d))
        return cls._make(*rows.batch_parts_from_wire(d))

    def to_struct(self) -> rows.BatchMetaWire:
        """The typed form protocol messages carry (msgspec validates it while decoding)."""
        return rows.batch_to_struct(self)


from tq_loader.metadata_kv import KVBatchMeta  # noqa: E402  (re-export; it builds on the helpers above)
