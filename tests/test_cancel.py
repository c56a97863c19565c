"""A get_meta the client gave up on consumes nothing, even when rows arrive later."""

from __future__ import annotations

import pytest
import torch
from conftest import wait_until
from tensordict import TensorDict

import tq_loader as tq


@pytest.fixture
def client():
    tq.init()
    yield tq.get_client()
    tq.close()


def test_cancelled_get_meta_consumes_nothing(client):
    waiting = lambda: tq.statistics()["controller"]["waiting_requests"]  # noqa: E731
    future = client.submit(lambda core: core.async_get_meta(["x"], 4, "cancel", task_name="t"))
    wait_until(lambda: waiting() == 1, "the get_meta to park in the controller")
    future.cancel()
    wait_until(lambda: waiting() == 0, "the controller to drop the cancelled request")
    client.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="cancel")
    assert client.get_consumption_status("t", "cancel")[1].tolist() == [0, 0, 0, 0]
    meta = client.get_meta(["x"], 4, "cancel", task_name="t", timeout=5)
    assert meta.size == 4


def test_timed_out_get_meta_consumes_nothing(client):
    with pytest.raises(tq.TQTimeoutError):
        client.get_meta(["x"], 4, "late", task_name="t", timeout=0.2)
    client.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="late")
    assert client.get_consumption_status("t", "late")[1].tolist() == [0, 0, 0, 0]
