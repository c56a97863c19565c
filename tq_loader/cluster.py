"""Placement of the services: embedded in this process ("local") or as Ray actors ("ray").

Either way a cluster is one controller plus ``storage.num_units`` storage units, each a ZMQ
server; the controller knows the units' addresses (``Describe``), so a client needs only the
controller's address to attach -- no Ray calls, which keeps DataLoader workers fork-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tq_loader import protocol as p
from tq_loader.config import TQConfig
from tq_loader.controller.service import ControllerService
from tq_loader.loop import LoopThread
from tq_loader.storage.service import StorageUnitService
from tq_loader.storage.unit import SimpleStorageUnit
from tq_loader.transport import Server

__all__ = ["Cluster", "EmbeddedCluster", "ServiceHost", "start_cluster"]


class Cluster(Protocol):
    address: str

    def stop(self) -> None: ...


@dataclass
class ServiceHost:
    """One service (controller or storage unit) served on its own event-loop thread."""

    name: str
    thread: LoopThread
    server: Server
    service: Any

    @classmethod
    def start(cls, name: str, service: Any, *, host: str, port: int, auth_token: str | None) -> ServiceHost:
        thread = LoopThread(f"tq-{name}")
        server = Server(service.handle, host=host, port=port, auth_token=auth_token, name=name)
        thread.run(server.start())
        return cls(name, thread, server, service)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        if self.thread.alive:
            self.thread.run(self.server.close())
            self.thread.close()


def start_controller(config: TQConfig) -> ServiceHost:
    return ServiceHost.start(
        "controller", ControllerService(config.controller),
        host=config.host, port=config.controller.port, auth_token=config.auth_token,
    )  # fmt: skip


def start_storage_unit(config: TQConfig, index: int) -> ServiceHost:
    ports = config.storage.ports
    unit = SimpleStorageUnit(capacity_rows=config.storage.capacity_rows)
    return ServiceHost.start(
        f"storage-{index}", StorageUnitService(unit, put_timeout=config.storage.put_timeout),
        host=config.host, port=ports[index] if index < len(ports) else 0, auth_token=config.auth_token,
    )  # fmt: skip


def publish_layout(controller: ServiceHost, config: TQConfig, unit_addresses: list[str]) -> None:
    """Tell the controller where the storage units are; clients learn it through ``Describe``."""
    info = p.ClusterInfo(
        controller=controller.address,
        storage_units=unit_addresses,
        storage_backend=config.storage.backend,
        config=config.to_dict(),
    )

    async def _set() -> None:
        controller.service.cluster = info

    controller.thread.run(_set())


class EmbeddedCluster:
    """Controller and storage units as services in this process, each on its own loop thread."""

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
