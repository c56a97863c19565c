"""Private helpers of the metadata classes: frozen numpy arrays, plain-value checks, wire arrays."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tq_loader.errors import ProtocolError, SchemaError

_WIRE_VERSION = 1
_PLAIN = (type(None), bool, int, float, str, bytes)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _int_array(values: Any, what: str, dtype: type = np.int64, kinds: str = "iu") -> np.ndarray:
    """A fresh 1-D integer array from a list/array/tensor, refusing floats (and bools unless allowed)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.array(values)
    if arr.ndim != 1:
        raise SchemaError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in kinds:
        raise SchemaError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


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


def _merge_extra_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch-level info of a concat: equal values kept once, lists joined, tensors concatenated."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        values = [info[key] for info in infos if key in info]
        if all(_values_equal(values[0], v) for v in values[1:]):
            merged[key] = values[0]
        elif all(isinstance(v, list) for v in values):
            merged[key] = [x for v in values for x in v]
        elif all(isinstance(v, torch.Tensor) for v in values):
            try:
                merged[key] = torch.cat([v.reshape(1) if v.dim() == 0 else v for v in values])
            except RuntimeError as e:
                raise SchemaError(f"concat: extra_info[{key!r}] tensors cannot be concatenated: {e}") from e
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise SchemaError(
                f"concat: extra_info[{key!r}] differs between batches ({kinds}) and has no merge rule; "
                "make the values equal, lists or tensors, or remove the key before concat"
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
