"""Tests of tq_loader.metadata: BatchMeta, KVBatchMeta, schema inference and the wire form."""

from __future__ import annotations

import warnings

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import NonTensorData, NonTensorStack, TensorDict

from tq_loader.errors import NotFoundError, ProtocolError, SchemaError, TQError
from tq_loader.metadata import (
    BatchMeta,
    KVBatchMeta,
    SampleMeta,
    dtype_name,
    normalize_schema,
    schema_of,
)
from tq_loader.schema import FieldSchema

F32 = FieldSchema("float32", (4,))
I64 = FieldSchema("int64", ())


def jagged(*lengths: int, dim: int = 3) -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(n, dim) for n in lengths], layout=torch.jagged)


def make(n: int = 6, partition: str | list[str] = "train", **kw) -> BatchMeta:
    return BatchMeta(list(range(100, 100 + n)), partition, {"a": F32, "b": I64}, **kw)


def wire_round_trip(meta):
    return type(meta).from_wire(msgspec.msgpack.decode(msgspec.msgpack.encode(meta.to_wire())))


def assert_plain(value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int))
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (bool, int, float, str, bytes), type(value)


# ---------------------------------------------------------------- dtype names and schema normalisation


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (torch.float32, "float32"),
        (torch.bfloat16, "bfloat16"),
        ("torch.int64", "int64"),
        ("float", "float32"),
        ("long", "int64"),
        (np.dtype("float16"), "float16"),
        (np.int32, "int32"),
        (np.dtype("U5"), "object"),
        (str, "object"),
        (dict, "object"),
        ("object", "object"),
    ],
)
def test_dtype_name(given, expected):
    assert dtype_name(given) == expected


@pytest.mark.parametrize("bad", ["floaty", "Tensor", 3.5])
def test_dtype_name_rejects_unknown(bad):
    with pytest.raises(SchemaError):
        dtype_name(bad)


def test_normalize_tq_style_dicts():
    assert normalize_schema({"dtype": torch.float32, "shape": torch.Size([4]), "is_nested": False}) == F32
    nested = {"dtype": torch.int64, "shape": None, "is_nested": True, "per_sample_shapes": [(3, 2), (5, 2)]}
    assert normalize_schema(nested) == FieldSchema("int64", (-1, 2), True, False)
    non_tensor = {"dtype": str, "shape": None, "is_nested": False, "is_non_tensor": True}
    assert normalize_schema(non_tensor) == FieldSchema("object", (), False, True)
    assert normalize_schema({"dtype": list}).is_non_tensor  # a Python type means a non-tensor column
    assert normalize_schema(["int8", [2, -1], True, False]) == FieldSchema("int8", (2, -1), True, False)
    assert normalize_schema(F32) is F32


@pytest.mark.parametrize("bad", [{}, {"shape": (3,)}, 42, ["float32", [1]]])
def test_normalize_rejects_schemas_without_dtype(bad):
    with pytest.raises(SchemaError):
        normalize_schema(bad, "x")


# ---------------------------------------------------------------- schema_of


def test_schema_of_regular_tensor_uses_per_row_shape():
    assert schema_of(torch.zeros(5, 4, 2, dtype=torch.bfloat16)) == FieldSchema("bfloat16", (4, 2))
    assert schema_of(torch.arange(5)) == FieldSchema("int64", ())
    assert schema_of(np.zeros((3, 7), dtype=np.float64)) == FieldSchema("float64", (7,))


def test_schema_of_jagged_marks_ragged_dim():
    assert schema_of(jagged(3, 5)) == FieldSchema("float32", (-1, 3), True, False)
    # all rows equal: still a jagged column, because types never depend on the data
    assert schema_of(jagged(4, 4)) == FieldSchema("float32", (-1, 3), True, False)


def test_schema_of_strided_nested_tensor():
    with warnings.catch_warnings():  # torch warns once per process that strided nested is a prototype
        warnings.simplefilter("ignore")
        strided = torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(4, 3)])
    assert schema_of(strided) == FieldSchema("float32", (-1, 3), True, False)


def test_schema_of_list_of_tensors():
    assert schema_of([torch.zeros(3), torch.zeros(3)]) == FieldSchema("float32", (3,), False, False)
    assert schema_of([torch.zeros(3, 2), torch.zeros(5, 2)]) == FieldSchema("float32", (-1, 2), True, False)
    assert schema_of([torch.zeros(2, 3), torch.zeros(2, 5)]) == FieldSchema("float32", (2, -1), True, False)


@pytest.mark.parametrize(
    "value",
    [
        NonTensorStack("a", "b"),
        NonTensorData("x", batch_size=[2]),
        ["a", "b"],
        [{"k": 1}, None],
        np.array(["x", "y"]),
        [],
        "scalar",
    ],
)
def test_schema_of_non_tensors_is_object(value):
    assert schema_of(value) == FieldSchema("object", (), False, True)


@pytest.mark.parametrize(
    "value",
    [
        [torch.zeros(3), torch.zeros(3, 1)],  # ranks differ
        [torch.zeros(3), torch.zeros(3, dtype=torch.int64)],  # dtypes differ
        [torch.zeros(3), "x"],  # tensor mixed with other values
        TensorDict({"x": torch.zeros(2)}, batch_size=[2]),  # nested TensorDict
        torch.tensor(1.0),  # no batch dim
    ],
)
def test_schema_of_rejects(value):
    with pytest.raises(SchemaError):
        schema_of(value, "f")


def test_schema_of_table_from_tensordict():
    td = TensorDict(
        {"x": torch.zeros(2, 4), "j": jagged(1, 2), "t": NonTensorStack("a", "b")},
        batch_size=[2],
    )
    got = {k: schema_of(td.get(k)) for k in td.keys()}  # noqa: SIM118
    assert got == {
        "x": FieldSchema("float32", (4,)),
        "j": FieldSchema("float32", (-1, 3), True, False),
        "t": FieldSchema("object", (), False, True),
    }


# ---------------------------------------------------------------- construction and properties


def test_construct_and_properties():
    meta = BatchMeta([7, 3, 5], ["p", "q", "p"], {"z": F32, "a": {"dtype": torch.int64, "shape": ()}})
    assert meta.size == len(meta) == 3
    assert meta.global_index_array.dtype == np.int64
    assert meta.global_index_array.tolist() == [7, 3, 5]
    assert meta.partition_id_array.tolist() == ["p", "q", "p"]
    assert meta.partition_id_array.dtype.kind == "U"
    assert meta.production_status.dtype == np.int8 and meta.production_status.tolist() == [0, 0, 0]
    assert meta.field_names == ["a", "z"]
    assert meta.field_schema == {"z": F32, "a": I64}
    assert not meta.is_ready and not meta.is_end_of_stream
    assert meta.get_all_custom_meta() == [{}, {}, {}]
    assert meta.extra_info == {}


def test_arrays_are_read_only_and_inputs_are_copied():
    idx = np.array([1, 2, 3])
    meta = BatchMeta(idx, "p")
    idx[0] = 99
    assert meta.global_index_array.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        meta.global_index_array[0] = 5
    with pytest.raises(ValueError):
        meta.production_status[0] = 1
    meta.field_schema["new"] = F32  # a copy: does not change the batch
    assert meta.field_names == []


def test_single_partition_string_is_broadcast():
    assert BatchMeta([1, 2, 3], "train").partition_id_array.tolist() == ["train"] * 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_indexes": [1, 2], "partition_ids": ["p"]},
        {"global_indexes": [1.5, 2.0], "partition_ids": "p"},
        {"global_indexes": [[1], [2]], "partition_ids": "p"},
        {"global_indexes": [1, 2], "partition_ids": "p", "production_status": [1]},
        {"global_indexes": [1, 2], "partition_ids": "p", "custom_meta": [{}]},
        {"global_indexes": [1], "partition_ids": "p", "field_schema": {"x": {"shape": (1,)}}},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError) as info:
        BatchMeta(**kwargs)
    assert isinstance(info.value, TQError)


def test_production_status_accepts_lists_tensors_bools():
    assert BatchMeta([1, 2], "p", production_status=[1, 0]).production_status.tolist() == [1, 0]
    assert BatchMeta([1, 2], "p", production_status=torch.tensor([True, True])).is_ready
    assert BatchMeta([1, 2], "p", production_status=np.ones(2, np.int8)).is_ready


def test_is_ready():
    assert not BatchMeta.empty().is_ready
    assert not BatchMeta([1, 2], "p", production_status=[1, 0]).is_ready
    assert BatchMeta([1, 2], "p", production_status=[1, 1]).is_ready


def test_custom_meta_given_to_constructor_is_deep_copied():
    tags = [{"x": [1]}, {}]
    meta = BatchMeta([1, 2], "p", custom_meta=tags)
    tags[0]["x"].append(2)
    assert meta.get_all_custom_meta() == [{"x": [1]}, {}]


def test_empty():
    meta = BatchMeta.empty(extra_info={"step": 1}, end_of_stream=True)
    assert meta.size == 0 and meta.field_names == [] and meta.is_end_of_stream
    assert meta.get_extra_info("step") == 1
    assert list(meta.samples) == [] and meta.chunk_by_partition() == []


def test_end_of_stream_is_kept_by_derived_batches():
    meta = make(5, end_of_stream=True)
    assert meta.is_end_of_stream
    derived = [meta.copy(), meta[1:3], meta.select_samples([0]), meta.select_fields(["a"]), *meta.chunk(2)]
    assert all(d.is_end_of_stream for d in derived)
    assert BatchMeta.concat([make(2), meta]).is_end_of_stream
    assert not BatchMeta.concat([make(2), make(3)]).is_end_of_stream


# ---------------------------------------------------------------- samples and indexing


def test_samples_views():
    meta = make(3, custom_meta=[{"k": 1}, {}, {"k": 3}], production_status=[1, 0, 1])
    samples = meta.samples
    assert len(samples) == 3
    first = samples[0]
    assert isinstance(first, SampleMeta)
    assert (first.global_index, first.partition_id, first.batch_index) == (100, "train", 0)
    assert first.fields == {"a": F32, "b": I64} and first.field_names == ["a", "b"]
    assert first.is_ready and not samples[1].is_ready
    assert first.custom_meta == {"k": 1}
    assert samples[-1].global_index == 102
    assert [s.global_index for s in samples] == [100, 101, 102]
    assert [s.global_index for s in samples[1:]] == [101, 102]
    first.custom_meta["k"] = 99  # a copy: does not write back
    assert meta.samples[0].custom_meta == {"k": 1}
    with pytest.raises(IndexError):
        samples[3]


def test_getitem():
    meta = make(5)
    row = meta[0]  # one row as a batch, as in TransferQueue (per-row views are meta.samples)
    assert isinstance(row, BatchMeta) and row.global_indexes == [100] and row.field_names == ["a", "b"]
    assert meta[-1].global_indexes == [104]
    assert meta[np.int64(-2)].global_indexes == [103]
    part = meta[1:4]
    assert isinstance(part, BatchMeta) and part.global_index_array.tolist() == [101, 102, 103]
    assert meta[::-1].global_index_array.tolist() == [104, 103, 102, 101, 100]
    assert meta[::2].global_index_array.tolist() == [100, 102, 104]
    assert meta[[4, 0]].global_index_array.tolist() == [104, 100]
    assert meta[10:].size == 0
    for bad in (5, -6):
        with pytest.raises(IndexError):
            meta[bad]
    with pytest.raises(TypeError):
        meta[True]


# ---------------------------------------------------------------- selection


def test_select_samples():
    meta = make(5, partition=["a", "b", "a", "b", "c"], custom_meta=[{"i": i} for i in range(5)])
    meta.set_extra_info("step", 3)
    sel = meta.select_samples([4, 1, 2])
    assert sel.global_index_array.tolist() == [104, 101, 102]
    assert sel.partition_id_array.tolist() == ["c", "b", "a"]
    assert sel.get_all_custom_meta() == [{"i": 4}, {"i": 1}, {"i": 2}]
    assert sel.field_names == meta.field_names and sel.get_extra_info("step") == 3
    sel.set_extra_info("step", 4)
    assert meta.get_extra_info("step") == 3
    assert meta.select_samples(torch.tensor([0])).global_index_array.tolist() == [100]
    assert meta.select_samples(np.array([True, False, False, False, True])).global_index_array.tolist() == [
        100,
        104,
    ]
    assert meta.select_samples([]).size == 0


@pytest.mark.parametrize("bad", [[5], [-1], [0.5], [[0]]])
def test_select_samples_rejects_bad_indexes(bad):
    with pytest.raises(ValueError):
        make(5).select_samples(bad)


def test_select_fields():
    meta = make(3, production_status=[1, 1, 0])
    only_a = meta.select_fields(["a"])
    assert only_a.field_names == ["a"] and only_a.field_schema == {"a": F32}
    assert only_a.global_index_array.tolist() == meta.global_index_array.tolist()
    assert only_a.production_status.tolist() == [1, 1, 0]
    assert meta.select_fields([]).field_names == []
    assert meta.field_names == ["a", "b"]
    with pytest.raises(NotFoundError, match="nope"):
        meta.select_fields(["a", "nope"])
    with pytest.raises(KeyError):  # NotFoundError is a KeyError too
        meta.select_fields(["nope"])


# ---------------------------------------------------------------- chunking


def test_chunk_sizes_first_chunks_longer():
    chunks = make(10).chunk(3)
    assert [c.size for c in chunks] == [4, 3, 3]
    assert [c.global_index_array.tolist() for c in chunks] == [
        [100, 101, 102, 103],
        [104, 105, 106],
        [107, 108, 109],
    ]
    assert all(c.field_names == ["a", "b"] for c in chunks)


def test_chunk_more_chunks_than_rows():
    chunks = make(2).chunk(5)
    assert [c.size for c in chunks] == [1, 1, 0, 0, 0]
    assert [c.size for c in BatchMeta.empty().chunk(2)] == [0, 0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_chunk_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        make(4).chunk(bad)


@given(size=st.integers(0, 40), chunks=st.integers(1, 12))
def test_chunk_then_concat_is_identity(size, chunks):
    meta = make(size, custom_meta=[{"i": i} if i % 3 else {} for i in range(size)])
    meta.set_extra_info("step", 1)
    parts = meta.chunk(chunks)
    assert len(parts) == chunks
    assert sum(p.size for p in parts) == size
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert BatchMeta.concat(parts) == meta


def test_chunk_by_partition_keeps_first_appearance_order():
    meta = make(6, partition=["b", "a", "b", "c", "a", "b"], custom_meta=[{"i": i} for i in range(6)])
    groups = meta.chunk_by_partition()
    assert [g.partition_id_array.tolist() for g in groups] == [["b", "b", "b"], ["a", "a"], ["c"]]
    assert [g.global_index_array.tolist() for g in groups] == [[100, 102, 105], [101, 104], [103]]
    assert groups[0].get_all_custom_meta() == [{"i": 0}, {"i": 2}, {"i": 5}]
    single = make(3).chunk_by_partition()
    assert len(single) == 1 and single[0] == make(3)


# ---------------------------------------------------------------- concat / union / reorder


def test_concat():
    a = BatchMeta([1, 2], "p", {"x": F32}, production_status=[1, 1])
    b = BatchMeta([3], "q", {"x": F32}, custom_meta=[{"t": 1}])
    out = BatchMeta.concat([a, BatchMeta.empty(), b])
    assert out.global_index_array.tolist() == [1, 2, 3]
    assert out.partition_id_array.tolist() == ["p", "p", "q"]
    assert out.production_status.tolist() == [1, 1, 0]
    assert out.get_all_custom_meta() == [{}, {}, {"t": 1}]
    assert out.field_schema == {"x": F32}


def test_concat_of_nothing_is_empty():
    assert BatchMeta.concat([]).size == 0
    only_empty = BatchMeta.concat([BatchMeta([], [], {"x": F32})])
    assert only_empty.size == 0 and only_empty.field_names == ["x"]


def test_concat_mismatching_fields_raises_schema_error():
    a, b = BatchMeta([1], "p", {"x": F32}), BatchMeta([2], "p", {"y": F32})
    with pytest.raises(SchemaError, match="fields"):
        BatchMeta.concat([a, b])
    assert BatchMeta.concat([a, b], validate=False).field_names == ["x"]


def test_concat_mismatching_dtypes_raises_schema_error():
    a = BatchMeta([1], "p", {"x": F32})
    b = BatchMeta([2], "p", {"x": FieldSchema("float16", (4,))})
    with pytest.raises(SchemaError, match="'x'"):
        BatchMeta.concat([a, b])
    c = BatchMeta([3], "p", {"x": FieldSchema("object", (), False, True)})
    with pytest.raises(SchemaError):
        BatchMeta.concat([a, c])


def test_concat_of_different_row_shapes_turns_field_jagged():
    a = BatchMeta([1], "p", {"x": FieldSchema("int64", (3,))})
    b = BatchMeta([2], "p", {"x": FieldSchema("int64", (5,))})
    assert BatchMeta.concat([a, b]).field_schema["x"] == FieldSchema("int64", (-1,), True, False)


def test_concat_merges_extra_info():
    a, b = make(1), make(1)
    a.update_extra_info({"step": 3, "ids": [1], "t": torch.tensor([1.0]), "s": torch.tensor(1)})
    b.update_extra_info(
        {"step": 3, "ids": [2], "t": torch.tensor([2.0]), "s": torch.tensor(2), "only_b": "x"}
    )
    merged = BatchMeta.concat([a, b]).extra_info
    assert merged["step"] == 3 and merged["ids"] == [1, 2] and merged["only_b"] == "x"
    assert merged["t"].tolist() == [1.0, 2.0] and merged["s"].tolist() == [1, 2]
    b.set_extra_info("step", 4)
    with pytest.raises(SchemaError, match="step"):
        BatchMeta.concat([a, b])


def test_union_merges_the_columns_of_the_same_rows():
    a = BatchMeta([1, 2], "p", {"x": F32}, production_status=[1, 1], custom_meta=[{"k": 1}, {}])
    b = BatchMeta([1, 2], "p", {"y": I64}, production_status=[1, 0], custom_meta=[{"k": 2}, {"j": 3}])
    out = a.union(b)
    assert out.global_indexes == [1, 2] and out.field_names == ["x", "y"]
    assert out.production_status.tolist() == [1, 0]
    assert out.get_all_custom_meta() == [{"k": 2}, {"j": 3}]
    assert a.union(BatchMeta.empty()) == a and BatchMeta.empty().union(a) == a and a.union(a) == a
    with pytest.raises(SchemaError, match="global_indexes do not match"):
        a.union(BatchMeta([2, 1], "p", {"y": F32}))  # same rows, other order: not the same rows
    with pytest.raises(SchemaError, match="partition_ids do not match"):
        a.union(BatchMeta([1, 2], "q", {"y": F32}))


def test_reorder_in_place():
    meta = make(4, partition=["a", "b", "c", "d"], custom_meta=[{"i": i} for i in range(4)])
    meta.reorder([2, 0, 3, 1])
    assert meta.global_index_array.tolist() == [102, 100, 103, 101]
    assert meta.partition_id_array.tolist() == ["c", "a", "d", "b"]
    assert [m["i"] for m in meta.get_all_custom_meta()] == [2, 0, 3, 1]
    empty = BatchMeta.empty()
    empty.reorder([])
    assert empty.size == 0


@pytest.mark.parametrize(
    "bad", [[0, 1, 2], [0, 1, 2, 2], [0, 1, 2, 4], [-1, 0, 1, 2], [True] * 4, [0.0, 1, 2, 3]]
)
def test_reorder_rejects_non_permutations(bad):
    meta = make(4)
    with pytest.raises(ValueError):
        meta.reorder(bad)
    assert meta.global_index_array.tolist() == [100, 101, 102, 103]


def test_copy_is_independent():
    meta = make(2, custom_meta=[{"k": [1]}, {}])
    meta.set_extra_info("nested", {"a": 1})
    dup = meta.copy()
    assert dup == meta and dup is not meta
    dup.get_extra_info("nested")["a"] = 2
    dup.update_custom_meta([{"k": [2]}, {"z": 1}])
    dup.add_fields(TensorDict({"c": torch.zeros(2)}, batch_size=[2]))
    assert meta.get_extra_info("nested") == {"a": 1}
    assert meta.get_all_custom_meta() == [{"k": [1]}, {}]
    assert meta.field_names == ["a", "b"] and not meta.is_ready


# ---------------------------------------------------------------- add_fields


def test_add_fields_infers_schemas_and_marks_ready():
    meta = BatchMeta([1, 2], "p")
    td = TensorDict(
        {
            "x": torch.zeros(2, 4),
            "j": jagged(2, 5),
            "txt": NonTensorStack("a", "b"),
            "ids": torch.zeros(2, dtype=torch.int64),
        },
        batch_size=[2],
    )
    assert meta.add_fields(td) is meta
    assert meta.field_names == ["ids", "j", "txt", "x"]
    assert meta.field_schema == {
        "x": FieldSchema("float32", (4,)),
        "j": FieldSchema("float32", (-1, 3), True, False),
        "txt": FieldSchema("object", (), False, True),
        "ids": FieldSchema("int64", ()),
    }
    assert meta.is_ready


def test_add_fields_list_column_and_not_ready():
    meta = BatchMeta([1, 2], "p", {"x": F32})
    meta.add_fields(
        TensorDict({"s": ["a", "b"], "x": torch.zeros(2, 8)}, batch_size=[2]), set_all_ready=False
    )
    assert meta.field_schema["s"].is_non_tensor
    assert meta.field_schema["x"] == FieldSchema("float32", (8,))  # replaced, as TransferQueue does
    assert not meta.is_ready


def test_add_fields_rejects_batch_size_mismatch():
    meta = BatchMeta([1, 2], "p")
    with pytest.raises(SchemaError, match="batch"):
        meta.add_fields(TensorDict({"x": torch.zeros(3)}, batch_size=[3]))
    with pytest.raises(SchemaError):
        meta.add_fields(TensorDict({"x": torch.zeros(2)}, batch_size=[]))
    with pytest.raises(SchemaError):
        meta.add_fields({"x": torch.zeros(2)})
    assert meta.field_names == []


# ---------------------------------------------------------------- custom meta and extra info


def test_update_custom_meta_list_merges_per_row():
    meta = make(3)
    meta.update_custom_meta([{"a": 1}, {}, {"c": 3}])
    meta.update_custom_meta([{"b": 2}, {"b": 2}, {}])
    assert meta.get_all_custom_meta() == [{"a": 1, "b": 2}, {"b": 2}, {"c": 3}]
    meta.update_custom_meta(None)
    with pytest.raises(SchemaError):
        meta.update_custom_meta([{}])
    with pytest.raises(SchemaError):
        meta.update_custom_meta([1, 2, 3])
    meta.clear_custom_meta()
    assert meta.get_all_custom_meta() == [{}, {}, {}]


def test_update_custom_meta_by_global_index():
    meta = make(3)
    meta.update_custom_meta({102: {"x": 1}, 100: {"y": 2}})
    assert meta.get_all_custom_meta() == [{"y": 2}, {}, {"x": 1}]
    with pytest.raises(NotFoundError, match="7"):
        meta.update_custom_meta({7: {"x": 1}})
    with pytest.raises(NotFoundError):
        BatchMeta.empty().update_custom_meta({1: {}})


def test_custom_meta_is_copy_on_write():
    parent = make(4, custom_meta=[{"i": i} for i in range(4)])
    child = parent.chunk(2)[0]
    child.update_custom_meta([{"i": 10}, {"j": 1}])
    assert parent.get_all_custom_meta() == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    got = parent.get_all_custom_meta()
    got[0]["i"] = 42
    assert parent.custom_meta[0] == {"i": 0}


def test_extra_info_api():
    meta = make(1, extra_info={"a": 1})
    assert meta.get_extra_info("a") == 1 and meta.get_extra_info("zz", "d") == "d"
    meta.set_extra_info("b", [1])
    meta.update_extra_info({"c": 3, "a": 0})
    assert meta.has_extra_info("c") and meta.get_all_extra_info() == {"a": 0, "b": [1], "c": 3}
    meta.get_all_extra_info()["b"].append(2)  # a deep copy
    assert meta.get_extra_info("b") == [1]
    assert meta.remove_extra_info("a") == 0 and meta.remove_extra_info("a") is None
    meta.clear_extra_info()
    assert meta.extra_info == {}


# ---------------------------------------------------------------- wire form


def test_wire_round_trip_exact():
    meta = BatchMeta(
        [5, 1, 9, 2],
        ["p", "q", "p", "r"],
        {
            "x": F32,
            "j": FieldSchema("int64", (-1, 2), True, False),
            "s": FieldSchema("object", (), False, True),
        },
        production_status=[1, 0, 1, 1],
        extra_info={"step": 7, "name": "run", "ratio": 0.5, "blob": b"\x00\x01", "nested": {"l": [1, None]}},
        custom_meta=[{"score": 1.5}, {}, {"tags": ["a"], "n": None}, {"d": {"k": True}}],
        end_of_stream=True,
    )
    wire = meta.to_wire()
    assert_plain(wire)
    back = wire_round_trip(meta)
    assert back == meta
    assert list(back.field_schema) == list(meta.field_schema)
    assert back.is_end_of_stream and back.extra_info["blob"] == b"\x00\x01"
    assert back.global_index_array.dtype == np.int64 and back.production_status.dtype == np.int8
    assert back.get_all_custom_meta()[2] == {"tags": ["a"], "n": None}
    assert not back.global_index_array.flags.writeable


@pytest.mark.parametrize("meta", [BatchMeta.empty(), make(3), make(3, custom_meta=[{}, {"a": 1}, {}])])
def test_wire_round_trip_simple_batches(meta):
    assert wire_round_trip(meta) == meta


def test_wire_round_trip_then_operations():
    back = wire_round_trip(make(6, partition=["a", "b"] * 3))
    back.add_fields(TensorDict({"c": torch.zeros(6)}, batch_size=[6]))
    back.update_custom_meta([{"i": i} for i in range(6)])
    back.reorder([5, 4, 3, 2, 1, 0])
    assert back.is_ready and back.global_index_array.tolist() == [105, 104, 103, 102, 101, 100]
    assert [g.size for g in back.chunk_by_partition()] == [3, 3]


def test_to_wire_refuses_non_plain_extra_info():
    meta = make(1, extra_info={"t": torch.zeros(1)})
    with pytest.raises(SchemaError, match="extra_info"):
        meta.to_wire()


def _corrupt(wire, key, value):
    bad = dict(wire)
    bad[key] = value
    return bad


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: {k: v for k, v in w.items() if k != "global_indexes"},
        lambda w: _corrupt(w, "v", 99),
        lambda w: _corrupt(w, "global_indexes", ["|O", b""]),
        lambda w: _corrupt(w, "global_indexes", ["<i8", b"\x00" * 7]),
        lambda w: _corrupt(w, "production_status", ["|i1", b"\x00"]),
        lambda w: _corrupt(w, "partition_ids", {"names": ["a"], "codes": ["<i4", b"\x05\x00\x00\x00" * 3]}),
        lambda w: _corrupt(w, "partition_ids", {"names": [], "codes": None}),
        lambda w: _corrupt(w, "field_schema", [["x", "nonsense", [], False, False]]),
        lambda w: _corrupt(w, "custom_meta", [{}]),
        lambda w: _corrupt(w, "extra_info", [1]),
        lambda w: "not a dict",
    ],
)
def test_from_wire_rejects_malformed(mutate):
    with pytest.raises(ProtocolError):
        BatchMeta.from_wire(mutate(make(3).to_wire()))


# ---------------------------------------------------------------- 100k rows stay columnar


def test_hundred_thousand_rows():
    n = 100_000
    parts = np.array(["rollout", "eval"])[np.arange(n) % 2]
    meta = BatchMeta(np.arange(n) * 3, parts, {"x": F32}, production_status=np.ones(n, np.int8))
    assert meta.size == n and meta.is_ready
    sel = meta.select_samples(np.arange(n - 1, -1, -7))
    assert sel.size == len(range(n - 1, -1, -7))
    assert sel.global_index_array[:3].tolist() == [(n - 1) * 3, (n - 8) * 3, (n - 15) * 3]
    chunks = meta.chunk(7)
    assert [c.size for c in chunks] == [14286] * 5 + [14285] * 2
    assert chunks[1].global_index_array[0] == 14286 * 3
    assert BatchMeta.concat(chunks) == meta
    by_part = meta.chunk_by_partition()
    assert [g.partition_id_array[0] for g in by_part] == ["rollout", "eval"]
    assert by_part[1].global_index_array[:2].tolist() == [3, 9]
    assert wire_round_trip(meta) == meta
    assert meta.samples[-1].global_index == (n - 1) * 3


# ---------------------------------------------------------------- KVBatchMeta


def kv(n: int = 4, **kw) -> KVBatchMeta:
    return KVBatchMeta([f"k{i}" for i in range(n)], [{"i": i} for i in range(n)], "p", ["a", "b"], **kw)


def test_kv_construct():
    meta = kv(3, extra_info={"e": 1})
    assert meta.size == len(meta) == 3 and meta.keys == ["k0", "k1", "k2"]
    assert meta.partition_id == "p" and meta.fields == ["a", "b"] and meta.extra_info == {"e": 1}
    assert KVBatchMeta().size == 0
    assert KVBatchMeta(["x", "y"]).tags == [{}, {}]
    tags = [{"l": [1]}]
    m = KVBatchMeta(["x"], tags)
    tags[0]["l"].append(2)
    assert m.tags == [{"l": [1]}]


@pytest.mark.parametrize(
    "args",
    [(["a", "b"], [{}]), (["a", "a"], [{}, {}]), (["a"], [{}], "p", ["f", "f"])],
)
def test_kv_validation(args):
    with pytest.raises(ValueError):
        KVBatchMeta(*args)


def test_kv_select_keys():
    meta = kv(4)
    sel = meta.select_keys(["k3", "k1"])
    assert sel.keys == ["k3", "k1"] and sel.tags == [{"i": 3}, {"i": 1}]
    assert sel.partition_id == "p" and sel.fields == ["a", "b"]
    assert meta.select_keys([]).size == 0
    with pytest.raises(NotFoundError, match="zz"):
        meta.select_keys(["k0", "zz"])
    with pytest.raises(ValueError):
        meta.select_keys(["k0", "k0"])


def test_kv_reorder():
    meta = kv(3)
    meta.reorder([2, 0, 1])
    assert meta.keys == ["k2", "k0", "k1"] and [t["i"] for t in meta.tags] == [2, 0, 1]
    for bad in ([0, 1], [0, 0, 1], [0, 1, 3], [-1, 0, 1]):
        with pytest.raises(ValueError):
            meta.reorder(bad)
    assert meta.keys == ["k2", "k0", "k1"]


def test_kv_chunk_and_concat():
    meta = kv(5, extra_info={"step": 1})
    chunks = meta.chunk(2)
    assert [c.keys for c in chunks] == [["k0", "k1", "k2"], ["k3", "k4"]]
    assert [c.size for c in meta.chunk(7)] == [1, 1, 1, 1, 1, 0, 0]
    assert KVBatchMeta.concat(chunks) == meta
    assert KVBatchMeta.concat(meta.chunk(7)) == meta
    assert KVBatchMeta.concat([]).size == 0
    with pytest.raises(ValueError):
        meta.chunk(0)


def test_kv_concat_mismatches():
    a = KVBatchMeta(["x"], [{}], "p", ["f"])
    with pytest.raises(SchemaError, match="partition"):
        KVBatchMeta.concat([a, KVBatchMeta(["y"], [{}], "q", ["f"])])
    with pytest.raises(SchemaError, match="fields"):
        KVBatchMeta.concat([a, KVBatchMeta(["y"], [{}], "p", ["g"])])
    with pytest.raises(SchemaError, match="duplicate"):
        KVBatchMeta.concat([a, a])


def test_kv_wire_round_trip():
    meta = kv(3, extra_info={"step": 2, "b": b"\x01"})
    wire = meta.to_wire()
    assert_plain(wire)
    assert wire_round_trip(meta) == meta
    assert wire_round_trip(KVBatchMeta()) == KVBatchMeta()
    with pytest.raises(SchemaError):
        KVBatchMeta(["x"], [{"t": torch.zeros(1)}]).to_wire()
    with pytest.raises(ProtocolError):
        KVBatchMeta.from_wire({"v": 1, "keys": ["a", "a"], "tags": [{}, {}], "partition_id": None})
    with pytest.raises(ProtocolError):
        KVBatchMeta.from_wire({**wire, "keys": ["a"]})


def test_custom_meta_entries_must_be_dicts():
    with pytest.raises(SchemaError):
        BatchMeta([1, 2], "p", custom_meta=[{"a": 1}, [1]])
    wire = make(2).to_wire()
    with pytest.raises(ProtocolError):
        BatchMeta.from_wire({**wire, "custom_meta": [{"a": 1}, 5]})


@pytest.mark.parametrize("args", [([1], [{}]), (["a"], [[1]])])
def test_kv_rejects_non_string_keys_and_non_dict_tags(args):
    with pytest.raises(SchemaError):
        KVBatchMeta(*args)


def test_kv_reorder_rejects_floats_and_bools():
    meta = kv(2)
    for bad in ([0.0, 1.0], [False, True]):
        with pytest.raises(ValueError):
            meta.reorder(bad)
