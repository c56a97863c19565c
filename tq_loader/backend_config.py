"""The config sections of the external storage backends (``storage.mooncake``, ``storage.yuanrong``,
``storage.ray_rdt``): plain dataclasses, no torch, no backend package needed to read or validate them.

Addresses left empty mean "start the service on this machine" (``auto_start``): the cluster
bootstrap (:mod:`tq_loader.storage.services`) fills them in -- with the pids of what it started --
before it publishes the cluster layout, so every client attaches to the same services.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KV_BACKENDS",
    "STORAGE_BACKENDS",
    "MooncakeConfig",
    "RayRdtConfig",
    "YuanrongConfig",
    "storage_from_transfer_queue",
]

#: every ``storage.backend`` name; the KV ones go through :class:`tq_loader.storage.kv.KVStorageManager`
STORAGE_BACKENDS = ("simple", "mooncake", "yuanrong", "ray_rdt")
KV_BACKENDS = ("mooncake", "yuanrong")


@dataclass
class MooncakeConfig:
    """``storage.mooncake``: where the Mooncake services are and how this process talks to them.

    Addresses left empty with ``auto_start`` make the bootstrap start a local ``mooncake_master`` (with
    its HTTP metadata server) and a ``mooncake_client`` store process that owns the memory.
    """

    master_server_address: str = ""  # host:port of mooncake_master's RPC
    metadata_server: str = ""  # "http://host:port/metadata" (the master's HTTP metadata server)
    store_address: str = ""  # host:port of the mooncake_client store process (dummy clients)
    client_mode: str = "dummy"  # dummy (shared memory to a same-host store process) | real
    protocol: str = "tcp"  # real clients: tcp | rdma
    device_name: str = ""  # real clients with rdma: e.g. "mlx5_0" (empty: auto-detect)
    local_hostname: str = "127.0.0.1"
    global_segment_size: int = 4 << 30  # memory of the store process the bootstrap starts
    client_segment_size: int = 0  # memory a real client contributes (its values die with it)
    local_buffer_size: int = 512 << 20  # this client's staging arena; bounds the biggest value
    auto_start: bool = True  # no addresses: start master + store process here, stop them on close
    client_ttl: int = 30  # s the master keeps a silent client's segment
    startup_timeout: float = 30.0
    staging_timeout: float = 30.0  # how long a call waits for arena space other calls hold
    pids: list[int] = field(default_factory=list)  # filled in by the bootstrap (what it started)


@dataclass
class YuanrongConfig:
    """``storage.yuanrong``: the datasystem worker to use, or the one to start here."""

    worker_address: str = ""  # host:port of a running datasystem worker; empty: start one (auto_start)
    metastore_address: str = ""  # only for a started worker (its built-in metastore); empty: a free port
    worker_port: int = 0  # fixed ports for a started worker (TransferQueue's keys); 0: free ports
    metastore_port: int = 0
    auto_start: bool = True
    shared_memory_size_mb: int = 2048  # the started worker's memory for values
    home_dir: str = ""  # logs/sockets of a started worker; empty: a temporary folder, removed on close
    connect_timeout: float = 10.0  # s
    request_timeout: float = 10.0  # s per call: a dead worker is a TQConnectionError after this
    startup_timeout: float = 90.0
    pids: list[int] = field(default_factory=list)  # filled in by the bootstrap (what it started)


@dataclass
class RayRdtConfig:
    """``storage.ray_rdt``: storage actors that hand tensors to readers through Ray Direct Transport."""

    tensor_transport: str = "gloo"  # gloo (CPU) | nccl | nixl (GPU)
    num_actors: int = 2


# --------------------------------------------------------------------------- TransferQueue's keys
# TransferQueue 0.1.11's ``backend.MooncakeStore`` / ``backend.Yuanrong`` / ``backend.RayStore``
# sections -> ``storage.mooncake`` / ``storage.yuanrong`` / ``storage.ray_rdt``.

_TQ_MOONCAKE_DEFAULTS = {"metadata_server": "localhost:50050", "master_server_address": "localhost:50051"}
_TQ_YUANRONG_DEFAULTS = {"worker_port": 31501, "metastore_port": 2379}


def _http_metadata(address: str) -> str:
    """TransferQueue's ``metadata_server`` ("host:port", a URL or P2PHANDSHAKE) as Mooncake's URL."""
    address = str(address).strip()
    if address.upper() == "P2PHANDSHAKE" or address.startswith("http"):
        return address
    return f"http://{address.removeprefix('//')}/metadata"


def _mooncake_from_tq(tq: dict[str, Any], warn: Callable[[str, str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    auto = bool(tq.get("auto_init", True))
    out["auto_start"] = auto
    where = {k: tq.get(k) for k in _TQ_MOONCAKE_DEFAULTS if tq.get(k) is not None}
    if auto:
        if any(str(v) != _TQ_MOONCAKE_DEFAULTS[k] for k, v in where.items()):
            warn(
                "backend.MooncakeStore.master_server_address",
                "backend.MooncakeStore.auto_init=true: tq_loader starts its own mooncake_master on free "
                f"loopback ports and ignores {where}; to attach to a running master set auto_init: false "
                "(and never kills other mooncake_master processes, unlike TransferQueue)",
            )
        if tq.get("global_segment_size") is not None:
            out["global_segment_size"] = int(tq["global_segment_size"])
    else:
        # attach like TransferQueue: each client is a full Mooncake client that mounts its own memory
        if where.get("master_server_address"):
            out["master_server_address"] = str(where["master_server_address"])
        if where.get("metadata_server"):
            out["metadata_server"] = _http_metadata(where["metadata_server"])
        out["client_mode"] = "real"
        if tq.get("global_segment_size") is not None:
            out["client_segment_size"] = int(tq["global_segment_size"])
    for key in ("protocol", "device_name"):
        if tq.get(key) is not None:
            out[key] = str(tq[key])
    if tq.get("local_hostname"):
        out["local_hostname"] = str(tq["local_hostname"])
    if tq.get("local_buffer_size") is not None:
        out["local_buffer_size"] = int(tq["local_buffer_size"])
    if tq.get("hard_pin") is False:
        warn("backend.MooncakeStore.hard_pin", "backend.MooncakeStore.hard_pin=false is ignored: tq_loader "
             "always hard-pins values (a full store is a CapacityError, never silent eviction)")  # fmt: skip
    offload = tq.get("offload") or {}
    if isinstance(offload, dict) and offload.get("enabled"):
        warn("backend.MooncakeStore.offload", "backend.MooncakeStore.offload.enabled=true is ignored: tq_loader "
             "starts no SSD offload client; size global_segment_size for the data instead")  # fmt: skip
    if tq.get("use_gdr"):
        warn("backend.MooncakeStore.use_gdr", "backend.MooncakeStore.use_gdr=true is ignored: GPU tensors are "
             "staged through host memory (GPUDirect RDMA is not implemented)")  # fmt: skip
    return out


def _yuanrong_from_tq(tq: dict[str, Any], warn: Callable[[str, str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    auto = bool(tq.get("auto_init", True))
    out["auto_start"] = auto
    ports = {k: int(tq[k]) for k in _TQ_YUANRONG_DEFAULTS if tq.get(k) is not None}
    if auto:  # TransferQueue's default ports become free ports (2379 is etcd's); others are kept
        out.update({k: v for k, v in ports.items() if v != _TQ_YUANRONG_DEFAULTS[k]})
    elif "worker_port" in ports:
        out["worker_address"] = f"127.0.0.1:{ports['worker_port']}"
    args = str(tq.get("worker_args") or "").split()
    rest = []
    i = 0
    while i < len(args):
        if args[i] == "--shared_memory_size_mb" and i + 1 < len(args):
            out["shared_memory_size_mb"] = int(args[i + 1])
            i += 2
            continue
        rest.append(args[i])
        i += 1
    if rest:
        warn("backend.Yuanrong.worker_args", f"backend.Yuanrong.worker_args {' '.join(rest)!r} is ignored: "
             "tq_loader passes only --shared_memory_size_mb to dscli (storage.yuanrong.shared_memory_size_mb)")  # fmt: skip
    for key in ("enable_yr_npu_transport", "enable_rdma"):
        if tq.get(key):
            warn(f"backend.Yuanrong.{key}", f"backend.Yuanrong.{key}=true is ignored: tq_loader uses the "
                 "worker's shared memory (same host); NPU and RDMA transports are not implemented")  # fmt: skip
    if tq.get("ucx_env_vars"):
        warn("backend.Yuanrong.ucx_env_vars", "backend.Yuanrong.ucx_env_vars is ignored (no RDMA transport)")
    if tq.get("ds_max_workers") not in (None, 1):
        warn("backend.Yuanrong.ds_max_workers", "backend.Yuanrong.ds_max_workers is ignored: a put stores "
             "one value per (block, field), packed in the calling thread")  # fmt: skip
    return out


_TQ_SECTIONS = {"MooncakeStore": "mooncake", "Yuanrong": "yuanrong", "RayStore": "ray_rdt"}
_KNOWN_TQ_KEYS = {
    "MooncakeStore": {"auto_init", "metadata_server", "master_server_address", "local_hostname", "protocol",
                      "global_segment_size", "local_buffer_size", "device_name", "hard_pin", "offload",
                      "use_gdr", "gdr_staging_buffer_mb"},
    "Yuanrong": {"auto_init", "worker_port", "metastore_port", "enable_yr_npu_transport", "ds_max_workers",
                 "enable_rdma", "ucx_env_vars", "worker_args"},
    "RayStore": set(),
}  # fmt: skip


def storage_from_transfer_queue(
    sections: dict[str, Any], storage: dict[str, Any], warn: Callable[[str, str], None]
) -> None:
    """Map TransferQueue's per-backend ``sections`` into ``storage`` (a plain dict, changed in place).

    ``warn(key, message)`` is called once per key that is accepted but has no effect here. Keys the
    user set under ``storage.<backend>`` win over the TransferQueue ones.
    """
    for tq_name, section in sections.items():
        if section is None:  # an empty section (TransferQueue's own config.yaml has ``RayStore:``)
            continue
        ours = _TQ_SECTIONS.get(tq_name)
        if ours is None or not isinstance(section, dict):
            warn(f"backend.{tq_name}", f"TransferQueue config section backend.{tq_name} is not known to "
                 f"tq_loader and has no effect; storage backends: {', '.join(STORAGE_BACKENDS)}")  # fmt: skip
            continue
        unknown = sorted(set(section) - _KNOWN_TQ_KEYS[tq_name])
        if unknown:
            warn(f"backend.{tq_name}.*", f"TransferQueue config keys backend.{tq_name}.{unknown} are not known "
                 f"to tq_loader and have no effect (see storage.{ours} in docs/backends.md)")  # fmt: skip
        if tq_name == "MooncakeStore":
            mapped = _mooncake_from_tq(section, warn)
        elif tq_name == "Yuanrong":
            mapped = _yuanrong_from_tq(section, warn)
        else:
            mapped = {}
        target = storage.setdefault(ours, {})
        if isinstance(target, dict):
            for key, value in mapped.items():
                target.setdefault(key, value)
