"""Baselines for the KV storage backends: each backend's own Python client moving one batch.

``run_backends(BackendSpec())`` starts each available backend's local services (Mooncake: master +
store process; Yuanrong: a worker), moves a batch of ``rows x fields x width`` float32 (288 MiB by
default) and returns GiB/s per path. These are the numbers tq_loader's KV layer is compared
against (target: >= 0.8x). Two layouts: one value per field (9 x 32 MiB) and one per block of
``block_rows`` rows per field (144 x 2 MiB, what the KV manager stores).

Paths, per backend, each with the backend's raw client and then through our ``KVClient``:

* Mooncake (dummy client of the store process, the deployment tq_loader uses on one host):
  copying ``put_batch`` / ``get_batch``; zero-copy ``batch_upsert_from`` / ``batch_get_into`` on
  registered shared memory (the bytes already sit in it: the transfer alone).
* Yuanrong: copying ``set`` per key / ``get``; zero-copy ``mcreate`` + fill + ``mset_buffer`` (the
  fill is the one copy any put needs) / ``get_buffers`` (views of shared memory).

``second_process``: a child process reads the parent's keys (get paths) and writes its own (put
paths) -- the store lives in yet another process either way. The same-process round leaves its
keys stored for the child; they are deleted before the ``kv_client`` round.

Run: ``python -m benchmarks.backends [--quick]`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.harness import gib_per_s, median, timed

__all__ = ["BackendSpec", "run_backends"]


@dataclass
class BackendSpec:
    rows: int = 1024
    fields: int = 9
    width: int = 8192  # float32 per row and field
    block_rows: int = 64  # the "blocks" layout: one value per (field, block of rows)
    repeats: int = 3
    second_process: bool = True
    backends: tuple[str, ...] = ("mooncake", "yuanrong")

    @property
    def nbytes(self) -> int:
        return self.rows * self.fields * self.width * 4


def _layout(batch: np.ndarray, spec: BackendSpec, layout: str) -> tuple[list[str], list[np.ndarray]]:
    """Keys and values of one batch (``batch`` is fields x rows x width)."""
    if layout == "fields":
        return [f"f{f}" for f in range(spec.fields)], [batch[f] for f in range(spec.fields)]
    keys, values = [], []
    for f in range(spec.fields):
        for b in range(0, spec.rows, spec.block_rows):
            keys.append(f"f{f}/b{b // spec.block_rows}")
            values.append(batch[f, b : b + spec.block_rows])
    return keys, values


def _shm(store: Any, nbytes: int) -> tuple[int, np.ndarray]:
    """Registered shared memory of a Mooncake dummy client, as (address, uint8 array over it)."""
    ptr = store.alloc_from_mem_pool(nbytes)
    if not ptr or store.register_buffer(ptr, nbytes) != 0:
        raise RuntimeError("Mooncake refused the shared-memory buffer")
    return ptr, np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=np.uint8)


def _rate(spec: BackendSpec, fn: Callable[[int], Any], cleanup: Callable[[int], Any] | None = None) -> float:
    """Median GiB/s of ``fn(round)`` over ``spec.repeats`` rounds (``cleanup(round)`` untimed)."""
    times = []
    for r in range(spec.repeats + 1):  # round 0 warms up (page faults of fresh store memory)
        t = timed(lambda r=r: fn(r))
        if r:
            times.append(t)
        if cleanup is not None:
            cleanup(r)
    return round(gib_per_s(spec.nbytes, median(times)), 3)


# --------------------------------------------------------------------------- Mooncake


def _mooncake_raw(cfg: Any, spec: BackendSpec, keys: list[str], values: list[np.ndarray], role: str) -> dict:
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    store = MooncakeDistributedStore()
    if store.setup_dummy(0, spec.nbytes + (64 << 20), cfg.store_address) != 0:
        raise RuntimeError("cannot attach to the Mooncake store process")
    rep = ReplicateConfig()
    rep.with_hard_pin = True
    sizes = [v.nbytes for v in values]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    out: dict[str, float] = {}
    try:
        src_ptr, src = _shm(store, spec.nbytes)
        dst_ptr, _ = _shm(store, spec.nbytes)
        np.concatenate([v.reshape(-1).view(np.uint8) for v in values], out=src)
        if role in ("all", "put"):
            mine = [f"{role}/{k}" for k in keys]
            out["put_copy"] = _rate(
                spec,
                lambda r: _ok(store.put_batch(mine, values, rep)),
                lambda r: store.batch_remove(mine, True),
            )
            out["put_zero_copy"] = _rate(
                spec,
                lambda r: _ok(store.batch_upsert_from(mine, [src_ptr + o for o in offsets], sizes, rep)),
                lambda r: store.batch_remove(mine, True),
            )
        if role == "all":
            _ok(store.batch_upsert_from(keys, [src_ptr + o for o in offsets], sizes, rep))
        if role in ("all", "get"):
            out["get_copy"] = _rate(spec, lambda r: store.get_batch(keys))
            out["get_zero_copy"] = _rate(
                spec, lambda r: _ok(store.batch_get_into(keys, [dst_ptr + o for o in offsets], sizes), sizes)
            )
    finally:
        store.close()
    return out


def _ok(codes: Any, sizes: list[int] | None = None) -> None:
    if isinstance(codes, int):
        codes = [codes]
    want = sizes or [0] * len(codes)
    if list(codes) != list(want):
        raise RuntimeError(f"a Mooncake batch call failed: {list(codes)[:4]}")


# --------------------------------------------------------------------------- Yuanrong


def _yuanrong_raw(cfg: Any, spec: BackendSpec, keys: list[str], values: list[np.ndarray], role: str) -> dict:
    from yr.datasystem import KVClient

    host, _, port = cfg.worker_address.rpartition(":")
    client = KVClient(host, int(port), connect_timeout_ms=10_000, req_timeout_ms=30_000)
    client.init()
    out: dict[str, float] = {}

    def zc_put(mine: list[str]) -> None:
        bufs = client.mcreate(mine, [v.nbytes for v in values])
        for b, v in zip(bufs, values):
            np.copyto(np.frombuffer(b.MutableData(), dtype=v.dtype).reshape(v.shape), v)
        client.mset_buffer(bufs)

    if role in ("all", "put"):
        copy_keys = [f"{role}-set/{k}".replace("/", "_") for k in keys]
        zc_keys = [f"{role}-mc/{k}".replace("/", "_") for k in keys]
        out["put_copy"] = _rate(
            spec,
            lambda r: [client.set(k, memoryview(v).cast("B")) for k, v in zip(copy_keys, values)],
            lambda r: client.delete(copy_keys),
        )
        out["put_zero_copy"] = _rate(spec, lambda r: zc_put(zc_keys), lambda r: client.delete(zc_keys))
    safe = [k.replace("/", "_") for k in keys]
    if role == "all":
        zc_put(safe)
    if role in ("all", "get"):
        out["get_copy"] = _rate(spec, lambda r: client.get(safe))
        out["get_zero_copy"] = _rate(spec, lambda r: [memoryview(b) for b in client.get_buffers(safe)])
    return out


# --------------------------------------------------------------------------- through KVClient


def _through_kv_client(kv: Any, spec: BackendSpec, keys: list[str], values: list[np.ndarray]) -> dict:
    out: dict[str, float] = {}
    mine = [f"kv/{k}" for k in keys]
    out["put_copy"] = _rate(spec, lambda r: kv.put(mine, values), lambda r: kv.delete(mine))

    def reserve_put() -> None:
        with kv.reserve(mine, [v.nbytes for v in values]) as pending:
            for buf, v in zip(pending.buffers, values):
                np.copyto(np.frombuffer(buf, dtype=v.dtype).reshape(v.shape), v)

    if sum(v.nbytes for v in values) <= getattr(kv.config, "local_buffer_size", 1 << 62):
        out["put_zero_copy"] = _rate(spec, lambda r: reserve_put(), lambda r: kv.delete(mine))
    kv.put(mine, values)
    out["get_copy"] = _rate(spec, lambda r: kv.get(mine))
    dst = [np.empty_like(v) for v in values]
    out["get_into"] = _rate(spec, lambda r: kv.get_into(mine, dst))
    kv.delete(mine)
    return out


# --------------------------------------------------------------------------- driver


def _raw(name: str, cfg: Any, spec: BackendSpec, layout: str, role: str) -> dict:
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((spec.fields, spec.rows, spec.width), dtype=np.float32)
    keys, values = _layout(batch, spec, layout)
    fn = _mooncake_raw if name == "mooncake" else _yuanrong_raw
    return fn(cfg, spec, keys, values, role)


def _child(name: str, cfg: Any, spec: BackendSpec, layout: str) -> dict:
    """Run the get paths (parent's keys) and put paths (own keys) in a separate process."""
    payload = json.dumps(
        {"name": name, "cfg": dataclasses.asdict(cfg), "spec": dataclasses.asdict(spec), "layout": layout}
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.backends", "--child", payload],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the second process failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    spec = BackendSpec(**{**args["spec"], "backends": tuple(args["spec"]["backends"])})
    cfg = _config_class(args["name"])(**args["cfg"])
    out = _raw(args["name"], cfg, spec, args["layout"], "get") | _raw(
        args["name"], cfg, spec, args["layout"], "put"
    )
    print(json.dumps(out))


def _config_class(name: str) -> Any:
    if name == "mooncake":
        from tq_loader.storage.mooncake import MooncakeConfig

        return MooncakeConfig
    from tq_loader.storage.yuanrong import YuanrongConfig

    return YuanrongConfig


def _service(name: str, spec: BackendSpec) -> tuple[Any, Any, Callable[[], Any]]:
    """(service, filled config, make KVClient) for a backend, or raise RuntimeError if unusable."""
    if name == "mooncake":
        from tq_loader.storage.mooncake import (
            MooncakeConfig,
            MooncakeKVClient,
            MooncakeMaster,
            mooncake_available,
        )

        if mooncake_available():
            raise RuntimeError(mooncake_available())
        svc = MooncakeMaster.start(
            MooncakeConfig(
                global_segment_size=4 * spec.nbytes + (256 << 20), local_buffer_size=spec.nbytes + (32 << 20)
            )
        )
        return svc, svc.config, lambda: MooncakeKVClient(svc.config)
    from tq_loader.storage.yuanrong import (
        YuanrongConfig,
        YuanrongKVClient,
        YuanrongWorker,
        yuanrong_available,
    )

    if yuanrong_available():
        raise RuntimeError(yuanrong_available())
    mb = max(2048, 4 * spec.nbytes >> 20)
    svc = YuanrongWorker.start(YuanrongConfig(shared_memory_size_mb=mb, request_timeout=60))
    return svc, svc.config, lambda: YuanrongKVClient(svc.config)


def run_backends(spec: BackendSpec | None = None) -> dict[str, Any]:
    """GiB/s per backend, layout and path (see the module docstring); skipped backends say why."""
    spec = spec or BackendSpec()
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec) | {"nbytes": spec.nbytes}, "unit": "GiB/s"}
    for name in spec.backends:
        try:
            svc, cfg, make = _service(name, spec)
        except RuntimeError as exc:
            out[name] = {"skipped": str(exc)}
            continue
        try:
            result: dict[str, Any] = {
                "services": {k: v for k, v in dataclasses.asdict(cfg).items() if "address" in k}
            }
            rng = np.random.default_rng(0)
            batch = rng.standard_normal((spec.fields, spec.rows, spec.width), dtype=np.float32)
            for layout in ("fields", "blocks"):
                keys, values = _layout(batch, spec, layout)
                row: dict[str, Any] = {
                    "values": len(keys),
                    "same_process": _raw(name, cfg, spec, layout, "all"),
                }
                if spec.second_process:
                    row["second_process"] = _child(name, cfg, spec, layout)
                kv = make()
                try:
                    # the raw "all" round left its keys for the second process; drop them now
                    kv.delete([k.replace("/", "_") for k in keys] if name == "yuanrong" else keys)
                    row["kv_client"] = _through_kv_client(kv, spec, keys, values)
                finally:
                    kv.close()
                result[layout] = row
            out[name] = result
        finally:
            svc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a 36 MiB batch, 2 repeats, no second process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child_main(args.child)
        return
    spec = BackendSpec(rows=128, repeats=2, second_process=False) if args.quick else BackendSpec()
    print(json.dumps(run_backends(spec), indent=2))


if __name__ == "__main__":
    main()
