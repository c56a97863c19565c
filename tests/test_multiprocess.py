"""Two OS processes sharing one embedded cluster: the child attaches through ``TQ_LOADER_ADDRESS``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ADDRESS_ENV, in_thread, start_cluster, stop_cluster, wait_for_waiters, waiting_requests
from tensordict import TensorDict

# The child: attach (no config: everything comes from the environment), write rows the parent is
# waiting for, read rows the parent wrote, detach. It prints one JSON line for the parent to check.
CHILD = """
import json, os, sys
import torch
from tensordict import TensorDict
import tq_loader.api as tq

pid, parent_pid = sys.argv[1], sys.argv[2]
config = tq.init()
client = tq.get_client()
meta = client.put(TensorDict({"x": torch.arange(4.0).unsqueeze(1) + 100}, batch_size=[4]), partition_id=pid)
got = client.get_meta(["y"], 3, parent_pid, task_name="child", timeout=60)
data = client.get_data(got)
print(json.dumps({
    "put_ids": meta.global_index_array.tolist(),
    "got_ids": got.global_index_array.tolist(),
    "y": data["y"].squeeze(1).tolist(),
    "address": os.environ["TQ_LOADER_ADDRESS"],
    "placement": config.placement,
}))
tq.close()  # detaching must not stop the parent's services
"""


@pytest.fixture(scope="module")
def shared_cluster():
    handle = start_cluster("local")
    try:
        yield handle
    finally:
        stop_cluster()


def test_child_process_put_wakes_parent_get_meta(shared_cluster, pid):
    client = shared_cluster.client
    assert os.environ[ADDRESS_ENV] == client.controller_address
    parent_pid = pid + "-parent"
    parent_meta = client.put(
        TensorDict({"y": torch.tensor([[1.5], [2.5], [3.5]])}, batch_size=[3]), partition_id=parent_pid
    )

    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["x"], 4, pid, task_name="parent", timeout=120)
    wait_for_waiters(client, base + 1)
    assert not waiter.done()

    child = subprocess.run(
        [sys.executable, "-c", CHILD, pid, parent_pid],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])

    got = waiter.result(timeout=30)
    assert got.global_index_array.tolist() == report["put_ids"]
    assert client.get_data(got)["x"].squeeze(1).tolist() == [100.0, 101.0, 102.0, 103.0]
    assert report["got_ids"] == parent_meta.global_index_array.tolist()
    assert report["y"] == [1.5, 2.5, 3.5]
    assert report["address"] == client.controller_address and report["placement"] == "local"

    # the child's consumption is its task's alone; the cluster still serves after it detached
    _, consumed = client.get_consumption_status("child", parent_pid)
    assert consumed.all()
    again = client.get_meta(["y"], 3, parent_pid, task_name="parent", timeout=30)
    assert again.global_index_array.tolist() == parent_meta.global_index_array.tolist()
