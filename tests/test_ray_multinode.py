"""The Ray placement over several nodes (Ray's own multi-node test cluster on this machine).

Three raylets: a head that keeps the controller, and two worker nodes offering the ``store``
resource that hold the storage units. Tasks pinned to a worker node attach with ``tq.init()``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from tensordict import TensorDict

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import tq_loader as tq  # noqa: E402
from tq_loader.errors import DataLostError, TQConnectionError  # noqa: E402

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
CONF = {"placement": "ray", "storage": {"num_units": 2, "stripe_rows": 8},
        "ray": {"unit_resource": "store", "controller_resource": "head"}}  # fmt: skip


@pytest.fixture(scope="module")
def nodes():
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    tq.close()
    os.environ.pop("TQ_LOADER_ADDRESS", None)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, resources={"store": 1, f"node{i}": 1}) for i in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield cluster, workers
    finally:
        tq.close()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _unit_nodes() -> list[str]:
    units = [ray.get_actor(f"tq_loader_unit_{i}", namespace="tq_loader") for i in range(2)]
    return ray.get([u.node_id.remote() for u in units], timeout=60)


def _put_and_read(key: str) -> dict:
    """Runs on a worker node: attach with a bare tq.init() (no address in its environment)."""
    import os

    import torch

    import tq_loader as tq

    os.environ.pop("TQ_LOADER_ADDRESS", None)
    tq.init()
    tq.kv_put(key, "multi", {"x": torch.full((4,), 3.0)})
    back = tq.kv_batch_get([key], "multi")["x"]
    out = {"address": tq.get_client().controller_address, "sum": float(back.sum()),
           "node": ray.get_runtime_context().get_node_id()}  # fmt: skip
    tq.close()
    return out


def test_units_spread_over_the_store_nodes_and_workers_attach(nodes):
    tq.close()
    tq.init(CONF)
    try:
        head = ray.get_runtime_context().get_node_id()
        where = _unit_nodes()
        assert len(set(where)) == 2 and head not in where  # one unit per store node, none on the head
        results = ray.get(
            [
                ray.remote(num_cpus=0, resources={f"node{i}": 0.01})(_put_and_read).remote(f"k{i}")
                for i in range(2)
            ],
            timeout=120,
        )
        assert {r["address"] for r in results} == {tq.get_client().controller_address}
        assert [r["sum"] for r in results] == [12.0, 12.0]
        assert sorted(tq.kv_list("multi")["multi"]) == ["k0", "k1"]
        # the driver (head node) never maps a unit's memory on another node: bytes go over TCP
        big = TensorDict({"x": torch.randn(4096, 256)}, batch_size=[4096])
        meta = tq.get_client().put(big, partition_id="big")
        assert torch.equal(tq.get_client().get_data(meta)["x"], big["x"])
        for unit in tq.statistics()["storage"]["units"].values():
            assert unit["shared_memory"]["segments"] == 0
    finally:
        tq.close()


def _attach_embedded() -> str:
    import os

    import tq_loader as tq

    os.environ.pop("TQ_LOADER_ADDRESS", None)
    try:
        tq.init()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "attached"


def test_a_worker_on_another_node_cannot_use_an_embedded_cluster(nodes):
    tq.init({"placement": "local"})
    try:
        answer = ray.get(
            ray.remote(num_cpus=0, resources={"node0": 0.01})(_attach_embedded).remote(), timeout=120
        )
        assert answer.startswith("TQConnectionError") and "placement: ray" in answer
    finally:
        tq.close()


def test_losing_a_node_loses_its_units_rows_and_the_rest_is_served(nodes):
    cluster, workers = nodes
    tq.init(CONF)
    try:
        client = tq.get_client()
        meta = client.put(TensorDict({"x": torch.arange(64.0)}, batch_size=[64]), partition_id="lose")
        where = _unit_nodes()
        lost = next(i for i, w in enumerate(workers) if w.node_id == where[1])
        cluster.remove_node(workers[lost])  # unit 1 goes with its node
        with pytest.raises(DataLostError):
            client.get_data(meta)
        left = client.get_meta(["x"], 1, "lose", mode="force_fetch")
        assert 0 < left.size < 64  # unit 1's rows were dropped, unit 0's remain
        values = client.get_data(left)["x"]
        assert torch.equal(
            values, torch.tensor([float(i) for i in left.global_indexes]) - meta.global_indexes[0]
        )
        assert client.statistics()["controller"]["lost_rows"] == 64 - left.size
    finally:
        tq.close()
        if "lost" in locals():  # the same node again (later tests pin tasks to node0 / node1)
            workers[lost] = cluster.add_node(num_cpus=1, resources={"store": 1, f"node{lost}": 1})
            cluster.wait_for_nodes()


def test_scheduling_units_on_a_resource_no_node_has_fails_clearly(nodes):
    conf = {**CONF, "ray": {"unit_resource": "gpu-node-that-does-not-exist"}}
    import tq_loader.ray_cluster as rc

    old, rc._SCHEDULE_TIMEOUT = rc._SCHEDULE_TIMEOUT, 3.0
    try:
        with pytest.raises(TQConnectionError, match="gpu-node-that-does-not-exist"):
            tq.init(conf)
    finally:
        rc._SCHEDULE_TIMEOUT = old
        tq.close()


def test_the_auth_token_reaches_workers_without_user_code(nodes):
    tq.init({**CONF, "auth_token": "s3cret-token"})
    try:
        task = ray.remote(num_cpus=0, resources={"node0": 0.01})(_put_and_read)
        assert (
            ray.get(task.remote("with-token"), timeout=120)["sum"] == 12.0
        )  # the worker set no token itself
    finally:
        tq.close()
