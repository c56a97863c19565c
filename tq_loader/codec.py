"""Columns of a batch <-> (column specs, raw buffers), for multipart frames; no pickle anywhere.

:func:`encode_columns` turns each column into one :class:`ColumnSpec` (small, msgspec, embedded by
the protocol layer in its own messages) plus the column's raw buffers (plain ``memoryview`` s over
the tensor's own memory where it is already contiguous on CPU: zero-copy, not tied to zmq).
:func:`decode_columns` is the inverse; it validates every spec and buffer first, so malformed
input raises :class:`ProtocolError` and never allocates more than the buffers it was given.

Kinds of columns (what goes in -> buffers -> what comes back):

``dense``   a tensor (or numeric numpy array, or list of same-shape tensors) of shape ``(B, ...)``
            -> one buffer -> a regular tensor. Strided/non-contiguous/conjugated inputs are made
            contiguous; CUDA tensors travel via CPU (``spec.device`` records where they came from;
            decode always returns CPU tensors: the receiver decides where they go).
``jagged``  a ``torch.jagged`` nested tensor, or a list of tensors whose shapes differ in exactly
            one dimension -> values (rows concatenated along that dimension) + int64 offsets ->
            a jagged nested tensor (``nested_tensor_from_jagged``, same ragged dimension).
``rows``    a strided-layout nested tensor, or a list of tensors differing in more than one
            dimension -> flat values + int64 ``(B, ndim)`` shapes -> a strided nested tensor
            (a list of tensors for dtypes strided nested tensors do not support, e.g. uint16,
            float8). Decoding ``rows`` always copies (``torch.nested.nested_tensor`` does).
``object``  ``NonTensorStack`` / ``NonTensorData`` / lists of plain values -> one msgpack blob ->
            a Python list (see :mod:`tq_loader.codec_objects` for what a value may hold).

Zero-copy decode: with ``copy=False`` dense and jagged tensors are ``torch.frombuffer`` views of the
received buffers. A received frame belongs to exactly one message, so sharing it is safe; PyTorch
warns that a read-only buffer (``bytes``, a zmq frame) becomes a writable tensor, and that warning
is silenced here for that reason. Writing into such a tensor writes into the frame: pass
``copy=True`` to get private, writable memory.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from tq_loader import codec_objects as objects
from tq_loader.errors import ProtocolError, SchemaError

__all__ = [
    "ColumnSpec", "KINDS", "batch_length", "column_length", "decode_columns", "encode_columns",
    "quiet_torch_notices", "to_tensordict",
]  # fmt: skip

KINDS = ("dense", "jagged", "rows", "object")
_NBUF = {"dense": 1, "jagged": 2, "rows": 2, "object": 1}
_DTYPE_NAMES = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
)  # fmt: skip
_DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_MAX_NDIM = 32
_MAX_BYTES = 1 << 62  # no column may describe more: keeps every size and stride inside int64

_quiet = False


def quiet_torch_notices() -> None:
    """Spend, silenced, the one-time notices torch prints on behalf of the data path.

    Each is printed once per process (``TORCH_WARN_ONCE`` / a logger warning), at the first call
    that triggers it: ``torch.frombuffer`` over a read-only buffer (a received frame belongs to its
    message alone, so the "not writable" warning does not apply), strided nested tensors (the
    "prototype" warning, for columns whose rows vary in several dims -- the user did not choose
    the layout) and jagged tensors (an internal torch.fx notice). Triggering them here once, under a
    temporary filter that is then restored, leaves the process's warning filters and loggers as
    they were. Called by the codec on first use, not at import.
    """
    global _quiet
    if _quiet:
        return
    _quiet = True
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.frombuffer(b"\0", dtype=torch.uint8)
            torch.nested.nested_tensor([torch.zeros(1, 2), torch.zeros(2, 1)])
            torch.nested.nested_tensor_from_jagged(torch.zeros(3), torch.tensor([0, 1, 3]))
    finally:
        fx_log.setLevel(level)


class ColumnSpec(msgspec.Struct, frozen=True, array_like=True):
    """How one column travels: its kind, dtype and shape, and how many buffers it owns.

    ``shape``: dense: full shape incl. the batch dim; jagged: per-row shape with ``-1`` at
    ``ragged_dim``; rows and object: ``(B,)``. ``device``: where the tensor lived before it was
    sent (informational). ``nbytes``: total bytes of the column's buffers, checked on decode.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbuf: int
    device: str = "cpu"
    ragged_dim: int = -1
    nbytes: int = 0


# --------------------------------------------------------------------------- lengths


def _items(data: Any) -> list[tuple[Any, Any]]:
    if isinstance(data, (TensorDictBase, Mapping)):
        return list(data.items())
    raise SchemaError(f"expected a TensorDict or a mapping of field -> column, got {type(data).__name__}")


def column_length(value: Any) -> int:
    """Number of rows in a column value of any supported kind."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim == 0:
            raise SchemaError("a 0-d tensor/array is not a column: give it a leading batch dimension")
        return int(value.size(0) if isinstance(value, torch.Tensor) else value.shape[0])  # nested-safe
    if isinstance(value, (NonTensorStack, NonTensorData)):
        if not value.batch_size:
            raise SchemaError("a non-tensor value without batch dimension is not a column")
        return int(value.batch_size[0])
    if isinstance(value, (list, tuple)):
        return len(value)
    raise SchemaError(f"a {type(value).__name__} is not a column: use a tensor or a list of rows")


def batch_length(data: TensorDict | Mapping[str, Any]) -> int:
    """The number of rows shared by all columns; ``SchemaError`` naming the columns if they differ."""
    if isinstance(data, TensorDictBase) and data.batch_dims:
        return int(data.batch_size[0])
    lengths: dict[Any, int] = {}
    for name, value in _items(data):
        try:
            lengths[name] = column_length(value)
        except SchemaError as exc:
            raise SchemaError(f"field {name!r}: {exc}") from exc
    if len(set(lengths.values())) > 1:
        raise SchemaError(f"columns have different numbers of rows {lengths}: give one value per row")
    return next(iter(lengths.values()), 0)


# --------------------------------------------------------------------------- encoding


def _dtype_name(dtype: torch.dtype, field: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise SchemaError(f"field {field!r}: dtype {name} cannot be sent; convert to one of {list(_DTYPES)}")
    return name


def _wire_tensor(t: torch.Tensor, field: str) -> torch.Tensor:
    """A detached, resolved, contiguous CPU tensor holding the same values."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise SchemaError(
            f"field {field!r}: a {t.layout} / {t.dtype} tensor on {t.device} cannot be sent; "
            "use a dense (strided) tensor with real data"
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().contiguous()


def _buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying (the view keeps the tensor alive)."""
    if t.numel() == 0:
        return memoryview(b"")
    # A one-element tensor counts as contiguous whatever its stride, which view(uint8) refuses.
    flat = t.reshape(-1) if t.numel() > 1 else t.as_strided((1,), (1,))
    return memoryview(flat.view(torch.uint8).numpy())


def _spec(name: str, kind: str, dtype: str, shape: Any, bufs: list[memoryview], **kw: Any) -> ColumnSpec:
    shape = tuple(int(d) for d in shape)
    return ColumnSpec(name, kind, dtype, shape, len(bufs), nbytes=sum(b.nbytes for b in bufs), **kw)


def _encode_dense(name: str, t: torch.Tensor) -> tuple[ColumnSpec, list[memoryview]]:
    if t.dim() == 0:
        raise SchemaError(f"field {name!r}: a 0-d tensor is not a column; give it a leading batch dimension")
    dtype, device = _dtype_name(t.dtype, name), str(t.device)
    bufs = [_buffer(_wire_tensor(t, name))]
    return _spec(name, "dense", dtype, t.shape, bufs, device=device), bufs


def _encode_jagged(
    name: str, values: torch.Tensor, offsets: torch.Tensor, rdim: int, device: str
) -> tuple[ColumnSpec, list[memoryview]]:
    values = _wire_tensor(values, name)
    offsets = _wire_tensor(offsets.to(torch.int64), name)
    shape = list(values.shape)
    shape[rdim] = -1
    bufs = [_buffer(values), _buffer(offsets)]
    dtype = _dtype_name(values.dtype, name)
    return _spec(name, "jagged", dtype, shape, bufs, device=device, ragged_dim=rdim), bufs


def _encode_njt(name: str, nt: torch.Tensor) -> tuple[ColumnSpec, list[memoryview]]:
    if nt.lengths() is not None:  # a view with holes between rows: compact it first
        nt = nt.contiguous()
    rdim = nt._ragged_idx - 1  # ragged dim of a row (the nested dim minus the batch dim)
    values, offsets = nt.values(), nt.offsets()
    start, end = int(offsets[0]), int(offsets[-1])
    if start != 0 or end != values.shape[rdim]:  # rows are a window of a larger values tensor
        values, offsets = values.narrow(rdim, start, end - start), offsets - start
    return _encode_jagged(name, values, offsets, rdim, str(nt.device))


def _encode_tensor_rows(
    name: str, rows: Sequence[torch.Tensor], dtype: torch.dtype, force_rows: bool = False
) -> tuple[ColumnSpec, list[memoryview]]:
    """Per-row tensors: same shapes -> dense, one varying dim -> jagged, otherwise -> rows."""
    dtype_name = _dtype_name(dtype, name)
    if len({(t.dtype, t.dim(), t.device) for t in rows}) > 1:
        raise SchemaError(
            f"field {name!r}: rows differ in dtype, number of dimensions or device; "
            "give every row of a field the same dtype, rank and device"
        )
    device, ndim = (str(rows[0].device), rows[0].dim()) if rows else ("cpu", 0)
    shapes = torch.tensor([tuple(t.shape) for t in rows], dtype=torch.int64).reshape(len(rows), ndim)
    varying = (shapes != shapes[:1]).any(0).nonzero().flatten().tolist() if rows else []
    if not force_rows and rows and not varying:
        return _encode_dense(name, torch.stack([t.detach() for t in rows]))
    if not force_rows and len(varying) == 1:
        rdim = varying[0]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(shapes[:, rdim], 0, out=offsets[1:])
        return _encode_jagged(name, torch.cat([t.detach() for t in rows], rdim), offsets, rdim, device)
    flat = [t.detach().reshape(-1) for t in rows]
    values = torch.cat(flat) if flat else torch.empty(0, dtype=dtype)
    bufs = [_buffer(_wire_tensor(values, name)), _buffer(shapes)]
    return _spec(name, "rows", dtype_name, (len(rows),), bufs, device=device), bufs


def _encode_object(name: str, rows: list[Any]) -> tuple[ColumnSpec, list[memoryview]]:
    bufs = [memoryview(objects.encode_objects(rows, name))]
    return _spec(name, "object", "object", (len(rows),), bufs), bufs


def _encode_value(name: str, value: Any) -> tuple[ColumnSpec, list[memoryview]]:
    if isinstance(value, torch.Tensor):
        if value.is_nested and value.layout == torch.jagged:
            return _encode_njt(name, value)
        if value.is_nested:
            return _encode_tensor_rows(name, value.unbind(), value.dtype, force_rows=True)
        return _encode_dense(name, value)
    if isinstance(value, np.ndarray):  # numeric: a dense tensor; strings/objects: a list of rows
        return _encode_value(name, objects.numpy_column(value, name))
    if isinstance(value, (NonTensorStack, NonTensorData)):  # rows may be tensors: list rules apply
        return _encode_value(name, objects.non_tensor_rows(value, name))
    if isinstance(value, TensorDictBase):
        raise SchemaError(
            f"field {name!r}: nested TensorDicts are not columns; flatten with td.flatten_keys('.')"
        )
    if isinstance(value, (list, tuple)):
        n_tensors = sum(isinstance(v, torch.Tensor) for v in value)
        if value and n_tensors == len(value):
            return _encode_tensor_rows(name, value, value[0].dtype)
        if n_tensors:
            raise SchemaError(f"field {name!r}: rows mix tensors and other values; use one kind per field")
        return _encode_object(name, list(value))
    raise SchemaError(
        f"field {name!r}: a value of type {type(value).__name__} is not a column; "
        "pass a tensor, a numpy array, a NonTensorStack or a list with one value per row"
    )


def encode_columns(data: TensorDict | Mapping[str, Any]) -> tuple[list[ColumnSpec], list[memoryview]]:
    """Encode every column of ``data``: specs in column order, and their buffers concatenated.

    The buffers may alias the input tensors' memory: do not modify them until the frames are sent.
    """
    quiet_torch_notices()
    batch_length(data)  # all columns must agree on the number of rows
    specs: list[ColumnSpec] = []
    buffers: list[memoryview] = []
    for name, value in _items(data):
        if not isinstance(name, str):
            raise SchemaError(f"field names must be str, got {name!r}")
        spec, bufs = _encode_value(name, value)
        specs.append(spec)
        buffers.extend(bufs)
    return specs, buffers


# --------------------------------------------------------------------------- decoding


def _check_spec(spec: ColumnSpec) -> None:
    """Reject a spec that is inconsistent in itself, before any buffer is looked at."""
    where = f"column {spec.name!r}"
    if spec.kind not in _NBUF:
        raise ProtocolError(f"{where}: unknown kind {spec.kind!r} (expected one of {KINDS})")
    if spec.nbuf != _NBUF[spec.kind]:
        raise ProtocolError(
            f"{where}: kind {spec.kind} owns {_NBUF[spec.kind]} buffers, header says {spec.nbuf}"
        )
    if spec.dtype not in (("object",) if spec.kind == "object" else _DTYPES):
        raise ProtocolError(f"{where}: dtype {spec.dtype!r} is not valid for kind {spec.kind}")
    shape, ndim = spec.shape, len(spec.shape)
    if (spec.kind in ("rows", "object") and ndim != 1) or not 1 <= ndim <= _MAX_NDIM:
        raise ProtocolError(f"{where}: bad shape {shape} for kind {spec.kind}")
    negative = [i for i, d in enumerate(shape) if d < 0]  # jagged: exactly the ragged dim, as -1
    expected = [spec.ragged_dim] if spec.kind == "jagged" else []
    if negative != expected or min(shape) < -1 or (spec.kind != "jagged" and spec.ragged_dim != -1):
        raise ProtocolError(f"{where}: bad shape {shape} / ragged_dim {spec.ragged_dim} for kind {spec.kind}")
    if spec.nbytes < 0:
        raise ProtocolError(f"{where}: negative nbytes {spec.nbytes}")


def _byte_view(buf: Any, name: str) -> memoryview:
    try:
        mv = memoryview(buf)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"column {name!r}: buffer is not a contiguous byte buffer ({exc})") from exc


def _nbytes_of(shape: Sequence[int], itemsize: int, name: str) -> int:
    """Bytes for ``shape``; ``ProtocolError`` if any size or stride could overflow int64."""
    count, bound = 1, itemsize
    for d in shape:
        count, bound = count * d, bound * max(d, 1)
    if bound > _MAX_BYTES:
        raise ProtocolError(f"column {name!r}: shape {tuple(shape)} is too large")
    return count * itemsize


def _view(mv: memoryview, dtype: torch.dtype, shape: Sequence[int], copy: bool, name: str) -> torch.Tensor:
    """A tensor over ``mv`` (whose length was checked against ``shape``), or a copy of it."""
    if mv.nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    raw = torch.frombuffer(mv, dtype=torch.uint8)
    if dtype == torch.bool and bool(raw.max() > 1):
        raise ProtocolError(f"column {name!r}: bool buffer holds bytes other than 0 and 1")
    if copy or raw.data_ptr() % min(dtype.itemsize, 16):
        # a buffer at an address the dtype's kernels cannot read in place (e.g. a complex128 column at
        # an 8-byte offset inside a file) is copied: vectorised copies of it would fault
        raw = raw.clone()
    return raw.view(dtype).view(tuple(shape))


def _expect(mv: memoryview, nbytes: int, what: str, name: str) -> None:
    if mv.nbytes != nbytes:
        raise ProtocolError(f"column {name!r}: {what} buffer has {mv.nbytes} bytes, expected {nbytes}")


def _decode_dense(spec: ColumnSpec, bufs: list[memoryview], copy: bool) -> torch.Tensor:
    dtype = _DTYPES[spec.dtype]
    _expect(bufs[0], _nbytes_of(spec.shape, dtype.itemsize, spec.name), "values", spec.name)
    return _view(bufs[0], dtype, spec.shape, copy, spec.name)


def _decode_jagged(spec: ColumnSpec, bufs: list[memoryview], copy: bool) -> torch.Tensor:
    vbuf, obuf = bufs
    if obuf.nbytes < 8 or obuf.nbytes % 8:
        raise ProtocolError(f"column {spec.name!r}: offsets buffer of {obuf.nbytes} bytes is not B+1 int64s")
    offsets = _view(obuf, torch.int64, (obuf.nbytes // 8,), copy, spec.name)
    if int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
        raise ProtocolError(f"column {spec.name!r}: offsets must start at 0 and never decrease")
    shape = list(spec.shape)
    shape[spec.ragged_dim] = int(offsets[-1])
    dtype = _DTYPES[spec.dtype]
    _expect(vbuf, _nbytes_of(shape, dtype.itemsize, spec.name), "values", spec.name)
    values = _view(vbuf, dtype, shape, copy, spec.name)
    return torch.nested.nested_tensor_from_jagged(values, offsets, jagged_dim=spec.ragged_dim + 1)


def _decode_rows(spec: ColumnSpec, bufs: list[memoryview], copy: bool) -> torch.Tensor | list[torch.Tensor]:
    vbuf, sbuf = bufs
    nrows, dtype = spec.shape[0], _DTYPES[spec.dtype]
    if nrows == 0:
        _expect(sbuf, 0, "shapes", spec.name)
        _expect(vbuf, 0, "values", spec.name)
        parts: list[torch.Tensor] = []
    else:
        ndim = sbuf.nbytes // (8 * nrows)
        if sbuf.nbytes % (8 * nrows) or ndim > _MAX_NDIM:
            raise ProtocolError(f"column {spec.name!r}: shapes buffer is not a ({nrows}, ndim) int64 matrix")
        if ndim == 0:  # 0-d rows: check the values first, so nrows is bounded by real bytes
            _expect(vbuf, nrows * dtype.itemsize, "values", spec.name)
        shapes = _view(sbuf, torch.int64, (nrows, ndim), False, spec.name)
        bounds = shapes.clamp(min=1).double().prod(1) * dtype.itemsize
        if bool((shapes < 0).any()) or bool((bounds > _MAX_BYTES).any()):
            raise ProtocolError(f"column {spec.name!r}: shapes matrix holds negative or huge sizes")
        numels = shapes.prod(1)
        if float(numels.double().sum()) * dtype.itemsize > _MAX_BYTES:
            raise ProtocolError(f"column {spec.name!r}: rows describe too many elements")
        total = int(numels.sum())
        _expect(vbuf, total * dtype.itemsize, "values", spec.name)
        values = _view(vbuf, dtype, (total,), False, spec.name)
        sizes = shapes.tolist()
        parts = [p.view(s) for p, s in zip(values.split(numels.tolist()), sizes, strict=True)]
    try:
        return torch.nested.nested_tensor(parts, dtype=dtype)  # always copies
    except RuntimeError:  # dtypes strided nested tensors do not implement (uint16, float8...)
        return [p.clone() if copy else p for p in parts]


_DECODERS = {
    "dense": _decode_dense,
    "jagged": _decode_jagged,
    "rows": _decode_rows,
    "object": lambda spec, bufs, copy: objects.decode_objects(bufs[0], spec.shape[0], spec.name),
}


def decode_columns(
    specs: Sequence[ColumnSpec], buffers: Sequence[Any], *, copy: bool = False
) -> dict[str, Any]:
    """Rebuild the columns from their specs and buffers (any objects with the buffer protocol).

    ``copy=False``: dense and jagged tensors share memory with ``buffers`` (see module docstring);
    ``copy=True``: every tensor owns its memory. Raises ``ProtocolError`` on any inconsistency.
    """
    quiet_torch_notices()
    for spec in specs:
        _check_spec(spec)
    need = sum(spec.nbuf for spec in specs)
    if need != len(buffers):
        raise ProtocolError(f"header describes {need} buffers, message carries {len(buffers)}")
    out: dict[str, Any] = {}
    pos = 0
    for spec in specs:
        if spec.name in out:
            raise ProtocolError(f"column {spec.name!r} appears twice in one message")
        bufs = [_byte_view(b, spec.name) for b in buffers[pos : pos + spec.nbuf]]
        pos += spec.nbuf
        if (got := sum(b.nbytes for b in bufs)) != spec.nbytes:
            raise ProtocolError(f"column {spec.name!r}: buffers hold {got} bytes, header says {spec.nbytes}")
        out[spec.name] = _DECODERS[spec.kind](spec, bufs, copy)
    return out


# --------------------------------------------------------------------------- TensorDict


def to_tensordict(columns: Mapping[str, Any], batch_size: int) -> TensorDict:
    """A ``TensorDict`` of batch size ``[batch_size]``: tensors as entries, objects as ``NonTensorStack``."""
    td = TensorDict({}, batch_size=[batch_size])
    for name, value in columns.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        elif isinstance(value, (list, tuple)):  # object rows, or tensors from a "rows" fallback
            value = objects.non_tensor_stack(value)
        elif not isinstance(value, (torch.Tensor, NonTensorStack, NonTensorData)):
            raise SchemaError(f"field {name!r}: {type(value).__name__} is not a column value")
        if column_length(value) != batch_size:
            raise SchemaError(f"field {name!r} has {column_length(value)} rows, batch size is {batch_size}")
        td.set(name, value)
    return td
