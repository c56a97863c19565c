"""Non-tensor ("object") columns: one msgpack blob per field, no pickle; numpy/tensordict inputs.

A column of Python values travels as one msgpack array (via msgspec) of its rows. The values a
row may hold are deliberately closed, so that nothing executable or surprising crosses the wire:

- ``None``, ``bool``, ``int`` (64-bit range), ``float``, ``str``, ``bytes``;
- ``list`` / ``tuple`` / ``dict`` (``str`` or ``int`` keys) of those, nested (tuples come back as lists);
- numpy arrays and numpy scalars of numeric dtype (bool, int, uint, float, complex), carried as a
  msgpack extension ``[dtype.str, shape, raw bytes]`` (code 1 for arrays, 2 for scalars) and
  decoded to writable numpy arrays / numpy scalars of the same dtype and byte order.

Anything else (class instances, sets, tensors, datetimes, enums...) is refused on encode with a
:class:`SchemaError`, instead of being silently turned into something else by msgspec.
Decoding validates every extension (dtype whitelist, byte length = shape x itemsize) and turns
any malformed blob into a :class:`ProtocolError`.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack

from tq_loader._meta_util import warn_once
from tq_loader.errors import ProtocolError, SchemaError
from tq_loader.schema import numpy_dtype_error, numpy_torch_dtype

__all__ = ["decode_objects", "encode_objects", "non_tensor_rows", "non_tensor_stack", "numpy_column"]

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 2
_MAX_DEPTH = 64
_MAX_NDIM = 32
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_NUMERIC_KINDS = frozenset("biufc")
# dtype.str of a plain numeric dtype, e.g. "<f4", "|b1", ">i8": no object, void, subarray or datetime.
_DTYPE_RE = re.compile(r"[<>|=][biufc](1|2|4|8|16|32)")
_EXT_PAYLOAD = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...], bytearray])


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in _NUMERIC_KINDS and dtype.fields is None and dtype.subdtype is None


def _refuse(field: str, value: Any, path: str) -> SchemaError:
    return SchemaError(
        f"field {field!r}: value of type {type(value).__module__}.{type(value).__qualname__} at {path} "
        "cannot be sent; non-tensor values may be None/bool/int/float/str/bytes, lists/tuples/dicts "
        "(str or int keys) of those, or numeric numpy arrays. Convert it (e.g. to str or a dict), "
        "or put tensors in their own field"
    )


def _check(value: Any, field: str, path: str, depth: int) -> None:
    """Refuse what msgspec would encode lossily or we could not decode; walks containers only."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if depth > _MAX_DEPTH:
        raise SchemaError(f"field {field!r}: values nested deeper than {_MAX_DEPTH} levels at {path}")
    if kind is list or kind is tuple:
        if set(map(type, value)) <= _SCALARS:  # the common flat case, checked at C speed
            return
        for i, item in enumerate(value):
            _check(item, field, f"{path}[{i}]", depth + 1)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str and type(key) is not int:
                raise _refuse(field, key, f"{path} (a dict key)")
            _check(item, field, f"{path}[{key!r}]", depth + 1)
    elif isinstance(value, (np.ndarray, np.generic)):
        if not _is_numeric(value.dtype):
            raise numpy_dtype_error(value.dtype, field, path)
    else:
        raise _refuse(field, value, path)


def _enc_hook(obj: Any) -> msgspec.msgpack.Ext:
    """Numpy values as an extension; everything else was refused by :func:`_check` already."""
    if isinstance(obj, np.ndarray):
        payload = (obj.dtype.str, obj.shape, obj.tobytes(order="C"))
        return msgspec.msgpack.Ext(_EXT_NDARRAY, msgspec.msgpack.encode(payload))
    if isinstance(obj, np.generic):
        payload = (obj.dtype.str, (), obj.tobytes())
        return msgspec.msgpack.Ext(_EXT_NPSCALAR, msgspec.msgpack.encode(payload))
    raise TypeError(f"unsupported type {type(obj)!r}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def encode_objects(values: list[Any], field: str) -> bytes:
    """Encode the rows of a non-tensor column to one msgpack blob (``SchemaError`` if refused)."""
    _check(values, field, "row", 0)
    try:
        return _ENCODER.encode(values)
    except (OverflowError, TypeError, msgspec.EncodeError) as exc:
        raise SchemaError(f"field {field!r}: cannot encode non-tensor values: {exc}") from exc


def _ext_hook(code: int, data: memoryview) -> Any:
    """Rebuild a numpy value, validating dtype and size before anything is allocated."""
    if code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise ProtocolError(f"unknown msgpack extension code {code} in a non-tensor column")
    try:
        dtype_str, shape, raw = _EXT_PAYLOAD.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed numpy extension in a non-tensor column: {exc}") from exc
    if not _DTYPE_RE.fullmatch(dtype_str):
        raise ProtocolError(f"numpy extension with unsupported dtype {dtype_str!r}")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise ProtocolError(f"numpy extension with unknown dtype {dtype_str!r}") from exc
    if not _is_numeric(dtype) or len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
        raise ProtocolError(f"numpy extension with bad dtype/shape {dtype_str!r} {shape}")
    if code == _EXT_NPSCALAR and shape:
        raise ProtocolError("numpy scalar extension with a non-empty shape")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(raw):
        raise ProtocolError(
            f"numpy extension {dtype_str} {shape} needs {count * dtype.itemsize} bytes, has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)  # bytearray: writable, no extra copy
    return arr[()] if code == _EXT_NPSCALAR else arr


_DECODER = msgspec.msgpack.Decoder(list, ext_hook=_ext_hook)

# The same numpy extension for the free-form fields of control messages (a sampling config may
# carry arrays, as a TransferQueue sampler expects): validated, never pickled.
numpy_enc_hook = _enc_hook
numpy_ext_hook = _ext_hook


def decode_objects(buf: memoryview | bytes, nrows: int, field: str) -> list[Any]:
    """Decode the blob of a non-tensor column; it must hold exactly ``nrows`` rows."""
    try:
        rows = _DECODER.decode(buf)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"field {field!r}: malformed non-tensor blob: {exc}") from exc
    if len(rows) != nrows:
        raise ProtocolError(f"field {field!r}: non-tensor blob holds {len(rows)} rows, header says {nrows}")
    return rows


def non_tensor_rows(value: NonTensorStack | NonTensorData, field: str = "?") -> list[Any]:
    """The per-row values of a tensordict non-tensor entry; the one place that turns them into rows.

    ``NonTensorStack``: one value per row. ``NonTensorData`` holds one value for the whole batch;
    as in TransferQueue, a ``list`` or numpy array with exactly one entry per row is read as the
    rows themselves: ``NonTensorData(data=[{"i": 0}, {"i": 1}], batch_size=(2,))`` is the rows
    ``{"i": 0}``, ``{"i": 1}``. (tensordict itself wraps str/bytes/object numpy columns this way.)
    Any other value is repeated for every row, as tensordict does; a list or array whose length is
    not the row count is repeated too, with a one-time warning, because TransferQueue would index
    into it instead.
    """
    if not value.batch_size:
        raise SchemaError(f"field {field!r}: a non-tensor value without batch dimension is not a column")
    if isinstance(value, NonTensorStack):
        return value.tolist()
    if len(value.batch_size) > 1:
        return value.tolist()  # nested per-row lists, tensordict's reading
    n, data = int(value.batch_size[0]), value.data
    if isinstance(data, (list, np.ndarray)) and len(data) == n:
        return _array_rows(data, field) if isinstance(data, np.ndarray) else list(data)
    if isinstance(data, (list, np.ndarray)):
        warn_once(
            ("non_tensor_rows", field),
            f"field {field!r}: NonTensorData holds a {type(data).__name__} of {len(data)} values for "
            f"{n} rows, so every row gets the whole value (tensordict's reading; TransferQueue would "
            f"index into it). For one value per row pass exactly {n} values, or a NonTensorStack.",
        )
    return [data] * n


def _array_rows(arr: np.ndarray, field: str) -> list[Any]:
    """Rows of a numpy array as plain values (str/bytes/objects) or numpy values (numeric dtypes)."""
    if arr.dtype.kind in "OUS":
        return arr.tolist()
    if numpy_torch_dtype(arr.dtype) is None:
        raise numpy_dtype_error(arr.dtype, field)
    return list(arr)


def non_tensor_stack(rows: list[Any] | tuple[Any, ...]) -> NonTensorStack:
    """One ``NonTensorData`` per row (``NonTensorStack.from_list`` would recurse into list rows)."""
    return NonTensorStack(*(NonTensorData(data=v, batch_size=[]) for v in rows), stack_dim=0)


def numpy_column(arr: np.ndarray, field: str) -> torch.Tensor | list[Any]:
    """A numpy column as a tensor (numeric dtypes, zero-copy when possible) or a list of rows.

    str (``U``), bytes (``S``) and object arrays become non-tensor columns, one value per row
    (``tolist()``: bytes stay bytes, objects as they are). Any other dtype without a torch
    equivalent (datetime64, timedelta64, records, float128) is refused with a ``SchemaError`` that
    names the field and says what to convert it to.
    """
    if arr.ndim == 0:
        raise SchemaError(f"field {field!r}: a 0-d array is not a column; give it a leading batch dimension")
    if arr.dtype.kind in "OUS":  # strings / bytes / Python objects: a non-tensor column
        return arr.tolist()
    if numpy_torch_dtype(arr.dtype) is None:
        raise numpy_dtype_error(arr.dtype, field)
    if not (arr.dtype.isnative and arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C")
    return torch.from_numpy(arr)
