"""The KV API (``tq_loader.kv``), sync and async, against a real cluster on both placements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

import tq_loader.kv as kv
from tq_loader.errors import NotFoundError, SchemaError

NUM_UNITS = {"ray": 1}  # each Ray actor costs seconds to start; striping is covered on "local"


def test_kv_put_single_row_round_trip(cluster, pid):
    meta = kv.kv_put(
        "k1", pid, fields={"vec": torch.tensor([1.0, 2.0]), "ids": torch.arange(3), "text": "hi", "n": 7},
        tag={"score": 0.5},
    )  # fmt: skip
    assert meta.keys == ["k1"] and meta.partition_id == pid
    assert meta.tags == [{"score": 0.5}] and meta.fields == ["ids", "n", "text", "vec"]
    kv.kv_put(
        "k2", pid, fields={"vec": torch.tensor([3.0, 4.0]), "ids": torch.arange(3) + 10, "text": "yo", "n": 8}
    )
    out = kv.kv_batch_get(["k2", "k1"], pid)  # key order, not insertion order
    assert out.batch_size == torch.Size([2])
    assert torch.equal(out["vec"], torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    assert torch.equal(out["ids"], torch.stack([torch.arange(3) + 10, torch.arange(3)]))
    assert list(out["text"]) == ["yo", "hi"] and list(out["n"]) == [8, 7]
    single = kv.kv_batch_get("k1", pid)
    assert torch.equal(single["vec"], torch.tensor([[1.0, 2.0]]))


def test_kv_put_accepts_a_tensordict_and_a_scalar_tensor(cluster, pid):
    kv.kv_put("a", pid, fields=TensorDict({"x": torch.ones(2, 2), "y": torch.tensor(3.0)}, batch_size=[]))
    kv.kv_put("b", pid, fields={"x": torch.zeros(2, 2), "y": torch.tensor(4.0)})
    out = kv.kv_batch_get(["a", "b"], pid)
    assert out["x"].shape == (2, 2, 2) and out["y"].tolist() == [3.0, 4.0]


def test_kv_jagged_rows_come_back_nested(cluster, pid):
    kv.kv_put("short", pid, fields={"seq": torch.arange(3)})
    kv.kv_put("long", pid, fields={"seq": torch.arange(5)})
    seq = kv.kv_batch_get(["long", "short"], pid)["seq"]
    assert seq.is_nested
    assert [t.tolist() for t in seq.unbind()] == [list(range(5)), list(range(3))]


def test_kv_batch_put_partial_columns_and_tag_merge(cluster, pid):
    kv.kv_batch_put(
        ["a", "b"], pid, fields=TensorDict({"x": torch.tensor([[1], [2]])}, batch_size=[2]),
        tags=[{"step": 1, "keep": "a"}, {"step": 1}],
    )  # fmt: skip
    # a second column for the same rows: the first stays
    meta = kv.kv_batch_put(["b", "a"], pid, fields={"y": torch.tensor([20.0, 10.0])})
    assert meta.fields == ["x", "y"]
    out = kv.kv_batch_get(["a", "b"], pid)
    assert out["x"].squeeze(1).tolist() == [1, 2] and out["y"].tolist() == [10.0, 20.0]
    # tag-only update: merged with dict.update semantics, columns untouched
    meta = kv.kv_batch_put(["a"], pid, tags=[{"step": 2, "new": True}])
    assert meta.tags == [{"step": 2, "keep": "a", "new": True}]
    listing = kv.kv_list(pid)
    assert listing == {pid: {"a": {"step": 2, "keep": "a", "new": True}, "b": {"step": 1}}}
    assert kv.kv_batch_get(["a"], pid)["y"].tolist() == [10.0]
    # overwrite one column of one row
    kv.kv_batch_put(["b"], pid, fields={"y": torch.tensor([-1.0])})
    assert kv.kv_batch_get(["a", "b"], pid)["y"].tolist() == [10.0, -1.0]


def test_kv_batch_get_common_columns_and_select_fields(cluster, pid):
    kv.kv_batch_put(["a", "b"], pid, fields={"x": torch.tensor([1, 2]), "s": NonTensorStack("p", "q")})
    kv.kv_batch_put(["a"], pid, fields={"only_a": torch.tensor([5])})
    both = kv.kv_batch_get(["a", "b"], pid)
    assert set(both.keys()) == {"x", "s"}  # only_a is missing on b: not a common column
    assert set(kv.kv_batch_get(["a"], pid).keys()) == {"x", "s", "only_a"}
    picked = kv.kv_batch_get(["b", "a"], pid, select_fields=["x"])
    assert list(picked.keys()) == ["x"] and picked["x"].tolist() == [2, 1]
    assert list(kv.kv_batch_get(["a"], pid, select_fields="s")["s"]) == ["p"]
    with pytest.raises(NotFoundError, match="only_a"):
        kv.kv_batch_get(["a", "b"], pid, select_fields=["only_a"])
    meta = kv.kv_batch_put(["a", "b"], pid, tags=[{}, {}])
    by_meta = kv.kv_batch_get_by_meta(meta, select_fields=["x"])
    assert by_meta["x"].tolist() == [1, 2]


def test_kv_list_structure_and_clear(cluster, pid):
    other = pid + "-2"
    kv.kv_put("a", pid, fields={"x": torch.ones(1)}, tag={"t": 1})
    kv.kv_put("b", pid, tag={"t": 2})
    kv.kv_put("c", other, fields={"x": torch.ones(1)})
    everything = kv.kv_list()
    assert everything[pid] == {"a": {"t": 1}, "b": {"t": 2}}
    assert everything[other] == {"c": {}}
    assert kv.kv_list(pid) == {pid: {"a": {"t": 1}, "b": {"t": 2}}}
    kv.kv_clear(["a", "never-put"], pid)
    kv.kv_clear("a", pid)  # idempotent
    kv.kv_clear(["x"], pid + "-unknown-partition")
    assert kv.kv_list(pid) == {pid: {"b": {"t": 2}}}
    with pytest.raises(NotFoundError):
        kv.kv_batch_get(["a"], pid)
    kv.kv_clear(["b"], pid)
    kv.kv_clear(["c"], other)
    assert kv.kv_list(pid) == {pid: {}}


def test_kv_misuse_raises_value_error(cluster, pid):
    cases = [
        lambda: kv.kv_put("k", pid),
        lambda: kv.kv_batch_put(["k"], pid),
        lambda: kv.kv_batch_put(["a", "b"], pid, tags=[{}]),
        lambda: kv.kv_batch_put(["a", "b"], pid, fields={"x": torch.ones(3)}),
        lambda: kv.kv_batch_put(["a", "a"], pid, fields={"x": torch.ones(2)}),
        lambda: kv.kv_batch_put(["a"], pid, tags=[{1: "non-str key"}]),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
    assert kv.kv_list(pid) in ({}, {pid: {}})  # no key was created


def test_kv_unknown_key_or_partition(cluster, pid):
    kv.kv_put("k", pid, fields={"x": torch.ones(1)})
    with pytest.raises(NotFoundError, match="missing") as info:
        kv.kv_batch_get(["k", "missing"], pid)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(NotFoundError) as info:
        kv.kv_batch_get(["k"], pid + "-nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert kv.kv_list(pid + "-nope") == {}


def test_kv_failed_write_leaves_nothing_behind(cluster, pid):
    kv.kv_put("old", pid, fields={"x": torch.tensor([1.0, 2.0])}, tag={"v": 1})
    with pytest.raises(
        SchemaError
    ):  # dtype conflict (complex cannot become float) on a new key: it must not appear
        kv.kv_put("new", pid, fields={"x": torch.tensor([1j, 2j])}, tag={"v": 2})
    with pytest.raises(SchemaError):  # ... and on an existing key: neither data nor tags change
        kv.kv_put("old", pid, fields={"x": "text"}, tag={"v": 3})
    assert kv.kv_list(pid) == {pid: {"old": {"v": 1}}}
    assert kv.kv_batch_get("old", pid)["x"].tolist() == [[1.0, 2.0]]
    with pytest.raises(SchemaError):
        kv.kv_put("tagged", pid, tag={"o": object()})
    assert kv.kv_list(pid) == {pid: {"old": {"v": 1}}}


def test_kv_numpy_and_object_values_round_trip(cluster, pid):
    kv.kv_put("k", pid, fields={"arr": np.arange(4, dtype=np.int16), "d": {"a": [1, "b"]}})
    out = kv.kv_batch_get("k", pid)
    (arr,) = list(out["arr"])
    assert isinstance(arr, np.ndarray) and arr.dtype == np.int16 and arr.tolist() == [0, 1, 2, 3]
    assert list(out["d"]) == [{"a": [1, "b"]}]


async def test_kv_async_api(cluster, pid):
    meta = await kv.async_kv_put("a", pid, fields={"x": torch.tensor([1.0])}, tag={"t": 1})
    assert meta.keys == ["a"]
    await kv.async_kv_batch_put(
        ["b", "c"], pid, fields={"x": torch.tensor([[2.0], [3.0]])}, tags=[{}, {"t": 3}]
    )
    out = await kv.async_kv_batch_get(["c", "a"], pid)
    assert out["x"].squeeze(1).tolist() == [3.0, 1.0]
    assert await kv.async_kv_list(pid) == {pid: {"a": {"t": 1}, "b": {}, "c": {"t": 3}}}
    got = await kv.async_kv_batch_get_by_meta(meta)
    assert got["x"].tolist() == [[1.0]]
    await kv.async_kv_clear(["a", "b"], pid)
    assert await kv.async_kv_list(pid) == {pid: {"c": {"t": 3}}}
    with pytest.raises(NotFoundError):
        await kv.async_kv_batch_get(["a"], pid)
    with pytest.raises(ValueError):
        await kv.async_kv_batch_put(["a"], pid)
