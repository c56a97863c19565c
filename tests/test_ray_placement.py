"""What only the Ray placement does: named actors, attaching by actor name from Ray workers, clean stop.

The placement-neutral behaviour (put/get, streams, KV) runs on Ray in test_lifecycle.py and
test_kv.py; this module owns one Ray instance and creates its clusters itself.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import ADDRESS_ENV, in_thread, start_cluster, stop_cluster, wait_for_waiters, waiting_requests
from tensordict import TensorDict

pytestmark = pytest.mark.ray

NAMESPACE = "tq_loader"


@pytest.fixture(scope="module")
def ray_cluster(ray_instance):
    handle = start_cluster("ray")
    try:
        yield handle
    finally:
        stop_cluster()


def _actor_exists(ray, name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def test_services_are_named_ray_actors(ray_instance, ray_cluster):
    ray = ray_instance
    from tq_loader.ray_cluster import find_controller_address

    assert ray_cluster.config.placement == "ray"
    assert _actor_exists(ray, "tq_loader_controller")
    assert _actor_exists(ray, "tq_loader_unit_0") and _actor_exists(ray, "tq_loader_unit_1")
    info = ray_cluster.client.describe()
    assert len(info.storage_units) == 2 and info.controller == ray_cluster.client.controller_address
    assert find_controller_address(ray_cluster.config) == info.controller == os.environ[ADDRESS_ENV]


def _worker_put(pid: str, n: int) -> dict:
    """Runs in a Ray worker: attach by actor name (no address in the environment) and put rows."""
    import os

    import tq_loader.api as tq

    os.environ.pop("TQ_LOADER_ADDRESS", None)  # force the lookup of the named controller actor
    tq.init()
    client = tq.get_client()
    meta = client.put(TensorDict({"x": torch.arange(n).unsqueeze(1) * 3}, batch_size=[n]), partition_id=pid)
    out = {"ids": meta.global_index_array.tolist(), "address": client.controller_address}
    tq.close()
    return out


def test_ray_worker_attaches_by_name_and_wakes_a_waiting_driver(ray_instance, ray_cluster, pid):
    ray = ray_instance
    client = ray_cluster.client
    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["x"], 5, pid, task_name="t", timeout=120)
    wait_for_waiters(client, base + 1)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    report = ray.get(ray.remote(num_cpus=0)(_worker_put).remote(pid, 5), timeout=120)
    assert report["address"] == client.controller_address
    got = waiter.result(timeout=30)
    assert got.global_index_array.tolist() == report["ids"]
    assert client.get_data(got)["x"].squeeze(1).tolist() == [0, 3, 6, 9, 12]
    # the worker detached: the services are still up
    assert ray.get_actor("tq_loader_controller", namespace=NAMESPACE) is not None


def test_close_survives_a_dead_unit_and_frees_names(ray_instance, ray_cluster):
    ray = ray_instance
    ray.kill(ray.get_actor("tq_loader_unit_1", namespace=NAMESPACE))  # a storage unit dies
    stop_cluster()  # closing still stops everything else, frees the names and clears the address
    assert ADDRESS_ENV not in os.environ
    for name in ("tq_loader_controller", "tq_loader_unit_0", "tq_loader_unit_1"):
        assert not _actor_exists(ray, name)


def _worker_kv(key: str) -> str:
    """Runs in a Ray worker, whose environment has no TQ_LOADER_ADDRESS: ``tq.init()`` must find the
    driver's (embedded) cluster, never make a private one."""
    import os

    import tq_loader as tq

    os.environ.pop("TQ_LOADER_ADDRESS", None)
    tq.init()
    tq.kv_put(key, "from_workers", {"x": torch.tensor([1.0, 2.0])}, {"worker": True})
    address = tq.get_client().controller_address
    tq.close()
    return address


def test_ray_worker_init_finds_the_drivers_embedded_cluster(ray_instance):
    ray = ray_instance
    handle = start_cluster("local")
    try:
        assert _actor_exists(ray, "tq_loader_registry")  # announced to the job because Ray is up
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        remote = ray.remote(num_cpus=0)(_worker_kv)
        addresses = ray.get([remote.remote(f"k{i}") for i in range(3)], timeout=120)
        assert set(addresses) == {handle.client.controller_address}
        import tq_loader as tq

        assert sorted(tq.kv_list("from_workers")["from_workers"]) == ["k0", "k1", "k2"]
    finally:
        stop_cluster()
    assert not _actor_exists(ray, "tq_loader_registry")  # close() withdrew the announcement
