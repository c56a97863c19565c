"""Prometheus metrics (``metrics.enabled``): the endpoint ``tq.get_metrics_endpoint()`` names serves
the numbers of the statistics snapshot, and stops with ``tq.close()``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import start_cluster, stop_cluster
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.metrics import ENV_METRICS


def scrape(endpoint: str) -> dict[str, float]:
    """``/metrics`` parsed into ``{'name{labels}': value}`` (labels as the exposition writes them)."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture
def metrics_cluster() -> Iterator[Any]:
    handle = start_cluster("local", metrics={"enabled": True, "port": 0})
    try:
        yield handle.client
    finally:
        stop_cluster()


def test_endpoint_serves_the_statistics(metrics_cluster: Any) -> None:
    client = metrics_cluster
    endpoint = tq.get_metrics_endpoint()
    assert endpoint is not None and endpoint.startswith("127.0.0.1:")
    assert int(endpoint.rsplit(":", 1)[1]) > 0  # port 0 became a real free port
    assert os.environ[ENV_METRICS] == endpoint  # child processes learn it like the address
    client.put(
        TensorDict({"x": torch.arange(12.0), "y": torch.ones(12, 3)}, batch_size=[12]), partition_id="m"
    )
    client.put(TensorDict({"x": torch.arange(4.0)}, batch_size=[4]), partition_id="m2")
    meta = client.get_meta(["x"], 5, "m", task_name="actor", timeout=10)
    client.get_data(meta)
    client.seal("m")
    got = scrape(endpoint)
    assert got["tq_loader_up"] == 1
    assert got["tq_loader_partitions"] == 2
    assert got['tq_loader_partition_rows{partition="m"}'] == 12
    assert got['tq_loader_partition_rows{partition="m2"}'] == 4
    assert got['tq_loader_partition_sealed{partition="m"}'] == 1
    assert got['tq_loader_partition_sealed{partition="m2"}'] == 0
    assert got['tq_loader_partition_produced_rows{field="y",partition="m"}'] == 12
    assert got['tq_loader_partition_consumed_rows{partition="m",task="actor"}'] == 5
    assert got["tq_loader_controller_rows_out_total"] == 5
    assert got["tq_loader_controller_lost_rows_total"] == 0
    stats = client.statistics()
    unit_rows = {k: v for k, v in got.items() if k.startswith("tq_loader_storage_unit_rows{")}
    assert len(unit_rows) == 2 and sum(unit_rows.values()) == 16 == stats["storage"]["rows"]
    unit_bytes = sum(v for k, v in got.items() if k.startswith("tq_loader_storage_unit_bytes{"))
    assert unit_bytes == sum(u["bytes"] for u in stats["storage"]["units"].values()) > 0
    puts = sum(v for k, v in got.items() if k.startswith('tq_loader_storage_unit_requests_total{op="put"'))
    assert puts >= 2
    # a later scrape sees later numbers (nothing cached)
    client.get_data(client.get_meta(["x"], 7, "m", task_name="actor", timeout=10))
    assert scrape(endpoint)['tq_loader_partition_consumed_rows{partition="m",task="actor"}'] == 12


def test_close_stops_the_endpoint(metrics_cluster: Any) -> None:
    endpoint = tq.get_metrics_endpoint()
    assert endpoint is not None and scrape(endpoint)["tq_loader_up"] == 1
    stop_cluster()
    assert tq.get_metrics_endpoint() is None and ENV_METRICS not in os.environ
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(endpoint)


def test_metrics_off_means_no_endpoint(local_client: Any) -> None:
    assert tq.get_config().metrics.enabled is False
    assert tq.get_metrics_endpoint() is None  # as TransferQueue: None when metrics are disabled


def test_bad_metrics_port_is_refused() -> None:
    with pytest.raises(ValueError, match=r"metrics\.port"):
        tq.TQConfig(metrics=tq.config.MetricsConfig(port=70000))


def test_serve_prints_the_metrics_endpoint() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_LOADER_ADDRESS", ENV_METRICS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tq_loader", "serve", "storage.num_units=1", "metrics.enabled=true"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        line = proc.stdout.readline().strip()
        assert address.startswith("TQ_LOADER_ADDRESS=") and line.startswith(f"{ENV_METRICS}="), (
            address,
            line,
        )
        endpoint = line.split("=", 1)[1]
        got = scrape(endpoint)
        assert got["tq_loader_up"] == 1 and got["tq_loader_partitions"] == 0
        # a process that only attached by address asks the controller (no env var to inherit)
        attached = {**env, "TQ_LOADER_ADDRESS": address.split("=", 1)[1]}
        code = "import tq_loader as tq; tq.init(); print(tq.get_metrics_endpoint()); tq.close()"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=attached
        )
        assert done.returncode == 0 and done.stdout.strip() == endpoint, done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_child_processes_learn_the_endpoint(metrics_cluster: Any) -> None:
    endpoint = tq.get_metrics_endpoint()
    code = "import tq_loader as tq; print(tq.get_metrics_endpoint())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == endpoint, done.stderr
