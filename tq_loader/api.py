"""Process-level API: ``init`` / ``connect`` / ``close`` / ``get_client`` (TransferQueue's names).

``init(conf)`` resolves, first match wins:

1. already initialised in this process -> no-op, returns the current config;
2. ``TQ_LOADER_ADDRESS`` names a running cluster's controller -> attach to it;
3. Ray is initialised and this Ray job has a cluster -> attach to it (a Ray placement's named
   controller actor, or an embedded cluster its owner announced with a named registry actor:
   Ray workers do not inherit the driver's environment);
4. ``placement: ray`` -> create the cluster as Ray actors;
5. otherwise start the embedded default (services on threads of this process).

The process that creates a cluster sets ``TQ_LOADER_ADDRESS`` in its own environment, so
DataLoader workers, DDP ranks and subprocesses it starts attach to the same cluster by themselves.
``TQ_LOADER_AUTH_TOKEN`` carries the token the same way when the cluster needs one, and
``TQ_LOADER_METRICS_ENDPOINT`` the Prometheus endpoint (``metrics.enabled``). These are the only
environment variables the library reads.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tq_loader import args
from tq_loader.client import Client
from tq_loader.cluster import Cluster, start_cluster
from tq_loader.config import TQConfig, resolve_config
from tq_loader.errors import ArgumentError
from tq_loader.stats import ClusterStats

__all__ = [
    "ENV_ADDRESS", "ENV_TOKEN", "close", "connect", "get_client", "get_config", "get_metrics_endpoint", "init",
    "is_initialized", "owns_cluster", "statistics",
]  # fmt: skip

ENV_ADDRESS = "TQ_LOADER_ADDRESS"
ENV_TOKEN = "TQ_LOADER_AUTH_TOKEN"


@dataclass
class _Runtime:
    config: TQConfig
    client: Client
    address: str
    cluster: Cluster | None  # set only in the process that owns the services
    pid: int
    published: list[Any] = field(default_factory=list)  # Ray registry actors announcing the cluster
    metrics: Any = None  # the MetricsServer of an owned cluster with metrics.enabled


_runtime: _Runtime | None = None
_lock = threading.RLock()


def _current() -> _Runtime | None:
    """The runtime of *this* process (a forked child does not inherit its parent's)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None


def init(conf: Any = None) -> TQConfig:
    """Attach to or start a cluster (see the module docstring); returns the resolved config."""
    global _runtime
    if conf is not None and not isinstance(conf, (Mapping, TQConfig)):  # a DictConfig is a Mapping
        raise ArgumentError(f"conf must be a dict, DictConfig or TQConfig, not {type(conf).__name__}")
    with _lock:
        current = _current()
        if current is not None:
            return current.config
        address = os.environ.get(ENV_ADDRESS)
        if address:
            return _attach(address, os.environ.get(ENV_TOKEN))
        conf, sampler = _take_sampler_object(conf)
        config = resolve_config(conf)
        found = _find_ray_cluster(config)
        if found:
            return _attach(found[0], found[1] or config.auth_token)
        if sampler is not None and config.placement != "local":
            raise _remote_sampler_error(sampler, config)
        cluster = start_cluster(config)
        client = Client(cluster.address, config=config.client, auth_token=config.auth_token)
        try:
            if sampler is not None:
                _install_sampler(cluster, config, sampler)
            published = _publish_in_ray(config, cluster.address)
            metrics = _start_metrics(config, cluster.address)
            if metrics is not None:  # every attached process can then ask the controller for it
                client.announce_metrics(metrics.endpoint)
        except BaseException:
            client.close()
            cluster.stop()
            raise
        _runtime = _Runtime(config, client, cluster.address, cluster, os.getpid(), published, metrics)
        os.environ[ENV_ADDRESS] = cluster.address
        if config.auth_token:
            os.environ[ENV_TOKEN] = config.auth_token
        return config


def _start_metrics(config: TQConfig, address: str) -> Any:
    if not config.metrics.enabled:
        return None
    from tq_loader.metrics import ENV_METRICS, start_metrics

    server = start_metrics(config.metrics, address, config.auth_token)
    os.environ[ENV_METRICS] = server.endpoint  # children find it as they find the cluster
    return server


def get_metrics_endpoint() -> str | None:
    """``"host:port"`` of the Prometheus endpoint (``/metrics``), or None when metrics are off.

    The process hosting the cluster announces it to the controller, so every process attached to
    the cluster gets it (``tq-loader serve`` also prints it); without a cluster,
    ``TQ_LOADER_METRICS_ENDPOINT`` is the answer.
    """
    current = _current()
    if current is not None and current.metrics is not None:
        return str(current.metrics.endpoint)
    if current is not None:
        return current.client.metrics_endpoint()
    return os.environ.get("TQ_LOADER_METRICS_ENDPOINT") or None


def _take_sampler_object(conf: Any) -> tuple[Any, Any]:
    """A sampler instance or class in ``controller.sampler`` (as TransferQueue accepts), replaced by a
    name in the config; the object itself goes to the controller if it runs in this process."""
    from omegaconf import DictConfig, OmegaConf

    from tq_loader.samplers import BaseSampler, available_samplers

    if isinstance(conf, DictConfig):
        controller = conf.get("controller")
        sampler = None if controller is None else controller.get("sampler")
        if isinstance(sampler, str) or sampler is None:
            return conf, None
        conf = OmegaConf.to_container(conf)
    if not isinstance(conf, dict):
        return conf, None
    sampler = (conf.get("controller") or {}).get("sampler")
    is_object = isinstance(sampler, BaseSampler) or (
        isinstance(sampler, type) and issubclass(sampler, BaseSampler)
    )
    if not is_object:
        return conf, None
    cls = sampler if isinstance(sampler, type) else type(sampler)
    registered = [n for n in available_samplers() if _registered_class(n) is cls]
    name = (
        registered[0] if registered and isinstance(sampler, type) else f"{cls.__qualname__}@{id(sampler):x}"
    )
    conf = {**conf, "controller": {**conf["controller"], "sampler": name}}
    return conf, (None if registered and isinstance(sampler, type) else sampler)


def _registered_class(name: str) -> Any:
    from tq_loader.samplers import get_sampler_class

    return get_sampler_class(name)


def _remote_sampler_error(sampler: Any, config: TQConfig) -> ArgumentError:
    return ArgumentError(
        f"controller.sampler is a {getattr(sampler, '__name__', type(sampler).__name__)} object, but with "
        f"placement {config.placement!r} the controller runs in another process and nothing executable "
        "crosses the wire. Register the class by name in a module every process imports -- "
        "tq_loader.register_sampler('my_sampler', MySampler) -- and pass controller.sampler='my_sampler' "
        "(arguments in controller.sampler_kwargs)"
    )


def _install_sampler(cluster: Cluster, config: TQConfig, sampler: Any) -> None:
    """Hand a sampler object to the controller this process hosts (the embedded placement)."""
    controller = cluster.controller  # type: ignore[attr-defined]
    instance = sampler() if isinstance(sampler, type) else sampler
    controller.call(lambda: controller.service.add_sampler(config.controller.sampler, instance))


def _ray_up() -> bool:
    if "ray" not in sys.modules:  # Ray cannot be initialised if it was never imported
        return False
    import ray

    return ray.is_initialized()


def _find_ray_cluster(config: TQConfig) -> tuple[str, str | None] | None:
    if not _ray_up():
        return None
    from tq_loader.ray_cluster import find_cluster

    return find_cluster(config)


def _publish_in_ray(config: TQConfig, address: str) -> list[Any]:
    """With Ray up, let every Ray worker of the job find this cluster (they do not inherit the
    environment that carries ``TQ_LOADER_ADDRESS``)."""
    if not _ray_up():
        return []
    from tq_loader.ray_cluster import publish_cluster

    aliased = type(sys.modules.get("transfer_queue")).__module__ == "_tq_loader_alias"  # tq_loader.compat
    return publish_cluster(config, address, compat_name=aliased)


def _attach(address: str, auth_token: str | None) -> TQConfig:
    global _runtime
    client = Client(address, auth_token=auth_token)
    try:
        info = client.describe()
    except BaseException:
        client.close()
        raise
    config = resolve_config(info.config)
    client = _reconfigure(client, config, auth_token)
    _runtime = _Runtime(config, client, address, None, os.getpid())
    return config


def _reconfigure(client: Client, config: TQConfig, auth_token: str | None) -> Client:
    if config.client == client.config:
        return client
    client.close()
    return Client(client.controller_address, config=config.client, auth_token=auth_token)


def connect(address: str, auth_token: str | None = None) -> TQConfig:
    """Attach to the cluster whose controller listens at ``address`` (replacing any current one)."""
    address = args.name("address", address)  # checked before the current cluster is let go
    auth_token = None if auth_token is None else args.key("auth_token", auth_token)
    with _lock:
        if _current() is not None:
            close()
        return _attach(address, auth_token)


def close() -> None:
    """Detach; in the process that created the cluster, also stop its services."""
    global _runtime
    with _lock:
        current, _runtime = _current(), None
        if current is None:
            return
        try:
            if current.metrics is not None:
                current.metrics.stop()
                if os.environ.get("TQ_LOADER_METRICS_ENDPOINT") == current.metrics.endpoint:
                    os.environ.pop("TQ_LOADER_METRICS_ENDPOINT", None)
            current.client.close()
        finally:
            if current.cluster is not None:
                # the address must not outlive the services, even if stopping one of them failed
                if os.environ.get(ENV_ADDRESS) == current.address:
                    os.environ.pop(ENV_ADDRESS, None)
                    os.environ.pop(ENV_TOKEN, None)
                _unpublish(current.published)
                current.cluster.stop()


def _unpublish(actors: list[Any]) -> None:
    if actors and _ray_up():
        import ray

        for actor in actors:
            ray.kill(actor)


def is_initialized() -> bool:
    """Whether this process is attached to (or owns) a cluster."""
    return _current() is not None


def owns_cluster() -> bool:
    """Whether this process started the services it is attached to (``close()`` stops them)."""
    current = _current()
    return current is not None and current.cluster is not None


def get_client() -> Client:
    """This process's client (attaching or starting a cluster with ``init()`` on first use)."""
    with _lock:
        if _current() is None:
            init()
        current = _current()
        assert current is not None
        return current.client


def get_config() -> TQConfig:
    get_client()
    current = _current()
    assert current is not None
    return current.config


def statistics() -> ClusterStats:
    """Counters of this client, the controller and the storage: a frozen typed snapshot that reads
    like a dict (``stats["controller"]["waiting_requests"]``); ``.to_dict()`` for plain data."""
    return get_client().statistics()
