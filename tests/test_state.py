"""Tests of the controller's per-partition bookkeeping (PartitionState) and the partition registry."""

from __future__ import annotations

import numpy as np
import pytest

from tq_loader.controller import state as state_mod
from tq_loader.controller.registry import ControllerState
from tq_loader.controller.state import PartitionState, RowIdAllocator
from tq_loader.errors import ClosedError, NotFoundError, SchemaError, TQError
from tq_loader.schema import FieldSchema

F32 = FieldSchema("float32", (4,))
I64 = FieldSchema("int64", ())
OBJ = FieldSchema("object", (), False, True)


def make(pid: str = "p") -> PartitionState:
    return PartitionState(pid, RowIdAllocator())


# ---------------------------------------------------------------- allocator and insert
def test_allocator_contiguous_monotonic():
    a = RowIdAllocator(10)
    assert a.allocate(3) == 10
    assert a.allocate(0) == 13
    assert a.allocate(2) == 13
    assert a.next_id == 15
    with pytest.raises(SchemaError):
        a.allocate(-1)


def test_insert_returns_ascending_int64_ids():
    p = make()
    ids = p.insert(5)
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert p.insert(0).size == 0
    assert p.insert(3).tolist() == [5, 6, 7]
    assert p.num_rows == 8


def test_insert_grows_past_initial_capacity():
    p = make()
    for _ in range(50):
        p.insert(7)
    assert p.num_rows == 350
    assert p.positions([0, 349]).tolist() == [0, 349]


def test_ids_unique_across_partitions_and_interleaved():
    reg = ControllerState()
    a, b = reg.create("a"), reg.create("b")
    ia1 = a.insert(3)
    ib1 = b.insert(2)
    ia2 = a.insert(2)
    assert set(ia1.tolist() + ia2.tolist()).isdisjoint(ib1.tolist())
    # a's ids are non-contiguous but ascending; lookups still work
    all_a = np.concatenate([ia1, ia2])
    assert (np.diff(all_a) > 0).all()
    assert a.positions(ia2).tolist() == [3, 4]
    with pytest.raises(NotFoundError, match="'a'"):
        a.positions(ib1)


def test_positions_errors_name_partition_and_ids():
    p = make("train")
    p.insert(3)
    with pytest.raises(NotFoundError) as exc:
        p.positions([1, 100, 101, 102, 103, 104, 105, 106])
    msg = str(exc.value)
    assert "'train'" in msg and "100" in msg and "2 more" in msg
    with pytest.raises(SchemaError):
        p.positions([1.5])
    assert p.positions([]).size == 0
    assert p.positions(np.array([2, 0], dtype=np.int32)).tolist() == [2, 0]


def test_positions_on_empty_partition():
    p = make()
    with pytest.raises(NotFoundError):
        p.positions([0])


# ---------------------------------------------------------------- schemas and production
def test_schema_conflict_leaves_state_unchanged():
    p = make()
    ids = p.insert(4)
    p.mark_produced(ids[:2], {"x": F32})
    before = p.statistics()
    with pytest.raises(SchemaError, match="'x'"):
        p.mark_produced(ids[2:], {"y": I64, "x": FieldSchema("int32", (4,))})
    assert p.statistics() == before
    assert p.field_schemas == {"x": F32}
    assert "y" not in p.field_schemas
    assert p.ready(["x"], None).tolist() == ids[:2].tolist()
    # unknown ids: also all-or-nothing
    with pytest.raises(NotFoundError):
        p.mark_produced([ids[3], 999], {"z": I64})
    assert "z" not in p.field_schemas
    assert p.num_fields == 1


def test_tensor_vs_non_tensor_conflict():
    p = make()
    ids = p.insert(1)
    p.mark_produced(ids, {"x": OBJ})
    with pytest.raises(SchemaError):
        p.check_schemas({"x": F32})
    with pytest.raises(SchemaError):
        p.check_schemas({"x": "float32"})  # type: ignore[dict-item]


def test_jagged_promotion():
    p = make()
    ids = p.insert(2)
    p.mark_produced(ids[:1], {"resp": FieldSchema("int64", (5,))})
    merged = p.check_schemas({"resp": FieldSchema("int64", (9,))})
    assert merged["resp"] == FieldSchema("int64", (-1,), True, False)
    assert p.field_schemas["resp"] == FieldSchema("int64", (5,))  # check does not apply
    p.mark_produced(ids[1:], {"resp": FieldSchema("int64", (9,))})
    assert p.field_schemas["resp"].is_nested
    # once jagged, stays jagged even for a write matching the first shape
    p.mark_produced(ids[:1], {"resp": FieldSchema("int64", (5,))})
    assert p.field_schemas["resp"].shape == (-1,)


def test_check_schemas_returns_all_fields_merged():
    p = make()
    p.mark_produced(p.insert(1), {"a": I64})
    merged = p.check_schemas({"b": F32})
    assert merged == {"a": I64, "b": F32}
    assert p.field_schemas == {"a": I64}


def test_ready_requires_all_fields_and_ignores_unknown_fields():
    p = make()
    ids = p.insert(6)
    p.mark_produced(ids[[0, 1, 2, 3]], {"a": I64})
    p.mark_produced(ids[[1, 3, 5]], {"b": I64})
    assert p.ready(["a"], None).tolist() == [0, 1, 2, 3]
    assert p.ready(["a", "b"], None).tolist() == [1, 3]
    assert p.ready("a", None).tolist() == [0, 1, 2, 3]  # a lone str means one field
    assert p.ready(["a", "nope"], None).size == 0
    assert p.ready([], None).tolist() == ids.tolist()
    assert p.ready(["a"], None, limit=2).tolist() == [0, 1]
    assert p.ready(["a"], None, limit=0).size == 0


def test_many_fields_grow_columns():
    p = make()
    ids = p.insert(3)
    for i in range(20):
        p.mark_produced(ids[i % 3 : i % 3 + 1], {f"f{i}": I64})
    assert p.num_fields == 20
    got_ids, names, mat = p.production_status()
    assert names == [f"f{i}" for i in range(20)]
    for i in range(20):
        assert mat[:, i].tolist() == [r == i % 3 for r in range(3)]
    assert got_ids.tolist() == ids.tolist()


def test_production_status_subsets():
    p = make()
    ids = p.insert(3)
    p.mark_produced(ids[1:], {"a": I64})
    got, names, mat = p.production_status([ids[2], ids[0]], ["a", "missing"])
    assert got.tolist() == [2, 0]
    assert names == ["a", "missing"]
    assert mat.tolist() == [[True, False], [False, False]]


# ---------------------------------------------------------------- consumption
def test_consumption_per_task_independent():
    p = make()
    ids = p.insert(4)
    p.mark_produced(ids, {"a": I64})
    p.mark_consumed("actor", ids[:2])
    assert p.ready(["a"], "actor").tolist() == [2, 3]
    assert p.ready(["a"], "critic").tolist() == [0, 1, 2, 3]
    assert p.ready(["a"], None).tolist() == [0, 1, 2, 3]
    assert p.count_unconsumed("actor") == 2
    assert p.count_unconsumed("critic") == 4
    p.mark_consumed("critic", ids[3:])
    assert p.consumption_status("actor")[1].tolist() == [True, True, False, False]
    cids, flags = p.consumption_status("critic", ids[2:])
    assert cids.tolist() == [2, 3] and flags.tolist() == [False, True]
    assert p.consumption_status("nobody")[1].tolist() == [False] * 4
    assert p.tasks == ["actor", "critic"]


def test_count_unconsumed_includes_unproduced_rows():
    p = make()
    ids = p.insert(5)
    p.mark_produced(ids[:1], {"a": I64})
    p.mark_consumed("t", ids[:1])
    assert p.count_unconsumed("t") == 4
    p.clear(ids[4:])
    assert p.count_unconsumed("t") == 3


def test_reset_one_task_vs_all():
    p = make()
    ids = p.insert(3)
    p.mark_consumed("a", ids)
    p.mark_consumed("b", ids)
    p.reset_consumption("a")
    assert p.count_unconsumed("a") == 3
    assert p.count_unconsumed("b") == 0
    p.mark_consumed("a", ids[:1])
    p.reset_consumption()
    assert p.count_unconsumed("a") == 3
    assert p.count_unconsumed("b") == 3
    p.reset_consumption("unknown")  # no-op, no error


def test_consumption_survives_row_growth():
    p = make()
    ids = p.insert(2)
    p.mark_consumed("t", ids[:1])
    more = p.insert(1000)
    p.mark_consumed("t", more[-1:])
    assert p.consumption_status("t", [ids[0], ids[1], more[-1]])[1].tolist() == [True, False, True]


# ---------------------------------------------------------------- clear
def test_clear_idempotent_and_ids_not_reused():
    p = make()
    ids = p.insert(4)
    p.mark_produced(ids, {"a": I64})
    p.mark_consumed("t", ids[:1])
    got = p.clear([ids[2], ids[0], ids[2], 12345])
    assert got.tolist() == [0, 2]
    assert p.clear([ids[0], ids[2]]).size == 0
    assert p.num_rows == 2
    assert p.ready(["a"], None).tolist() == [1, 3]
    with pytest.raises(NotFoundError):
        p.positions([ids[0]])
    with pytest.raises(NotFoundError):
        p.mark_produced([ids[0]], {"a": I64})
    new = p.insert(2)
    assert set(new.tolist()).isdisjoint(ids.tolist())
    assert p.statistics()["rows_cleared"] == 2
    assert p.statistics()["tasks"] == {"t": 0}
    assert p.statistics()["fields"] == {"a": 2}


def test_clear_compacts_and_keeps_lookups_correct(monkeypatch):
    monkeypatch.setattr(state_mod, "_COMPACT_MIN_DEAD", 16)
    p = make()
    ids = p.insert(100)
    p.mark_produced(ids[::2], {"a": I64})
    p.mark_consumed("t", ids[::4])
    p.set_tags(ids[99:], [{"seqlen": 7}])
    keys, _ = p.get_or_create_keys(["k"])
    cleared = p.clear(ids[:90])
    assert cleared.size == 90
    assert p._n == p.num_rows == 11  # compaction dropped the dead slots
    rest = ids[90:]
    assert p.positions(rest).tolist() == list(range(10))
    assert p.ready(["a"], None).tolist() == rest[::2].tolist()
    assert p.ready(["a"], "t").tolist() == [i for i in rest[::2].tolist() if i % 4 != 0]
    assert p.tag_values(rest[-1:], "seqlen").tolist() == [7]
    assert p.lookup_keys(["k"]).tolist() == keys.tolist()
    assert p.statistics()["rows_cleared"] == 90
    more = p.insert(3)
    assert more.tolist() == [101, 102, 103]


def test_clear_all_keeps_schemas_and_flags():
    p = make()
    ids = p.insert(3)
    p.mark_produced(ids, {"a": I64})
    p.mark_consumed("t", ids)
    p.get_or_create_keys(["x"])
    p.set_tags(ids[:1], [{"s": 1}])
    p.clear_all()
    assert p.num_rows == 0
    assert p.ready(["a"], None).size == 0
    assert p.field_schemas == {"a": I64}
    assert p.lookup_keys(["x"]).tolist() == [-1]
    new = p.insert(2)
    assert new.min() > 3
    assert p.count_unconsumed("t") == 2
    p.mark_produced(new, {"a": I64})
    assert p.ready(["a"], "t").tolist() == new.tolist()
    s = p.statistics()
    assert s["rows_cleared"] == 4 and s["keyed_rows"] == 0 and s["tagged_rows"] == 0


# ---------------------------------------------------------------- seal / abort
def test_seal_then_insert_raises_closed():
    p = make("s")
    ids = p.insert(2)
    p.seal()
    assert p.sealed
    with pytest.raises(ClosedError, match="'s'"):
        p.insert(1)
    # existing rows can still be produced, consumed, cleared
    p.mark_produced(ids, {"a": I64})
    p.mark_consumed("t", ids[:1])
    assert p.count_unconsumed("t") == 1
    # existing keys are fine, new keys are not
    with pytest.raises(ClosedError):
        p.get_or_create_keys(["new"])


def test_abort_refuses_inserts_with_reason():
    p = make()
    p.abort("reward model crashed")
    assert p.aborted == "reward model crashed"
    with pytest.raises(ClosedError, match="reward model crashed"):
        p.insert(1)
    assert p.statistics()["aborted"] == "reward model crashed"


# ---------------------------------------------------------------- tags
def test_tag_update_semantics():
    p = make()
    ids = p.insert(3)
    p.set_tags(ids[:2], [{"seqlen": 10, "src": "a"}, {"seqlen": 20}])
    p.set_tags(ids[:1], [{"seqlen": 11, "score": 0.5}])
    tags = p.get_tags(ids)
    assert tags == [{"seqlen": 11, "src": "a", "score": 0.5}, {"seqlen": 20}, {}]
    tags[0]["seqlen"] = 999  # a copy: mutating it does not change the state
    assert p.get_tags(ids[:1]) == [{"seqlen": 11, "src": "a", "score": 0.5}]
    assert p.tag_values(ids, "seqlen").tolist() == [11, 20, 0]
    assert p.tag_values(ids, "seqlen", default=-1).tolist() == [11, 20, -1]


def test_tags_validation():
    p = make()
    ids = p.insert(2)
    with pytest.raises(SchemaError):
        p.set_tags(ids, [{"a": 1}])
    with pytest.raises(SchemaError):
        p.set_tags(ids[:1], [{"a": object()}])
    with pytest.raises(SchemaError):
        p.set_tags(ids[:1], [{1: 1}])
    with pytest.raises(NotFoundError):
        p.set_tags([77], [{"a": 1}])
    assert p.get_tags(ids) == [{}, {}]


def test_clear_drops_tags():
    p = make()
    ids = p.insert(2)
    p.set_tags(ids, [{"a": 1}, {"a": 2}])
    p.clear(ids[:1])
    assert p.statistics()["tagged_rows"] == 1
    with pytest.raises(NotFoundError):
        p.get_tags(ids[:1])


# ---------------------------------------------------------------- keys
def test_kv_create_lookup_keys_of_and_order():
    p = make()
    plain = p.insert(1)
    ids, created = p.get_or_create_keys(["b", "a", "b"])
    assert created.tolist() == [True, True, True]
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert ids.tolist() == [1, 2, 1]
    ids2, created2 = p.get_or_create_keys(["a", "c"])
    assert created2.tolist() == [False, True]
    assert ids2[0] == ids[1]
    assert p.lookup_keys(["c", "zz", "b"]).tolist() == [ids2[1], -1, ids[0]]
    assert p.keys_of([ids[1], plain[0], ids2[1]]) == ["a", None, "c"]
    keys, kids = p.list_keys()
    assert keys == ["b", "a", "c"]
    assert kids.tolist() == [ids[0], ids[1], ids2[1]]
    assert p.num_rows == 4
    with pytest.raises(SchemaError):
        p.get_or_create_keys([3])  # type: ignore[list-item]


def test_kv_clear_forgets_key_and_recreates_fresh_row():
    p = make()
    ids, _ = p.get_or_create_keys(["k1", "k2"])
    p.clear(ids[:1])
    assert p.lookup_keys(["k1"]).tolist() == [-1]
    assert p.list_keys()[0] == ["k2"]
    again, created = p.get_or_create_keys(["k1"])
    assert created.tolist() == [True]
    assert again[0] not in ids.tolist()
    assert p.list_keys()[0] == ["k2", "k1"]


def test_existing_keys_in_sealed_partition_resolve():
    p = make()
    ids, _ = p.get_or_create_keys(["a"])
    p.seal()
    got, created = p.get_or_create_keys(["a"])
    assert got.tolist() == ids.tolist() and created.tolist() == [False]


# ---------------------------------------------------------------- statistics
def test_statistics_plain_dict():
    p = make()
    ids = p.insert(4)
    p.mark_produced(ids[:3], {"a": I64})
    p.mark_produced(ids[:1], {"b": OBJ})
    p.mark_consumed("t", ids[:2])
    s = p.statistics()
    assert s["rows_live"] == 4
    assert s["rows_cleared"] == 0
    assert s["fields"] == {"a": 3, "b": 1}
    assert s["tasks"] == {"t": 2}
    assert s["sealed"] is False and s["aborted"] is None
    assert isinstance(s["bytes"], int) and s["bytes"] > 0
    assert all(type(v) is int for v in s["fields"].values())
    assert make().statistics()["fields"] == {}


# ---------------------------------------------------------------- scale: vectorised ready
def test_ready_one_million_rows_32_fields():
    rng = np.random.default_rng(0)
    n, nf = 1_000_000, 32
    p = make()
    filler = PartitionState("other", p._alloc)
    ids = []
    for _ in range(4):  # non-contiguous ids: another partition allocates in between
        ids.append(p.insert(n // 4))
        filler.insert(3)
    ids = np.concatenate(ids)
    fields = [f"f{i}" for i in range(nf)]
    truth = np.zeros((n, nf), dtype=bool)
    for j, name in enumerate(fields):
        produced = rng.random(n) < 0.995  # most rows produced
        truth[:, j] = produced
        p.mark_produced(ids[produced], {name: I64})
    consumed = rng.random(n) < 0.1
    p.mark_consumed("actor", ids[consumed])
    cleared = rng.random(n) < 0.01
    p.clear(ids[cleared])
    live = ~cleared

    all_ready = truth.all(axis=1) & live
    got = p.ready(fields, None)
    np.testing.assert_array_equal(got, ids[all_ready])
    # clearing zeroed consumption for cleared rows; consumption of the live ones must hold
    got_task = p.ready(fields, "actor")
    np.testing.assert_array_equal(got_task, ids[all_ready & ~consumed])
    sub = fields[3:7]
    np.testing.assert_array_equal(p.ready(sub, "actor"), ids[truth[:, 3:7].all(axis=1) & live & ~consumed])
    np.testing.assert_array_equal(p.ready(fields, "actor", limit=1000), ids[all_ready & ~consumed][:1000])
    assert p.count_unconsumed("actor") == int((live & ~consumed).sum())
    assert p.statistics()["fields"]["f0"] == int((truth[:, 0] & live).sum())


# ---------------------------------------------------------------- registry
def test_registry_create_get_drop_list():
    reg = ControllerState()
    a = reg.create("a")
    assert reg.create("a") is a
    with pytest.raises(TQError, match="already exists"):
        reg.create("a", exist_ok=False)
    b = reg.get_or_create("b")
    assert reg.get("b") is b
    assert reg.list() == ["a", "b"]
    assert "a" in reg and len(reg) == 2
    with pytest.raises(NotFoundError) as exc:
        reg.get("zzz")
    assert "'zzz'" in str(exc.value) and "'a'" in str(exc.value) and "'b'" in str(exc.value)
    with pytest.raises(SchemaError):
        reg.create("")
    a.insert(5)
    assert reg.drop("a") is a
    assert reg.drop("a") is None
    with pytest.raises(NotFoundError):
        reg.drop("a", missing_ok=False)
    again = reg.create("a")
    assert again.insert(1).tolist() == [5]  # ids of the dropped partition are not reused
    s = reg.statistics()
    assert s["num_partitions"] == 2 and s["next_row_id"] == 6
    assert set(s["partitions"]) == {"a", "b"}
    assert s["partitions"]["a"]["rows_live"] == 1


def test_ordinals_are_insertion_order_within_partition_and_survive_compaction(monkeypatch):
    monkeypatch.setattr(state_mod, "_COMPACT_MIN_DEAD", 1)
    alloc = RowIdAllocator()
    a, b = PartitionState("a", alloc), PartitionState("b", alloc)
    first = a.insert(4)
    b.insert(3)  # interleaved allocation: ids of "a" are not contiguous
    second = a.insert(4)
    ids = np.concatenate([first, second])
    assert a.ordinals(ids).tolist() == list(range(8))
    a.clear(first[:3])  # enough dead rows to compact
    assert a.ordinals(second).tolist() == [4, 5, 6, 7]
    assert (a.ordinals(second) // 4).tolist() == [1, 1, 1, 1]  # GRPO group of the second prompt
    with pytest.raises(NotFoundError):
        a.ordinals(first[:1])


# ---------------------------------------------------------------- abandoned rows (issue 7, defect 3)
def test_sealed_partition_drops_rows_that_were_never_produced():
    p = make()
    done, dead, half = p.insert(3), p.insert(4), p.insert(2)
    p.mark_produced(done, {"x": F32})
    p.mark_produced(half, {"y": I64})  # one field of two written: its insert write completed
    assert p.unproduced().tolist() == dead.tolist()
    with pytest.raises(ClosedError, match="not sealed"):
        p.drop_abandoned(dead, 30.0)
    p.seal()
    dropped = p.drop_abandoned(p.unproduced(), 30.0)
    assert dropped.tolist() == dead.tolist()
    assert p.num_rows == 5 and p.unproduced().size == 0
    assert p.ready(["x"], "t").tolist() == done.tolist()
    assert p.count_unconsumed("t") == 5
    stats = p.statistics()
    assert stats["abandoned_rows"] == 4 and stats["rows_cleared"] == 4
    # a late write names the rows: a typed error that says what happened, and nothing changes
    with pytest.raises(ClosedError, match=r"sealed and rows .* abandoned.*seal_grace_s=30.0s"):
        p.mark_produced(dead, {"x": F32})
    with pytest.raises(NotFoundError):  # rows that never existed stay "not found"
        p.positions([999])
    assert p.statistics()["fields"]["x"] == 3
    assert p.drop_abandoned(done, 30.0).size == 0  # produced rows are never dropped


def test_drop_abandoned_keeps_rows_produced_since():
    p = make()
    ids = p.insert(4)
    p.seal()
    p.mark_produced(ids[:2], {"x": F32})  # their write completed within the grace period
    assert p.drop_abandoned(ids, 1.0).tolist() == ids[2:].tolist()
    assert p.abandoned_rows == 2


async def _call(service, body, timeout: float | None = 30.0):
    """One request to a ControllerService, as the transport would hand it over."""
    import asyncio

    from tq_loader.transport import RequestContext

    loop = asyncio.get_running_loop()
    ctx = RequestContext(1, None if timeout is None else loop.time() + timeout, loop)
    reply, _ = await service.handle(ctx, body, [])
    return reply


async def test_service_ends_a_sealed_stream_after_the_grace_period():
    import asyncio

    from tq_loader import protocol as wire
    from tq_loader.config import ControllerConfig
    from tq_loader.controller.service import ControllerService
    from tq_loader.errors import TQTimeoutError
    from tq_loader.metadata import BatchMeta

    service = ControllerService(ControllerConfig(seal_grace_s=0.2))
    schemas = {"x": F32}

    async def insert(n: int) -> bytes:
        reply = await _call(
            service, wire.PrepareWrite(partition_id="s", schemas=schemas, new_rows=n, insert=True)
        )
        return reply.global_indexes

    dead = await insert(4)  # a producer that dies before it notifies
    done = await insert(3)
    await _call(service, wire.NotifyProduced(partition_id="s", global_indexes=done, schemas=schemas))
    await _call(service, wire.Seal(partition_id="s"))
    fetch = wire.GetMeta(partition_id="s", data_fields=["x"], batch_size=8, task_name="t", allow_partial=True)
    # the complete rows cannot be served while 4 rows may still arrive: the timeout says so
    with pytest.raises(TQTimeoutError) as excinfo:
        await _call(service, fetch, timeout=0.0)
    message = str(excinfo.value)
    assert "sealed" in message and "3 rows" in message and "4 still being written" in message
    assert "seal it" not in message and "seal the partition" not in message
    # once the grace period passes (the loop's timer, no polling) the wait ends by itself
    first = BatchMeta.from_wire((await asyncio.wait_for(_call(service, fetch), 30)).meta)
    assert sorted(first.global_index_array.tolist()) == wire.ids_from_wire(done).tolist()
    last = BatchMeta.from_wire((await _call(service, fetch)).meta)
    assert last.is_end_of_stream and last.size == 0
    assert last.get_extra_info("abandoned_rows") == 4
    stats = service.statistics()
    assert stats["abandoned_rows"] == 4
    assert stats["partitions"]["partitions"]["s"]["abandoned_rows"] == 4
    # the dead producer's late notify gets a typed error saying what happened
    with pytest.raises(ClosedError, match="abandoned"):
        await _call(service, wire.NotifyProduced(partition_id="s", global_indexes=dead, schemas=schemas))


async def test_service_grace_timer_only_for_sealed_partitions_with_unproduced_rows():
    from tq_loader import protocol as wire
    from tq_loader.config import ControllerConfig
    from tq_loader.controller.service import ControllerService

    service = ControllerService(ControllerConfig(seal_grace_s=3600.0))
    schemas = {"x": F32}
    reply = await _call(
        service, wire.PrepareWrite(partition_id="a", schemas=schemas, new_rows=2, insert=True)
    )
    await _call(
        service, wire.NotifyProduced(partition_id="a", global_indexes=reply.global_indexes, schemas=schemas)
    )
    await _call(service, wire.Seal(partition_id="a"))
    assert "a" not in service._grace_timers  # nothing can be abandoned: no timer at all
    await _call(service, wire.PrepareWrite(partition_id="b", schemas=schemas, new_rows=2, insert=True))
    await _call(service, wire.Seal(partition_id="b"))
    timer = service._grace_timers["b"]
    await _call(service, wire.Seal(partition_id="b"))  # sealing again does not restart the period
    assert service._grace_timers["b"] is timer
    await _call(service, wire.ClearPartition(partition_id="b"))
    assert "b" not in service._grace_timers and timer.cancelled()


def test_seal_grace_is_configurable_and_validated():
    from tq_loader.config import ControllerConfig, resolve_config

    assert ControllerConfig().seal_grace_s == 30.0
    assert resolve_config({"controller": {"seal_grace_s": 1}}).controller.seal_grace_s == 1.0
    with pytest.raises(ValueError, match="seal_grace_s"):
        resolve_config({"controller": {"seal_grace_s": -1}})
