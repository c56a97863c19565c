"""Hosting one service (controller or storage unit) in this process, for both placements.

A :class:`ServiceHost` serves a service's handler over ZMQ (for other processes) and registers it
for in-process clients (:func:`tq_loader.channel.register_local`), on the process's shared event
loop (:data:`tq_loader.loop.shared_loop`), so a client of this process calls it without a socket
and without a thread hop of its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from tq_loader import protocol as p
from tq_loader.channel import register_local, unregister_local
from tq_loader.config import TQConfig
from tq_loader.controller.service import ControllerService
from tq_loader.loop import LoopThread, shared_loop
from tq_loader.storage.service import StorageUnitService
from tq_loader.storage.unit import SimpleStorageUnit
from tq_loader.transport import Server

__all__ = ["ServiceHost", "publish_layout", "start_controller", "start_storage_unit"]


@dataclass
class ServiceHost:
    """One service, served on the shared loop of this process."""

    name: str
    thread: LoopThread
    server: Server
    service: Any
    _stopped: bool = False

    @classmethod
    def start(cls, name: str, service: Any, *, host: str, port: int, auth_token: str | None) -> ServiceHost:
        thread = shared_loop.acquire()
        try:
            server = Server(service.handle, host=host, port=port, auth_token=auth_token, name=name)
            thread.run(server.start())
        except BaseException:
            shared_loop.release(thread)
            raise
        register_local(server.address, service.handle, thread.loop, name)
        return cls(name, thread, server, service)

    @property
    def address(self) -> str:
        return self.server.address

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the service's loop (the only thread that may touch its state)."""

        async def _call() -> Any:
            return fn()

        return self.thread.run(_call())

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        unregister_local(self.server.address)
        if self.thread.alive:
            self.thread.run(self.server.close())
        shared_loop.release(self.thread)


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
        cluster_id=uuid.uuid4().hex,
    )

    def _set() -> None:
        controller.service.cluster = info

    controller.call(_set)
