"""The KV storage manager's cost model against the real services: backend calls and keys per batch
grow with fields x blocks (stripes of ``storage.stripe_rows`` rows), never with rows.

The manager is built over a real embedded controller (it keeps the per-row index there) and a real
Mooncake / Yuanrong service, and its :class:`KVClient`'s own counters are read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tq_loader import protocol as p
from tq_loader.backend_config import MooncakeConfig, YuanrongConfig
from tq_loader.client import AsyncClient
from tq_loader.cluster import EmbeddedCluster
from tq_loader.config import resolve_config
from tq_loader.errors import DataLostError, NotFoundError
from tq_loader.metadata import BatchMeta
from tq_loader.storage import make_storage_manager
from tq_loader.storage.base import BackendInfo
from tq_loader.storage.kv import TAG_PREFIX, KVStorageManager
from tq_loader.storage.mooncake import mooncake_available
from tq_loader.storage.services import open_backend_services
from tq_loader.storage.yuanrong import yuanrong_available

SECTIONS = {
    "mooncake": (
        mooncake_available,
        MooncakeConfig(global_segment_size=512 << 20, local_buffer_size=64 << 20),
    ),
    "yuanrong": (yuanrong_available, YuanrongConfig(shared_memory_size_mb=512)),
}


@pytest.fixture(scope="module", params=list(SECTIONS))
def rig(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[AsyncClient, KVStorageManager, asyncio.AbstractEventLoop]]:
    available, section = SECTIONS[request.param]
    missing = available()
    if missing:
        pytest.skip(missing)
    services = open_backend_services(request.param, section)
    cluster = EmbeddedCluster(resolve_config({}))  # its controller keeps the index
    loop = asyncio.new_event_loop()
    core = AsyncClient(cluster.address)
    try:
        info: p.ClusterInfo = loop.run_until_complete(core.async_describe())
        conf = {
            **info.config,
            "storage": {**info.config["storage"], request.param: dataclasses.asdict(services.section)},
        }
        ours = p.ClusterInfo(
            controller=info.controller, storage_units=[], storage_backend=request.param, config=conf,
            cluster_id=info.cluster_id,
        )  # fmt: skip
        manager = make_storage_manager(request.param, BackendInfo(ours, core.channel))
        assert isinstance(manager, KVStorageManager)
        core._storage = manager  # the client core uses this backend from now on
        yield core, manager, loop
    finally:
        loop.run_until_complete(core.async_close())
        loop.close()
        cluster.stop()
        services.close()


def _batch(rows: int) -> dict[str, Any]:
    return {
        "a": torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4),
        "b": torch.nested.nested_tensor([torch.arange(i % 3 + 1) for i in range(rows)], layout=torch.jagged),
        "c": [str(i) for i in range(rows)],
    }


def _key_of(manager: KVStorageManager, meta: BatchMeta, field: str, row: int = 0) -> str:
    """The KV key that holds ``field`` of row ``row`` of ``meta``."""
    key = manager.key_of(meta, row, field)
    assert key is not None
    return key


def _counts(manager: KVStorageManager) -> dict[str, int]:
    s = manager.client.statistics()
    return {"puts": s.puts, "gets": s.gets, "keys_put": s.keys_put, "keys_got": s.keys_got}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize("rows", [1024, 2048])
def test_backend_calls_grow_with_fields_times_blocks(rig: Any, rows: int) -> None:
    core, manager, loop = rig
    stripe = manager.stripe_rows
    start = _counts(manager)
    meta = loop.run_until_complete(core.async_put(_batch(rows), partition_id=f"count{rows}"))
    put = _delta(start, _counts(manager))
    blocks = len({int(i) // stripe for i in meta.global_index_array})
    # one batched call; a backend that cannot list keys (Yuanrong) also claims a slot for the new
    # partition (one put_if_absent) and writes the put's manifest in the same call
    slot, manifest = (1, 1) if manager._registry is not None else (0, 0)
    assert put == {"puts": 1 + slot, "gets": 0, "keys_put": 3 * blocks + manifest + slot, "keys_got": 0}
    start = _counts(manager)
    td = loop.run_until_complete(core.async_get_data(meta))
    got = _delta(start, _counts(manager))
    assert got == {"puts": 0, "gets": 1, "keys_put": 0, "keys_got": 3 * blocks}
    assert torch.equal(td["a"], _batch(rows)["a"])
    assert list(td["c"]) == [str(i) for i in range(rows)]
    # a subset of rows in any order, one field: keys of that field's touched blocks only
    sub = meta.select_samples([rows - 1, 0, stripe]).select_fields(["a"])
    start = _counts(manager)
    td = loop.run_until_complete(core.async_get_data(sub))
    assert _delta(start, _counts(manager))["keys_got"] == len(
        {int(i) // stripe for i in sub.global_index_array}
    )
    assert torch.equal(td["a"], _batch(rows)["a"][[rows - 1, 0, stripe]])


def test_index_travels_in_metadata(rig: Any) -> None:
    core, manager, loop = rig
    meta = loop.run_until_complete(core.async_put({"x": torch.ones(5, 2)}, partition_id="idx"))
    assert all(any(k.startswith(TAG_PREFIX) for k in row) for row in meta.get_all_custom_meta())
    assert manager.key_of(meta, 0, "x") is not None
    hand_made = BatchMeta(meta.global_index_array, "idx", field_schema=meta.field_schema)
    with pytest.raises(NotFoundError, match="storage index"):
        loop.run_until_complete(core.async_get_data(hand_made))


def test_overwritten_values_are_deleted(rig: Any) -> None:
    core, manager, loop = rig
    meta = loop.run_until_complete(core.async_put({"x": torch.zeros(8, 2)}, partition_id="over"))
    key = _key_of(manager, meta, "x")
    assert manager.client.exists([key]) == [True]
    loop.run_until_complete(core.async_put({"x": torch.ones(8, 2)}, metadata=meta))
    assert manager.client.exists([key]) == [False]  # every row of the old value was rewritten
    assert torch.equal(loop.run_until_complete(core.async_get_data(meta))["x"], torch.ones(8, 2))


def test_a_value_the_backend_lost_drops_its_rows(rig: Any) -> None:
    core, manager, loop = rig
    meta = loop.run_until_complete(core.async_put({"x": torch.zeros(4, 1)}, partition_id="lost"))
    manager.client.delete([_key_of(manager, meta, "x")])  # gone behind our back
    with pytest.raises(DataLostError, match="lost"):
        loop.run_until_complete(core.async_get_data(meta))
    status = loop.run_until_complete(core.async_get_production_status(["x"], "lost"))
    assert status[0] is None or len(status[0]) == 0  # the controller dropped the rows
