"""Placement as Ray actors: a named controller actor and storage-unit actors in a placement group.

Actors only host the same ZMQ services the embedded placement runs in threads; clients talk ZMQ to
them directly. Ray is used to place, name and find the services -- never on the data path. Service
actors ask for a fraction of a CPU (``ray.num_cpus``, default 0), so they start on any machine
size (TransferQueue's whole-CPU actors stay pending forever on a 2-core host).
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tq_loader.config import TQConfig, resolve_config
from tq_loader.errors import TQConnectionError
from tq_loader.transport import check_bind

__all__ = ["ClusterRegistry", "RayCluster", "find_cluster", "find_controller_address", "publish_cluster"]

_MIN_CPU = 0.001  # Ray bundles must ask for something; this is "no real CPU"
_STOP_TIMEOUT = 10.0
_SCHEDULE_TIMEOUT = 60.0  # seconds for Ray to place the storage units before init gives up  # seconds to wait for services to stop cleanly before their actors are killed


@ray.remote
class ServiceActor:
    """Hosts one service (controller or storage unit) on an event-loop thread inside the actor."""

    def __init__(self, kind: str, config: dict[str, Any], index: int = 0) -> None:
        from tq_loader.hosting import start_controller, start_storage_unit

        self.config = resolve_config(config)
        if self.config.host == "node":  # bind where other nodes can reach this one (needs auth_token)
            self.config.host = ray.util.get_node_ip_address()
        self.host = (
            start_controller(self.config) if kind == "controller" else start_storage_unit(self.config, index)
        )

    def address(self) -> str:
        return self.host.address

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def publish_layout(self, unit_addresses: list[str]) -> None:
        from tq_loader.hosting import publish_layout

        publish_layout(self.host, self.config, unit_addresses)

    def stop(self) -> None:
        self.host.stop()


def _controller_name(config: TQConfig) -> str:
    return f"{config.ray.name}_controller"


def _registry_name(config: TQConfig) -> str:
    return f"{config.ray.name}_registry"


# TransferQueue's tutorials look its controller actor up by this name to read the cluster's config
# (``ray.get_actor("TransferQueueController", namespace="transfer_queue").get_config``); the
# registry answers to it too when the compat alias is in use (see tq_loader.compat).
TQ_ACTOR_NAME, TQ_NAMESPACE = "TransferQueueController", "transfer_queue"


@ray.remote(num_cpus=0)
class ClusterRegistry:
    """Where a cluster of this Ray job is: Ray workers do not inherit the driver's environment
    (``TQ_LOADER_ADDRESS``), so ``tq.init()`` in a task or actor asks this named actor instead."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def lookup(self) -> dict[str, Any]:
        return self.entry

    def get_config(self) -> dict[str, Any]:
        """The cluster's config (TransferQueue's controller method of the same name)."""
        return self.entry["config"]


def _this_host() -> str:
    from tq_loader.shm import boot_id

    return boot_id() or ray.util.get_node_ip_address()


def publish_cluster(config: TQConfig, address: str, *, compat_name: bool = False) -> list[Any]:
    """Announce a cluster created in this process to every Ray worker of the job; the actors to
    kill on close. ``compat_name`` also registers TransferQueue's controller name."""
    entry = {"address": address, "placement": config.placement, "host": _this_host(),
             "node_id": ray.get_runtime_context().get_node_id(), "auth_token": config.auth_token,
             "config": config.to_dict()}  # fmt: skip
    names = [(_registry_name(config), config.ray.namespace)]
    if compat_name:
        names.append((TQ_ACTOR_NAME, TQ_NAMESPACE))
    actors = []
    for name, namespace in names:
        try:
            actors.append(
                ClusterRegistry.options(name=name, namespace=namespace, lifetime=None).remote(entry)
            )
        except ValueError:  # another process of the job published first: its cluster is the one
            continue
    return actors


def find_cluster(config: TQConfig) -> tuple[str, str | None] | None:
    """``(controller address, auth token)`` of this Ray job's cluster, if Ray is up and one exists.

    A cluster whose services are embedded in a process of another node cannot be reached from
    here (they listen on that node's loopback): that is a ``TQConnectionError`` saying to use the
    Ray placement, never a silent private cluster.
    """
    if not ray.is_initialized():
        return None
    try:
        registry = ray.get_actor(_registry_name(config), namespace=config.ray.namespace)
    except ValueError:
        try:  # a Ray placement whose owner did not announce it (an older owner): the controller actor
            actor = ray.get_actor(_controller_name(config), namespace=config.ray.namespace)
        except ValueError:
            return None
        return ray.get(actor.address.remote()), config.auth_token
    entry = ray.get(registry.lookup.remote())
    other_node = entry["host"] != _this_host() or entry["node_id"] != ray.get_runtime_context().get_node_id()
    if entry["placement"] != "ray" and other_node:
        raise TQConnectionError(
            f"the cluster of this Ray job runs embedded in a process on another node ({entry['address']} is "
            "that node's loopback); start it with placement: ray (tq.init({'placement': 'ray'})) so its "
            "services are Ray actors every node can reach"
        )
    return entry["address"], entry.get("auth_token")


def find_controller_address(config: TQConfig) -> str | None:
    """Address of a running cluster's controller (a Ray actor, or published by its owner)."""
    found = find_cluster(config)
    return None if found is None else found[0]


class RayCluster:
    """A cluster whose services are Ray actors; this process owns (and stops) them."""

    def __init__(
        self, config: TQConfig, controller: Any, units: list[Any], pg: Any, backend_services: Any = None
    ) -> None:
        self.config, self.controller, self.units, self.pg = config, controller, units, pg
        self.backend_services = backend_services  # an external backend's services (started by the driver)
        self.address: str = ray.get(controller.address.remote())

    @classmethod
    def create(cls, config: TQConfig) -> RayCluster:
        check_bind(config.host, config.auth_token, "tq_loader on Ray")  # before any actor starts
        if not ray.is_initialized():
            ray.init(include_dashboard=False, namespace=config.ray.namespace, log_to_driver=False)
        # An external backend's services start (or are attached to) here, in the driver: with
        # loopback addresses they serve this node; give addresses to serve several nodes.
        from tq_loader.storage.services import start_backend_services

        services, config = start_backend_services(config)
        try:
            return cls._create(config, services)
        except BaseException:
            if services is not None:
                services.close()
            raise

    @classmethod
    def _create(cls, config: TQConfig, services: Any) -> RayCluster:
        cpus = max(config.ray.num_cpus, _MIN_CPU)
        conf = config.to_dict()
        num_units = 0 if services is not None else config.storage.num_units  # a KV backend needs none
        bundle: dict[str, float] = {"CPU": cpus}
        if config.ray.unit_resource:
            bundle[config.ray.unit_resource] = _MIN_CPU  # only nodes that offer it hold units
        pg = placement_group([bundle] * max(num_units, 1), strategy=config.ray.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=_SCHEDULE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            need = (
                f" on nodes with the custom resource {config.ray.unit_resource!r}"
                if config.ray.unit_resource
                else ""
            )
            raise TQConnectionError(
                f"Ray could not place {config.storage.num_units} storage units{need} within "
                f"{_SCHEDULE_TIMEOUT:.0f}s ({bundle} each, strategy {config.ray.placement_strategy}); start "
                "nodes that offer it (ray start --resources=...), or lower storage.num_units"
            ) from None
        actors: list[Any] = []
        try:  # a failed start (a name already taken, an actor that dies) leaves nothing behind
            for i in range(num_units):
                actors.append(
                    ServiceActor.options(
                        name=f"{config.ray.name}_unit_{i}",
                        namespace=config.ray.namespace,
                        num_cpus=cpus,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=i
                        ),
                    ).remote("storage", conf, i)
                )
            units = list(actors)
            pin = {config.ray.controller_resource: _MIN_CPU} if config.ray.controller_resource else None
            controller = ServiceActor.options(
                name=_controller_name(config), namespace=config.ray.namespace, num_cpus=cpus, resources=pin
            ).remote("controller", conf)
            actors.append(controller)
            unit_addresses = ray.get([u.address.remote() for u in units])
            ray.get(controller.publish_layout.remote(unit_addresses))
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(pg)
            raise
        return cls(config, controller, units, pg, services)

    def stop(self) -> None:
        """Stop every service, even if some actor already died; idempotent. The names are free after."""
        if self.pg is None:
            return
        actors, self.units = [*self.units, self.controller], []
        refs = [a.stop.remote() for a in actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=_STOP_TIMEOUT)
        for ref in done:  # a dead actor's stop fails: killing it below is all that is left to do
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ref)
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(self.pg)
        self.pg = None
        if self.backend_services is not None:
            self.backend_services.close()
            self.backend_services = None
