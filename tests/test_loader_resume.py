"""Crash-resume, exactly once, with real processes.

The data plane runs in ``tq-loader serve`` (its own process). A consumer process iterates ``K``
micro-batches from one partition per sampler, writing its ``state_dict()`` (JSON) after each
delivered micro-batch, and is killed with SIGKILL while its prefetch threads have fetched ahead
(the controller has consumed more rows than were delivered). A second consumer process loads the
states and runs to the end. Per sampler: the delivered rows of both processes are every row
exactly once, in the order of an uninterrupted reference run on a second partition fed the same.

This file is also the consumer's program: ``python test_loader_resume.py first|resume WORKDIR``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.loader import ResumeStateError

SAMPLERS: dict[str, dict[str, Any]] = {
    "sequential": {},
    "grpo_group_n": {"n_samples_per_prompt": 4},
    "rank_aware": {},
}
N_ROWS, CHUNK, BATCH, MICRO = 64, 16, 8, 4
K = 3  # micro-batches the first consumer delivers: batch 1 is cut in the middle
TASK = "trainer"
JOIN = 60.0


# ----------------------------------------------------------------------------- shared by test and consumer
def make_loader(pid: str, sampler: str) -> tq.StreamingDataLoader:
    ds = tq.StreamingDataset(
        None, BATCH, MICRO, ["x"], pid, TASK, 0, sampler=sampler, sampling_config=SAMPLERS[sampler]
    )
    return tq.StreamingDataLoader(ds, num_workers=2, prefetch_factor=2)


def rows_of(td: TensorDict) -> list[int]:
    return [int(v) for v in td["x"].tolist()]


def write_json(path: Path, value: Any) -> None:
    """Atomic: a SIGKILL leaves either the previous or the new file, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- consumer process
def consumer_first(workdir: Path) -> None:
    """Deliver K micro-batches per partition, saving the state after each; then wait to be killed."""
    partitions: dict[str, str] = json.loads((workdir / "partitions.json").read_text())
    iterators = []  # kept alive: their prefetch threads keep fetching ahead until the kill
    for sampler, pid in partitions.items():
        loader = make_loader(pid, sampler)
        it = iter(loader)
        delivered: list[list[int]] = []
        for _ in range(K):
            td, _meta = next(it)
            delivered.append(rows_of(td))
            write_json(
                workdir / f"{sampler}.state.json", {"state": loader.state_dict(), "delivered": delivered}
            )
        iterators.append((loader, it))
    print("READY", flush=True)
    sys.stdin.read()  # blocks until the test kills this process


def consumer_resume(workdir: Path) -> None:
    partitions: dict[str, str] = json.loads((workdir / "partitions.json").read_text())
    for sampler, pid in partitions.items():
        saved = json.loads((workdir / f"{sampler}.state.json").read_text())
        loader = make_loader(pid, sampler)
        loader.load_state_dict(saved["state"])
        rest = [rows_of(td) for td, _ in loader]
        write_json(workdir / f"{sampler}.rest.json", rest)
    print("DONE", flush=True)


# ----------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """``tq-loader serve`` in a subprocess; this process attaches to it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_LOADER_ADDRESS", "TQ_LOADER_AUTH_TOKEN")}
    server = subprocess.Popen(
        [sys.executable, "-m", "tq_loader", "serve"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        address = ""
        for line in server.stdout:
            if line.startswith("TQ_LOADER_ADDRESS="):
                address = line.strip().split("=", 1)[1]
                break
        assert address, f"tq-loader serve exited ({server.poll()}) without printing its address"
        tq.close()
        tq.connect(address)
        yield address
    finally:
        tq.close()
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            raise AssertionError("tq-loader serve did not stop on SIGTERM") from None


def spawn_consumer(phase: str, workdir: Path, address: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TQ_LOADER_ADDRESS": address}
    return subprocess.Popen(
        [sys.executable, __file__, phase, str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def read_until(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"consumer exited with {proc.wait()} before printing {word}")


def wait_until(predicate: Any, what: str, timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)  # test-side wait on the system under test, bounded by the deadline


def consumed(client: Any, pid: str) -> int:
    _, done = client.get_consumption_status(TASK, pid)
    return int(done.sum())


@pytest.mark.timeout(120)
def test_sigkilled_consumer_resumes_exactly_once(served: str, tmp_path: Path) -> None:
    client = tq.get_client()
    tag = uuid.uuid4().hex[:8]
    partitions = {s: f"crash-{s}-{tag}" for s in SAMPLERS}
    references = {s: f"reference-{s}-{tag}" for s in SAMPLERS}
    for start in range(0, N_ROWS, CHUNK):  # both partitions of a sampler are fed identically
        x = torch.arange(start, start + CHUNK)
        for pid in (*partitions.values(), *references.values()):
            client.put(TensorDict({"x": x}, batch_size=[CHUNK]), partition_id=pid)
    for pid in (*partitions.values(), *references.values()):
        client.seal(pid)
    (tmp_path / "partitions.json").write_text(json.dumps(partitions))

    first = spawn_consumer("first", tmp_path, served)
    try:
        read_until(first, "READY")
        for pid in partitions.values():  # the kill must hit batches fetched but not delivered
            wait_until(lambda pid=pid: consumed(client, pid) > K * MICRO, f"{pid} was fetched ahead")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=JOIN)
    assert first.returncode == -signal.SIGKILL

    second = spawn_consumer("resume", tmp_path, served)
    out, _ = second.communicate(timeout=JOIN)
    assert second.returncode == 0, out

    for sampler, pid in partitions.items():
        saved = json.loads((tmp_path / f"{sampler}.state.json").read_text())
        before: list[list[int]] = saved["delivered"]
        after: list[list[int]] = json.loads((tmp_path / f"{sampler}.rest.json").read_text())
        assert len(before) == K and saved["state"]["next_batch_index"] == 1
        assert saved["state"]["skip_micro_batches"] == 1
        rows = [r for mb in before + after for r in mb]
        assert sorted(rows) == list(range(N_ROWS)), f"{sampler}: rows lost or repeated across the crash"
        reference = [rows_of(td) for td, _ in make_loader(references[sampler], sampler)]
        assert before + after == reference, f"{sampler}: order differs from the uninterrupted run"
        assert consumed(client, pid) == N_ROWS
        if sampler == "grpo_group_n":
            assert all(len({r // 4 for r in mb}) == 1 for mb in before + after), "a prompt group was split"


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    (consumer_first if phase == "first" else consumer_resume)(workdir)


# ----------------------------------------------------------------------------- resume into the wrong cluster
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def serve(*overrides: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_LOADER_ADDRESS", "TQ_LOADER_AUTH_TOKEN")}
    server = subprocess.Popen(
        [sys.executable, "-m", "tq_loader", "serve", *overrides],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdout is not None
    for line in server.stdout:
        if line.startswith("TQ_LOADER_ADDRESS="):
            return server, line.strip().split("=", 1)[1]
    raise AssertionError(f"tq-loader serve exited ({server.wait()}) without printing its address")


def stop(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def feed_and_read(pid: str, k: int) -> dict[str, Any]:
    """Put 32 rows into ``pid`` of the attached cluster, seal, deliver ``k`` micro-batches; the state."""
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(32)}, batch_size=[32]), partition_id=pid)
    client.seal(pid)
    loader = tq.StreamingDataLoader(tq.StreamingDataset(None, BATCH, MICRO, ["x"], pid, TASK, 0, dp_size=1))
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    return state


def fresh_loader(pid: str) -> tq.StreamingDataLoader:
    return tq.StreamingDataLoader(tq.StreamingDataset(None, BATCH, MICRO, ["x"], pid, TASK, 0, dp_size=1))


@pytest.mark.timeout(120)
def test_resume_refuses_a_fresh_cluster_on_the_same_ports() -> None:
    """``tq-loader serve`` restarted on fixed ports has the same addresses; the row ids tell it apart."""
    port, *units = free_ports(3)
    overrides = (f"--port={port}", f"storage.ports=[{units[0]},{units[1]}]")
    tq.close()
    server, address = serve(*overrides)
    try:
        tq.connect(address)
        tq.get_client().put(TensorDict({"x": torch.arange(64)}, batch_size=[64]), partition_id="warmup")
        state = feed_and_read("stream", 3)  # rows 64..95 of the first cluster; 3 micro-batches delivered
        assert state["cluster"]["controller"] == address and state["max_row_id"] >= 64
        assert fresh_loader("stream").load_state_dict(state) is None  # the same cluster: accepted
    finally:
        tq.close()
        stop(server)
    server, again = serve(*overrides)
    try:
        assert again == address
        tq.connect(again)
        tq.get_client().put(TensorDict({"x": torch.arange(32)}, batch_size=[32]), partition_id="stream")
        with pytest.raises(ResumeStateError, match=r"another cluster|fresh cluster"):
            fresh_loader("stream").load_state_dict(state)
        tq.get_client().seal("stream")
        forced = fresh_loader("stream")
        with pytest.warns(UserWarning, match="resuming anyway"):
            forced.load_state_dict(state, allow_other_cluster=True)
        assert forced.state_dict()["next_batch_index"] == state["next_batch_index"]
    finally:
        tq.close()
        stop(server)


@pytest.mark.timeout(120)
def test_resume_refuses_another_cluster_and_a_cleared_partition(served: str) -> None:
    tq.close()
    tq.connect(served)
    state = feed_and_read(f"moved-{uuid.uuid4().hex[:8]}", 2)
    tq.close()
    tq.init({"storage": {"num_units": 1}})  # another cluster (embedded, fresh addresses)
    try:
        with pytest.raises(ResumeStateError, match="another cluster") as caught:
            fresh_loader(state["partition_id"]).load_state_dict(state)
        assert "allow_other_cluster=True" in str(caught.value)
    finally:
        tq.close()
        tq.connect(served)
    tq.get_client().clear_partition(state["partition_id"])
    with pytest.raises(ResumeStateError, match="no such partition"):
        fresh_loader(state["partition_id"]).load_state_dict(state)
