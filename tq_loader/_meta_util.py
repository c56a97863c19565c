"""Private helpers of the metadata classes: frozen numpy arrays, plain-value checks, wire arrays."""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch

from tq_loader.errors import ArgumentError, NotFoundError, ProtocolError, SchemaError
from tq_loader.ids import int_vector
from tq_loader.schema import FieldSchema, normalize_schema

_WIRE_VERSION = 1
_PLAIN = (type(None), bool, int, float, str, bytes)
_WARNED: set[Hashable] = set()
_WARNED_LOCK = threading.Lock()


def warn_once(key: Hashable, message: str, stacklevel: int = 3) -> bool:
    """Emit ``message`` as a UserWarning the first time ``key`` is seen in this process.

    Used where tq_loader deliberately differs from TransferQueue: the difference is said once,
    with what to write instead, without flooding a training loop. Returns whether it warned.
    """
    with _WARNED_LOCK:
        if key in _WARNED:
            return False
        _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
    return True


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _int_array(values: Any, what: str, dtype: type = np.int64, kinds: str = "iu") -> np.ndarray:
    """A fresh 1-D integer array from a list/array/tensor, refusing floats (and bools unless allowed)."""
    return int_vector(values, what, dtype, kinds, copy=True)


def _extra_key(arg: str, key: Any) -> str:
    """extra_info keys are ``str`` (the batch travels as msgpack, whose map keys here are str)."""
    if not isinstance(key, str):
        raise ArgumentError(f"{arg} must be a str, got {key!r} ({type(key).__name__})")
    return key


def _chunk_slices(size: int, chunks: int) -> list[slice]:
    """``chunks`` contiguous slices covering ``size`` rows; the first ``size % chunks`` one longer."""
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise SchemaError(f"chunks must be a positive int, got {chunks!r}")
    base, extra = divmod(size, int(chunks))
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(int(chunks))]).tolist()
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _custom_array(entries: Sequence[Any], n: int, deep: bool) -> np.ndarray | None:
    """Object array of per-row custom meta (dict, or None for empty); None when every row is empty."""
    if len(entries) != n:
        raise SchemaError(f"custom_meta has {len(entries)} entries for {n} rows")
    if not all(m is None or isinstance(m, Mapping) for m in entries):
        raise SchemaError("custom_meta entries must be dicts, one per row")
    if not any(entries):
        return None
    arr = np.empty(n, dtype=object)
    arr[:] = [copy.deepcopy(m) if m else None for m in entries] if deep else [m or None for m in entries]
    return arr


def _values_equal(a: Any, b: Any) -> bool:
    """Equality that also works for tensors and arrays (and treats tuples like lists, as msgpack does)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and bool(a == b)


def _warn_joined(key: str) -> None:
    warn_once(
        ("concat-extra-info", key),
        f"BatchMeta.concat: extra_info[{key!r}] differs between the batches and is joined (lists "
        "appended, tensors concatenated); TransferQueue 0.1.11 raises here. Make the values equal or "
        "remove the key before concat to keep one value (docs/compat.md)",
        stacklevel=5,
    )


def _merge_extra_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch-level info of a concat: equal values kept once, lists joined, tensors concatenated."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        values = [info[key] for info in infos if key in info]
        if all(_values_equal(values[0], v) for v in values[1:]):
            merged[key] = values[0]
        elif all(isinstance(v, list) for v in values):
            _warn_joined(key)
            merged[key] = [x for v in values for x in v]
        elif all(isinstance(v, torch.Tensor) for v in values):
            _warn_joined(key)
            try:
                merged[key] = torch.cat([v.reshape(1) if v.dim() == 0 else v for v in values])
            except RuntimeError as e:
                raise SchemaError(f"concat: extra_info[{key!r}] tensors cannot be concatenated: {e}") from e
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise SchemaError(
                f"concat: extra_info[{key!r}] has conflicting values across batches ({kinds}) and no merge "
                "rule; make the values equal, lists or tensors, or remove the key before concat"
            )
    return copy.deepcopy(merged)


def _check_plain(value: Any, where: str) -> None:
    """Refuse values msgpack cannot carry as plain data (tensors, arrays, objects)."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise SchemaError(
            f"{where} holds a {type(value).__name__}; only None/bool/int/float/str/bytes, lists and dicts "
            "cross the wire (convert it, e.g. tensor.tolist())"
        )


def _arr_to_wire(arr: np.ndarray, dtype: str) -> list[Any]:
    return [dtype, arr.astype(dtype, copy=False).tobytes()]


def _arr_from_wire(spec: Any, dtype: str, count: int | None, what: str) -> np.ndarray:
    tag, buf = spec
    if tag != dtype or not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what}: expected {dtype} bytes, got {tag!r}/{type(buf).__name__}")
    arr = np.frombuffer(buf, dtype=np.dtype(dtype))
    if count is not None and arr.size != count:
        raise ProtocolError(f"{what}: {arr.size} entries for {count} rows")
    return _frozen(arr)


# ---------------------------------------------------------------- per-row custom meta of a BatchMeta
#
# A batch's custom meta is None (every row empty), an object array of dict|None that derived batches
# share and nobody writes, or -- after ``BatchMeta.custom_meta`` was read -- the batch's own live list
# of dicts, handed to the caller to edit (TransferQueue's type). Deriving from a live list deep-copies
# the selected rows, so no two batches ever share a dict that someone may edit.


def _object_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def checked(custom: Any, n: int) -> Any:
    """``custom`` after checking that a live list the caller may have edited still has one dict per row."""
    if isinstance(custom, list) and (len(custom) != n or not all(isinstance(m, dict) for m in custom)):
        raise SchemaError(
            f"custom_meta must stay a list of {n} dicts (one per row); edit or replace the rows' dicts, do "
            "not add or remove entries (use select_samples / concat to change the rows)"
        )
    return custom


def own_custom(custom: np.ndarray | list | None, n: int) -> list[dict[str, Any]]:
    """The batch's live list of per-row dicts, made (deep-copied) on first use."""
    if isinstance(custom, list):
        return checked(custom, n)
    if custom is None:
        return [{} for _ in range(n)]
    return [copy.deepcopy(m) if m else {} for m in custom]


def custom_rows(custom: np.ndarray | list | None, key: Any, n: int) -> np.ndarray | None:
    """Custom meta of rows ``key`` (a slice or positions) of a batch of ``n`` rows, for a derived batch."""
    if custom is None:
        return None
    if isinstance(custom, list):
        return _object_array([copy.deepcopy(m) for m in _object_array(checked(custom, n))[key]])
    return custom[key]


def custom_row(custom: np.ndarray | list | None, pos: int) -> dict[str, Any] | None:
    return None if custom is None else custom[pos]


def concat_custom(parts: list[tuple[np.ndarray | list | None, int]]) -> np.ndarray | None:
    """Custom meta of concatenated batches (None when every part is empty)."""
    if all(c is None for c, _ in parts):
        return None
    filled = [
        np.full(n, None, object)
        if c is None
        else custom_rows(c, slice(None), n)
        if isinstance(c, list)
        else c
        for c, n in parts
    ]
    return np.concatenate(filled)


def union_rows(a: np.ndarray | list | None, b: np.ndarray | list | None, n: int) -> np.ndarray | None:
    """Per-row merge of two batches' custom meta for the same rows; ``b`` wins on equal keys."""
    if a is None and b is None:
        return None
    a_rows = [None] * n if a is None else checked(a, n)
    b_rows = [None] * n if b is None else checked(b, n)
    return _object_array([copy.deepcopy({**(x or {}), **(y or {})}) or None for x, y in zip(a_rows, b_rows)])


def permute(custom: np.ndarray | list | None, pos: np.ndarray) -> Any:
    """Rows of per-row meta in the order ``pos`` (live lists stay live: same dicts, new order)."""
    if custom is None:
        return None
    if isinstance(custom, list):
        live = checked(custom, len(pos))
        return [live[i] for i in pos.tolist()]
    return custom[pos]


def merge_into(
    custom: np.ndarray | list | None, n: int, pairs: Sequence[tuple[int, Mapping[str, Any] | None]]
) -> np.ndarray | list:
    """``custom`` with each ``(position, dict)`` merged in: live dicts in place, else copy-on-write."""
    if isinstance(custom, list):
        checked(custom, n)
        for pos, meta in pairs:
            if meta:
                custom[pos].update(copy.deepcopy(dict(meta)))
        return custom
    arr = np.full(n, None, object) if custom is None else custom.copy()
    for pos, meta in pairs:
        if meta:
            arr[pos] = {**(arr[pos] or {}), **copy.deepcopy(dict(meta))}
    return arr


class RowMetaMixin:
    """BatchMeta's custom meta (per row), backend meta and extra info (per batch), TransferQueue's API.

    Expects ``_custom``, ``_backend``, ``_gidx``, ``size`` and ``extra_info`` on the class.
    """

    __slots__ = ()
    _custom: Any
    _backend: Any
    _gidx: np.ndarray
    size: int
    extra_info: dict[str, Any]

    @property
    def custom_meta(self) -> list[dict[str, Any]]:
        """Each row's custom meta as a live list of dicts, as in TransferQueue: edits stay in the batch.

        The first read gives this batch its own copy of the dicts (batches derived earlier keep
        theirs). Use :meth:`get_all_custom_meta` for a detached deep copy.
        """
        self._custom = own_custom(self._custom, self.size)
        return self._custom

    @custom_meta.setter
    def custom_meta(self, value: Sequence[dict[str, Any]] | None) -> None:
        self._custom = None if value is None else _custom_array(value, self.size, deep=True)

    @property
    def _custom_backend_meta(self) -> list[dict[str, Any]]:
        """TransferQueue's per-row, per-field storage-backend meta: a live list of dicts."""
        if self._backend is None:
            self._backend = [{} for _ in range(self.size)]
        return self._backend

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
            if isinstance(custom_meta, (str, bytes)) or not isinstance(custom_meta, Sequence):
                raise ArgumentError(
                    f"custom_meta must be a list of dicts (one per row) or {{global_index: dict}}, "
                    f"got {type(custom_meta).__name__}"
                )
            if len(custom_meta) != self.size:
                raise SchemaError(f"custom_meta has {len(custom_meta)} entries for a batch of {self.size}")
            pairs = list(enumerate(custom_meta))
        for pos, meta in pairs:
            if meta is not None and not isinstance(meta, Mapping):
                raise SchemaError(f"custom_meta of row {pos} must be a dict, got {type(meta).__name__}")
        self._custom = merge_into(self._custom, self.size, pairs)

    def get_all_custom_meta(self) -> list[dict[str, Any]]:
        """Deep copy of every row's custom meta, in row order."""
        if self._custom is None:
            return [{} for _ in range(self.size)]
        return [copy.deepcopy(m) if m else {} for m in checked(self._custom, self.size)]

    def clear_custom_meta(self) -> None:
        self._custom = None

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return self.extra_info.get(_extra_key("key", key), default)

    def set_extra_info(self, key: str, value: Any) -> None:
        self.extra_info[_extra_key("key", key)] = value

    def update_extra_info(self, info_dict: Mapping[str, Any]) -> None:
        if not isinstance(info_dict, Mapping):
            raise ArgumentError(f"info_dict must be a dict, got {type(info_dict).__name__}")
        for k in info_dict:
            _extra_key("info_dict keys", k)
        self.extra_info.update(info_dict)

    def remove_extra_info(self, key: str) -> Any:
        return self.extra_info.pop(_extra_key("key", key), None)

    def clear_extra_info(self) -> None:
        self.extra_info.clear()

    def has_extra_info(self, key: str) -> bool:
        return _extra_key("key", key) in self.extra_info

    def get_all_extra_info(self) -> dict[str, Any]:
        return copy.deepcopy(self.extra_info)


# ---------------------------------------------------------------- TransferQueue's _custom_backend_meta


def backend_list(entries: Sequence[Any], n: int) -> list[dict[str, Any]]:
    """A validated deep copy of per-row backend meta (one dict per row)."""
    if len(entries) != n or not all(isinstance(m, Mapping) for m in entries):
        raise SchemaError(f"_custom_backend_meta needs {n} dicts (one per row), got {len(entries)} entries")
    return [copy.deepcopy(dict(m)) for m in entries]


def backend_rows(backend: list | None, key: Any, fields: Iterable[str] | None = None) -> list | None:
    """Backend meta of rows ``key``, deep-copied; only the keys in ``fields`` when given."""
    if backend is None:
        return None
    picked = _object_array(backend)[key]
    if fields is None:
        return [copy.deepcopy(m) for m in picked]
    keep = set(fields)
    return [{k: copy.deepcopy(v) for k, v in m.items() if k in keep} for m in picked]


def concat_backend(parts: list[tuple[list | None, int]]) -> list | None:
    if all(b is None for b, _ in parts):
        return None
    return [copy.deepcopy(m) for b, n in parts for m in (b if b is not None else [{}] * n)]


def union_backend(a: list | None, b: list | None, n: int) -> list | None:
    if a is None and b is None:
        return None
    a, b = a or [{}] * n, b or [{}] * n
    return [copy.deepcopy({**x, **y}) for x, y in zip(a, b)]


# ---------------------------------------------------------------- BatchMeta wire form


class BatchMetaWire(msgspec.Struct, frozen=True, array_like=True):
    """A BatchMeta as it travels inside protocol messages: typed, so msgspec checks every field
    while decoding and builds the field schemas itself (no per-field Python normalisation)."""

    global_indexes: bytes  # little-endian int64
    partition_names: list[str]
    partition_codes: bytes | None  # int32 index into partition_names per row; None: all the first name
    production_status: bytes  # int8 per row
    field_schema: dict[str, FieldSchema]
    custom_meta: list[dict[str, Any] | None] | None  # None: every row empty
    custom_backend_meta: list[dict[str, Any]] | None
    extra_info: dict[str, Any]
    end_of_stream: bool
    version: int = _WIRE_VERSION


def batch_to_struct(meta: Any) -> BatchMetaWire:
    """The typed wire form of a BatchMeta (what ``MetaReply`` and ``KVLookupReply`` carry)."""
    d = batch_to_wire(meta)
    pids = d["partition_ids"]
    return BatchMetaWire(
        global_indexes=d["global_indexes"][1],
        partition_names=pids["names"],
        partition_codes=None if pids["codes"] is None else pids["codes"][1],
        production_status=d["production_status"][1],
        field_schema=dict(meta._schema),
        custom_meta=d["custom_meta"],
        custom_backend_meta=d["custom_backend_meta"],
        extra_info=d["extra_info"],
        end_of_stream=d["end_of_stream"],
    )


def batch_parts_from_struct(w: BatchMetaWire) -> tuple[Any, ...]:
    """The arguments of ``BatchMeta._make`` from a :class:`BatchMetaWire`; ``ProtocolError`` if inconsistent."""
    if w.version != _WIRE_VERSION:
        raise ProtocolError(f"BatchMeta wire version {w.version!r}, this side speaks {_WIRE_VERSION}")
    legacy = {
        "v": w.version,
        "global_indexes": ["<i8", w.global_indexes],
        "partition_ids": {"names": w.partition_names,
                          "codes": None if w.partition_codes is None else ["<i4", w.partition_codes]},
        "production_status": ["|i1", w.production_status],
        "field_schema": [],
        "custom_meta": w.custom_meta,
        "custom_backend_meta": w.custom_backend_meta,
        "extra_info": w.extra_info,
        "end_of_stream": w.end_of_stream,
    }  # fmt: skip
    parts = list(batch_parts_from_wire(legacy))
    parts[3] = dict(w.field_schema)  # already FieldSchema structs, validated by the decoder
    return tuple(parts)


def batch_to_wire(meta: Any) -> dict[str, Any]:
    """A BatchMeta as a plain msgpack-able dict (raw bytes for arrays, lists for schemas)."""
    _check_plain(meta.extra_info, "extra_info")
    pids_arr = meta._pids
    pids: dict[str, Any] = {"names": [], "codes": None}
    if meta.size and (pids_arr == pids_arr[0]).all():
        pids["names"] = [str(pids_arr[0])]
    elif meta.size:
        names, codes = np.unique(pids_arr, return_inverse=True)
        pids = {"names": names.tolist(), "codes": _arr_to_wire(codes.reshape(-1), "<i4")}
    backend = meta._backend
    if backend is not None:
        _check_plain(backend, "_custom_backend_meta")
    return {
        "v": _WIRE_VERSION,
        "global_indexes": _arr_to_wire(meta._gidx, "<i8"),
        "partition_ids": pids,
        "production_status": _arr_to_wire(meta._status, "|i1"),
        "field_schema": [
            [n, s.dtype, list(s.shape), s.is_nested, s.is_non_tensor] for n, s in meta._schema.items()
        ],
        "custom_meta": None
        if meta._custom is None
        else [m or None for m in checked(meta._custom, meta.size)],
        "custom_backend_meta": backend,
        "extra_info": dict(meta.extra_info),
        "end_of_stream": meta._eos,
    }


def batch_parts_from_wire(d: Mapping[str, Any]) -> tuple[Any, ...]:
    """The arguments of ``BatchMeta._make`` from :func:`batch_to_wire`'s dict; ``ProtocolError`` if malformed."""
    try:
        if d["v"] != _WIRE_VERSION:
            raise ProtocolError(f"BatchMeta wire version {d['v']!r}, this side speaks {_WIRE_VERSION}")
        gidx = _arr_from_wire(d["global_indexes"], "<i8", None, "global_indexes")
        n = gidx.size
        names = np.asarray(d["partition_ids"]["names"], dtype=str).reshape(-1)
        codes = d["partition_ids"]["codes"]
        codes = np.zeros(n, np.intp) if codes is None else _arr_from_wire(codes, "<i4", n, "partition codes")
        if n and (codes.min() < 0 or codes.max() >= names.size):
            raise ProtocolError(f"partition_ids: codes outside the {names.size} partition names")
        status = _arr_from_wire(d["production_status"], "|i1", n, "production_status")
        schema = {name: normalize_schema(rest, name) for name, *rest in d["field_schema"]}
        custom = None if d["custom_meta"] is None else _custom_array(d["custom_meta"], n, deep=False)
        backend = d.get("custom_backend_meta")
        if backend is not None and (
            not isinstance(backend, list)
            or len(backend) != n
            or not all(isinstance(m, dict) for m in backend)
        ):
            raise ProtocolError(f"custom_backend_meta must be {n} maps, one per row")
        extra_info = d["extra_info"]
        if not isinstance(extra_info, dict):
            raise ProtocolError(f"extra_info must be a map, got {type(extra_info).__name__}")
        return gidx, names[codes], status, schema, custom, extra_info, bool(d["end_of_stream"]), backend
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ProtocolError(f"malformed BatchMeta wire form: {type(e).__name__}: {e}") from e
