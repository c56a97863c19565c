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

__all__ = ["Cluster", "EmbeddedCluster", "start_cluster"]


class Cluster(Protocol):
    address: str

    def stop(self) -> None: ...


class EmbeddedCluster:
    """Controller and storage units as services in this process, on its shared event loop."""

    def __init__(self, config: TQConfig) -> None:
        if config.storage.backend != "simple":
            raise ValueError(
                f"storage backend {config.storage.backend!r} is not built in to the embedded placement; "
                "use storage.backend=simple"
            )
        self.config = config
        self.controller = start_controller(config)
        self.units: list[ServiceHost] = []
        try:
            for i in range(config.storage.num_units):
                self.units.append(start_storage_unit(config, i))
            publish_layout(self.controller, config, [u.address for u in self.units])
        except BaseException:
            self.stop()
            raise
        self.address = self.controller.address

    def statistics(self) -> dict[str, Any]:
        return {host.name: host.server.statistics() for host in [self.controller, *self.units]}

    def stop(self) -> None:
        for host in [*self.units, self.controller]:
            host.stop()
        self.units = []


def start_cluster(config: TQConfig) -> Cluster:
    """Create a cluster as ``config.placement`` says (this process owns it)."""
    if config.placement == "ray":
        from tq_loader.ray_cluster import RayCluster

        return RayCluster.create(config)
    return EmbeddedCluster(config)
