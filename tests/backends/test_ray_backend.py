"""A KV backend under the Ray placement: the driver starts the backend's services, the controller
runs as a Ray actor, a Ray task attaches with ``tq.init()`` and reads what the driver wrote, and
``tq.close()`` stops the services (by pid)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tq_loader.storage.kv_client import pid_alive
from tq_loader.storage.mooncake import mooncake_available

ray = pytest.importorskip("ray")


@pytest.fixture
def ray_up() -> Iterator[None]:
    missing = mooncake_available()
    if missing:
        pytest.skip(missing)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="tq_backend_test")
    try:
        yield
    finally:
        ray.shutdown()


def test_mooncake_on_the_ray_placement(ray_up: None) -> None:
    import tq_loader as tq

    def remote_sum() -> float:  # defined here: Ray ships it by value (the test module is not importable)
        import tq_loader as tq

        tq.init()  # finds the cluster through Ray
        client = tq.get_client()
        meta = client.get_meta(["a"], 10, "p", task_name="remote")
        return float(client.get_data(meta)["a"].sum())

    section = {"global_segment_size": 256 << 20, "local_buffer_size": 32 << 20}
    tq.init({"placement": "ray", "storage": {"backend": "mooncake", "mooncake": section}})
    try:
        storage = tq.statistics().storage
        assert storage.backend == "mooncake" and storage.services["master"].startswith("127.0.0.1:")
        pids = storage.services["pids"]
        assert pids and all(pid_alive(pid) for pid in pids)
        tq.get_client().put({"a": torch.arange(10.0)}, partition_id="p")
        assert ray.get(ray.remote(remote_sum).remote(), timeout=120) == 45.0
    finally:
        tq.close()
    assert not [pid for pid in pids if pid_alive(pid)], "the Mooncake services outlived tq.close()"
