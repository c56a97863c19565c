"""A dead storage unit: typed errors for its rows, which are reported lost and never served;
the other units keep working."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader import api
from tq_loader.striping import unit_of


@pytest.fixture(params=[1, 4], ids=["modulo", "stripe4"])
def cluster(request):
    # Blocks of 4 ids are neither the default nor plain modulo: the controller must use the same rule.
    tq.init({"storage": {"num_units": 2, "stripe_rows": request.param}, "client": {"connect_timeout": 1.0}})
    yield api._current().cluster
    tq.close()


def test_dead_unit_rows_reported_lost_never_served(cluster):
    client = tq.get_client()
    stripe = cluster.config.storage.stripe_rows
    n = 3 * stripe  # the rows land on both units, striped in blocks of ``stripe`` ids
    client.put(TensorDict({"x": torch.arange(float(n))}, batch_size=[n]), partition_id="loss")
    ids = client.get_meta(["x"], n, "loss", mode="force_fetch").global_index_array
    on_dead = ids[unit_of(ids, 2, stripe) == 1]
    assert 0 < len(on_dead) < len(ids)
    meta = client.get_meta(["x"], n, "loss", task_name="reader", timeout=5)
    cluster.units[1].stop()  # the unit's process part dies: its rows are gone

    with pytest.raises(tq.DataLostError, match="lost"):
        client.get_data(meta)
    stats = tq.statistics()
    assert stats["controller"]["lost_rows"] == len(on_dead)
    assert "1" in stats["controller"]["lost_units"]
    # The lost rows are gone from the controller; the others are still served by unit 0.
    alive = client.get_meta(["x"], n, "loss", mode="force_fetch")
    assert set(alive.global_index_array.tolist()) == set(ids[unit_of(ids, 2, stripe) == 0].tolist())
    data = client.get_data(alive)
    assert np.array_equal(data["x"].numpy(), alive.global_index_array.astype(np.float32) - ids[0])
    # A fresh reader gets only the surviving rows.
    client.seal("loss")
    again = client.get_meta(["x"], n, "loss", task_name="second", timeout=5, allow_partial=True)
    assert set(again.global_index_array.tolist()) == set(alive.global_index_array.tolist())
    assert client.get_data(again)["x"].shape == (len(alive),)
    # Clearing the partition works although one unit is dead.
    client.clear_partition("loss")
    assert "loss" not in client.get_partition_list()
