"""The configuration tree: dataclasses that are the structured config, registered with Hydra.

``resolve_config`` accepts ``None``, a dict, an OmegaConf ``DictConfig`` or a :class:`TQConfig`
and returns a validated :class:`TQConfig`. The only environment variable read anywhere is
``TQ_LOADER_ADDRESS`` (documented in ``api.init``): configuration is data, not hidden knobs.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tq_loader.backend_config import MooncakeConfig, RayRdtConfig, YuanrongConfig, storage_from_transfer_queue

__all__ = [
    "ClientConfig",
    "ControllerConfig",
    "LoaderConfig",
    "MetricsConfig",
    "RayConfig",
    "StorageConfig",
    "TQConfig",
    "register_configs",
    "resolve_config",
]


@dataclass
class ControllerConfig:
    """The side-controller: readiness, consumption, sampling."""

    sampler: str = "sequential"  # default sampler by registered name
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    polling_mode: bool = False  # True: get_meta returns an empty batch at once instead of waiting
    round_cache: int = 4096  # rank-aware rounds kept per (partition, task) for replay/resume
    port: int = 0
    # after a seal, rows allocated but never produced (a producer died mid-put) are dropped this
    # many seconds later, so they cannot hold back the end of the stream (docs/reliability.md)
    seal_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.seal_grace_s >= 0:
            raise ValueError(f"controller.seal_grace_s must be >= 0 seconds, got {self.seal_grace_s}")


@dataclass
class StorageConfig:
    """Where the bytes live. ``backend``: simple (built-in, ZMQ, in memory) | mooncake | yuanrong |
    ray_rdt (docs/backends.md); each external backend has its own section below."""

    backend: str = "simple"
    num_units: int = 2
    capacity_rows: int | None = None  # per unit; None = unbounded
    put_timeout: float = 30.0  # how long a put waits for space in a full unit before CapacityError
    # rows go to unit (global_index // stripe_rows) % num_units: blocks keep a batch in few contiguous
    # runs per unit (moved as slices, not gathered row by row). = storage.striping.DEFAULT_STRIPE_ROWS
    stripe_rows: int = 64
    ports: list[int] = field(default_factory=list)  # fixed ports for units (empty: ephemeral)
    # clients on the same host as a unit move bytes through shared memory (memfd) instead of TCP
    shared_memory: bool = True
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)  # storage.backend=mooncake
    yuanrong: YuanrongConfig = field(default_factory=YuanrongConfig)  # storage.backend=yuanrong
    ray_rdt: RayRdtConfig = field(default_factory=RayRdtConfig)  # storage.backend=ray_rdt


@dataclass
class RayConfig:
    """Placement as Ray actors."""

    namespace: str = "tq_loader"
    name: str = "tq_loader"  # controller actor is "<name>_controller", units "<name>_unit_<i>"
    placement_strategy: str = "SPREAD"
    num_cpus: float = 0.0  # service actors need no whole CPU (they mostly wait on sockets)
    # storage units only on nodes that offer this Ray custom resource (None: any node); TransferQueue's
    # backend.SimpleStorage.required_node_resource
    unit_resource: str | None = None
    # the controller only on a node that offers this Ray custom resource (one that stays, e.g. the head)
    controller_resource: str | None = None


@dataclass
class ClientConfig:
    request_timeout: float | None = 120.0  # for non-blocking requests; get_meta uses its own timeout
    connect_timeout: float = 10.0
    # call services hosted by this very process directly (no socket); False: always ZMQ (tests)
    in_process: bool = True
    # a waiting get_meta logs what it waits for after this many seconds, then at doubling intervals
    # (None: never)
    wait_log_after: float | None = 2.0


@dataclass
class LoaderConfig:
    batch_size: int = 8
    micro_batch_size: int = 4
    data_fields: list[str] = field(default_factory=list)
    partition_id: str = "train"
    task_name: str = "train"
    dp_size: int = 1
    sampler: str | None = None
    sampling_config: dict[str, Any] = field(default_factory=dict)
    drop_last: bool = True
    timeout: float | None = None
    num_workers: int = 1
    prefetch_factor: int = 2
    pin_memory: bool = False
    collate: str | None = None


@dataclass
class MetricsConfig:
    """A Prometheus endpoint (``prometheus_client``) served by the process that hosts the controller."""

    enabled: bool = False
    host: str = "127.0.0.1"  # bind address of the HTTP endpoint
    port: int = 0  # 0: a free port (``tq.get_metrics_endpoint()`` says which)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics.port must be in 0..65535 (0: a free port), got {self.port}")


@dataclass
class TQConfig:
    """Root of the tree. ``placement``: local (embedded threads, no Ray) or ray (named actors)."""

    placement: str = "local"
    host: str = "127.0.0.1"
    auth_token: str | None = None  # required when host is not loopback
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PLACEMENTS = ("local", "ray")


def resolve_config(conf: Any = None) -> TQConfig:
    """Merge ``conf`` over the defaults and validate (unknown keys raise with the key's name)."""
    if isinstance(conf, TQConfig):
        cfg = conf
    else:
        base = OmegaConf.structured(TQConfig)
        if conf is not None:
            if not isinstance(conf, (dict, DictConfig)):
                raise TypeError(f"config must be a dict, DictConfig or TQConfig, not {type(conf).__name__}")
            user = OmegaConf.create(_from_transfer_queue(conf))
            base = OmegaConf.merge(base, user)
        cfg = OmegaConf.to_object(base)  # type: ignore[assignment]
    if cfg.placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, not {cfg.placement!r}")
    if cfg.storage.num_units < 1:
        raise ValueError("storage.num_units must be >= 1")
    return cfg


_TQ_BACKENDS = {
    "SimpleStorage": "simple",
    "MooncakeStore": "mooncake",
    "Yuanrong": "yuanrong",
    "RayStore": "ray_rdt",
}
_TQ_WARNED: set[str] = set()


def _warn_tq_key(key: str, message: str) -> None:
    """One warning per TransferQueue key that is accepted but has no effect here."""
    if key not in _TQ_WARNED:
        _TQ_WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=6)


def _from_transfer_queue(conf: Any) -> Any:
    """Accept TransferQueue-style keys (``backend.storage_backend``, ``num_data_storage_units``)."""
    conf = OmegaConf.to_container(conf) if isinstance(conf, DictConfig) else dict(conf)
    backend = conf.pop("backend", None)
    if isinstance(backend, dict):
        storage = conf.setdefault("storage", {})
        name = backend.get("storage_backend")
        if name:
            storage.setdefault("backend", _TQ_BACKENDS.get(str(name), str(name).lower()))
        simple = backend.get("SimpleStorage") or {}
        if "num_data_storage_units" in simple:
            storage.setdefault("num_units", int(simple["num_data_storage_units"]))
        # backend.MooncakeStore / Yuanrong / RayStore -> storage.mooncake / yuanrong / ray_rdt
        sections = {k: v for k, v in backend.items() if k not in ("storage_backend", "SimpleStorage")}
        storage_from_transfer_queue(sections, storage, _warn_tq_key)
    controller = conf.get("controller")
    if (
        isinstance(controller, dict)
        and "sampler" in controller
        and not isinstance(controller["sampler"], str)
    ):
        controller["sampler"] = getattr(controller["sampler"], "__name__", str(controller["sampler"]))
    return conf


def register_configs() -> None:
    """Register the cluster tree in Hydra's ConfigStore (``tq_loader_schema``).

    The pipeline app's schemas (root, ``loader``, ``demo``) are registered by
    :func:`tq_loader.app.config.register_configs`, which calls this one.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tq_loader_schema", node=TQConfig)
