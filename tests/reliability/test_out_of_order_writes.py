"""Issue 7, defect 1: rows written out of allocation order keep a storage unit's memory bounded.

Several producers allocate rows in one order and finish writing them in another; the unit's id
index used to reallocate at twice its size on every such write (32 GiB by the 29th of 40 puts).
"""

from __future__ import annotations

import os

import torch

import tq_loader as tq


def _unit_partition_stats(client, pid: str) -> list[dict]:
    units = client.statistics()["storage"]["units"]
    return [u["partitions"][pid] for u in units.values() if pid in u.get("partitions", {})]


def test_forty_single_row_puts_newest_first_into_one_unit() -> None:
    tq.close()
    os.environ.pop("TQ_LOADER_ADDRESS", None)  # start a cluster of our own, never attach
    tq.init({"storage": {"num_units": 1}})
    try:
        client = tq.get_client()
        metas = [client.get_meta([], 1, "ooo", mode="insert") for _ in range(40)]
        for i, meta in reversed(list(enumerate(metas))):  # newest first: every write interleaves
            client.put({"x": torch.tensor([float(i)])}, metadata=meta)
        (part,) = _unit_partition_stats(client, "ooo")
        assert part["rows"] == 40
        assert part["index_capacity"] <= 2 * 40  # O(rows held), not 2**40
        got = client.get_meta(["x"], 40, "ooo", task_name="t", timeout=30)
        values = client.get_data(got)["x"].tolist()
        by_id = dict(zip(got.global_index_array.tolist(), values, strict=True))
        assert [by_id[int(m.global_index_array[0])] for m in metas] == [float(i) for i in range(40)]
    finally:
        tq.close()
