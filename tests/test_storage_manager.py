"""SimpleStorageManager against real storage-unit Servers on 127.0.0.1 (in the test's event loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from tq_loader import protocol as p
from tq_loader.batch import prepare_batch
from tq_loader.config import StorageConfig
from tq_loader.errors import NotFoundError, SchemaError, TQConnectionError
from tq_loader.metadata import BatchMeta, schema_of
from tq_loader.storage import (
    BackendInfo,
    SimpleStorageManager,
    StorageManager,
    make_storage_manager,
    register_storage_manager,
    registered_storage_managers,
)
from tq_loader.storage.service import StorageUnitService
from tq_loader.storage.unit import SimpleStorageUnit
from tq_loader.striping import DEFAULT_STRIPE_ROWS, unit_of
from tq_loader.transport import Connection, Server


def info(addresses: list[str], connect: Any, stripe_rows: int) -> BackendInfo:
    cluster = p.ClusterInfo(
        controller="", storage_units=addresses, config={"storage": {"stripe_rows": stripe_rows}}
    )
    return BackendInfo(cluster, connect)


@dataclass
class Cluster:
    units: list[SimpleStorageUnit]
    servers: list[Server]
    conns: dict[str, Connection] = field(default_factory=dict)
    stripe_rows: int = 2  # small blocks: the tests' small batches still spread over every unit

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def connect(self, address: str) -> Connection:
        if address not in self.conns:
            self.conns[address] = Connection(address, connect_timeout=5.0)
        return self.conns[address]

    def manager(self, stripe_rows: int | None = None) -> SimpleStorageManager:
        return SimpleStorageManager(info(self.addresses, self.connect, stripe_rows or self.stripe_rows))


async def put(manager: StorageManager, data: Any, meta: BatchMeta) -> None:
    """What the client core hands a manager: one prepared batch."""
    await manager.put_data(prepare_batch(data), meta)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    units = [SimpleStorageUnit() for _ in range(3)]
    servers = [Server(StorageUnitService(u).handle, name=f"unit-{i}") for i, u in enumerate(units)]
    for server in servers:
        await server.start()
    c = Cluster(units, servers)
    try:
        yield c
    finally:
        for conn in c.conns.values():
            await conn.close()
        for server in servers:
            await server.close()


def meta_for(ids: list[int], data: Any = None, pid: str = "p") -> BatchMeta:
    schemas = {} if data is None else {k: schema_of(v, k) for k, v in data.items()}
    return BatchMeta(np.asarray(ids, dtype=np.int64), pid, field_schema=schemas)


def assert_column_equal(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor) and want.is_nested:
        assert got.is_nested and got.layout == want.layout
        pairs = zip(got.unbind(), want.unbind(), strict=True)
    elif isinstance(want, torch.Tensor):
        pairs = [(got, want)]
    else:
        assert list(got) == list(want)
        return
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def mixed_batch(n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    dtypes = [
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
        torch.bfloat16, torch.float64, torch.complex64,
    ]  # fmt: skip
    data: dict[str, Any] = {
        str(dt).removeprefix("torch."): (torch.randn(n, 3, generator=g) * 50).to(dt) for dt in dtypes
    }
    f32 = torch.randn(n, 2, generator=g)
    f32[0, 0], f32[-1, 1] = float("nan"), float("inf")
    data["f32"] = f32
    lens = [(i * 3) % 5 for i in range(n)]
    data["tokens"] = torch.nested.nested_tensor_from_jagged(
        torch.arange(sum(lens), dtype=torch.int64), torch.tensor([0, *np.cumsum(lens)])
    )
    data["text"] = [f"row {i}" if i % 3 else {"i": i, "tags": [i, None]} for i in range(n)]
    data["images"] = [torch.randn(1 + i % 2, 2 + i % 3, generator=g) for i in range(n)]  # 2 ragged dims
    return data


async def test_round_trip_mixed_rows_striped_and_reassembled(cluster: Cluster) -> None:
    n = 11
    ids = [7, 3, 12, 0, 5, 1, 9, 4, 10, 2, 8]
    data = mixed_batch(n)
    td = TensorDict({k: v for k, v in data.items() if k not in ("text", "images")}, batch_size=[n])
    td.set("text", NonTensorStack(*data["text"]))
    td.set("images", torch.nested.nested_tensor(data["images"]))
    manager = cluster.manager()
    await put(manager, td, meta_for(ids, data))
    assert [u.rows for u in cluster.units] == [4, 4, 3]  # striped in blocks of 2 ids over 3 units
    assert [u.rows for u in cluster.units] == np.bincount(unit_of(ids, 3, 2), minlength=3).tolist()
    order = np.random.default_rng(1).permutation(n)
    meta = meta_for([ids[i] for i in order], data)
    out = await manager.get_data(meta)
    assert out.batch_size == torch.Size([n])
    for name, value in data.items():
        if name == "tokens":
            want = torch.nested.as_nested_tensor([value[int(i)] for i in order], layout=torch.jagged)
        else:
            want = [value[i] for i in order] if isinstance(value, list) else value[torch.from_numpy(order)]
        got = out.get(name).tolist() if name == "text" else out.get(name)
        if name == "images":  # a "rows" column: comes back as a strided nested tensor
            assert got.is_nested and meta.field_schema[name].shape == (-1, -1)
            assert all(torch.equal(a, b) for a, b in zip(got.unbind(), want, strict=True))
            continue
        assert_column_equal(got, want)
    assert isinstance(out.get("text"), NonTensorStack)
    await manager.close()


async def test_a_refused_put_stores_nothing_in_any_unit(cluster: Cluster) -> None:
    manager = cluster.manager()
    data = {"x": torch.arange(6.0)}
    await put(manager, data, meta_for([0, 1, 2, 3, 4, 5], data))
    with pytest.raises(SchemaError):  # a dtype conflict in the units: nothing of this put is kept
        await put(manager, {"x": torch.arange(3)}, meta_for([0, 1, 2]))
    out = await manager.get_data(meta_for([0, 1, 2], data))
    assert out.get("x").tolist() == [0.0, 1.0, 2.0]


async def test_partial_field_updates_and_missing_field(cluster: Cluster) -> None:
    manager = cluster.manager()
    await put(manager, {"prompt": ["a", "b", "c", "d"]}, meta_for([0, 1, 2, 3]))
    resp = torch.nested.as_nested_tensor([torch.ones(2), torch.ones(5)], layout=torch.jagged)
    await put(manager, {"response": resp}, meta_for([2, 0]))  # adds a field to existing rows
    out = await manager.get_data(meta_for([0, 2]), ["prompt", "response"])
    assert out.get("prompt").tolist() == ["a", "c"]
    assert [t.numel() for t in out.get("response").unbind()] == [5, 2]
    with pytest.raises(NotFoundError, match=r"field 'response'.*\[1\]"):
        await manager.get_data(meta_for([0, 1, 2]), ["response"])


async def test_nested_schema_stays_jagged_when_selected_rows_share_a_shape(cluster: Cluster) -> None:
    manager = cluster.manager()
    data = {"x": [torch.ones(2), torch.ones(3), torch.ones(2)]}
    await put(manager, data, meta_for([0, 1, 2], {"x": data["x"]}))
    meta = meta_for([0, 2], {"x": data["x"]})
    assert meta.field_schema["x"].is_nested
    out = await manager.get_data(meta)
    assert out.get("x").layout == torch.jagged and [t.numel() for t in out.get("x").unbind()] == [2, 2]


async def test_clear_data_clear_partition_and_statistics(cluster: Cluster) -> None:
    manager = cluster.manager()
    data = {"x": torch.arange(6)}
    await put(manager, data, meta_for(list(range(6)), data))
    await put(manager, data, meta_for(list(range(6)), data, pid="q"))
    await manager.clear_data(meta_for([0, 4, 5]))
    await manager.clear_data(meta_for([0, 4, 5]))  # idempotent
    out = await manager.get_data(meta_for([3, 1, 2], data))
    assert out.get("x").tolist() == [3, 1, 2]
    with pytest.raises(NotFoundError, match=r"\[4\]"):
        await manager.get_data(meta_for([4], data))
    stats = await manager.statistics()
    assert stats["rows"] == 9 and len(stats["units"]) == 3
    mixed = BatchMeta(np.array([5, 3, 0]), ["q", "p", "q"], field_schema={"x": schema_of(data["x"])})
    assert (await manager.get_data(mixed)).get("x").tolist() == [5, 3, 0]  # two partitions in one batch
    exported = await manager.export_partition("p")
    assert sorted(i for ids, _ in exported for i in ids.tolist()) == [1, 2, 3]
    await manager.clear_partition("p")
    assert sum(u.rows for u in cluster.units) == 6
    assert (await manager.get_data(meta_for([5], data, pid="q"))).get("x").tolist() == [5]
    empty = await manager.get_data(meta_for([], data))
    assert empty.batch_size == torch.Size([0]) and empty.get("x").shape == (0,)


async def test_unreachable_unit_is_a_connection_error_naming_it(cluster: Cluster) -> None:
    dead = Server(StorageUnitService(SimpleStorageUnit()).handle)
    address = await dead.start()
    await dead.close()  # nothing listens there any more
    conn = Connection(address, connect_timeout=0.3)
    manager = SimpleStorageManager(
        info([cluster.addresses[0], address], lambda a: conn if a == address else cluster.connect(a), 2)
    )
    try:
        with pytest.raises(TQConnectionError, match=f"storage unit 1 \\({address}\\)"):
            await put(manager, {"x": torch.arange(4)}, meta_for([0, 1, 2, 3]))
    finally:
        await conn.close()


async def test_registry(cluster: Cluster) -> None:
    manager = make_storage_manager("simple", info(cluster.addresses, cluster.connect, 2))
    assert isinstance(manager, SimpleStorageManager) and "simple" in registered_storage_managers()
    with pytest.raises(NotFoundError, match="register_storage_manager"):
        make_storage_manager("nope", info(cluster.addresses, cluster.connect, 2))

    class Fake(SimpleStorageManager):
        pass

    register_storage_manager("Fake", Fake)
    assert isinstance(make_storage_manager("fake", info(["x"], cluster.connect, 2)), Fake)
    with pytest.raises(TypeError):
        register_storage_manager("bad", 3)  # type: ignore[arg-type]
    assert issubclass(Fake, StorageManager)


# --------------------------------------------------------------------------- striping in blocks


def test_unit_of_stripes_blocks_round_robin() -> None:
    ids = np.arange(20)
    assert unit_of(ids, 3, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4
    assert unit_of(ids, 3, 1).tolist() == (ids % 3).tolist()  # blocks of one row: plain modulo
    assert unit_of(torch.tensor([130, 5]), 2).tolist() == [(130 // DEFAULT_STRIPE_ROWS) % 2, 0]
    assert StorageConfig().stripe_rows == DEFAULT_STRIPE_ROWS  # the config's default is the rule's
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="stripe_rows"):
            unit_of(ids, 2, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_units"):
        unit_of(ids, 0, 4)


async def test_stripe_rows_from_config_and_large_batches_round_trip(cluster: Cluster) -> None:
    manager = cluster.manager(stripe_rows=8)
    assert manager.stripe_rows == 8 and (await manager.statistics())["stripe_rows"] == 8
    with pytest.raises(ValueError, match="stripe_rows"):
        SimpleStorageManager(info(cluster.addresses, cluster.connect, 0))
    g = torch.Generator().manual_seed(3)
    n, ids = 300, np.arange(5, 305)  # starts mid-block: first and last runs are partial
    lens = torch.randint(0, 50, (n,), generator=g)
    data = {
        "tokens": torch.nested.nested_tensor_from_jagged(
            torch.randn(int(lens.sum()), generator=g),
            torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
        ),
        "wide": torch.randn(n, 2, 300, generator=g),
        "emb": torch.nested.as_nested_tensor(
            [torch.randn(int(k), 3, generator=g) for k in lens], layout=torch.jagged
        ),
    }
    await put(manager, data, meta_for(ids.tolist(), data))
    assert [u.rows for u in cluster.units] == np.bincount(unit_of(ids, 3, 8), minlength=3).tolist()
    for order in (np.arange(n), np.random.default_rng(0).permutation(n), np.arange(n)[::-1][:77]):
        out = await manager.get_data(meta_for(ids[order].tolist(), data))
        for name, value in data.items():
            want = value[torch.from_numpy(order.copy())] if name == "wide" else [value[int(i)] for i in order]
            got = out.get(name)
            if name == "wide":
                assert torch.equal(got, want)
            else:
                assert got.layout == torch.jagged and all(
                    torch.equal(a, b) for a, b in zip(got.unbind(), want, strict=True)
                )
    # the caller's columns were sent as views where possible: they are unchanged and independent
    out = await manager.get_data(meta_for(ids.tolist(), data), ["wide"])
    out.get("wide").zero_()
    assert not torch.equal(data["wide"], torch.zeros_like(data["wide"]))
    await manager.close()
