"""`tq-loader serve` hosts a cluster in its own process; other processes attach by address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

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


# ------------------------------------------------------------------ one-line errors, status, bench
def tq_loader_cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> Any:
    base = {
        k: v for k, v in os.environ.items() if k not in ("TQ_LOADER_ADDRESS", "TQ_LOADER_METRICS_ENDPOINT")
    }
    return subprocess.run(
        [sys.executable, "-m", "tq_loader", *args], capture_output=True, text=True, timeout=120,
        env={**base, **(env or {})}, cwd=cwd,
    )  # fmt: skip


def one_line_error(done: Any) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_status_without_a_known_cluster_says_how_to_name_one() -> None:
    done = tq_loader_cli("status")
    assert done.returncode == 2 and done.stdout == ""  # nothing started, nothing shown
    line = one_line_error(done)
    assert "no cluster is known" in line and "--address" in line and "TQ_LOADER_ADDRESS" in line


@pytest.mark.parametrize("where", ["flag", "env"])
def test_status_of_an_unreachable_address_is_one_line(where: str) -> None:
    address = "127.0.0.1:9"  # discard port: nothing of ours listens there
    done = (
        tq_loader_cli("status", "--address", address)
        if where == "flag"
        else tq_loader_cli("status", env={"TQ_LOADER_ADDRESS": address})
    )
    assert done.returncode == 2
    assert "cannot reach" in one_line_error(done) and address in done.stderr


def test_debug_shows_the_traceback() -> None:
    done = tq_loader_cli("--debug", "status", "--address", "127.0.0.1:9")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_status_view_json_watch_and_plot(served_cluster: Any, tmp_path: Any) -> None:
    _, address = served_cluster
    tq.connect(address)
    try:
        client = tq.get_client()
        client.put(TensorDict({"x": torch.arange(8.0)}, batch_size=[8]), partition_id="view")
        client.get_data(client.get_meta(["x"], 3, "view", task_name="t", timeout=10))
    finally:
        tq.close()
    done = tq_loader_cli("status", env={"TQ_LOADER_ADDRESS": address})
    assert done.returncode == 0, done.stderr
    assert "view" in done.stdout and "storage units" in done.stdout and "lost rows: 0" in done.stdout
    view = json.loads(tq_loader_cli("status", "--address", address, "--json").stdout)["view"]
    (part,) = [p for p in view["partitions"] if p["partition_id"] == "view"]
    assert part["rows"] == 8 and part["produced"] == {"x": 1.0} and part["consumed"] == {"t": 0.375}
    assert sum(u["rows"] for u in view["units"]) == 8 and len(view["units"]) == 3
    # a reader that leaves early (`| head -1`) ends the watch without a BrokenPipeError traceback
    piped = subprocess.run(
        f"{sys.executable} -m tq_loader status --address {address} --json --watch 0.2 | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert piped.stdout == "{\n" and "BrokenPipe" not in piped.stderr and "Traceback" not in piped.stderr
    png = tmp_path / "view.png"
    done = tq_loader_cli("status", "--address", address, "--plot", str(png), "--partition", "view")
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_on_a_wide_address_without_a_token_is_one_line() -> None:
    done = tq_loader_cli("serve", "--host", "0.0.0.0", "storage.num_units=1")
    assert done.returncode == 2 and "TQ_LOADER_ADDRESS=" not in done.stdout
    assert "auth_token" in one_line_error(done)


def test_demo_override_typo_names_the_key() -> None:
    done = tq_loader_cli("demo", "storge.num_units=2")
    assert done.returncode == 2 and "storge.num_units" in one_line_error(done)


def test_bench_passes_its_arguments_from_any_directory(tmp_path: Any) -> None:
    done = tq_loader_cli("bench", "--help", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "usage: tq-loader bench" in done.stdout and "--quick" in done.stdout
    done = tq_loader_cli("bench", "--no-such-option", cwd=str(tmp_path))
    assert done.returncode == 2 and "--no-such-option" in done.stderr
