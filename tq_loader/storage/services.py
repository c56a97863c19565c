"""The services a storage backend needs, started on this machine or attached to, for a cluster.

``storage.backend = mooncake``: a ``mooncake_master`` (with its HTTP metadata server) and the store
process that owns the memory; ``yuanrong``: a datasystem worker with its built-in metastore. With no
address configured (and ``auto_start``) they are started on free loopback ports and stopped by pid
(Yuanrong: ``dscli stop``, then by pid) when the cluster stops; with an address they are attached to
and left running. The cluster publishes the filled-in section (addresses, pids) in its config, so
every client -- in this process or another -- attaches to the same services.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from tq_loader.backend_config import KV_BACKENDS, STORAGE_BACKENDS, MooncakeConfig, YuanrongConfig
from tq_loader.config import TQConfig
from tq_loader.storage.base import registered_storage_managers

__all__ = ["BackendServices", "open_backend_services", "start_backend_services"]


class BackendServices:
    """What a cluster started (or attached to) for its backend; :meth:`close` stops what it started."""

    def __init__(self, backend: str, section: Any, handle: Any) -> None:
        self.backend = backend
        self.section = section  # the config section with every address (and started pid) filled in
        self._handle = handle

    @property
    def started(self) -> bool:
        return bool(getattr(self.section, "pids", None))

    def describe(self) -> dict[str, Any]:
        """Role -> address, plus the pids of started processes (for status views)."""
        if self.backend == "mooncake":
            roles = {
                "master": "master_server_address",
                "metadata": "metadata_server",
                "store": "store_address",
            }
        else:
            roles = {"worker": "worker_address", "metastore": "metastore_address"}
        out: dict[str, Any] = {
            r: getattr(self.section, a) for r, a in roles.items() if getattr(self.section, a)
        }
        out["pids"] = list(self.section.pids)
        return out

    def alive(self) -> bool:
        return bool(self._handle.alive())

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()


def open_backend_services(backend: str, section: Any) -> BackendServices | None:
    """Start or attach to what ``backend`` needs (None for backends without services)."""
    if backend == "mooncake":
        from tq_loader.storage.mooncake import MooncakeMaster

        master = MooncakeMaster.open(section if isinstance(section, MooncakeConfig) else MooncakeConfig())
        return BackendServices(backend, replace(master.config, pids=master.pids), master)
    if backend == "yuanrong":
        from tq_loader.storage.yuanrong import YuanrongWorker

        worker = YuanrongWorker.open(section if isinstance(section, YuanrongConfig) else YuanrongConfig())
        pids = [worker.pid] if worker.pid is not None else []
        return BackendServices(backend, replace(worker.config, pids=pids), worker)
    if backend == "ray_rdt":
        from tq_loader.storage.ray_rdt import RayRdtUnavailableError, unavailable_reason

        raise RayRdtUnavailableError(unavailable_reason())
    if backend in KV_BACKENDS:  # pragma: no cover - every KV backend is handled above
        raise AssertionError(backend)
    return None


def start_backend_services(config: TQConfig) -> tuple[BackendServices | None, TQConfig]:
    """Start or attach to what ``storage.backend`` needs; the config with its section filled in."""
    backend = config.storage.backend
    if backend not in STORAGE_BACKENDS and backend.lower() not in registered_storage_managers():
        raise ValueError(
            f"storage.backend must be one of {STORAGE_BACKENDS} or a name registered with "
            f"tq_loader.storage.register_storage_manager, not {backend!r}"
        )
    services = open_backend_services(backend, getattr(config.storage, backend, None))
    if services is None:
        return None, config
    storage = dataclasses.replace(config.storage, **{backend: services.section})
    return services, dataclasses.replace(config, storage=storage)
