"""The KV storage backends in the ``simple`` case: through tq_loader, and each backend's own client.

* ``tq_loader embedded, mooncake`` / ``..., yuanrong``: ``tq.init({"storage": {"backend": NAME}})``
  (the cluster starts the backend's services on loopback) driven by the same public ``tq.kv_*``
  calls as every other system;
* ``mooncake own client`` / ``yuanrong own client``: the backend's Python client, in this process,
  moving the same bytes in the layout tq_loader stores (one value per field and block of
  ``stripe_rows`` rows), on services started the same way. Copying paths, to compare with a
  copying ``get_data``: Mooncake ``put_batch`` / ``get_batch`` (dummy client of the store
  process); Yuanrong ``mcreate`` + fill + ``mset_buffer`` (the one copy any put needs) / ``get``.

Ratio target (issue 11): tq_loader >= 0.8x the backend's own client, same run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from tq_loader.backend_config import MooncakeConfig, YuanrongConfig
from tq_loader.bench.registry import Context, System, register_system
from tq_loader.bench.results import KIND_BASELINE, KIND_TQ
from tq_loader.bench.systems import embedded_system
from tq_loader.bench.workloads import Workload, build, column_bytes, fingerprint, timed

__all__ = ["native_values", "own_client_system", "settings"]

STRIPE_ROWS = 64  # = storage.stripe_rows default: the block layout both sides store


def _available(name: str) -> str | None:
    if name == "mooncake":
        from tq_loader.storage.mooncake import mooncake_available

        return mooncake_available()
    from tq_loader.storage.yuanrong import yuanrong_available

    return yuanrong_available()


def settings(name: str) -> dict[str, Any]:
    """The backend section both sides use: room for a few rounds of the full ``simple`` batch."""
    if name == "mooncake":
        return {"global_segment_size": 3 << 30, "local_buffer_size": 320 << 20}
    return {"shared_memory_size_mb": 3072}


def native_values(w: Workload) -> tuple[list[str], list[np.ndarray], int, str]:
    """(keys, values, bytes, fingerprint): each column of ``w``'s batch cut in blocks of rows."""
    td = build(w)
    keys, values = [], []
    for name, flat in zip(sorted(td.keys()), column_bytes(td), strict=True):
        rows = flat.numpy().reshape(w.rows, -1)
        for block in range(0, w.rows, STRIPE_ROWS):
            keys.append(f"{name}_{block // STRIPE_ROWS}")
            values.append(np.ascontiguousarray(rows[block : block + STRIPE_ROWS]))
    return keys, values, sum(v.nbytes for v in values), fingerprint(td)


@contextlib.contextmanager
def _services(name: str) -> Iterator[Any]:
    from tq_loader.storage.services import open_backend_services

    cls = MooncakeConfig if name == "mooncake" else YuanrongConfig
    services = open_backend_services(name, cls(**settings(name)))
    assert services is not None
    try:
        yield services.section
    finally:
        services.close()


def _mooncake_rounds(cfg: MooncakeConfig, keys: list[str], values: list[np.ndarray], n: int) -> dict:
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    store = MooncakeDistributedStore()
    staging = sum(v.nbytes for v in values) + (64 << 20)  # put_batch / get_batch stage through it
    if store.setup_dummy(0, staging, cfg.store_address) != 0:
        raise RuntimeError(f"cannot attach to the Mooncake store process at {cfg.store_address}")
    rep = ReplicateConfig()
    rep.with_hard_pin = True
    out: dict[str, list[float]] = {"put": [], "get": []}
    try:
        for r in range(n + 1):  # round 0 warms up (fresh store memory)
            mine = [f"r{r}/{k}" for k in keys]
            put_s, code = timed(lambda mine=mine: store.put_batch(mine, values, rep))
            if code != 0:
                raise RuntimeError(f"Mooncake put_batch failed with code {code}")
            get_s, got = timed(lambda mine=mine: store.get_batch(mine))
            if r == 0 and bytes(got[0][:64]) != values[0].tobytes()[:64]:
                raise AssertionError("Mooncake returned other bytes than it was given")
            del got
            store.batch_remove(mine, True)
            if r:
                out["put"].append(put_s)
                out["get"].append(get_s)
    finally:
        store.close()
    return out


def _yuanrong_rounds(cfg: YuanrongConfig, keys: list[str], values: list[np.ndarray], n: int) -> dict:
    from yr.datasystem import KVClient

    host, _, port = cfg.worker_address.rpartition(":")
    client = KVClient(host, int(port), connect_timeout_ms=10_000, req_timeout_ms=60_000)
    client.init()
    out: dict[str, list[float]] = {"put": [], "get": []}

    def put(mine: list[str]) -> None:
        for start in range(0, len(mine), 1000):
            part = slice(start, start + 1000)
            bufs = client.mcreate(mine[part], [v.nbytes for v in values[part]])
            for buf, v in zip(bufs, values[part], strict=True):
                memoryview(buf.MutableData())[:] = memoryview(v).cast("B")
            client.mset_buffer(bufs)

    for r in range(n + 1):
        mine = [f"r{r}_{k}" for k in keys]
        put_s, _ = timed(lambda mine=mine: put(mine))
        get_s, got = timed(lambda mine=mine: client.get(mine))
        if r == 0 and bytes(memoryview(got[0])[:64]) != values[0].tobytes()[:64]:
            raise AssertionError("Yuanrong returned other bytes than it was given")
        del got
        client.delete(mine)
        if r:
            out["put"].append(put_s)
            out["get"].append(get_s)
    return out


def own_client_system(name: str) -> Any:
    """The backend's own client as a KV system (the ``simple`` case only)."""

    def run(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
        missing = _available(name)
        if missing:
            for w in workloads:
                ctx.skip(w.name, f"{name} own client", missing)
            return {}
        out: dict[str, dict[str, Any]] = {}
        with _services(name) as cfg:
            for w in workloads:
                ctx.status(f"{name} own client: {w.name}")
                keys, values, nbytes, fp = native_values(w)
                fn = _mooncake_rounds if name == "mooncake" else _yuanrong_rounds
                seconds = fn(cfg, keys, values, ctx.plan.reps * ctx.plan.rounds)
                samples = {op: [nbytes / s / 1e9 for s in times] for op, times in seconds.items()}
                out[w.name] = {"samples": samples, "bytes": nbytes, "fingerprint": fp}
        return out

    return run


def _tq_system(name: str) -> Any:
    label = f"tq_loader embedded, {name}"
    inner = embedded_system(label, {"storage": {"backend": name, name: settings(name)}})

    def run(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
        missing = _available(name)
        if missing:
            for w in workloads:
                ctx.skip(w.name, label, missing)
            return {}
        return inner(ctx, workloads)

    return run


for _name in ("mooncake", "yuanrong"):
    register_system(
        System(
            f"{_name} own client",
            KIND_BASELINE,
            own_client_system(_name),
            workloads=frozenset({"simple"}),
            note="the backend's Python client, same bytes, one value per field x 64-row block",
        )
    )
    register_system(
        System(
            f"tq_loader embedded, {_name}",
            KIND_TQ,
            _tq_system(_name),
            workloads=frozenset({"simple"}),
            note=f"storage.backend={_name}, services started by tq.init on loopback",
        )
    )
