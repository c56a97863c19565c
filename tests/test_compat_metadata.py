"""TransferQueue 0.1.11 compatibility of metadata, samplers and non-tensor columns (issue 10 items
3, 4, 10, 13, 14, 15 and issue 7 item 8): the types, names and behaviour TransferQueue code relies on,
and the loud errors / one-time warnings where tq_loader differs on purpose."""

from __future__ import annotations

import pickle
import warnings

import msgspec
import numpy as np
import pytest
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from tq_loader import _meta_util
from tq_loader.codec_objects import non_tensor_rows, numpy_column
from tq_loader.errors import NotFoundError, SchemaError, TQError
from tq_loader.metadata import BatchMeta, KVBatchMeta, extract_field_schema
from tq_loader.metadata_kv import KeysNotInBatchError
from tq_loader.samplers import (
    BaseSampler,
    GRPOGroupNSampler,
    RankAwareSampler,
    SeqlenBalancedSampler,
    SequentialSampler,
    get_seqlen_balanced_partitions,
)
from tq_loader.schema import FieldSchema, schema_of

F32 = {"dtype": torch.float32, "shape": (2,), "is_nested": False, "is_non_tensor": False}
I64 = {"dtype": torch.int64, "shape": (4,), "is_nested": False, "is_non_tensor": False}


@pytest.fixture(autouse=True)
def fresh_one_time_warnings():
    """One-time warnings are per process; each test sees its own first time."""
    saved = set(_meta_util._WARNED)
    _meta_util._WARNED.clear()
    yield
    _meta_util._WARNED.clear()
    _meta_util._WARNED.update(saved)


def batch(ids=(0, 1, 2), fields=None, **kw) -> BatchMeta:
    return BatchMeta(list(ids), ["p"] * len(ids), {"a": F32} if fields is None else fields, **kw)


# ---------------------------------------------------------------- item 3: TransferQueue's public types


def test_public_attributes_have_transferqueue_types():
    meta = batch(custom_meta=[{"u": 1}, {}, {"u": 3}], production_status=np.array([1, 1, 0], np.int8))
    assert meta.global_indexes == [0, 1, 2] and meta.partition_ids == ["p", "p", "p"]
    assert meta.global_indexes + [9] == [0, 1, 2, 9]  # noqa: RUF005 (the point: lists, + concatenates)
    assert isinstance(meta.production_status, np.ndarray) and meta.production_status.dtype == np.int8
    assert isinstance(meta.field_schema, dict) and meta.field_schema["a"]["dtype"] is torch.float32
    assert meta.custom_meta == [{"u": 1}, {}, {"u": 3}] and isinstance(meta.custom_meta, list)
    assert isinstance(meta.extra_info, dict) and meta.field_names == ["a"]
    row = meta[1]  # TransferQueue: one row is a BatchMeta of size 1
    assert isinstance(row, BatchMeta) and row.global_indexes == [1] and row.custom_meta == [{}]
    view = meta.samples[2]
    assert (view.global_index, view.partition_id, view.production_status) == (2, "p", 0)
    assert view.fields["a"]["shape"] == (2,) and view.custom_meta == {"u": 3}
    kv = KVBatchMeta(["k0", "k1"], [{"t": 1}, {}], "p", ["f"])
    assert kv.keys == ["k0", "k1"] and kv.tags == [{"t": 1}, {}] and kv.fields == ["f"]


def test_custom_meta_is_live_as_in_transferqueue():
    meta = batch(custom_meta=[{"u": 1}, {}, {}])
    earlier = meta[0:2]
    meta.custom_meta[0]["u"] = 10  # TransferQueue code edits the rows' dicts in place
    meta.custom_meta[1] = {"v": 2}
    assert meta.custom_meta[:2] == [{"u": 10}, {"v": 2}] and meta.get_all_custom_meta()[0] == {"u": 10}
    assert earlier.custom_meta == [{"u": 1}, {}]  # batches derived before keep their own rows
    child = meta.select_samples([0])
    child.custom_meta[0]["u"] = 99  # and derived ones are independent
    assert meta.custom_meta[0] == {"u": 10}
    meta.update_custom_meta([{"w": 1}, {}, {}])  # merges into the live dicts
    assert meta.custom_meta[0] == {"u": 10, "w": 1}
    back = BatchMeta.from_wire(msgspec.msgpack.decode(msgspec.msgpack.encode(meta.to_wire())))
    assert back.custom_meta == meta.custom_meta
    meta.custom_meta.append({})  # a row count the batch does not have
    with pytest.raises(SchemaError, match="one per row"):
        meta.chunk(2)


def test_production_status_is_read_only_but_assignable():
    meta = batch()
    with pytest.raises(ValueError, match="read-only"):  # shared with derived batches: loud, not lost
        meta.production_status[0] = 1
    meta.production_status = np.ones(3, np.int8)
    assert meta.is_ready


def test_custom_backend_meta_follows_rows_and_fields():
    meta = BatchMeta(
        [0, 1, 2], ["p"] * 3, {"a": F32, "b": I64},
        _custom_backend_meta=[{"a": {"key": i}, "b": {"key": -i}} for i in range(3)],
    )  # fmt: skip
    assert [c._custom_backend_meta for c in meta.chunk(2)][1] == [{"a": {"key": 2}, "b": {"key": -2}}]
    assert meta.select_fields(["a"])._custom_backend_meta[1] == {"a": {"key": 1}}
    fresh = batch()
    fresh._custom_backend_meta[0]["a"] = {"storage_key": "k"}  # lazily created, then live
    assert fresh._custom_backend_meta[0] == {"a": {"storage_key": "k"}}
    assert BatchMeta.from_wire(meta.to_wire())._custom_backend_meta == meta._custom_backend_meta


def test_pickle_keeps_arrays_read_only_and_schema_dict_like():
    meta = batch(extra_info={"step": 1}, custom_meta=[{"s": 0.5}, {}, {}])
    back = pickle.loads(pickle.dumps(meta))
    assert back == meta and back.field_schema["a"]["dtype"] is torch.float32
    assert not back.global_index_array.flags.writeable and not back.production_status.flags.writeable


# ---------------------------------------------------------------- item 4: union merges columns of the same rows


def test_union_merges_fields_status_and_custom_meta():
    a = batch(custom_meta=[{"a": 1}, {"a": 2}, {}], production_status=[1, 0, 1], extra_info={"s": 1})
    b = batch(fields={"b": I64}, custom_meta=[{"b": 10}, {}, {"a": 9}], production_status=[1, 1, 1])
    b.set_extra_info("t", 2)
    out = a.union(b)
    assert out.global_indexes == [0, 1, 2] and out.field_names == ["a", "b"]  # nothing of b dropped
    assert out.field_schema["b"]["dtype"] is torch.int64
    assert out.production_status.tolist() == [1, 0, 1] and not out.is_ready  # AND
    assert out.custom_meta == [{"a": 1, "b": 10}, {"a": 2}, {"a": 9}]
    assert out.extra_info == {"s": 1, "t": 2}
    overlapping = batch().union(batch(fields={"a": I64}))  # other's definition wins
    assert overlapping.field_schema["a"]["shape"] == (4,)


def test_union_of_other_rows_raises_instead_of_appending():
    a = batch()
    for other, what in (
        (batch(ids=(1, 2, 3)), "global_indexes"),
        (batch(ids=(0, 1)), "global_indexes"),  # the old meaning (append missing rows) is gone
        (BatchMeta([0, 1, 2], ["p", "q", "p"], {"b": I64}), "partition_ids"),
    ):
        with pytest.raises(SchemaError, match=f"{what} do not match.*concat") as info:
            a.union(other)
        assert isinstance(info.value, ValueError)
    with pytest.raises(SchemaError, match="needs a BatchMeta"):
        a.union(42)  # type: ignore[arg-type]


def test_union_with_an_empty_side_is_a_copy():
    a = batch(extra_info={"k": 1})
    for out in (a.union(BatchMeta.empty()), BatchMeta.empty().union(a), a.union(None)):
        assert out is not a and out == a
        out.extra_info["new"] = 1
        assert "new" not in a.extra_info


# ---------------------------------------------------------------- item 10: dict-like field schemas


def test_field_schema_entries_read_like_transferqueue_dicts():
    fs = FieldSchema("bfloat16", (3, -1), True, False)
    assert fs["dtype"] is torch.bfloat16 and fs["shape"] == (3, -1) and fs["is_nested"] is True
    assert dict(fs) == {"dtype": torch.bfloat16, "shape": (3, -1), "is_nested": True, "is_non_tensor": False}
    assert list(fs) == list(fs.keys()) == ["dtype", "shape", "is_nested", "is_non_tensor"] and len(fs) == 4
    assert fs.get("per_sample_shapes") is None and "dtype" in fs and "nope" not in fs
    assert {**fs}["dtype"] is torch.bfloat16 and dict(fs.items()) == dict(fs)
    obj = FieldSchema("object", (), False, True)
    assert obj["dtype"] is None and obj["shape"] is None and obj["is_non_tensor"]
    assert fs == dict(fs) and FieldSchema("float32", (2,)) == F32  # equal to its dict form
    with pytest.raises(KeyError):
        fs["per_sample_shapes"]
    with pytest.raises(TypeError):
        fs["dtype"] = torch.float16  # type: ignore[index]
    # the wire form is unchanged: a 4-element array
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(fs)) == ["bfloat16", [3, -1], True, False]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(fs), type=FieldSchema) == fs


def test_field_schema_round_trips_through_transferqueue_style_construction():
    meta = batch(
        fields={"a": F32, "s": {"dtype": None, "shape": None, "is_nested": False, "is_non_tensor": True}}
    )
    again = BatchMeta(meta.global_indexes, meta.partition_ids, field_schema=meta.field_schema)
    assert again.field_schema == meta.field_schema
    assert {k: dict(v) for k, v in meta.field_schema.items()}["s"]["dtype"] is None


# ---------------------------------------------------------------- item 13: keyword names and methods


def test_transferqueue_keyword_names():
    meta = batch(ids=(5, 6, 7), fields={"a": F32, "b": I64})
    assert meta.select_fields(field_names=["b"]).field_names == ["b"]
    assert meta.select_samples(sample_indices=[2, 0]).global_indexes == [7, 5]
    meta.reorder(indices=[1, 2, 0])
    assert meta.global_indexes == [6, 7, 5]
    kv = KVBatchMeta(["x", "y", "z"], [{}, {"i": 1}, {}], "p")
    assert kv.select_keys(keys_to_select=["y"]).tags == [{"i": 1}]


def test_get_dtypes_and_get_shapes():
    meta = batch(fields={"a": F32, "s": {"dtype": None, "is_non_tensor": True}})
    assert meta.get_dtypes("a") == [torch.float32] * 3 and meta.get_shapes("a") == [(2,)] * 3
    assert meta.get_dtypes("s") == [None] * 3 and meta.get_shapes("s") == [None] * 3
    with pytest.raises(KeyError, match="'zz'") as info:
        meta.get_dtypes("zz")
    assert isinstance(info.value, NotFoundError)
    jag = batch(fields={"j": {"dtype": torch.float32, "shape": None, "per_sample_shapes": [(2, 3), (4, 3)]}})
    with pytest.warns(UserWarning, match="does not track per-row sizes"):
        assert jag.get_shapes("j") == [(-1, 3)] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per field, not on every call
        jag.get_shapes("j")


def test_extract_field_schema_and_add_fields_give_dict_like_entries():
    td = TensorDict(
        {"t": torch.zeros(2, 4), "s": NonTensorStack("a", "b"), "i": torch.arange(2)}, batch_size=[2]
    )
    schema = extract_field_schema(td)
    assert (
        schema["t"]["shape"] == (4,) and schema["s"]["is_non_tensor"] and schema["i"]["dtype"] is torch.int64
    )
    meta = BatchMeta([0, 1], ["p", "p"]).add_fields(td)
    assert meta.field_schema == schema and meta.is_ready


def test_kv_select_keys_errors_have_transferqueue_types():
    kv = KVBatchMeta(["a", "b"], [{}, {}])
    with pytest.raises(RuntimeError, match="not found") as info:  # TransferQueue raises RuntimeError
        kv.select_keys(["zz"])
    assert isinstance(info.value, KeysNotInBatchError) and isinstance(info.value, KeyError)
    with pytest.raises(ValueError, match="duplicate"):
        kv.select_keys(["a", "a"])
    with pytest.raises(ValueError, match="does not match"):
        kv.reorder([0])


def test_select_fields_of_unknown_names_is_loud():
    """Deliberate difference: TransferQueue silently leaves unknown names out."""
    with pytest.raises(NotFoundError, match="select only fields"):
        batch().select_fields(["a", "typo"])


# ---------------------------------------------------------------- item 14: NonTensorData columns, one value per row


def test_non_tensor_data_list_is_one_value_per_row():
    rows = [{"i": 0}, {"i": 1}]
    assert non_tensor_rows(NonTensorData(data=rows, batch_size=(2,))) == rows
    assert non_tensor_rows(NonTensorData(data="same", batch_size=(3,))) == ["same"] * 3
    assert non_tensor_rows(NonTensorStack("a", "b")) == ["a", "b"]
    arr = np.array([b"x", b"yy"], dtype="|S4")  # what tensordict wraps a bytes column in
    assert non_tensor_rows(NonTensorData(data=arr, batch_size=(2,))) == [b"x", b"yy"]
    with pytest.warns(UserWarning, match="every row gets the whole value"):
        assert non_tensor_rows(NonTensorData(data=[1, 2, 3], batch_size=(2,)), "f") == [[1, 2, 3]] * 2


def test_non_tensor_data_column_round_trips_per_row(local_client):
    rows = [{"i": i, "text": f"t{i}"} for i in range(3)]
    td = TensorDict(
        {
            "nd": NonTensorData(data=rows, batch_size=(3,)),
            "bytes": np.array([b"a", b"bb", b"c"], dtype="|S10"),
            "obj": np.array(["x", 1, None], dtype=object),
            "x": torch.arange(3),
        },
        batch_size=[3],
    )
    meta = local_client.put(td, partition_id="compat-nd")
    got = local_client.get_data(meta)
    assert got["nd"].tolist() == rows
    assert got["bytes"].tolist() == [b"a", b"bb", b"c"] and got["obj"].tolist() == ["x", 1, None]
    assert meta.field_schema["nd"]["is_non_tensor"] and meta.field_schema["x"]["dtype"] is torch.int64
    plain = local_client.put(
        {"b": np.array([b"p", b"q"], dtype="S1"), "o": np.array([{"k": 1}, [2]], dtype=object)},
        partition_id="compat-np",
    )
    back = local_client.get_data(plain)
    assert back["b"].tolist() == [b"p", b"q"] and back["o"].tolist() == [{"k": 1}, [2]]


# ---------------------------------------------------------------- issue 7 item 8: refused numpy dtypes


@pytest.mark.parametrize(
    ("dtype", "advice"),
    [
        ("datetime64[D]", "astype\\('int64'\\).*datetime_as_string"),
        ("timedelta64[s]", "astype\\('int64'\\)"),
        ([("a", "<i4"), ("b", "<f4")], "its own column"),
        ("float128", "float64"),
    ],
)
def test_refused_numpy_dtypes_name_the_field_and_say_what_to_do(local_client, dtype, advice):
    arr = np.zeros(2, dtype=dtype)
    pattern = f"field 'when': numpy dtype .* is not supported; .*{advice}"
    for call in (
        lambda: numpy_column(arr, "when"),
        lambda: schema_of(arr, "when"),
        lambda: non_tensor_rows(NonTensorData(data=arr, batch_size=(2,)), "when"),
        lambda: local_client.put({"when": arr}, partition_id="compat-dt"),
    ):
        with pytest.raises(SchemaError, match=pattern):
            call()


# ---------------------------------------------------------------- item 15: samplers as TransferQueue's


def test_sequential_batch_size_zero_and_order():
    assert SequentialSampler().sample([0, 1, 2, 3], 0) == ([], [])
    assert SequentialSampler().sample([10, 5, 15, 20], 3) == ([10, 5, 15], [10, 5, 15])
    with pytest.raises(ValueError, match=">= 0") as info:  # TransferQueue slices with a negative size
        SequentialSampler().sample([0, 1, 2], -1)
    assert isinstance(info.value, TQError)


def test_grpo_direct_call_uses_transferqueue_run_rule():
    sampler = GRPOGroupNSampler(n_samples_per_prompt=4)
    assert sampler.sample([3, 4, 5, 6, 9, 10, 11, 12], 8)[0] == [3, 4, 5, 6, 9, 10, 11, 12]
    assert sampler.sample([0, 1, 2, 3], 0) == ([], [])
    with pytest.raises(ValueError, match="must be positive"):
        GRPOGroupNSampler(n_samples_per_prompt=0)
    with pytest.raises(ValueError, match="must be a multiple of n_samples_per_prompt"):
        sampler.sample(list(range(8)), 7)


def test_rank_aware_direct_calls_cache_per_rank_and_batch():
    sampler = RankAwareSampler()
    assert sampler.sample([0, 1, 2, 3, 4, 5], 2, 0, 0, "t", "p") == ([0, 1], [0, 1])
    assert sampler.sample([2, 3, 4, 5], 2, 0, 0, "t", "p") == ([0, 1], [0, 1])  # same rank, same batch
    assert sampler.sample([2, 3, 4, 5], 2, 1, 0, "t", "p") == ([2, 3], [2, 3])  # another rank samples
    assert sampler.sample([0], 2, 0, 1, "t", "p") == ([], [])  # too few: nothing, nothing cached
    assert sampler._states == {"p": {"t": {0: {0: [0, 1]}, 1: {0: [2, 3]}}}}
    assert sampler.has_cached_result("p", "t", {"dp_rank": 1, "batch_index": 0})
    assert not sampler.has_cached_result("p", "t", {"dp_rank": 0, "batch_index": 1})
    restored = RankAwareSampler()
    restored.load_checkpoint(sampler.save_checkpoint())
    assert restored._states == sampler._states
    sampler.clear_cache("p")
    assert sampler._states == {}
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        sampler.sample([0, 1], 1, -1, 0, "t", "p")
    assert sampler.sample([0, 1, 2], 0, 0, 0, "t", "p") == ([], [])


class _Partition:
    def __init__(self, lengths: dict[int, int]) -> None:
        self.lengths = lengths

    def get_custom_meta(self, global_indices: list[int]) -> dict[int, dict[str, int]]:
        return {i: {"total_lengths": self.lengths[i]} for i in global_indices}


def test_seqlen_balanced_direct_calls_balance_and_cache_every_rank():
    sampler = SeqlenBalancedSampler(n_samples_per_prompt=1, dp_size=2)
    part = _Partition({0: 100, 1: 100, 2: 10, 3: 10})
    kw = {"task_name": "t", "partition_id": "p0", "batch_index": 0, "partition": part}
    first, _ = sampler.sample([0, 1, 2, 3], 2, dp_rank=0, **kw)
    second, _ = sampler.sample([9, 9, 9], 2, dp_rank=1, **kw)  # answered from the cache
    assert sorted(first + second) == [0, 1, 2, 3]
    assert sum(part.lengths[i] for i in first) == sum(part.lengths[i] for i in second) == 110
    assert {r: sampler._states["p0"]["t"][r][0][0] for r in (0, 1)} == {0: first, 1: second}
    assert sampler.sample([0, 1, 2, 3], 2, dp_rank=5, **kw) == ([], [])
    assert sampler.sample([0, 1], 2, dp_rank=0, **{**kw, "batch_index": 1}) == ([], [])  # too few
    sampler.clear_cache("p0")
    assert "p0" not in sampler._states and not sampler._balanced_cache
    with pytest.raises(ValueError, match="dp_size must be positive"):
        SeqlenBalancedSampler(dp_size=0)


def test_balanced_partition_helper_asserts_like_transferqueue():
    parts = get_seqlen_balanced_partitions([10, 20, 30, 40], 2, True)
    assert sorted(parts[0] + parts[1]) == [0, 1, 2, 3] and len(parts[0]) == len(parts[1]) == 2
    for args in (([10, 20, 30], 2, True), ([10], 3, False)):
        with pytest.raises(AssertionError) as info:
            get_seqlen_balanced_partitions(*args)
        assert isinstance(info.value, (ValueError, TQError))


def test_controller_entry_waits_for_enough_rows_but_direct_calls_get_what_is_ready():
    """TransferQueue's controller waits until batch_size rows are ready before it samples; here
    that rule is ``BaseSampler.sample_batch``, so a TransferQueue-style sampler that returns what is
    ready is never served short by the controller."""

    class UpTo(BaseSampler):
        def sample(self, ready_indexes, batch_size, **kwargs):
            return list(ready_indexes)[:batch_size], list(ready_indexes)[:batch_size]

    assert UpTo().sample([1, 2], 3) == ([1, 2], [1, 2])
    assert UpTo().sample_batch([1, 2], 3) == ([], [])
    assert UpTo().sample_batch([1, 2], 3, allow_partial=True) == ([1, 2], [1, 2])
    assert UpTo().sample_round([1, 2, 3], 2, 2) == ([], [])
    assert SequentialSampler().sample_round([1, 2, 3, 4], 2, 2) == ([[1, 2], [3, 4]], [1, 2, 3, 4])
