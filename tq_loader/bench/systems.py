"""The tq_loader placements the KV cases are driven through, and how each is started and stopped.

* ``tq_loader embedded``: ``tq.init()`` with the defaults (services on threads of this process);
* ``tq_loader embedded over ZMQ``: the same with ``client.in_process=false`` (every call on a socket);
* ``tq_loader serve``: ``tq-loader serve`` in another process of this host; this process attaches
  with ``tq.connect`` (the same-host, cross-process placement; shared memory once the storage has it);
* ``tq_loader serve, shm off``: the same with ``storage.shared_memory=false`` -- passed only when
  ``StorageConfig`` has that key; until then the row says it is the plain served path.

The driver is always this process, calling the public ``tq.kv_*`` functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tq_loader as tq
from tq_loader.api import ENV_ADDRESS
from tq_loader.bench.registry import Context, System, SystemRun, register_system
from tq_loader.bench.results import KIND_TQ
from tq_loader.bench.workloads import Workload, build, drive_kv, drive_small
from tq_loader.client import AsyncClient
from tq_loader.config import StorageConfig

__all__ = [
    "EMBEDDED", "EMBEDDED_ZMQ", "SERVE", "SERVE_TCP", "embedded", "embedded_system", "has_shared_memory",
    "reset_runtime", "served", "served_system", "view_get",
]  # fmt: skip

EMBEDDED = "tq_loader embedded"
EMBEDDED_ZMQ = "tq_loader embedded over ZMQ"
SERVE = "tq_loader serve"
SERVE_TCP = "tq_loader serve, shm off"
_START_S = 60.0


def has_shared_memory() -> bool:
    return any(f.name == "shared_memory" for f in dataclasses.fields(StorageConfig))


def reset_runtime() -> None:
    """Detach from (and stop) any cluster of this process; forget an inherited address."""
    tq.close()
    os.environ.pop(ENV_ADDRESS, None)


@contextlib.contextmanager
def embedded(in_process: bool = True, conf: dict[str, Any] | None = None) -> Iterator[None]:
    """An embedded cluster owned by this process (``tq.init(conf)``), closed afterwards."""
    reset_runtime()
    conf = dict(conf or {})
    if not in_process:
        conf["client"] = {**conf.get("client", {}), "in_process": False}
    tq.init(conf or None)
    try:
        yield
    finally:
        reset_runtime()


def _read_address(proc: subprocess.Popen[str], log: Any) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="bench-serve-log").start()
    while True:
        try:
            line = lines.get(timeout=_START_S)
        except queue.Empty:
            raise RuntimeError(f"`tq-loader serve` printed no address within {_START_S:.0f} s") from None
        if line is None:
            raise RuntimeError(
                f"`tq-loader serve` exited with status {proc.wait()} before printing its address"
            )
        if line.startswith(f"{ENV_ADDRESS}="):
            return line.split("=", 1)[1].strip()


@contextlib.contextmanager
def served(overrides: Sequence[str], log_path: Path) -> Iterator[int]:
    """``tq-loader serve OVERRIDES`` in another process, attached to; yields the server's pid."""
    reset_runtime()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_LOADER_")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tq_loader", "serve", *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        try:
            tq.connect(_read_address(proc, log))
            yield proc.pid
        finally:
            reset_runtime()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)


def view_get() -> Any:
    """A ``copy=False`` read of the rows of ``keys`` when ``get_data`` offers one, else ``None``."""
    if "copy" not in inspect.signature(AsyncClient.async_get_data).parameters:
        return None

    def get(keys: Sequence[str], pid: str) -> Any:
        client = tq.get_client()
        meta = client.run(lambda core: core.async_kv_retrieve_meta(list(keys), pid))
        return client.run(lambda core: core.async_get_data(meta, copy=False))

    return get


def drive(ctx: Context, label: str, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
    """Every workload through the public KV functions of the cluster this process is attached to."""
    out: dict[str, dict[str, Any]] = {}
    plan = ctx.plan
    for w in workloads:
        ctx.status(f"{label}: {w.name}")
        if w.kind == "small":
            out[w.name] = drive_small(tq, w, plan.reps, plan.rounds)
        else:
            out[w.name] = drive_kv(tq, w, build(w), plan.reps, plan.rounds, view_get=view_get())
    return out


def embedded_system(label: str, conf: dict[str, Any] | None = None, *, in_process: bool = True) -> SystemRun:
    """A KV system on an embedded cluster of ``conf``: the hook a storage backend uses to get its
    row, e.g. ``register_system(System("tq_loader embedded, mooncake", KIND_TQ,
    embedded_system("tq_loader embedded, mooncake", {"storage": {"backend": "mooncake"}})))``."""

    def run(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
        with embedded(in_process, conf):
            return drive(ctx, label, workloads)

    return run


def serve_overrides(shm_off: bool) -> list[str]:
    return ["storage.shared_memory=false"] if shm_off and has_shared_memory() else []


def served_system(label: str, overrides: Sequence[str] = ()) -> SystemRun:
    """A KV system on ``tq-loader serve OVERRIDES`` (another process of this host), attached to."""

    def run(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        with served(overrides, ctx.out / "logs" / f"{slug}.log"):
            return drive(ctx, label, workloads)

    return run


def serve_note(shm_off: bool) -> str:
    if has_shared_memory():
        return "storage.shared_memory=false: TCP only" if shm_off else "same host, shared memory"
    if shm_off:
        return "storage.shared_memory is not a config key yet: this is the plain served path (TCP)"
    return "same host; the storage has no shared-memory path yet (TCP)"


register_system(System(EMBEDDED, KIND_TQ, embedded_system(EMBEDDED), note="tq.init() defaults"))
register_system(
    System(
        EMBEDDED_ZMQ, KIND_TQ, embedded_system(EMBEDDED_ZMQ, in_process=False), note="client.in_process=false"
    )
)
register_system(System(SERVE, KIND_TQ, served_system(SERVE, serve_overrides(False)), note=serve_note(False)))
register_system(
    System(SERVE_TCP, KIND_TQ, served_system(SERVE_TCP, serve_overrides(True)), note=serve_note(True))
)
