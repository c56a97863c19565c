"""The configuration tree: dataclasses that are the structured config, registered with Hydra.

``resolve_config`` accepts ``None``, a dict, an OmegaConf ``DictConfig`` or a :class:`TQConfig`
and returns a validated :class:`TQConfig`. No environment variable is read here: the few the
library reads (``TQ_LOADER_ADDRESS``, ``TQ_LOADER_AUTH_TOKEN``, ``TQ_LOADER_METRICS_ENDPOINT``) are
read by ``api`` and documented there. Configuration is data, not hidden knobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tq_loader.backend_config import MooncakeConfig, RayRdtConfig, YuanrongConfig, storage_from_transfer_queue
from tq_loader.config_tq import split_transfer_queue_config, warn_once
from tq_loader.errors import ArgumentError

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
                raise ArgumentError(f"conf must be a dict, DictConfig or TQConfig, not {type(conf).__name__}")
            user = OmegaConf.create(_from_transfer_queue(conf))
            base = OmegaConf.merge(base, user)
        cfg = OmegaConf.to_object(base)  # type: ignore[assignment]
    if cfg.placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, not {cfg.placement!r}")
    if cfg.storage.num_units < 1:
        raise ValueError("storage.num_units must be >= 1")
    return cfg


def _from_transfer_queue(conf: Any) -> Any:
    """TransferQueue's keys (its whole ``config.yaml``) in tq_loader's tree (``config_tq``); its
    per-backend sections go to the backends' mapping (``backend_config``)."""
    conf = OmegaConf.to_container(conf) if isinstance(conf, DictConfig) else dict(conf)
    conf, sections = split_transfer_queue_config(conf)
    if sections:
        # backend.MooncakeStore / Yuanrong / RayStore -> storage.mooncake / yuanrong / ray_rdt
        storage_from_transfer_queue(sections, conf.setdefault("storage", {}), warn_once)
    return conf


def register_configs() -> None:
    """Register the cluster tree in Hydra's ConfigStore (``tq_loader_schema``).

    The pipeline app's schemas (root, ``loader``, ``demo``) are registered by
    :func:`tq_loader.app.config.register_configs`, which calls this one.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tq_loader_schema", node=TQConfig)
