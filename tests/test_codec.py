"""Property tests of tq_loader.codec: round trips, bit-exactness, zero-copy and malformed input."""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Any

import hypothesis.extra.numpy as hnp
import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import NonTensorData, NonTensorStack, TensorDict

from tq_loader import codec
from tq_loader.codec import _DTYPES as DTYPES
from tq_loader.codec import (
    KINDS,
    ColumnSpec,
    batch_length,
    column_length,
    decode_columns,
    encode_columns,
    to_tensordict,
)
from tq_loader.errors import ProtocolError, SchemaError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = sorted(DTYPES)


# ----------------------------------------------------------------------------- helpers


def encode_header(specs: list[ColumnSpec]) -> bytes:
    """The specs as a message would carry them (inside its msgpack header)."""
    return msgspec.msgpack.encode(list(specs))


def decode_header(raw: bytes) -> list[ColumnSpec]:
    """What a receiver makes of header bytes: typed specs, each checked as decode_columns checks it."""
    try:
        specs = msgspec.msgpack.decode(raw, type=list[ColumnSpec])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ProtocolError(f"malformed column header: {exc}") from exc
    for spec in specs:
        codec._check_spec(spec)
    return specs


def _bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, for bit-exact comparison (NaN payloads, -0.0)."""
    t = t.detach().cpu().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _addr(buf: Any) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def _wire(buffers: list[memoryview]) -> list[bytearray]:
    """What a receiver holds: fresh, independent byte buffers (as after a network hop)."""
    return [bytearray(b) for b in buffers]


def _roundtrip(data: Any, copy: bool = False) -> dict[str, Any]:
    specs, buffers = encode_columns(data)
    return decode_columns(decode_header(encode_header(specs)), _wire(buffers), copy=copy)


@st.composite
def tensors(draw: st.DrawFn, dtype_name: str | None = None, min_rows: int = 0) -> torch.Tensor:
    """A tensor of any supported dtype from random bytes (so every bit pattern, NaNs included)."""
    dtype = DTYPES[dtype_name or draw(st.sampled_from(DTYPE_NAMES))]
    shape = [draw(st.integers(min_rows, 5)), *draw(st.lists(st.integers(0, 4), max_size=3))]
    n = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _same(a: Any, b: Any) -> bool:
    """Equality that also checks types and tells -0.0 from 0.0 (and NaN equals itself)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and a.tobytes() == b.tobytes()
    return a == b


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-(2**63), 2**63 - 1), inner, max_size=4)
    ),
    max_leaves=12,
)
_np_dtypes = st.sampled_from(
    ["?", "i1", "u1", "i2", "<u2", ">i4", "u4", "<i8", ">u8", "<f2", "f4", ">f8", "c8", ">c16"]
)
_np_arrays = _np_dtypes.flatmap(
    lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0))
)


# ----------------------------------------------------------------------------- dense


@SETTINGS
@given(st.sampled_from(DTYPE_NAMES).flatmap(tensors), st.booleans())
def test_dense_roundtrip_every_dtype_bit_exact(t: torch.Tensor, copy: bool) -> None:
    specs, buffers = encode_columns({"x": t})
    assert specs[0].kind == "dense" and specs[0].shape == tuple(t.shape) and specs[0].nbuf == 1
    assert specs[0].nbytes == t.numel() * t.element_size() == sum(b.nbytes for b in buffers)
    out = decode_columns(specs, _wire(buffers), copy=copy)["x"]
    assert out.dtype == t.dtype and out.shape == t.shape and out.layout == torch.strided
    assert _bits(out) == _bits(t)


@SETTINGS
@given(tensors(min_rows=1), st.sampled_from(["transpose", "step", "expand", "conj", "neg"]))
def test_strided_and_lazy_views_are_made_contiguous(t: torch.Tensor, how: str) -> None:
    if how == "transpose":
        view = t.unsqueeze(-1).transpose(0, -1)
    elif how == "step":
        view = t[::2]
    elif how == "expand":
        view = t[:1].expand(3, *t.shape[1:])
    elif how == "conj":
        view = t.conj() if t.is_complex() else t
    else:
        view = torch._neg_view(t) if t.is_floating_point() and t.dtype.itemsize > 1 else t
    out = _roundtrip({"x": view})["x"]
    assert out.shape == view.shape and out.dtype == view.dtype
    assert _bits(out) == _bits(view)


def test_nan_inf_negative_zero_bit_exact() -> None:
    special = [float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 5e-324]
    x64 = torch.tensor(special, dtype=torch.float64)
    x64_bits = x64.view(torch.int64).clone()
    x64_bits[0] = 0x7FF0000000000123  # a NaN with a payload
    x64 = x64_bits.view(torch.float64)
    data = {"f64": x64, "f32": x64.float(), "bf16": x64.bfloat16(), "f16": x64.half(), "obj": special}
    out = _roundtrip(data)
    assert torch.equal(out["f64"].view(torch.int64), x64.view(torch.int64))
    assert torch.equal(out["f32"].view(torch.int32), x64.float().view(torch.int32))
    assert torch.equal(out["bf16"].view(torch.int16), x64.bfloat16().view(torch.int16))
    assert torch.equal(out["f16"].view(torch.int16), x64.half().view(torch.int16))
    assert _same(out["obj"], special)


def test_zero_rows_and_zero_size() -> None:
    data = {
        "a": torch.zeros(0, 3),
        "b": torch.zeros(0, dtype=torch.bool),
        "j": torch.nested.nested_tensor_from_jagged(torch.zeros(0, 2), torch.zeros(1, dtype=torch.int64)),
        "o": [],
    }
    assert batch_length(data) == 0
    out = _roundtrip(data)
    assert out["a"].shape == (0, 3) and out["b"].dtype == torch.bool
    assert out["j"].is_nested and out["j"].size(0) == 0 and out["o"] == []
    assert _roundtrip({"z": torch.zeros(4, 0, 2)})["z"].shape == (4, 0, 2)
    assert encode_columns({}) == ([], [])
    td = to_tensordict(out, 0)
    assert td.batch_size == (0,)


@SETTINGS
@given(hnp.arrays(st.sampled_from([np.float32, np.dtype(">f8"), np.int16, np.uint32, np.bool_, np.complex64]),
                  hnp.array_shapes(min_dims=1, max_dims=3, min_side=0)))  # fmt: skip
def test_numpy_column_becomes_dense_tensor(arr: np.ndarray) -> None:
    out = _roundtrip({"x": arr})["x"]
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == arr.shape
    assert out.numpy().tobytes() == arr.astype(arr.dtype.newbyteorder("=")).tobytes()


def test_numpy_string_column_is_object() -> None:
    assert _roundtrip({"s": np.array(["a", "bé"])})["s"] == ["a", "bé"]


def test_list_of_same_shape_tensors_is_dense() -> None:
    rows = [torch.randn(2, 3) for _ in range(4)]
    specs, _ = encode_columns({"x": rows})
    assert specs[0].kind == "dense"
    assert torch.equal(_roundtrip({"x": rows})["x"], torch.stack(rows))
    assert torch.equal(_roundtrip({"s": [torch.tensor(1), torch.tensor(2)]})["s"], torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- zero-copy


def test_encode_shares_memory_with_contiguous_cpu_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    _, buffers = encode_columns({"x": t})
    assert _addr(buffers[0]) == t.data_ptr()
    del t  # the memoryview keeps the tensor's memory alive
    assert np.frombuffer(buffers[0], np.float32).tolist() == list(map(float, range(12)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_decode_copy_false_shares_memory_and_copy_true_does_not(dtype: torch.dtype) -> None:
    njt = torch.nested.nested_tensor_from_jagged(torch.ones(5, 2, dtype=dtype), torch.tensor([0, 2, 5]))
    specs, buffers = encode_columns({"d": torch.ones(2, 3, dtype=dtype), "j": njt})
    wire = _wire(buffers)
    shared = decode_columns(specs, wire, copy=False)
    assert shared["d"].data_ptr() == _addr(wire[0])
    assert shared["j"].values().data_ptr() == _addr(wire[1])
    assert shared["j"].offsets().data_ptr() == _addr(wire[2])
    owned = decode_columns(specs, wire, copy=True)
    ptrs = {owned["d"].data_ptr(), owned["j"].values().data_ptr(), owned["j"].offsets().data_ptr()}
    assert ptrs.isdisjoint({_addr(b) for b in wire})
    wire[0][:] = bytes(len(wire[0]))  # the receiver's frame changes: only the shared view sees it
    assert not shared["d"].any() and owned["d"].all()


def test_decode_accepts_read_only_buffers_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    specs, buffers = encode_columns({"x": torch.arange(4)})
    out = decode_columns(specs, [bytes(b) for b in buffers])["x"]
    assert out.tolist() == [0, 1, 2, 3]
    assert not [w for w in recwarn if "not writable" in str(w.message)]


# ----------------------------------------------------------------------------- jagged / rows


@st.composite
def jagged(draw: st.DrawFn) -> torch.Tensor:
    lengths = draw(st.lists(st.integers(0, 4), max_size=6))
    inner = draw(st.lists(st.integers(0, 3), max_size=2))
    rdim = draw(st.integers(0, len(inner)))
    dtype = DTYPES[draw(st.sampled_from(["float32", "bfloat16", "int64", "bool", "complex64", "uint8"]))]
    shape = [*inner[:rdim], sum(lengths), *inner[rdim:]]
    values = torch.randint(0, 2, shape).to(dtype) if dtype == torch.bool else torch.randn(shape).to(dtype)
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
    return torch.nested.nested_tensor_from_jagged(values, offsets, jagged_dim=rdim + 1)


@SETTINGS
@given(jagged(), st.booleans())
def test_jagged_nested_roundtrip(nt: torch.Tensor, copy: bool) -> None:
    specs, buffers = encode_columns({"j": nt})
    assert specs[0].kind == "jagged" and specs[0].ragged_dim == nt._ragged_idx - 1 and specs[0].nbuf == 2
    out = decode_columns(specs, _wire(buffers), copy=copy)["j"]
    assert out.is_nested and out.layout == torch.jagged and out._ragged_idx == nt._ragged_idx
    assert out.dtype == nt.dtype and out.size(0) == nt.size(0)
    assert torch.equal(out.offsets(), nt.offsets())
    assert _bits(out.values()) == _bits(nt.values())
    for a, b in zip(out.unbind(), nt.unbind(), strict=True):
        assert a.shape == b.shape and _bits(a) == _bits(b)


def test_jagged_views_with_holes_or_offsets_are_compacted() -> None:
    values = torch.arange(20.0).reshape(10, 2)
    holes = torch.nested.nested_tensor_from_jagged(
        values, torch.tensor([0, 4, 8]), lengths=torch.tensor([2, 3])
    )
    out = _roundtrip({"h": holes})["h"]
    assert [r.tolist() for r in out.unbind()] == [r.tolist() for r in holes.unbind()]
    shifted = torch.nested.nested_tensor_from_jagged(values, torch.tensor([3, 5, 6]))
    out = _roundtrip({"s": shifted})["s"]
    assert out.offsets().tolist() == [0, 2, 3]
    assert [r.tolist() for r in out.unbind()] == [values[3:5].tolist(), values[5:6].tolist()]


@SETTINGS
@given(st.lists(st.integers(0, 4), min_size=1, max_size=6), st.integers(0, 2), st.integers(1, 3))
def test_list_of_tensors_varying_in_one_dim_is_jagged(lengths: list[int], rdim: int, width: int) -> None:
    def shape(n: int) -> list[int]:
        s = [width, width]
        s.insert(rdim, n)
        return s

    rows = [torch.randn(shape(n)) for n in lengths]
    if len(set(lengths)) == 1:
        lengths = [*lengths, lengths[0] + 1]
        rows.append(torch.randn(shape(lengths[-1])))
    specs, _ = encode_columns({"x": rows})
    assert specs[0].kind == "jagged" and specs[0].ragged_dim == rdim
    out = _roundtrip({"x": rows})["x"]
    assert out.layout == torch.jagged
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=6), st.booleans())
def test_rows_kind_for_tensors_varying_in_several_dims(shapes: list[tuple[int, int]], copy: bool) -> None:
    shapes = [(1, 2), (2, 1), *shapes]  # at least two varying dims
    rows = [torch.randn(s) for s in shapes]
    specs, buffers = encode_columns({"r": rows})
    assert specs[0].kind == "rows" and specs[0].shape == (len(rows),) and specs[0].nbuf == 2
    out = decode_columns(specs, _wire(buffers), copy=copy)["r"]
    assert out.is_nested and out.layout == torch.strided
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))


def test_strided_nested_tensor_and_unsupported_dtype_fallback() -> None:
    nt = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 5)])
    out = _roundtrip({"n": nt})["n"]
    assert out.is_nested and all(torch.equal(a, b) for a, b in zip(out.unbind(), nt.unbind(), strict=True))
    empty = _roundtrip({"e": torch.nested.nested_tensor([])})["e"]
    assert empty.is_nested and empty.size(0) == 0
    rows = [torch.ones(2, 3, dtype=torch.uint16), torch.ones(1, 4, dtype=torch.uint16)]
    out = _roundtrip({"u": rows})["u"]  # strided nested tensors do not support uint16: a list comes back
    assert isinstance(out, list) and all(torch.equal(a, b) for a, b in zip(out, rows, strict=True))
    td = to_tensordict(_roundtrip({"u": rows}), 2)  # and it still re-encodes from a TensorDict
    again = _roundtrip(td)["u"]
    assert all(torch.equal(a, b) for a, b in zip(again, rows, strict=True))


# ----------------------------------------------------------------------------- objects


@SETTINGS
@given(st.lists(_plain, max_size=6))
def test_object_column_roundtrip(rows: list[Any]) -> None:
    specs, buffers = encode_columns({"o": rows})
    assert specs[0].kind == "object" and specs[0].dtype == "object" and specs[0].nbuf == 1
    assert _same(decode_columns(specs, _wire(buffers))["o"], rows)


@SETTINGS
@given(st.lists(_np_arrays, min_size=1, max_size=4))
def test_numpy_rows_in_object_columns(arrays: list[np.ndarray]) -> None:
    rows: list[Any] = [
        *arrays,
        {"a": arrays[0], "s": arrays[0].reshape(-1)[:1].sum() if arrays[0].size else None},
    ]
    if arrays[0].size:
        rows.append(arrays[0].reshape(-1)[0])  # a numpy scalar keeps its type
    out = _roundtrip({"o": rows})["o"]
    assert _same(out, rows)
    assert all(a.flags.writeable for a in out[: len(arrays)])


def test_non_tensor_stack_and_data_inputs() -> None:
    stack = NonTensorStack(
        *(NonTensorData(data=v, batch_size=[]) for v in ["a", [1, 2], {"k": None}]), stack_dim=0
    )
    out = _roundtrip({"s": stack, "d": NonTensorData(data="same", batch_size=[3])})
    assert out == {"s": ["a", [1, 2], {"k": None}], "d": ["same"] * 3}
    assert _roundtrip({"t": ("x", (1, 2))})["t"] == ["x", [1, 2]]  # tuples come back as lists


def test_non_tensor_data_holding_one_value_per_row_is_split_as_transferqueue() -> None:
    rows = [{"i": 0}, {"i": 1}, {"i": 2}]
    out = _roundtrip({"d": NonTensorData(data=rows, batch_size=[3])})
    assert out["d"] == rows
    wrapped = TensorDict({"b": np.array([b"a", b"bc", b""], dtype="|S3")}, batch_size=[3])  # NonTensorData
    assert _roundtrip(wrapped)["b"] == [b"a", b"bc", b""]


def test_numpy_bytes_and_object_columns() -> None:
    out = _roundtrip(
        {"b": np.array([b"x", b"yz", b""], dtype="S2"), "o": np.array([1, "two", None], dtype=object)}
    )
    assert out == {"b": [b"x", b"yz", b""], "o": [1, "two", None]}


class _Custom:
    pass


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([_Custom()], "_Custom"),
        (["a", {1, 2}], "set"),
        ([lambda: 1], "function"),
        ([{"k": [1, _Custom()]}], "_Custom"),
        ([{(1, 2): "tuple key"}], "tuple"),
        ([2**70], "encode"),
        ([np.array(["2020"], dtype="datetime64[D]")], "datetime64"),
        ([torch.zeros(2), "x"], "mix"),
        ([torch.zeros(2), torch.zeros(2, dtype=torch.int64)], "dtype"),
        ([torch.zeros(2), torch.zeros(2, 2)], "dimensions"),
        (np.zeros(3, dtype="datetime64[s]"), "numpy dtype"),
        (torch.tensor(1.0), "0-d"),
        ("just a string", "not a column"),
        ({1, 2}, "not a column"),
    ],
)
def test_unsupported_values_raise_schema_error(value: Any, needle: str) -> None:
    with pytest.raises(SchemaError, match=needle) as info:
        encode_columns({"bad": value})
    assert "'bad'" in str(info.value)


def test_schema_errors_for_batch_shape_and_names() -> None:
    with pytest.raises(SchemaError, match="different numbers of rows"):
        encode_columns({"a": torch.zeros(3), "b": ["x", "y"]})
    with pytest.raises(SchemaError, match="flatten"):
        encode_columns(TensorDict({"sub": TensorDict({"x": torch.zeros(2)}, [2])}, [2]))
    with pytest.raises(SchemaError, match="str"):
        encode_columns({1: torch.zeros(2)})
    with pytest.raises(SchemaError, match="sparse"):
        encode_columns({"s": torch.zeros(2, 2).to_sparse()})
    with pytest.raises(SchemaError):
        encode_columns([torch.zeros(2)])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- TensorDict


@SETTINGS
@given(st.integers(0, 5), st.data())
def test_tensordict_with_mixed_columns_roundtrip(nrows: int, data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 3), min_size=nrows, max_size=nrows))
    njt = torch.nested.nested_tensor_from_jagged(
        torch.randn(sum(lengths), 2), torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
    )
    words = data.draw(st.lists(st.text(), min_size=nrows, max_size=nrows))
    td = TensorDict(
        {"ids": torch.arange(nrows), "logp": torch.randn(nrows, 3).bfloat16(), "tokens": njt},
        batch_size=[nrows],
    )
    td.set("prompt", NonTensorStack(*(NonTensorData(data=w, batch_size=[]) for w in words), stack_dim=0))
    assert batch_length(td) == nrows
    out = _roundtrip(td)
    assert list(out) == ["ids", "logp", "tokens", "prompt"]
    assert torch.equal(out["ids"], td["ids"]) and _bits(out["logp"]) == _bits(td["logp"])
    assert out["prompt"] == words
    back = to_tensordict(out, nrows)
    assert back.batch_size == (nrows,)
    assert isinstance(back.get("prompt"), NonTensorStack) and back.get("prompt").tolist() == words
    assert back["tokens"].is_nested and torch.equal(back["tokens"].offsets(), njt.offsets())
    assert torch.equal(back["ids"], td["ids"])


def test_to_tensordict_checks_lengths() -> None:
    with pytest.raises(SchemaError, match="rows"):
        to_tensordict({"a": torch.zeros(3)}, 2)
    with pytest.raises(SchemaError):
        to_tensordict({"a": object()}, 1)
    td = to_tensordict({"n": np.arange(2), "o": [[1], {"a": 2}]}, 2)
    assert td["n"].tolist() == [0, 1] and td.get("o").tolist() == [[1], {"a": 2}]


def test_column_and_batch_length() -> None:
    assert column_length(torch.zeros(4, 2)) == 4
    assert column_length(torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(1, 4)])) == 2
    assert column_length(np.zeros((5,))) == 5
    assert column_length(["a"]) == 1
    assert column_length(NonTensorData(data="x", batch_size=[7])) == 7
    assert batch_length(TensorDict({"a": torch.zeros(3)}, [3])) == 3
    assert batch_length({}) == 0
    with pytest.raises(SchemaError):
        column_length(torch.tensor(3.0))
    with pytest.raises(SchemaError):
        column_length(object())


# ----------------------------------------------------------------------------- malformed input


def _valid() -> tuple[list[ColumnSpec], list[bytearray]]:
    data = {
        "d": torch.randn(3, 2),
        "j": [torch.ones(2), torch.ones(0), torch.ones(3)],
        "r": [torch.ones(1, 2), torch.ones(2, 1), torch.ones(2, 2)],
        "o": ["a", None, np.arange(2)],
        "b": torch.tensor([True, False, True]),
    }
    specs, buffers = encode_columns(data)
    return specs, _wire(buffers)


def _spec(specs: list[ColumnSpec], name: str) -> tuple[int, int]:
    """(index of the spec, index of its first buffer)."""
    pos = 0
    for i, s in enumerate(specs):
        if s.name == name:
            return i, pos
        pos += s.nbuf
    raise KeyError(name)


def test_wrong_buffer_count_and_truncation() -> None:
    specs, wire = _valid()
    with pytest.raises(ProtocolError, match="buffers"):
        decode_columns(specs, wire[:-1])
    with pytest.raises(ProtocolError, match="buffers"):
        decode_columns(specs, [*wire, bytearray(b"x")])
    for k in range(len(wire)):
        if wire[k]:
            cut = [*wire[:k], wire[k][:-1], *wire[k + 1 :]]
            with pytest.raises(ProtocolError):
                decode_columns(specs, cut)


def test_header_lies_are_rejected() -> None:
    specs, wire = _valid()
    i, _ = _spec(specs, "d")
    bad = [
        msgspec.structs.replace(specs[i], nbuf=2),
        msgspec.structs.replace(specs[i], kind="sparse"),
        msgspec.structs.replace(specs[i], dtype="float128"),
        msgspec.structs.replace(specs[i], dtype="object"),
        msgspec.structs.replace(specs[i], shape=(3, 3)),
        msgspec.structs.replace(specs[i], shape=(-3, -2)),
        msgspec.structs.replace(specs[i], shape=(2**40, 2**40, 0)),
        msgspec.structs.replace(specs[i], shape=()),
        msgspec.structs.replace(specs[i], nbytes=specs[i].nbytes + 1),
        msgspec.structs.replace(specs[i], ragged_dim=0),
    ]
    for spec in bad:
        with pytest.raises(ProtocolError):
            decode_columns([*specs[:i], spec, *specs[i + 1 :]], wire)
    j, _ = _spec(specs, "j")
    for spec in [msgspec.structs.replace(specs[j], ragged_dim=r) for r in (-1, 1, 5)] + [
        msgspec.structs.replace(specs[j], shape=s) for s in ((-2,), (1,), (-1, -1))
    ]:
        with pytest.raises(ProtocolError):
            decode_columns([*specs[:j], spec, *specs[j + 1 :]], wire)
    with pytest.raises(ProtocolError, match="twice"):
        decode_columns([specs[i], specs[i]], [wire[0], wire[0]])


def _offsets_case(offsets: list[int]) -> None:
    specs, wire = _valid()
    _, pos = _spec(specs, "j")
    wire[pos + 1] = bytearray(np.array(offsets, dtype=np.int64).tobytes())
    with pytest.raises(ProtocolError):
        decode_columns(specs, wire)


@pytest.mark.parametrize(
    "offsets", [[1, 2, 2, 5], [0, 3, 2, 5], [0, 2, 2, 4], [0, 2, 2, 6], [0, 2, 2, 2**62], [0, -1, 2, 5]]
)
def test_bad_offsets(offsets: list[int]) -> None:
    _offsets_case(offsets)


def test_bad_offsets_buffer_sizes() -> None:
    specs, wire = _valid()
    i, pos = _spec(specs, "j")
    for off in (b"", b"\x00" * 7):
        spec = msgspec.structs.replace(specs[i], nbytes=len(wire[pos]) + len(off))
        with pytest.raises(ProtocolError, match="offsets"):
            decode_columns([spec], [wire[pos], bytearray(off)])


@pytest.mark.parametrize(
    "shapes",
    [[[1, 2], [2, 1], [2, 3]], [[1, 2], [-2, -1], [2, 2]], [[2**40, 2**40], [0, 0], [0, 0]], [[1, 2, 1]]],
)
def test_bad_rows_shapes(shapes: list[list[int]]) -> None:
    specs, wire = _valid()
    i, pos = _spec(specs, "r")
    raw = bytearray(np.array(shapes, dtype=np.int64).tobytes())
    spec = msgspec.structs.replace(specs[i], nbytes=len(wire[pos]) + len(raw))
    with pytest.raises(ProtocolError):
        decode_columns([spec], [wire[pos], raw])


def test_bad_bool_bytes_and_bad_object_blobs() -> None:
    specs, wire = _valid()
    _, pos = _spec(specs, "b")
    wire[pos][0] = 7
    with pytest.raises(ProtocolError, match="bool"):
        decode_columns(specs, wire)
    specs, wire = _valid()
    i, pos = _spec(specs, "o")
    blobs = [
        b"\xc1garbage",
        msgspec.msgpack.encode(["only one row"]),
        msgspec.msgpack.encode(["a", "b", msgspec.msgpack.Ext(9, b"")]),
        msgspec.msgpack.encode(
            ["a", "b", msgspec.msgpack.Ext(1, msgspec.msgpack.encode(("|O8", [1], b"\0" * 8)))]
        ),
        msgspec.msgpack.encode(
            ["a", "b", msgspec.msgpack.Ext(1, msgspec.msgpack.encode(("<f8", [3], b"\0" * 8)))]
        ),
        msgspec.msgpack.encode(
            ["a", "b", msgspec.msgpack.Ext(2, msgspec.msgpack.encode(("<f8", [1], b"\0" * 8)))]
        ),
        msgspec.msgpack.encode(["a", "b", msgspec.msgpack.Ext(1, b"\x93")]),
        b"\x91" * 100_000,  # absurdly deep nesting
    ]
    for blob in blobs:
        spec = msgspec.structs.replace(specs[i], nbytes=len(blob))
        with pytest.raises(ProtocolError):
            decode_columns([spec], [bytearray(blob)])


@SETTINGS
@given(st.binary(max_size=200))
def test_garbage_header_bytes(raw: bytes) -> None:
    try:
        specs = decode_header(raw)
    except ProtocolError:
        return
    assert all(isinstance(s, ColumnSpec) and s.kind in KINDS for s in specs)


def test_header_roundtrip_and_known_garbage() -> None:
    specs, _ = _valid()
    assert decode_header(encode_header(specs)) == specs
    for raw in (b"", b"\x00", b"\x91\x93\x01\x02\x03", msgspec.msgpack.encode([["x", "weird", "f", [1], 1]])):
        with pytest.raises(ProtocolError):
            decode_header(raw)


_NBUF = {"dense": 1, "jagged": 2, "rows": 2, "object": 1}


def _mostly(draw: st.DrawFn, good: Any, bad: st.SearchStrategy[Any]) -> Any:
    return good if draw(st.integers(0, 9)) else draw(bad)


@st.composite
def fuzz_messages(draw: st.DrawFn) -> tuple[list[ColumnSpec], list[bytes]]:
    """Specs that are mostly self-consistent (so decoding gets deep) with random buffers."""
    specs, buffers = [], []
    size = st.integers(0, 4) | st.sampled_from([-2, -1, 2**31, 2**41, 2**62])
    for name in draw(st.lists(st.sampled_from("abc"), max_size=3)):
        kind = _mostly(draw, draw(st.sampled_from(KINDS)), st.just("bogus"))
        nbuf = _mostly(draw, _NBUF.get(kind, 1), st.integers(0, 3))
        bufs = draw(st.lists(st.binary(max_size=48), min_size=nbuf, max_size=nbuf))
        dtype = _mostly(draw, "object" if kind == "object" else draw(st.sampled_from(DTYPE_NAMES)), st.text())
        shape = draw(st.lists(size, min_size=1, max_size=4))
        if kind in ("rows", "object"):
            shape = _mostly(draw, shape[:1], st.just(shape))
        rdim = -1
        if kind == "jagged":
            rdim = draw(st.integers(0, len(shape) - 1))
            shape[rdim] = -1
        spec = ColumnSpec(
            name,
            kind,
            dtype,
            tuple(shape),
            nbuf,
            ragged_dim=_mostly(draw, rdim, st.integers(-2, 4)),
            nbytes=_mostly(draw, sum(map(len, bufs)), st.integers(-1, 64)),
        )
        specs.append(spec)
        buffers.extend(bufs)
    return specs, buffers


@settings(max_examples=400, deadline=None)
@given(fuzz_messages(), st.booleans())
def test_fuzzed_specs_and_buffers_never_crash(
    message: tuple[list[ColumnSpec], list[bytes]], copy: bool
) -> None:
    specs, buffers = message
    with contextlib.suppress(ProtocolError):
        decode_columns(specs, buffers, copy=copy)


@SETTINGS
@given(st.data())
def test_mutated_valid_messages_never_crash(data: st.DataObject) -> None:
    specs, wire = _valid()
    k = data.draw(st.integers(0, len(wire) - 1))
    if wire[k]:
        at = data.draw(st.integers(0, len(wire[k]) - 1))
        wire[k][at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode_columns(specs, wire)


def test_non_buffer_objects_are_rejected() -> None:
    specs, wire = _valid()
    with pytest.raises(ProtocolError, match="buffer"):
        decode_columns(specs, [object(), *wire[1:]])


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_travel_via_cpu_and_record_device() -> None:
    njt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged, device="cuda")
    data = {"d": torch.randn(3, 2, device="cuda").T, "j": njt, "l": [torch.ones(1, device="cuda")] * 2}
    specs, buffers = encode_columns({"d": data["d"]})
    assert specs[0].device.startswith("cuda")
    out = decode_columns(specs, _wire(buffers))["d"]
    assert out.device.type == "cpu" and torch.equal(out, data["d"].cpu())
    specs, buffers = encode_columns({"j": njt, "l": data["l"]})
    assert all(s.device.startswith("cuda") for s in specs)
    out = decode_columns(specs, _wire(buffers))
    assert torch.equal(out["j"].values(), njt.values().cpu()) and out["l"].shape == (2, 1)
