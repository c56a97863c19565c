"""One conformance suite for every storage backend available here, against the real services.

Each backend gets one cluster for the module (``storage.backend = NAME``, services started by the
cluster itself on free loopback ports and stopped by pid when it stops). The same tests run for
each: regular, jagged and string fields; partial field updates; subsets of fields and rows in any
order; clear_samples and clear_partition; a batch of 256 MiB; clients in other processes attaching
by address; typed errors for missing rows; checkpoints (or a typed "not supported"); and, last, the
backend's service killed mid-stream, which must give typed errors within a bounded time. A backend
is skipped only when its package cannot run here; the message says what to install.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tq_loader.checkpoint import load_checkpoint, save_checkpoint
from tq_loader.client import Client
from tq_loader.cluster import start_cluster
from tq_loader.config import resolve_config
from tq_loader.errors import DataLostError, NotFoundError, TQError
from tq_loader.metadata import BatchMeta
from tq_loader.storage.kv_client import pid_alive
from tq_loader.storage.mooncake import mooncake_available
from tq_loader.storage.yuanrong import yuanrong_available

BIG = 256 << 20
SETTINGS: dict[str, dict[str, Any]] = {
    "simple": {},
    # room for the 256 MiB batch (and the arena to stage one value of it)
    "mooncake": {"mooncake": {"global_segment_size": 1 << 30, "local_buffer_size": 320 << 20}},
    "yuanrong": {"yuanrong": {"shared_memory_size_mb": 1024}},
}


def _missing(name: str) -> str | None:
    return {"simple": None, "mooncake": mooncake_available(), "yuanrong": yuanrong_available()}[name]


@dataclass
class Env:
    name: str
    cluster: Any
    client: Client

    @property
    def address(self) -> str:
        return self.cluster.address

    def manager(self) -> Any:
        async def get(core: Any) -> Any:
            return await core.storage()

        return self.client.run(get)


@pytest.fixture(scope="module", params=list(SETTINGS))
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    name = request.param
    missing = _missing(name)
    if missing:
        pytest.skip(missing)
    config = resolve_config({"storage": {"backend": name, **SETTINGS[name]}, "client": {"in_process": False}})
    cluster = start_cluster(config)
    client = Client(cluster.address, config=config.client)
    try:
        yield Env(name, cluster, client)
    finally:
        client.close()
        services = getattr(cluster, "backend_services", None)
        pids = list(services.section.pids) if services is not None else []
        cluster.stop()
        assert not [pid for pid in pids if pid_alive(pid)], "the backend's services outlived the cluster"


def _columns(n: int, start: int = 0) -> dict[str, Any]:
    ids = torch.arange(start, start + n)
    return {
        "x": ids.float().unsqueeze(1).repeat(1, 3),
        "tok": torch.nested.nested_tensor(
            [torch.arange(int(i) % 5 + 1) + int(i) for i in ids], layout=torch.jagged
        ),
        "text": [f"row-{int(i)}" for i in ids],
    }


def _check(td: Any, n_ids: list[int], fields: tuple[str, ...] = ("x", "tok", "text")) -> None:
    if "x" in fields:
        want = torch.tensor(n_ids, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
        assert torch.equal(td["x"], want)
    if "tok" in fields:
        got = list(td["tok"].unbind())
        assert [r.tolist() for r in got] == [(torch.arange(i % 5 + 1) + i).tolist() for i in n_ids]
    if "text" in fields:
        assert list(td["text"]) == [f"row-{i}" for i in n_ids]


def test_put_get_regular_jagged_string(env: Env) -> None:
    meta = env.client.put(_columns(100), partition_id="basic")
    td = env.client.get_data(meta)
    _check(td, list(range(100)))
    storage = env.client.statistics().storage
    assert storage.backend == env.name
    if env.name != "simple":  # the services this cluster started, by address and pid
        services = env.cluster.backend_services.section
        assert storage.services["pids"] == list(services.pids) and all(pid_alive(p) for p in services.pids)
        assert any(addr for role, addr in storage.services.items() if role != "pids")


def test_partial_field_update(env: Env) -> None:
    meta = env.client.put({"x": torch.arange(40.0).unsqueeze(1)}, partition_id="partial")
    later = env.client.put({"y": torch.arange(40) * 2}, metadata=meta)
    td = env.client.get_data(later)
    assert torch.equal(td["x"], torch.arange(40.0).unsqueeze(1))
    assert torch.equal(td["y"], torch.arange(40) * 2)
    # overwrite one field of some rows: the others keep their values
    sub = later.select_samples([3, 1])
    env.client.put({"y": torch.tensor([-1, -2])}, metadata=sub)
    fresh = env.client.get_meta(["x", "y"], 40, "partial", mode="force_fetch", task_name="check")
    td = env.client.get_data(fresh)
    gids = meta.global_index_array.tolist()
    want = {g: 2 * i for i, g in enumerate(gids)} | {gids[3]: -1, gids[1]: -2}
    got_ids = fresh.global_index_array.tolist()
    assert sorted(got_ids) == sorted(gids)
    assert td["y"].tolist() == [want[g] for g in got_ids]
    assert td["x"].view(-1).tolist() == [float(gids.index(g)) for g in got_ids]


def test_subset_of_fields_and_rows_in_any_order(env: Env) -> None:
    put = env.client.put(_columns(130), partition_id="subset")  # spans 3+ stripes of 64 rows
    meta = env.client.get_meta(["x", "tok", "text"], 130, "subset", task_name="t")
    pick = [129, 5, 64, 0, 77, 63]  # rows in the order they were put
    where = {g: i for i, g in enumerate(meta.global_index_array.tolist())}
    sub = meta.select_samples([where[int(put.global_index_array[i])] for i in pick])
    td = env.client.get_data(sub.select_fields(["text", "tok"]))
    assert set(td.keys()) == {"text", "tok"}
    _check(td, pick, ("tok", "text"))


def test_clear_samples_and_partition(env: Env) -> None:
    meta = env.client.put(_columns(70), partition_id="clear")
    env.client.clear_samples(meta)
    with pytest.raises((NotFoundError, DataLostError)):
        env.client.get_data(meta)
    meta = env.client.put(_columns(70), partition_id="clear2")
    env.client.clear_partition("clear2")
    with pytest.raises((NotFoundError, DataLostError)):
        env.client.get_data(meta)
    if env.name != "simple":  # the values are gone from the backend itself, not just unreachable
        manager = env.manager()
        keys = sorted({manager.key_of(meta, i, "x") for i in range(meta.size)})
        assert manager.client.exists(keys) == [False] * len(keys)


def test_big_batch(env: Env) -> None:
    rows = 1024
    x = torch.empty(rows, BIG // rows // 4, dtype=torch.float32)
    x[:, 0] = torch.arange(rows, dtype=torch.float32)
    x[:, -1] = -torch.arange(rows, dtype=torch.float32)
    meta = env.client.put({"big": x}, partition_id="big")
    td = env.client.get_data(meta)
    assert td["big"].shape == x.shape
    assert torch.equal(td["big"][:, 0], x[:, 0]) and torch.equal(td["big"][:, -1], x[:, -1])
    assert torch.equal(td["big"][::97], x[::97])
    del td
    env.client.clear_partition("big")


def _peer(address: str, start: int, out: Any) -> None:
    """Another process: attach by address, write rows start..start+31, read back what it wrote."""
    try:
        with Client(address) as client:
            meta = client.put(_columns(32, start), partition_id="multi")
            td = client.get_data(meta)
            _check(td, list(range(start, start + 32)))
        out.put(("ok", start))
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def test_clients_in_other_processes(env: Env) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_peer, args=(env.address, 1000 * (i + 1), out)) for i in range(3)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert sorted(results) == [("ok", 1000), ("ok", 2000), ("ok", 3000)], results
    meta = env.client.get_meta(["x", "tok", "text"], 96, "multi", task_name="parent")
    td = env.client.get_data(meta)  # this process reads what the others wrote
    texts = list(td["text"])
    starts = sorted({int(t.split("-")[1]) // 1000 * 1000 for t in texts})
    assert starts == [1000, 2000, 3000] and len(set(texts)) == 96
    if env.name != "simple":  # this process frees what the others wrote (Yuanrong cannot list keys)
        manager = env.manager()
        keys = sorted({manager.key_of(meta, i, f) for i in range(meta.size) for f in ("x", "tok", "text")})
        assert all(manager.client.exists(keys))
        env.client.clear_partition("multi")
        assert not any(manager.client.exists(keys))


def test_missing_rows_are_a_typed_error(env: Env) -> None:
    meta = env.client.put({"x": torch.zeros(4, 1)}, partition_id="missing")
    ghost = BatchMeta(np.array([10_000, 10_001]), "missing", field_schema=meta.field_schema)
    with pytest.raises((NotFoundError, DataLostError)):
        env.client.get_data(ghost)


def test_checkpoint(env: Env, tmp_path: Path) -> None:
    env.client.put({"x": torch.ones(3, 1)}, partition_id="ckpt")
    if env.name == "simple":
        save_checkpoint(tmp_path / "ckpt", client=env.client)
        load_checkpoint(tmp_path / "ckpt", client=env.client)
        meta = env.client.get_meta(["x"], 3, "ckpt", task_name="after-load")
        assert torch.equal(env.client.get_data(meta)["x"], torch.ones(3, 1))
    else:  # the bytes live in the external service: a typed error says checkpoints do not cover it
        with pytest.raises(TQError, match="built-in storage"):
            save_checkpoint(tmp_path / "ckpt", client=env.client)


def _bounded(fn: Callable[[], Any], timeout: float) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised (None: it returned); fails if it hangs."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            box[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call still hangs after {timeout} s"
    return box[0]


def test_service_killed_mid_stream_is_a_typed_error(env: Env) -> None:
    """Last for each backend: the service holding the bytes dies; calls fail typed, never hang."""
    meta = env.client.put(_columns(64), partition_id="doomed")
    if env.name == "simple":
        env.cluster.units[0].stop()  # a storage unit (in this process) goes away
    else:
        for pid in reversed(env.cluster.backend_services.section.pids):  # the store / worker first
            os.kill(pid, signal.SIGKILL)
    err = _bounded(lambda: env.client.get_data(meta), 90)
    assert isinstance(err, TQError), repr(err)  # DataLostError, TQConnectionError, ...
    err = _bounded(lambda: env.client.put(_columns(64), partition_id="doomed"), 90)
    if env.name == "simple":  # new rows go to the live units (the lost one is avoided)
        assert err is None or isinstance(err, TQError), repr(err)
    else:  # nothing is left to hold them
        assert isinstance(err, TQError), repr(err)
