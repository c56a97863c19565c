"""A new backend implements only storing and fetching: the smallest one, a dict in this process.

The client core keeps the rules that make the system correct for every backend: rows become
visible to consumers only after ``put_data`` returned, and rows a backend reports lost are dropped
and never served. This file proves both with a backend that knows neither rule.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.batch import PreparedBatch
from tq_loader.metadata import BatchMeta
from tq_loader.storage import StorageLost, StorageManager, register_storage_manager
from tq_loader.storage.base import BackendInfo


class DictStorage(StorageManager):
    """Rows as ``{(partition, global index, field): tensor}``: store and fetch, nothing else."""

    name = "dict_test"
    rows: dict[tuple[str, int, str], torch.Tensor] = {}
    gate: threading.Event | None = None  # when set by a test, put_data waits for it
    lose: set[int] = set()  # global indexes this backend pretends to have lost

    def __init__(self, info: BackendInfo) -> None:
        self.info = info

    async def put_data(self, batch: PreparedBatch, meta: BatchMeta) -> None:
        if self.gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        for i, (pid, gi) in enumerate(zip(meta.partition_ids, meta.global_indexes, strict=True)):
            for name, column in batch.columns.items():
                self.rows[(pid, int(gi), name)] = column[i].clone()

    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        fields = list(meta.field_schema) if fields is None else list(fields)
        keys = list(zip(meta.partition_ids, map(int, meta.global_indexes), strict=True))
        gone = [gi for _, gi in keys if gi in self.lose]
        if gone:
            raise StorageLost(f"rows {gone} are gone", rows=[(keys[0][0], np.array(gone))])
        cols = {f: torch.stack([self.rows[(pid, gi, f)] for pid, gi in keys]) for f in fields}
        return TensorDict(cols, batch_size=[len(keys)])

    async def clear_data(self, meta: BatchMeta) -> None:
        for pid, gi in zip(meta.partition_ids, meta.global_indexes, strict=True):
            for key in [k for k in self.rows if k[:2] == (pid, int(gi))]:
                del self.rows[key]

    async def clear_partition(self, partition_id: str) -> None:
        for key in [k for k in self.rows if k[0] == partition_id]:
            del self.rows[key]

    async def statistics(self) -> dict:
        return {"backend": self.name, "rows": len({k[:2] for k in self.rows})}


register_storage_manager("dict_test", DictStorage)


@pytest.fixture
def dict_cluster():
    DictStorage.rows, DictStorage.gate, DictStorage.lose = {}, None, set()
    tq.init({"storage": {"backend": "dict_test"}})
    try:
        yield tq.get_client()
    finally:
        tq.close()


def test_put_get_clear_through_the_public_api(dict_cluster):
    c = dict_cluster
    meta = c.put({"x": torch.arange(6.0).reshape(3, 2)}, partition_id="p")
    got = c.get_meta(["x"], 3, "p", task_name="t")
    assert torch.equal(c.get_data(got)["x"], torch.arange(6.0).reshape(3, 2))
    c.clear_samples(meta)
    assert DictStorage.rows == {}


def test_rows_are_visible_only_after_the_backend_acknowledged(dict_cluster):
    c = dict_cluster
    DictStorage.gate = threading.Event()
    done = threading.Event()

    def produce():
        c.put({"x": torch.ones(2, 2)}, partition_id="p")
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        # the put is in the backend (not acknowledged): nothing is ready for a consumer
        with pytest.raises(tq.TQTimeoutError, match=r"0 rows .* ready .* 2 still being written"):
            c.get_meta(["x"], 2, "p", task_name="t", timeout=0.5)
        assert not done.is_set()
    finally:
        DictStorage.gate.set()
        producer.join(30)
    assert done.is_set()
    assert c.get_meta(["x"], 2, "p", task_name="t", timeout=10).size == 2


def test_rows_the_backend_lost_are_dropped_and_never_served_again(dict_cluster):
    c = dict_cluster
    meta = c.put({"x": torch.arange(4.0).reshape(4, 1)}, partition_id="p")
    DictStorage.lose = {int(meta.global_indexes[1])}
    with pytest.raises(tq.DataLostError):
        c.get_data(meta)
    c.seal("p")
    rest = c.get_meta(["x"], 4, "p", task_name="t", timeout=10, allow_partial=True)
    assert int(meta.global_indexes[1]) not in list(rest.global_indexes)
    assert rest.size == 3
    assert torch.equal(c.get_data(rest)["x"].flatten(), torch.tensor([0.0, 2.0, 3.0]))
