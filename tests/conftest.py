"""Shared fixtures: a cluster per test module on each placement, unique partitions, wait helpers.

``cluster`` is parametrized at module scope over ``["local", "ray"]``: pytest groups a module's
tests by placement, so each module starts one embedded cluster and (lazily, only when a "ray" test
runs) one local Ray instance with one Ray-placed cluster -- never one per test.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ADDRESS_ENV = "TQ_LOADER_ADDRESS"


@dataclass
class ClusterHandle:
    """What a test gets: the placement name, the resolved config and this process's client."""

    placement: str
    config: Any
    client: Any


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    """One local Ray instance for the whole test module (loopback only, no token auth)."""
    ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_cluster(placement: str, **overrides: Any) -> ClusterHandle:
    """``tq.init`` a fresh cluster of ``placement`` owned by this process (never attach)."""
    import tq_loader.api as tq

    tq.close()
    os.environ.pop(ADDRESS_ENV, None)
    config = tq.init({"placement": placement, "storage": {"num_units": 2}, **overrides})
    return ClusterHandle(placement, config, tq.get_client())


def stop_cluster() -> None:
    import tq_loader.api as tq

    tq.close()
    os.environ.pop(ADDRESS_ENV, None)


@pytest.fixture(scope="module")
def local_client() -> Iterator[Any]:
    """One embedded cluster for a test module (tq.init sets TQ_LOADER_ADDRESS for child processes)."""
    handle = start_cluster("local")
    try:
        yield handle.client
    finally:
        stop_cluster()


@pytest.fixture(scope="module", params=["local", "local-zmq", pytest.param("ray", marks=pytest.mark.ray)])
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterHandle]:
    """This module's cluster, over each channel: ``local`` (embedded services called in-process),
    ``local-zmq`` (the same services reached over ZMQ) and ``ray`` (services as Ray actors). A module
    may set ``NUM_UNITS = {"ray": 1}`` to start fewer actors."""
    units = getattr(request.module, "NUM_UNITS", {}).get(request.param, 2)
    placement, extra = request.param, {}
    if placement == "ray":
        request.getfixturevalue("ray_instance")
    if placement == "local-zmq":
        placement, extra = "local", {"client": {"in_process": False}}
    handle = start_cluster(placement, storage={"num_units": units}, **extra)
    try:
        yield handle
    finally:
        stop_cluster()


@pytest.fixture
def client(cluster: ClusterHandle) -> Any:
    return cluster.client


@pytest.fixture
def pid(request: pytest.FixtureRequest) -> str:
    """A partition id no other test uses (tests stay independent on a shared cluster)."""
    return f"{request.node.originalname}-{uuid.uuid4().hex[:8]}"


def waiting_requests(client: Any) -> int:
    return int(client.statistics()["controller"]["waiting_requests"])


def wait_for_waiters(client: Any, n: int = 1, timeout: float = 20.0) -> None:
    """Return once the controller has at least ``n`` parked get_meta requests (or fail)."""
    deadline = time.monotonic() + timeout
    while waiting_requests(client) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {n} get_meta requests were waiting after {timeout}s")
        time.sleep(0.005)  # test-side polling of a counter, bounded by the deadline


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Return once ``predicate()`` holds (or fail naming ``what``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)  # test-side polling of an observable condition, bounded by the deadline


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Run ``fn`` on a daemon thread; the future carries its result or exception."""
    future: Future = Future()

    def main() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=main, daemon=True).start()
    return future
