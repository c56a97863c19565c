"""Process-level API: ``init`` / ``connect`` / ``close`` / ``get_client`` (TransferQueue's names).

``init(conf)`` resolves, first match wins:

1. already initialised in this process -> no-op, returns the current config;
2. ``TQ_LOADER_ADDRESS`` names a running cluster's controller -> attach to it;
3. Ray is initialised and the named controller actor exists -> attach to it;
4. ``placement: ray`` -> create the cluster as Ray actors;
5. otherwise start the embedded default (services on threads of this process).

The process that creates a cluster sets ``TQ_LOADER_ADDRESS`` in its own environment, so
DataLoader workers, DDP ranks and subprocesses it starts attach to the same cluster by themselves.
``TQ_LOADER_AUTH_TOKEN`` carries the token the same way when the cluster needs one. These two
variables are the only environment the library reads.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from tq_loader.client import Client
from tq_loader.cluster import Cluster, start_cluster
from tq_loader.config import TQConfig, resolve_config

__all__ = [
    "ENV_ADDRESS", "ENV_TOKEN", "close", "connect", "get_client", "get_config", "init", "is_initialized",
    "owns_cluster", "statistics",
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


_runtime: _Runtime | None = None
_lock = threading.RLock()


def _current() -> _Runtime | None:
    """The runtime of *this* process (a forked child does not inherit its parent's)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None


def init(conf: Any = None) -> TQConfig:
    """Attach to or start a cluster (see the module docstring); returns the resolved config."""
    global _runtime
    with _lock:
        current = _current()
        if current is not None:
            return current.config
        address = os.environ.get(ENV_ADDRESS)
        if address:
            return _attach(address, os.environ.get(ENV_TOKEN))
        config = resolve_config(conf)
        found = _find_ray_cluster(config)
        if found:
            return _attach(found, config.auth_token)
        cluster = start_cluster(config)
        client = Client(cluster.address, config=config.client, auth_token=config.auth_token)
        _runtime = _Runtime(config, client, cluster.address, cluster, os.getpid())
        os.environ[ENV_ADDRESS] = cluster.address
        if config.auth_token:
            os.environ[ENV_TOKEN] = config.auth_token
        return config


def _find_ray_cluster(config: TQConfig) -> str | None:
    import sys

    if "ray" not in sys.modules:  # Ray cannot be initialised if it was never imported
        return None
    from tq_loader.ray_cluster import find_controller_address

    return find_controller_address(config)


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
            current.client.close()
        finally:
            if current.cluster is not None:
                # the address must not outlive the services, even if stopping one of them failed
                if os.environ.get(ENV_ADDRESS) == current.address:
                    os.environ.pop(ENV_ADDRESS, None)
                    os.environ.pop(ENV_TOKEN, None)
                current.cluster.stop()


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


def statistics() -> dict[str, Any]:
    """Counters of this client, the controller and every storage unit (a plain dict)."""
    return get_client().statistics()
