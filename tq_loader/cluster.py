"""Placement of the services: embedded in this process ("local") or as Ray actors ("ray").

Either way a cluster is one controller plus ``storage.num_units`` storage units, each a ZMQ
server (see :mod:`tq_loader.hosting`); the controller knows the units' addresses (``Describe``), so
a client needs only the controller's address to attach -- no Ray calls, which keeps DataLoader
workers fork-safe. A client in the process that hosts the services calls them directly.
"""

from __future__ import annotations

from typing import Any, Protocol

from tq_loader.config import TQConfig
from tq_loader.hosting import ServiceHost, publish_layout, start_controller, start_storage_unit
from tq_loader.storage.services import start_backend_services

__all__ = ["Cluster", "EmbeddedCluster", "start_cluster"]


class Cluster(Protocol):
    address: str

    def stop(self) -> None: ...


class EmbeddedCluster:
    """Controller and storage units as services in this process, on its shared event loop."""

    def __init__(self, config: TQConfig) -> None:
        # the external backend's services first (started here or attached to): the published
        # config names their addresses, so every client reaches the same ones
        self.backend_services, config = start_backend_services(config)
        self.config = config
        self.units: list[ServiceHost] = []
        try:
            self.controller = start_controller(config)
            if self.backend_services is None:  # the built-in units; a KV backend needs none
                for i in range(config.storage.num_units):
                    self.units.append(start_storage_unit(config, i))
            publish_layout(self.controller, config, [u.address for u in self.units])
        except BaseException:
            self.stop()
            raise
        self.address = self.controller.address

    def statistics(self) -> dict[str, Any]:
        out = {host.name: host.server.statistics() for host in [self.controller, *self.units]}
        if self.backend_services is not None:
            out[f"{self.backend_services.backend}-services"] = self.backend_services.describe()
        return out

    def stop(self) -> None:
        controller = getattr(self, "controller", None)
        for host in [*self.units, *([controller] if controller is not None else [])]:
            host.stop()
        self.units = []
        if self.backend_services is not None:  # stops only what was started here (by pid)
            self.backend_services.close()
            self.backend_services = None


def start_cluster(config: TQConfig) -> Cluster:
    """Create a cluster as ``config.placement`` says (this process owns it)."""
    if config.placement == "ray":
        from tq_loader.ray_cluster import RayCluster

        return RayCluster.create(config)
    return EmbeddedCluster(config)
