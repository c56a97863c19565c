"""`tq-loader serve` hosts a cluster in its own process; other processes attach by address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq


@pytest.fixture
def served_cluster():
    env = {k: v for k, v in os.environ.items() if k != "TQ_LOADER_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tq_loader", "serve", "storage.num_units=3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # the server prints its address once it serves
        assert line.startswith("TQ_LOADER_ADDRESS="), line
        yield proc, line.strip().split("=", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_attach_put_get_and_status(served_cluster):
    proc, address = served_cluster
    config = tq.connect(address)
    try:
        assert config.storage.num_units == 3
        client = tq.get_client()
        client.put(TensorDict({"x": torch.arange(6.0)}, batch_size=[6]), partition_id="cli")
        meta = client.get_meta(["x"], 6, "cli", task_name="t", timeout=10)
        assert client.get_data(meta)["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        stats = tq.statistics()
        assert stats["controller"]["partitions"]["partitions"]["cli"]["rows_live"] == 6
        assert stats["storage"]["num_units"] == 3
    finally:
        tq.close()
    out = subprocess.run(
        [sys.executable, "-m", "tq_loader", "status", "--address", address, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["controller"]["partitions"]["partitions"]["cli"]["tasks"] == {"t": 6}
    assert proc.poll() is None  # the server outlives its clients


def test_serve_stops_on_sigterm(served_cluster):
    proc, _ = served_cluster
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
