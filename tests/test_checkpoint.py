"""Checkpoints: controller state export/import, and save/load of a whole embedded cluster."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tensordict import NonTensorStack, TensorDict

import tq_loader.api as tq
from tq_loader import checkpoint
from tq_loader.checkpoint import (
    async_load_checkpoint,
    async_save_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tq_loader.controller.registry import ControllerState
from tq_loader.controller.snapshot import export_partition, partition_from_state
from tq_loader.controller.state import PartitionState, RowIdAllocator
from tq_loader.errors import CheckpointNotFoundError, NotFoundError, ProtocolError, SchemaError, TQError
from tq_loader.schema import FieldSchema

# uint16/32/64 and float8 are left out: storage units cannot store them yet (index_copy_ has no kernel).
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
]  # fmt: skip
F32 = FieldSchema("float32", (2,))


# --------------------------------------------------------------------------- controller state (no cluster)


def _partition(alloc: RowIdAllocator) -> PartitionState:
    part = PartitionState("p", alloc)
    ids = part.insert(6)
    part.mark_produced(ids[:4], {"a": F32})
    part.mark_produced(ids[:2], {"b": FieldSchema("object", (), False, True)})
    part.mark_consumed("actor", ids[:3])
    part.set_tags(ids[1:3], [{"seqlen": 7}, {"seqlen": 9, "src": b"x"}])
    part.clear(ids[5:])
    kids, _ = part.get_or_create_keys(["k1", "k2"])
    part.mark_produced(kids, {"a": F32})
    part.seal()
    return part


def test_partition_state_round_trip_keeps_everything() -> None:
    alloc = RowIdAllocator()
    part = _partition(alloc)
    state = export_partition(part)
    msgspec.msgpack.decode(msgspec.msgpack.encode(state))  # plain, msgpack-able data
    back = partition_from_state(msgspec.msgpack.decode(msgspec.msgpack.encode(state)), alloc)
    assert export_partition(back) == state
    assert back.sealed and back.num_rows == part.num_rows == 7
    assert back.ready(["a"], "actor").tolist() == part.ready(["a"], "actor").tolist() == [3, 6, 7]
    assert back.production_status()[2].tolist() == part.production_status()[2].tolist()
    assert back.get_tags([1, 2]) == [{"seqlen": 7}, {"seqlen": 9, "src": b"x"}]
    assert back.lookup_keys(["k1", "k2", "nope"]).tolist() == [6, 7, -1]
    assert back.ordinals([6, 7]).tolist() == [6, 7]
    assert back.statistics()["rows_cleared"] == 1
    back.sealed = False
    assert back.insert(1).tolist() == [8]  # the shared allocator continues; no id is reused


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("ids", "data"), np.array([3, 1, 2, 4, 5, 6, 7], "<i8").tobytes(), ProtocolError),  # not ascending
        (("ids", "dtype"), "<i4", ProtocolError),
        (("produced", "data"), b"\x02" * 14, ProtocolError),  # bool bytes other than 0/1
        (("key_ids", "data"), np.array([6, 99], "<i8").tobytes(), ProtocolError),  # key of no row
        (("schemas", "a"), ["evil", [2], False, False], SchemaError),
        (("sealed",), "yes", ProtocolError),
        (("surprise",), 1, ProtocolError),
    ],
)
def test_partition_state_rejects_inconsistent_state(path: tuple[str, ...], value: Any, error: type) -> None:
    alloc = RowIdAllocator()
    state = export_partition(_partition(alloc))
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(error):
        partition_from_state(state, alloc)


def test_controller_state_import_is_all_or_nothing_and_never_reuses_ids() -> None:
    src = ControllerState()
    src.create("a").insert(3)
    src.create("b").insert(2)
    state = src.export_state()
    dst = ControllerState(RowIdAllocator(100))
    dst.create("old").insert(1)
    dst.import_state(state)
    assert dst.list() == ["a", "b"] and dst.export_state()["partitions"] == state["partitions"]
    assert dst.allocator.next_id == 101  # max(saved 5, current 101): stale id 100 cannot alias a new row
    assert dst.get("a").insert(1).tolist() == [101]

    clash = src.export_state()  # partition "b" claims ids 0 and 1, which belong to "a"
    clash["partitions"][1]["ids"] = {"dtype": "<i8", "shape": [2], "data": np.array([0, 1], "<i8").tobytes()}
    for bad in (clash, {**state, "version": 99}, {**state, "next_row_id": 1}, {"partitions": []}):
        with pytest.raises(ProtocolError):
            dst.import_state(bad)
    assert dst.list() == ["a", "b"]  # unchanged by the failed imports


# --------------------------------------------------------------------------- embedded clusters


@pytest.fixture
def start() -> Iterator[Callable[[int], Any]]:
    """``start(num_units)``: a fresh embedded cluster owned by this test; returns its client."""

    def _start(num_units: int) -> Any:
        tq.close()
        os.environ.pop(tq.ENV_ADDRESS, None)
        tq.init({"storage": {"num_units": num_units, "stripe_rows": 1}})  # small data: use every unit
        return tq.get_client()

    tq.close()
    yield _start
    tq.close()
    os.environ.pop(tq.ENV_ADDRESS, None)


def _populate(c: Any) -> dict[str, Any]:
    """Every kind of column and every piece of controller state; returns some values as put."""
    n = 10
    dense = {
        f"d_{str(dt).removeprefix('torch.')}": (torch.arange(n * 3).reshape(n, 3) % 5).to(dt) for dt in DTYPES
    }
    nan = torch.tensor([[float("nan"), float("inf")], [-0.0, -float("inf")]] * (n // 2), dtype=torch.float32)
    jag = torch.nested.nested_tensor(
        [torch.arange(i + 1, dtype=torch.int64) for i in range(n)], layout=torch.jagged
    )
    txt = NonTensorStack(*[f"prompt {i}" for i in range(n)])
    obj = NonTensorStack(*[{"i": i, "xs": [i, None, 1.5], "b": bytes([i])} for i in range(n)])
    with warnings.catch_warnings():  # strided nested (rows differ in two dims) is a torch prototype
        warnings.simplefilter("ignore")
        grid = torch.nested.nested_tensor([torch.full((i + 1, i + 2), float(i)) for i in range(n)])
    td = TensorDict({**dense, "nan": nan, "jag": jag, "grid": grid, "txt": txt, "obj": obj}, batch_size=[n])
    meta = c.put(td, partition_id="train")
    tags = [{"seqlen": int(i)} for i in range(n)]
    meta.update_custom_meta(tags)
    c.set_custom_meta(meta)
    part2 = c.put(TensorDict({"d_float32": torch.ones(4, 3)}, batch_size=[4]), partition_id="train")
    half = c.get_meta([], 3, "train", mode="insert")  # rows with nothing written yet ...
    c.put(TensorDict({"nan": torch.zeros(1, 2)}, batch_size=[1]), metadata=half[:1])  # ... or one field
    c.get_meta(["d_float32"], 3, "train", task_name="actor")  # consumes rows 0..2 for "actor"
    c.get_meta(["jag"], 1, "train", task_name="ref")
    c.clear_samples(part2[3:])  # a cleared row: its id must never come back

    kv = c.kv_retrieve_meta(["k1", "k2", "k3"], "kv", create=True)
    c.put(TensorDict({"v": torch.tensor([[1.0], [2.0], [3.0]])}, batch_size=[3]), metadata=kv)
    kv.update_custom_meta([{"note": "a"}, {}, {"note": "c"}])
    c.set_custom_meta(kv)

    c.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="sealed")
    c.seal("sealed")
    c.create_partition("empty")
    return {"dense": dense, "nan": nan, "jag": jag, "tags": tags}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and a.is_nested and a.layout == torch.strided:
        return b.layout == torch.strided and all(map(_same, a.unbind(), b.unbind()))
    if isinstance(a, torch.Tensor) and a.is_nested:
        return (
            a.layout == b.layout
            and torch.equal(a.offsets(), b.offsets())
            and torch.equal(a.values(), b.values())
        )
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    return a.tolist() == b.tolist()


def _read_all(c: Any) -> dict[tuple[str, str], tuple[list[int], Any]]:
    """Every stored value, per (partition, field): the produced rows' ids and their column."""
    out = {}
    for part in c.export_state()["partitions"]:
        pid = part["partition_id"]
        for field in part["fields"]:
            meta = c.get_meta([field], 1, pid, mode="force_fetch")
            meta = meta.select_samples(meta.production_status == 1)
            out[(pid, field)] = (meta.global_index_array.tolist(), c.get_data(meta)[field])
    return out


def test_round_trip_into_cluster_with_more_units(start: Any, tmp_path: Path) -> None:
    c = start(2)
    put = _populate(c)
    state, data = c.export_state(), _read_all(c)
    kv_before = c.kv_list()
    user_meta = {"step": 7, "name": "run-a", "nested": {"lr": [1e-4, 3]}, "raw": b"\x00\xff"}
    assert save_checkpoint(tmp_path / "ck", user_meta) == str(tmp_path / "ck")

    c = start(3)
    c.put(TensorDict({"junk": torch.ones(5)}, batch_size=[5]), partition_id="train")  # to be replaced
    c.put(TensorDict({"junk": torch.ones(2)}, batch_size=[2]), partition_id="other")
    assert load_checkpoint(tmp_path / "ck") == user_meta

    stats = c.statistics()
    assert stats["storage"]["num_units"] == 3
    assert sorted(c.get_partition_list()) == ["empty", "kv", "sealed", "train"]
    assert c.export_state() == state  # ids, production, consumption, tags, keys, sealed, counters
    after = _read_all(c)
    assert after.keys() == data.keys()
    for key, (ids, value) in data.items():
        assert after[key][0] == ids, key
        assert _same(value, after[key][1]), key
    for name, value in put["dense"].items():  # what came back is what was put, bit for bit
        assert _same(after[("train", name)][1][:10], value)
    assert torch.isnan(after[("train", "nan")][1][0, 0]) and _same(
        after[("train", "nan")][1][:10], put["nan"]
    )
    assert [len(r) for r in after[("train", "jag")][1].unbind()] == list(range(1, 11))
    assert all(u["rows"] > 0 for u in stats["storage"]["units"].values())  # re-striped over all 3
    stored = {(pid, i) for (pid, _), (ids, _) in data.items() for i in ids}
    assert stats["storage"]["rows"] == len(stored)  # the units hold exactly the saved rows: junk is gone
    assert [len(r) for r in after[("train", "grid")][1].unbind()] == list(range(1, 11))

    # the restored cluster keeps working from where it was saved
    ids, consumed = c.get_consumption_status("actor", "train")
    assert consumed[:3].tolist() == [1, 1, 1] and consumed[3:].sum() == 0
    nxt = c.get_meta(["d_float32"], 2, "train", task_name="actor")
    assert nxt.global_index_array.tolist() == [3, 4]
    assert nxt.custom_meta == put["tags"][3:5]
    assert c.kv_list() == kv_before
    kv = c.kv_retrieve_meta(["k2"], "kv")
    assert c.get_data(kv)["v"].tolist() == [[2.0]]
    with pytest.raises(TQError):
        c.put(TensorDict({"x": torch.arange(1)}, batch_size=[1]), partition_id="sealed")
    eos = c.get_meta(["x"], 8, "sealed", task_name="t", allow_partial=True)
    assert eos.size == 4
    new = c.put(TensorDict({"z": torch.ones(1)}, batch_size=[1]), partition_id="train")
    assert new.global_index_array.tolist() == [state["next_row_id"]]  # ids are never reused


def test_load_drops_the_round_ledger(start: Any, tmp_path: Path) -> None:
    c = start(1)
    c.put(TensorDict({"x": torch.arange(8)}, batch_size=[8]), partition_id="p")
    first = c.get_meta(["x"], 2, "p", task_name="t", dp_rank=0, dp_size=1, batch_index=0)
    save_checkpoint(tmp_path / "ck")
    c.get_meta(["x"], 2, "p", task_name="t", dp_rank=0, dp_size=1, batch_index=1)
    assert c.statistics()["controller"]["rounds"]["rounds"] == 2
    assert load_checkpoint(tmp_path / "ck") == {}
    assert c.statistics()["controller"]["rounds"]["rounds"] == 0
    again = c.get_meta(["x"], 2, "p", task_name="t", dp_rank=0, dp_size=1, batch_index=1)
    assert again.global_index_array.tolist() == [2, 3] and first.global_index_array.tolist() == [0, 1]
    c.import_state(c.export_state())  # ImportState on its own (no clear_partition) drops rounds too
    assert c.statistics()["controller"]["rounds"]["rounds"] == 0


async def test_async_twins(start: Any, tmp_path: Path) -> None:
    c = start(2)
    c.put(TensorDict({"x": torch.arange(6)}, batch_size=[6]), partition_id="p")
    await async_save_checkpoint(tmp_path / "ck", {"epoch": 2})
    c.clear_partition("p")
    assert await async_load_checkpoint(tmp_path / "ck") == {"epoch": 2}
    meta = c.get_meta(["x"], 6, "p", mode="force_fetch")
    assert c.get_data(meta)["x"].tolist() == list(range(6))


# --------------------------------------------------------------------------- atomicity


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_dir(
    start: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = start(2)
    c.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="p")
    save_checkpoint(tmp_path / "ck", {"v": 1})
    c.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="p")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_data_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", {"v": 2})
    monkeypatch.undo()
    assert _listing(tmp_path) == ["ck"]

    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:  # the final rename fails after the old one moved aside
        if ".tq-tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path / "ck", {"v": 3})
    monkeypatch.undo()
    assert _listing(tmp_path) == ["ck"]
    assert load_checkpoint(tmp_path / "ck") == {"v": 1}
    assert c.get_meta(["x"], 1, "p", mode="force_fetch").size == 4  # the saved 4 rows, not 8

    save_checkpoint(tmp_path / "ck", {"v": 4})  # a successful save replaces it, leaving nothing behind
    assert _listing(tmp_path) == ["ck"] and load_checkpoint(tmp_path / "ck") == {"v": 4}


def test_save_refuses_bad_targets_and_metadata(start: Any, tmp_path: Path) -> None:
    start(1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TQError, match="not a tq_loader checkpoint"):
        save_checkpoint(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SchemaError):
        save_checkpoint(tmp_path / "ck", {"bad": object()})
    with pytest.raises(SchemaError):
        save_checkpoint(tmp_path / "ck", {1: "non-str key"})  # type: ignore[dict-item]
    assert _listing(tmp_path) == ["mine"]
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        load_checkpoint(tmp_path / "ck")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, NotFoundError)


def test_a_save_killed_midway_is_cleaned_up_or_rolled_back(start: Any, tmp_path: Path) -> None:
    client = start(1)
    client.put(TensorDict({"x": torch.arange(4.0)}, batch_size=[4]), partition_id="p")
    save_checkpoint(tmp_path / "ck", {"step": 1})
    dead = 2**22 + 12345  # above pid_max: no such process
    host = socket.gethostname().replace("-", "_")
    stale_tmp = tmp_path / f".ck.tq-tmp-{host}-{dead}-abc"  # what a SIGKILLed save leaves
    (stale_tmp / "sub").mkdir(parents=True)
    save_checkpoint(tmp_path / "ck", {"step": 2})
    assert not stale_tmp.exists() and _listing(tmp_path) == ["ck"]
    # killed between moving the old checkpoint aside and renaming the new one in: the old one is back
    os.rename(tmp_path / "ck", tmp_path / f".ck.tq-prev-{host}-{dead}-1234")
    assert load_checkpoint(tmp_path / "ck") == {"step": 2}
    assert _listing(tmp_path) == ["ck"]


# --------------------------------------------------------------------------- corrupt / tampered files


def _resign(ck: Path) -> None:
    """Recompute the manifest checksums, as an attacker who edits files would."""
    manifest = json.loads((ck / "manifest.json").read_text())
    for name in manifest["files"]:
        raw = (ck / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (ck / "manifest.json").write_text(json.dumps(manifest))


def _edit_data(ck: Path, edit: Callable[[dict[str, torch.Tensor], list[Any]], None]) -> None:
    with safe_open(str(ck / "data.safetensors"), framework="pt") as f:
        chunks = json.loads(f.metadata()["tq_loader.chunks"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, chunks)
    save_file(tensors, str(ck / "data.safetensors"), metadata={"tq_loader.chunks": json.dumps(chunks)})
    _resign(ck)


def _edit_state(ck: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    state = msgspec.msgpack.decode((ck / "state.msgpack").read_bytes())
    edit(state)
    (ck / "state.msgpack").write_bytes(msgspec.msgpack.encode(state))
    _resign(ck)


class _Exploit:
    """Unpickling this would create a file: the test checks it never happens."""

    marker = ""

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def _pickle_state(ck: Path, marker: Path) -> None:
    _Exploit.marker = str(marker)
    (ck / "state.msgpack").write_bytes(pickle.dumps({"controller": _Exploit()}))
    _resign(ck)


def _set_spec_shape(tensors: dict[str, torch.Tensor], chunks: list[Any]) -> None:
    chunks[0][1][3] = [10**12, 3]  # the spec claims far more rows than its buffer holds


def _ids_beyond(tensors: dict[str, torch.Tensor], chunks: list[Any]) -> None:
    tensors["0.ids"] = tensors["0.ids"] + 1000  # rows the controller does not know


def _drop_buffer(tensors: dict[str, torch.Tensor], chunks: list[Any]) -> None:
    del tensors["0.0"]


def _reverse_ids(state: dict[str, Any]) -> None:
    ids = state["controller"]["partitions"][0]["ids"]
    ids["data"] = np.frombuffer(ids["data"], "<i8")[::-1].tobytes()


def _evil_dtype(state: dict[str, Any]) -> None:
    state["controller"]["partitions"][0]["schemas"]["x"][0] = "__class__"


def _flip_byte(ck: Path) -> None:
    raw = bytearray((ck / "data.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (ck / "data.safetensors").write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (_flip_byte, ProtocolError),  # caught by the checksum
        (lambda ck: (ck / "manifest.json").write_text("{not json"), ProtocolError),
        (lambda ck: ((ck / "data.safetensors").write_bytes(b"\xff" * 64), _resign(ck)), ProtocolError),
        (lambda ck: _edit_data(ck, _set_spec_shape), ProtocolError),
        (lambda ck: _edit_data(ck, _ids_beyond), ProtocolError),
        (lambda ck: _edit_data(ck, _drop_buffer), ProtocolError),
        (lambda ck: _edit_state(ck, _reverse_ids), ProtocolError),
        (lambda ck: _edit_state(ck, _evil_dtype), SchemaError),
        (lambda ck: _edit_state(ck, lambda s: s.update(metadata=b"\xc1")), ProtocolError),
    ],
)
def test_tampered_checkpoint_raises_typed_error_and_leaves_cluster_alone(
    start: Any, tmp_path: Path, tamper: Callable[[Path], Any], error: type
) -> None:
    c = start(2)
    c.put(TensorDict({"x": torch.arange(6)}, batch_size=[6]), partition_id="p")
    save_checkpoint(tmp_path / "ck")
    c.put(TensorDict({"y": torch.ones(2)}, batch_size=[2]), partition_id="live")
    tamper(tmp_path / "ck")
    with pytest.raises(error):
        load_checkpoint(tmp_path / "ck")
    assert sorted(c.get_partition_list()) == ["live", "p"]  # validated before anything was touched
    meta = c.get_meta(["y"], 2, "live", mode="force_fetch")
    assert c.get_data(meta)["y"].tolist() == [1.0, 1.0]


def test_pickled_payload_is_never_executed(start: Any, tmp_path: Path) -> None:
    start(1)
    save_checkpoint(tmp_path / "ck")
    marker = tmp_path / "pwned"
    _pickle_state(tmp_path / "ck", marker)
    with pytest.raises(ProtocolError):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_metadata_defaults_and_empty_cluster(start: Any, tmp_path: Path) -> None:
    c = start(2)
    save_checkpoint(tmp_path / "sub" / "ck")  # parents are created
    c.put(TensorDict({"x": torch.arange(3)}, batch_size=[3]), partition_id="p")
    assert load_checkpoint(str(tmp_path / "sub" / "ck")) == {}
    assert c.get_partition_list() == []
