"""Tests of tq_loader.storage.columns, tq_loader.storage.unit and the unit's service (no network)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_loader import protocol as p
from tq_loader.codec import decode_columns, encode_columns
from tq_loader.errors import CapacityError, NotFoundError, ProtocolError, SchemaError
from tq_loader.schema import FieldSchema
from tq_loader.storage.columns import assemble, ragged_range, take_rows, target_kind
from tq_loader.storage.export import decode_export
from tq_loader.storage.service import StorageUnitService
from tq_loader.storage.unit import SimpleStorageUnit, _IdIndex
from tq_loader.transport import RequestContext

F32 = FieldSchema("float32", (2,))
JAG = FieldSchema("float32", (-1,), True)
OBJ = FieldSchema("object", (), False, True)


def njt(rows: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    offsets = torch.tensor([0, *np.cumsum([r.shape[dim] for r in rows])], dtype=torch.int64)
    return torch.nested.nested_tensor_from_jagged(torch.cat(rows, dim), offsets, jagged_dim=dim + 1)


def rows_of(value) -> list:
    return list(value.unbind()) if isinstance(value, torch.Tensor) else list(value)


def assert_rows_equal(value, expected: list) -> None:
    got = rows_of(value)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b


# --------------------------------------------------------------------------- columns.py


def test_ragged_range_matches_python() -> None:
    starts, lens = np.array([5, 0, 9, 2]), np.array([2, 0, 3, 1])
    expected = [i for s, n in zip(starts, lens, strict=True) for i in range(s, s + n)]
    assert ragged_range(starts, lens).tolist() == expected
    assert ragged_range(np.array([], np.int64), np.array([], np.int64)).size == 0


def test_take_rows_dense_copies() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    out = take_rows(x, np.array([4, 1, 1]))
    assert torch.equal(out, x[[4, 1, 1]])
    out.zero_()
    assert x[4, 0] == 8.0


@pytest.mark.parametrize("dim", [0, 1])
def test_take_rows_jagged_any_ragged_dim(dim: int) -> None:
    shapes = [(3, 2), (1, 2), (4, 2)] if dim == 0 else [(2, 3), (2, 1), (2, 4)]
    rows = [torch.randn(s) for s in shapes]
    out = take_rows(njt(rows, dim), np.array([2, 0]))
    assert out.layout == torch.jagged and out._ragged_idx == dim + 1
    assert_rows_equal(out, [rows[2], rows[0]])


def test_take_rows_jagged_with_holes() -> None:
    values = torch.arange(10.0)
    nt = torch.nested.narrow(
        values.reshape(2, 5), 1, torch.tensor([0, 2]), torch.tensor([3, 2]), layout=torch.jagged
    )
    assert nt.lengths() is not None
    assert_rows_equal(
        take_rows(nt, np.array([1, 0])), [torch.tensor([7.0, 8.0]), torch.tensor([0.0, 1.0, 2.0])]
    )


def test_take_rows_rows_and_objects() -> None:
    rows = [torch.ones(2, 3), torch.zeros(1, 2), torch.full((3, 1), 2.0)]
    strided = torch.nested.nested_tensor(rows)
    assert_rows_equal(take_rows(strided, np.array([2, 0])), [rows[2], rows[0]])
    assert_rows_equal(take_rows(rows, np.array([1])), [rows[1]])
    assert take_rows(["a", {"b": 1}, [2]], np.array([2, 0])) == [[2], "a"]


def test_assemble_dense_scatters_in_request_order() -> None:
    a, b = torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    out = assemble([(np.array([1, 3]), a), (np.array([0, 2]), b)], 4, F32)
    assert torch.equal(out[:, 0], torch.arange(4.0))
    out.add_(1)  # writable, and independent of the parts
    assert a[0, 0] == 1.0


def test_assemble_jagged_from_mixed_parts() -> None:
    dense = torch.arange(4.0).reshape(2, 2)  # a unit whose rows happen to share a shape
    jag = njt([torch.tensor([9.0]), torch.tensor([7.0, 7.0, 7.0])])
    out = assemble([(np.array([3, 0]), dense), (np.array([1, 2]), jag)], 4, JAG)
    assert out.layout == torch.jagged
    assert_rows_equal(out, [dense[1], torch.tensor([9.0]), torch.tensor([7.0, 7.0, 7.0]), dense[0]])


def test_assemble_nested_schema_gives_jagged_even_for_equal_shapes() -> None:
    out = assemble([(np.array([0, 1]), torch.ones(2, 3))], 2, JAG)
    assert out.is_nested and out.layout == torch.jagged
    empty = assemble([], 0, FieldSchema("int64", (-1, 4), True))
    assert empty.layout == torch.jagged and empty.size(0) == 0


def test_assemble_ragged_dim_one_and_rows_kind() -> None:
    rows = [torch.randn(2, 3), torch.randn(2, 1)]
    out = assemble([(np.array([1, 0]), njt(rows, 1))], 2, FieldSchema("float32", (2, -1), True))
    assert out._ragged_idx == 2
    assert_rows_equal(out, [rows[1], rows[0]])
    multi = [torch.ones(2, 3), torch.zeros(1, 2)]
    schema = FieldSchema("float32", (-1, -1), True)
    assert target_kind(schema) == ("rows", -1)
    out = assemble(
        [(np.array([1]), multi[:1]), (np.array([0]), torch.nested.nested_tensor(multi[1:]))], 2, schema
    )
    assert_rows_equal(out, [multi[1], multi[0]])


def test_assemble_objects_and_errors() -> None:
    out = assemble([(np.array([1]), [[1, 2]]), (np.array([0, 2]), ["a", {"k": None}])], 3, OBJ)
    assert out == ["a", [1, 2], {"k": None}]
    with pytest.raises(SchemaError, match="exactly once"):
        assemble([(np.array([0, 0]), torch.ones(2, 2))], 2, F32)
    with pytest.raises(SchemaError, match="float64"):
        assemble([(np.array([0]), torch.ones(1, 2, dtype=torch.float64))], 1, F32)
    with pytest.raises(SchemaError, match="shape"):
        assemble([(np.array([0]), torch.ones(1, 3))], 1, F32)


# --------------------------------------------------------------------------- unit.py

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64,
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_round_trip_every_dtype(dtype: torch.dtype) -> None:
    unit = SimpleStorageUnit()
    x = (torch.randn(5, 3, 2) * 10).to(dtype)
    unit.put("p", [4, 0, 9, 2, 7], {"x": x})
    got = unit.get("p", [2, 4, 7], ["x"])["x"]
    assert got.dtype == dtype
    assert torch.equal(got, x[[3, 0, 4]])


def test_every_kind_round_trip_and_reorder() -> None:
    unit = SimpleStorageUnit()
    jag = [torch.randn(n, 4) for n in (3, 1, 0, 5)]
    multi = [torch.randn(1, 2), torch.randn(3, 1), torch.randn(2, 2), torch.randn(1, 1)]
    objs = ["text", {"a": [1, 2]}, None, np.arange(3)]
    nan = torch.tensor([float("nan"), 1.0, float("-inf"), 0.0])
    unit.put(
        "p", [10, 11, 12, 13],
        {"jag": njt(jag), "multi": torch.nested.nested_tensor(multi), "obj": objs, "nan": nan},
    )  # fmt: skip
    out = unit.get("p", [13, 11, 10], ["jag", "multi", "obj", "nan"])
    assert out["jag"].layout == torch.jagged
    assert_rows_equal(out["jag"], [jag[3], jag[1], jag[0]])
    assert_rows_equal(out["multi"], [multi[3], multi[1], multi[0]])
    assert (
        out["obj"][1] == {"a": [1, 2]}
        and out["obj"][2] == "text"
        and np.array_equal(out["obj"][0], np.arange(3))
    )
    torch.testing.assert_close(out["nan"], nan[[3, 1, 0]], equal_nan=True)


def test_growth_beyond_initial_capacity() -> None:
    unit = SimpleStorageUnit()
    for start in range(0, 200, 7):
        ids = np.arange(start, min(start + 7, 200))
        unit.put(
            "p",
            ids,
            {
                "x": torch.from_numpy(ids).float().unsqueeze(1).repeat(1, 3),
                "j": njt([torch.ones(int(i) % 4) for i in ids]),
            },
        )
    assert unit.rows == 200
    ids = np.random.default_rng(0).permutation(200)
    got = unit.get("p", ids, ["x", "j"])
    assert torch.equal(got["x"][:, 0], torch.from_numpy(ids).float())
    assert got["j"].offsets().diff().tolist() == (ids % 4).tolist()


def test_freed_slots_are_reused() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", np.arange(10), {"x": torch.arange(10.0)})
    assert unit.drop("p", [1, 3, 5, 7, 9]) == 5
    assert unit.drop("p", [1, 3, 99]) == 0  # idempotent
    unit.put("p", np.arange(100, 105), {"x": torch.arange(100.0, 105.0)})
    stats = unit.statistics()["partitions"]["p"]
    assert stats["rows"] == 10 and stats["slots"] == 10  # no new slot was needed
    assert torch.equal(unit.get("p", [104, 0, 100], ["x"])["x"], torch.tensor([104.0, 0.0, 100.0]))
    with pytest.raises(NotFoundError, match=r"\[1\]"):
        unit.get("p", [0, 1], ["x"])


def test_column_turns_jagged_when_schema_says_so() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", [0, 1], {"x": torch.ones(2, 3)}, {"x": FieldSchema("float32", (3,))})
    assert unit.statistics()["partitions"]["p"]["fields"]["x"]["kind"] == "dense"
    # the controller merged another unit's (5,) rows: the column is jagged now, even for (3,) rows here
    unit.put("p", [2], {"x": torch.zeros(1, 3)}, {"x": JAG})
    assert unit.statistics()["partitions"]["p"]["fields"]["x"]["kind"] == "nested"
    out = unit.get("p", [2, 0], ["x"])["x"]
    assert out.layout == torch.jagged
    assert_rows_equal(out, [torch.zeros(3), torch.ones(3)])
    # data of another shape turns a column jagged on its own too
    unit.put("p", [5, 6], {"y": torch.ones(2, 2)})
    unit.put("p", [7], {"y": torch.ones(1, 4)})
    assert unit.schemas("p")["y"] == FieldSchema("float32", (-1,), True)
    assert_rows_equal(unit.get("p", [7, 5], ["y"])["y"], [torch.ones(4), torch.ones(2)])


def test_dtype_conflict_changes_nothing() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", [0, 1], {"x": torch.ones(2, 2)})
    with pytest.raises(SchemaError, match=r"partition 'p', field 'x'.*dtype"):
        unit.put("p", [2, 3], {"y": torch.ones(2), "x": torch.ones(2, 2, dtype=torch.int64)})
    assert unit.rows == 2 and "y" not in unit.schemas("p")
    with pytest.raises(SchemaError, match="int64"):
        unit.put("p", [0], {"x": torch.ones(1, 2)}, {"x": FieldSchema("int64", (2,))})
    with pytest.raises(SchemaError, match="duplicate"):
        unit.put("p", [5, 5], {"x": torch.ones(2, 2)})
    with pytest.raises(SchemaError, match="rows for 3"):
        unit.put("p", [5, 6, 7], {"x": torch.ones(2, 2)})
    assert torch.equal(unit.get("p", [0, 1], ["x"])["x"], torch.ones(2, 2))


def test_returned_values_are_independent_of_storage() -> None:
    unit = SimpleStorageUnit()
    x, rows, obj = torch.zeros(2, 3), [torch.zeros(2), torch.zeros(3)], [{"k": [1]}, "s"]
    unit.put("p", [0, 1], {"x": x, "j": njt(rows), "o": obj})
    x.fill_(5)  # the caller's buffers are not kept
    rows[0].fill_(5)
    obj[0]["k"].append(2)
    got = unit.get("p", [0, 1], ["x", "j", "o"])
    assert not got["x"].any() and not got["j"].values().any() and got["o"][0] == {"k": [1]}
    got["x"].fill_(7)
    got["j"].values().fill_(7)
    got["o"][0]["k"].append(3)
    again = unit.get("p", [0, 1], ["x", "j", "o"])
    assert not again["x"].any() and not again["j"].values().any() and again["o"][0] == {"k": [1]}


def test_missing_rows_fields_and_partitions() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", [0, 1, 2], {"a": torch.ones(3)})
    unit.put("p", [1], {"b": ["only row 1"]})
    assert unit.get("p", [1], ["a", "b"])["b"] == ["only row 1"]
    with pytest.raises(NotFoundError, match=r"partition 'p', field 'b': rows \[0, 2\]"):
        unit.get("p", [0, 1, 2], ["b"])
    with pytest.raises(NotFoundError, match=r"field .zz.: rows \[0\]"):
        unit.get("p", [0], ["zz"])
    with pytest.raises(NotFoundError, match="partition 'nope'"):
        unit.get("nope", [0], ["a"])
    with pytest.raises(NotFoundError, match=r"\[7\]"):
        unit.get("p", [0, 7], ["a"])


def test_capacity_drop_partition_export_statistics() -> None:
    unit = SimpleStorageUnit(capacity_rows=4)
    unit.put("p", [0, 1, 2], {"a": torch.ones(3, 2)})
    with pytest.raises(CapacityError, match="holds 3 of 4"):
        unit.put("q", [0, 1], {"a": torch.ones(2)})
    assert unit.rows == 3 and unit.free_rows == 1
    unit.put("p", [0, 1, 2], {"b": ["x", "y", "z"]})  # existing rows need no room
    unit.put("q", [9], {"a": torch.ones(1)})
    assert unit.free_rows == 0
    ids, fields = unit.export("p")
    assert ids.tolist() == [0, 1, 2] and fields["b"][1] == ["x", "y", "z"]
    assert torch.equal(fields["a"][1], torch.ones(3, 2))
    stats = unit.statistics()
    assert stats["partitions"]["p"]["fields"]["a"]["bytes"] == 3 * 2 * 4 and stats["rows"] == 4
    assert stats["requests"]["put"] == 4 and stats["bytes_in"] > 0
    assert unit.drop_partition("p") == 3 and unit.drop_partition("p") == 0
    assert unit.rows == 1 and unit.partitions() == ["q"]


# --------------------------------------------------------------------------- service.py


def _ctx(timeout: float | None = None) -> RequestContext:
    loop = asyncio.get_running_loop()
    return RequestContext(1, None if timeout is None else loop.time() + timeout, loop)


def _put_request(ids: list[int], data: dict, timeout: float | None = None) -> tuple[p.PutRows, list]:
    specs, bufs = encode_columns(data)
    return p.PutRows(
        partition_id="p", global_indexes=p.ids_to_wire(ids), columns=specs, schemas={}, timeout=timeout
    ), bufs


class _SignallingUnit(SimpleStorageUnit):
    """Sets ``blocked`` whenever a put finds no room (so a test knows the put is waiting)."""

    def __init__(self, capacity_rows: int) -> None:
        super().__init__(capacity_rows)
        self.blocked = asyncio.Event()

    def has_room(self, new_rows: int) -> bool:
        room = super().has_room(new_rows)
        if not room:
            self.blocked.set()
        return room


async def test_service_put_waits_for_space_freed_by_a_drop() -> None:
    unit = _SignallingUnit(capacity_rows=2)
    service = StorageUnitService(unit, put_timeout=30.0)
    await service.handle(_ctx(), *_put_request([0, 1], {"x": torch.ones(2)}))
    put = asyncio.ensure_future(service.handle(_ctx(), *_put_request([2], {"x": torch.full((1,), 2.0)})))
    await unit.blocked.wait()
    assert not put.done()
    await service.handle(_ctx(), p.DropRows(partition_id="p", global_indexes=p.ids_to_wire([0])), [])
    reply, _ = await asyncio.wait_for(put, 10)
    assert isinstance(reply, p.Ok)
    got, bufs = await service.handle(
        _ctx(), p.GetRows(partition_id="p", global_indexes=p.ids_to_wire([2, 1]), fields=["x"]), []
    )
    assert torch.equal(decode_columns(got.columns, bufs)["x"], torch.tensor([2.0, 1.0]))


async def test_service_full_unit_times_out_with_capacity_error() -> None:
    unit = SimpleStorageUnit(capacity_rows=2)
    service = StorageUnitService(unit, put_timeout=30.0)
    await service.handle(_ctx(), *_put_request([0, 1], {"x": torch.ones(2)}))
    with pytest.raises(CapacityError, match="clear"):
        await service.handle(_ctx(), *_put_request([2], {"x": torch.ones(1)}, timeout=0.05))
    with pytest.raises(CapacityError, match="can never fit"):
        await service.handle(_ctx(), *_put_request([5, 6, 7], {"x": torch.ones(3)}))
    assert unit.rows == 2
    stats, _ = await service.handle(_ctx(), p.Stats(), [])
    assert stats.stats["service"]["capacity_errors"] == 1 and stats.stats["rows"] == 2


async def test_service_export_and_bad_requests() -> None:
    service = StorageUnitService(SimpleStorageUnit())
    await service.handle(_ctx(), *_put_request([3, 1], {"x": torch.tensor([3.0, 1.0]), "o": ["c", "a"]}))
    await service.handle(_ctx(), *_put_request([1], {"j": njt([torch.ones(2)])}))
    reply, bufs = await service.handle(_ctx(), p.ExportRows(partition_id="p"), [])
    ids, fields = decode_export(reply, bufs)
    assert ids.tolist() == [1, 3]
    assert fields["x"][0].tolist() == [1, 3] and fields["x"][1].tolist() == [1.0, 3.0]
    assert fields["o"][1] == ["a", "c"] and fields["j"][0].tolist() == [1]
    with pytest.raises(ProtocolError, match="controller"):
        await service.handle(_ctx(), p.ListPartitions(), [])
    with pytest.raises(NotFoundError, match=r"field .zz.: rows \[1\]"):
        await service.handle(
            _ctx(), p.GetRows(partition_id="p", global_indexes=p.ids_to_wire([1]), fields=["zz"]), []
        )


# --------------------------------------------------------------------------- the id index


def test_out_of_order_single_row_puts_keep_the_index_small() -> None:
    """Issue 7, defect 1: rows written newest-first used to double the index on every put."""
    unit = SimpleStorageUnit()
    for gid in reversed(range(40)):
        unit.put("p", [gid], {"x": torch.tensor([float(gid)])})
    part = unit.statistics()["partitions"]["p"]
    assert part["rows"] == 40
    assert part["index_capacity"] <= 2 * 40
    assert unit.get("p", list(range(40)), ["x"])["x"].tolist() == [float(i) for i in range(40)]


def test_index_capacity_follows_the_high_water_mark_of_rows_held() -> None:
    unit = SimpleStorageUnit()
    rng = np.random.default_rng(0)
    live: set[int] = set()
    for step in range(300):  # interleaved writes and drops, never more than 64 rows held
        fresh = [int(i) for i in rng.choice(10_000, size=8, replace=False) if int(i) not in live]
        unit.put("p", fresh, {"x": torch.ones(len(fresh))})
        live.update(fresh)
        if len(live) > 56:
            gone = sorted(live)[step % 3 :: 2]
            unit.drop("p", gone)
            live.difference_update(gone)
        assert unit.statistics()["partitions"]["p"]["index_capacity"] <= 2 * 64
    assert unit.rows == len(live)
    assert unit.get("p", sorted(live), ["x"])["x"].shape == (len(live),)


_ID = st.integers(min_value=0, max_value=200)
_OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "remove"]), st.lists(_ID, max_size=12)), min_size=1, max_size=40
)


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, probe=st.lists(_ID, max_size=20))
def test_id_index_matches_a_dict_model(ops: list[tuple[str, list[int]]], probe: list[int]) -> None:
    index, model, most = _IdIndex(), {}, 0
    next_slot = 0
    for op, ids in ops:
        if op == "insert":
            fresh = [i for i in dict.fromkeys(ids) if i not in model]
            slots = np.arange(next_slot, next_slot + len(fresh), dtype=np.int64)
            next_slot += len(fresh)
            index.insert(np.asarray(fresh, dtype=np.int64), slots)
            model.update(zip(fresh, slots.tolist(), strict=True))
        else:
            removed = index.remove(np.asarray(ids, dtype=np.int64))
            expected = sorted(model.pop(i) for i in set(ids) if i in model)
            assert sorted(removed.tolist()) == expected
        most = max(most, len(model))
        assert index.n == len(model)
        assert index.capacity <= max(16, 2 * most)
        keys, slots = index.items()
        assert keys.tolist() == sorted(model)
        assert slots.tolist() == [model[k] for k in sorted(model)]
    query = np.asarray(probe + list(model), dtype=np.int64)
    assert index.lookup(query).tolist() == [model.get(int(i), -1) for i in query]
