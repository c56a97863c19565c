"""Faults: a dead server, a lost storage unit, a killed checkpoint save, and what close/exit leave.

* ``tq-loader serve`` SIGKILLed while clients wait in ``get_meta`` (with and without a timeout),
  read with ``get_data`` (in flight, and called afterwards) or iterate a ``StreamingDataLoader``: each gets a typed ``TQConnectionError``
  (a ``TQError``), bounded by the request/connect timeouts, never a hang.
* A storage unit lost, embedded (its service stopped) and on Ray (``ray.kill`` of its actor): the
  first statistics snapshot already shows it lost with its rows counted, the other unit's rows are
  served, and a new put goes to the live unit at once (issue 7, defect 6).
* A checkpoint save SIGKILLed once its temporary directory exists: the previous checkpoint still
  loads, and the next save leaves no temporary directory.
* ``close()`` and interpreter exit leave no threads, sockets, child processes, memfd segments or
  ``/dev/shm`` entries behind (checked in a fresh interpreter).

The producer SIGKILLed mid-put is ``test_dead_producer.py``; the unit loss's typed errors for its
rows are ``tests/test_unit_loss.py``. This file is also the child program of the checkpoint and
leak checks: ``python test_faults.py save|close|exit ...``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_wire import child_env, serve

import tq_loader as tq
from tq_loader.striping import unit_of

WAIT_S = 60.0  # the bound on every wait here: a hang fails the test instead of blocking CI


def _in_thread(fn: Callable[[], Any]) -> Future:
    fut: Future = Future()

    def main() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the test through the future
            fut.set_exception(exc)

    threading.Thread(target=main, daemon=True).start()
    return fut


def _poll(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _waiting(client: Any) -> int:
    return client.statistics()["controller"]["waiting_requests"]


# ---------------------------------------------------------------------------- the server dies
def test_server_killed_while_clients_wait_gives_typed_errors() -> None:
    from tq_loader.client import Client
    from tq_loader.config import ClientConfig

    with serve("storage.num_units=2") as served:
        client = Client(served.address, config=ClientConfig(connect_timeout=3.0, request_timeout=10.0))
        try:
            stored = client.put({"x": torch.arange(8.0).reshape(4, 2)}, partition_id="kept")
            meta = client.get_meta(["x"], 4, "kept", mode="force_fetch")
            big = client.put({"b": torch.ones(64, 65536)}, partition_id="big")  # 16 MiB: a read takes a while
            reads = [0]

            def read_forever() -> None:  # get_data after get_data: the server dies during one of them
                while True:
                    client.get_data(big)
                    reads[0] += 1

            reader = _in_thread(read_forever)
            forever = _in_thread(lambda: client.get_meta(["x"], 4, "empty", task_name="a", timeout=None))
            bounded = _in_thread(lambda: client.get_meta(["x"], 4, "empty", task_name="b", timeout=300))
            _poll(
                lambda: _waiting(client) >= 2 and reads[0] >= 1,
                "get_meta calls waiting, get_data calls running",
            )
            os.kill(served.proc.pid, signal.SIGKILL)
            served.proc.wait(timeout=WAIT_S)
            for fut in (reader, forever, bounded):
                with pytest.raises(tq.TQConnectionError):
                    fut.result(timeout=WAIT_S)
            with pytest.raises(tq.TQConnectionError):  # a call made after the death
                _in_thread(lambda: client.get_data(meta)).result(timeout=WAIT_S)
            with pytest.raises(tq.TQConnectionError):
                _in_thread(lambda: client.put({"x": torch.ones(4, 2)}, metadata=stored)).result(
                    timeout=WAIT_S
                )
        finally:
            client.close()


def test_server_killed_while_a_loader_waits_gives_a_typed_error() -> None:
    with serve("storage.num_units=2", "client.connect_timeout=3", "client.request_timeout=10") as served:
        tq.close()
        tq.connect(served.address)
        try:
            client = tq.get_client()
            client.put({"x": torch.arange(4.0).reshape(2, 2)}, partition_id="stream")
            ds = tq.StreamingDataset(batch_size=2, data_fields=["x"], partition_id="stream", task_name="t")
            it = iter(tq.StreamingDataLoader(ds))
            first = next(it)  # the stream works; the next batch waits for rows nobody writes
            assert first[0]["x"].shape[0] == 2
            nxt = _in_thread(lambda: next(it))
            _poll(lambda: _waiting(client) >= 1, "the loader to wait on the controller")  # or its prefetch
            os.kill(served.proc.pid, signal.SIGKILL)
            served.proc.wait(timeout=WAIT_S)
            with pytest.raises(tq.TQError) as info:
                nxt.result(timeout=WAIT_S)
            assert isinstance(info.value, tq.TQConnectionError), repr(info.value)
        finally:
            tq.close()


# ---------------------------------------------------------------------------- a unit is lost
def _lose_a_unit_and_check(kill_unit_1: Callable[[], None], stripe: int) -> None:
    """Rows on both units; unit 1 dies; one snapshot says so; unit 0 serves; new puts avoid unit 1."""
    client = tq.get_client()
    n = 3 * stripe + 5
    client.put({"x": torch.arange(float(n)).unsqueeze(1)}, partition_id="loss")
    ids = client.get_meta(["x"], n, "loss", mode="force_fetch").global_index_array
    on_dead = ids[unit_of(ids, 2, stripe) == 1]
    assert 0 < len(on_dead) < n
    kill_unit_1()

    stats = tq.statistics()  # the first call after the death: storage and controller agree
    assert stats["controller"]["lost_units"].keys() == {"1"}
    assert stats["controller"]["lost_rows"] == len(on_dead)
    part = stats["controller"]["partitions"]["partitions"]["loss"]
    assert part["rows_live"] == n - len(on_dead)

    alive = client.get_meta(["x"], n, "loss", mode="force_fetch")
    assert sorted(alive.global_index_array.tolist()) == sorted(ids[unit_of(ids, 2, stripe) == 0].tolist())
    got = client.get_data(alive)["x"].squeeze(1).numpy()
    assert np.array_equal(got, (alive.global_index_array - ids[0]).astype(np.float32))

    # defect 6: new rows go to the live unit (before the fix this put failed after the connect timeout)
    for size in (1, stripe, 3 * stripe + 1):
        new = client.put({"x": torch.full((size, 1), -1.0)}, partition_id="after")
        new_ids = new.global_index_array
        assert len(new_ids) == size and (unit_of(new_ids, 2, stripe) == 0).all(), new_ids
        assert client.get_data(new)["x"].squeeze(1).tolist() == [-1.0] * size
    meta = client.get_meta([], 4, "after", mode="insert")  # allocated by metadata, written later
    assert (unit_of(meta.global_index_array, 2, stripe) == 0).all()
    client.put({"x": torch.zeros(4, 1)}, metadata=meta)
    assert tq.statistics()["controller"]["lost_rows"] == len(on_dead)  # nothing new was lost


@pytest.mark.parametrize("stripe", [1, 64], ids=["modulo", "stripe64"])
def test_lost_unit_embedded(stripe: int) -> None:
    from tq_loader import api

    tq.close()
    os.environ.pop("TQ_LOADER_ADDRESS", None)
    # a connect timeout far above what a put to the live unit takes: a put still aimed at the dead
    # unit waits it out and fails, so the test can fail only by that, never by its timing
    tq.init({"storage": {"num_units": 2, "stripe_rows": stripe}, "client": {"connect_timeout": 2.0}})
    try:
        cluster = api._current().cluster
        _lose_a_unit_and_check(lambda: cluster.units[1].stop(), stripe)
    finally:
        tq.close()


@pytest.mark.ray
def test_lost_unit_on_ray(ray_instance) -> None:
    ray = ray_instance
    tq.close()
    os.environ.pop("TQ_LOADER_ADDRESS", None)
    tq.init({"placement": "ray", "storage": {"num_units": 2}, "client": {"connect_timeout": 2.0}})
    try:

        def kill() -> None:
            actor = ray.get_actor("tq_loader_unit_1", namespace="tq_loader")
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=WAIT_S)
            ray.kill(actor, no_restart=True)
            _poll(lambda: not Path(f"/proc/{pid}").exists(), "the unit actor's process to exit")

        _lose_a_unit_and_check(kill, 64)
    finally:
        tq.close()


@settings(max_examples=60, deadline=None)
@given(
    num_units=st.integers(1, 5), stripe=st.integers(1, 70), start=st.integers(0, 10_000),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), data=st.data(),
)  # fmt: skip
def test_allocator_after_a_loss_fills_exactly_the_live_stripes(num_units, stripe, start, sizes, data) -> None:
    from tq_loader.controller.allocator import RowIdAllocator

    lost = data.draw(st.sets(st.integers(0, num_units - 1), min_size=1, max_size=num_units))
    alloc = RowIdAllocator(start)
    for unit in lost:
        alloc.avoid_unit(unit, num_units, stripe)
    if len(lost) == num_units:
        with pytest.raises(tq.TQConnectionError, match="every storage unit is lost"):
            alloc.allocate_ids(1)
        return
    got = np.concatenate([alloc.allocate_ids(n) for n in sizes])
    everything = np.arange(start, start + (sum(sizes) + 1) * num_units * stripe + num_units * stripe)
    live = everything[~np.isin(unit_of(everything, num_units, stripe), list(lost))]
    assert got.tolist() == live[: len(got)].tolist()  # ascending, no live id skipped, none lost
    assert alloc.next_id == (int(got[-1]) + 1 if len(got) else start)
    resumed = alloc.resumed_at(alloc.next_id + 5)  # a checkpoint load keeps avoiding the lost units
    assert not np.isin(unit_of(resumed.allocate_ids(2 * stripe), num_units, stripe), list(lost)).any()


# ---------------------------------------------------------------------------- checkpoint save killed
BIG_ROWS, BIG_DIM = 256, 65536  # 64 MiB of float32: the save takes long enough to be caught midway


def save_child(address: str, target: str) -> None:
    tq.connect(address)
    print("saving", flush=True)
    tq.save_checkpoint(target, {"which": "second"})
    print("saved", flush=True)  # the test kills us before this


def test_checkpoint_save_killed_midway_keeps_the_previous_one(tmp_path: Path) -> None:
    from tq_loader.client import Client

    target = tmp_path / "ck"
    with serve("storage.num_units=2") as served, Client(served.address) as client:
        client.put({"x": torch.arange(6.0).reshape(3, 2)}, partition_id="first")
        tq.save_checkpoint(target, {"which": "first"}, client=client)
        client.put({"big": torch.ones(BIG_ROWS, BIG_DIM)}, partition_id="second")
        child = subprocess.Popen(
            [sys.executable, __file__, "save", served.address, str(target)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )  # fmt: skip
        try:
            _poll(
                lambda: any(tmp_path.glob(".ck.tq-tmp-*")) or child.poll() is not None, "the save's temp dir"
            )
            os.kill(child.pid, signal.SIGKILL)
            out, err = child.communicate(timeout=WAIT_S)
        finally:
            if child.poll() is None:
                child.kill()
        assert "saved" not in out, f"the save finished before it was killed: {err[-2000:]}"
        assert any(tmp_path.glob(".ck.tq-tmp-*")), "the killed save left no temp dir (nothing was tested)"

        assert tq.load_checkpoint(target, client=client) == {"which": "first"}  # the previous one
        assert client.get_partition_list() == ["first"]
        meta = client.get_meta(["x"], 3, "first", mode="force_fetch")
        assert client.get_data(meta)["x"].flatten().tolist() == [float(i) for i in range(6)]
        client.put({"y": torch.ones(2, 1)}, partition_id="third")
        tq.save_checkpoint(target, {"which": "third"}, client=client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir, no kept-aside copy


# ---------------------------------------------------------------------------- nothing left behind
def _resources() -> dict[str, Any]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
    children = set()
    for task in os.listdir("/proc/self/task"):
        try:
            children.update(Path(f"/proc/self/task/{task}/children").read_text().split())
        except OSError:
            continue
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "sockets": sorted(v for v in fds.values() if v.startswith("socket:")),
        "memfd": sorted(v for v in fds.values() if v.startswith("/memfd:")),
        "children": sorted(children),
        "shm": sorted(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else [],
    }


def _exercise_embedded() -> None:
    tq.init({"storage": {"num_units": 2}})
    client = tq.get_client()
    client.put({"x": torch.arange(8.0).reshape(4, 2), "s": ["a", "b", "c", "d"]}, partition_id="p")
    client.seal("p")
    ds = tq.StreamingDataset(batch_size=2, data_fields=["x"], partition_id="p", task_name="t")
    assert sum(td["x"].shape[0] for td, _ in tq.StreamingDataLoader(ds)) == 4


def _exercise_remote(address: str) -> None:
    from tq_loader.client import Client

    client = Client(address)
    meta = client.put({"x": torch.ones(200, 1024)}, partition_id="remote")  # big enough for shared memory
    assert client.get_data(meta)["x"].shape == (200, 1024)
    client.close()


def close_child(address: str) -> None:
    """Exercise an embedded cluster and a remote client, close both, print what is left over."""
    base = _resources()
    _exercise_embedded()
    tq.close()
    _exercise_remote(address)

    def settled() -> bool:
        gc.collect()  # batches the caller dropped may sit in reference cycles; their memory goes with them
        now = _resources()
        return all(set(now[k]) <= set(base[k]) for k in ("threads", "sockets", "memfd", "children"))

    deadline = time.monotonic() + 20
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    now = _resources()
    print(json.dumps({k: sorted(set(now[k]) - set(base[k])) for k in now}))


def exit_child(address: str) -> None:
    """Exercise both and exit without closing: the interpreter's exit must clean up (and not hang)."""
    _exercise_embedded()
    from tq_loader.client import Client

    client = Client(address)
    client.put({"x": torch.ones(200, 1024)}, partition_id="exit")
    print(json.dumps(_resources()), flush=True)  # what is open at exit, for the test to look for


def _ours(shm: list[str]) -> list[str]:
    return [n for n in shm if "tq" in n.lower()]


def test_close_leaves_nothing_behind() -> None:
    with serve("storage.num_units=1") as served:
        out = subprocess.run(
            [sys.executable, __file__, "close", served.address],
            capture_output=True, text=True, timeout=WAIT_S * 3, env=child_env(),
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    left = json.loads(out.stdout.strip().splitlines()[-1])
    assert left["threads"] == [] and left["sockets"] == [] and left["memfd"] == [], left
    assert left["children"] == [] and _ours(left["shm"]) == [], left


def test_interpreter_exit_leaves_nothing_behind() -> None:
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with serve("storage.num_units=1") as served:
        out = subprocess.run(
            [sys.executable, __file__, "exit", served.address],
            capture_output=True, text=True, timeout=WAIT_S * 3, env=child_env(),  # a hang at exit fails here
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        at_exit = json.loads(out.stdout.strip().splitlines()[-1])
        assert at_exit["sockets"], "the child held no sockets at exit (nothing was tested)"
        for pid in at_exit["children"]:
            _poll(
                lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"child process {pid} of the exited client"
            )
        units = served.proc.pid
        assert Path(f"/proc/{units}").exists()  # the server outlived its client
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert _ours(sorted(shm_after - shm_before)) == []


if __name__ == "__main__":
    {"save": save_child, "close": close_child, "exit": exit_child}[sys.argv[1]](*sys.argv[2:])
