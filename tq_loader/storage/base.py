"""The backend contract: a :class:`StorageManager` only stores and fetches the columns of rows.

What makes the system correct lives above it, in the client core (``tq_loader.client``), once for
every backend: a row becomes visible to consumers only after ``put_data`` returned (the backend
acknowledged every byte), and rows a backend reports gone (:class:`StorageLost`) are dropped in
the controller and never served again. A backend therefore implements five coroutines and, to be
built by name (``storage.backend``), registers a factory with :func:`register_storage_manager`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tensordict import TensorDict

from tq_loader import protocol as p
from tq_loader.batch import PreparedBatch
from tq_loader.channel import Channel
from tq_loader.errors import DataLostError, NotFoundError, SchemaError
from tq_loader.metadata import BatchMeta
from tq_loader.stats import StorageStats

__all__ = [
    "ChannelFactory",
    "StorageLost",
    "StorageManager",
    "make_storage_manager",
    "register_storage_manager",
    "registered_storage_managers",
    "rows_to_store",
]

ChannelFactory = Callable[[str], Channel]


class StorageLost(DataLostError):
    """Raised by a backend when stored rows are gone for good (a dead storage unit, evicted keys).

    ``unit``/``num_units``/``stripe_rows``: every row striped to that unit is lost; ``rows``:
    ``(partition, global indexes)`` of rows known lost. The client core reports either to the
    controller, which drops those rows, and re-raises a :class:`DataLostError` to the caller.
    """

    def __init__(
        self,
        message: str,
        *,
        unit: int | None = None,
        num_units: int = 0,
        stripe_rows: int = 0,
        rows: Sequence[tuple[str, np.ndarray]] = (),
    ) -> None:
        super().__init__(message)
        self.unit, self.num_units, self.stripe_rows = unit, num_units, stripe_rows
        self.rows = list(rows)


@dataclass(frozen=True)
class BackendInfo:
    """What a manager knows of the cluster: its ``ClusterInfo`` and how to reach a service."""

    cluster: p.ClusterInfo
    connect: ChannelFactory
    settings: dict[str, Any] = field(default_factory=dict)


class StorageManager(ABC):
    """Moves the columns of a batch between a client and a storage backend (store and fetch only)."""

    #: the name it is registered under (``storage.backend``)
    name: str = ""
    #: whether ``get_data(..., copy=False)`` may return views of the backend's memory (else the
    #: client core asks for the usual private copy, which satisfies ``copy=False`` as well)
    supports_views: bool = False

    @abstractmethod
    async def put_data(self, batch: PreparedBatch, meta: BatchMeta) -> None:
        """Store row ``i`` of every column of ``batch`` as row ``meta[i]``; return once it is durable
        in the backend (the caller then makes the rows visible)."""

    @abstractmethod
    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        """The ``fields`` (default: all of ``meta``'s) of ``meta``'s rows, in its order, in memory
        the caller owns (writable, not shared with the backend). A manager with ``supports_views``
        also takes ``copy=False``: tensors may then be views the caller must not write."""

    @abstractmethod
    async def clear_data(self, meta: BatchMeta) -> None:
        """Free the storage of ``meta``'s rows (unknown rows are ignored)."""

    @abstractmethod
    async def clear_partition(self, partition_id: str) -> None:
        """Free everything stored for a partition."""

    @abstractmethod
    async def statistics(self) -> StorageStats | dict[str, Any]:
        """A snapshot of the backend's counters: a :class:`~tq_loader.stats.StorageStats` (or a plain
        dict with its keys -- ``backend``, ``rows``, ``services``...; the client core types it)."""

    def take_lost(self) -> list[StorageLost]:
        """Losses found outside a data call (e.g. by :meth:`statistics`), each returned once; the
        client core reports them to the controller."""
        return []

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what this manager holds."""


def rows_to_store(batch: PreparedBatch, meta: BatchMeta) -> int:
    """How many rows a ``put_data`` stores (0: nothing to do); a batch and metadata of different
    lengths are a ``SchemaError`` -- the one check every backend makes first."""
    if batch.size != meta.size:
        raise SchemaError(
            f"put_data(): data has {batch.size} rows but the metadata has {meta.size}; "
            "pass the BatchMeta of exactly these rows, in the same order"
        )
    return meta.size if batch.columns else 0


_BACKENDS: dict[str, Callable[[BackendInfo], StorageManager]] = {}


def register_storage_manager(name: str, factory: Callable[[BackendInfo], StorageManager]) -> None:
    """Make ``factory(info)`` buildable as ``storage.backend = name`` (case-insensitive); ``factory``
    is usually the manager class itself (its ``__init__(self, info: BackendInfo)``)."""
    if not callable(factory):
        raise TypeError(f"{factory!r} is not callable")
    _BACKENDS[name.lower()] = factory


def registered_storage_managers() -> list[str]:
    return sorted(_BACKENDS)


def make_storage_manager(name: str, info: BackendInfo) -> StorageManager:
    """Build the storage manager registered as ``name``."""
    factory = _BACKENDS.get(str(name).lower())
    if factory is None:
        raise NotFoundError(
            f"unknown storage backend {name!r}; registered: {registered_storage_managers()}. "
            "Register it with tq_loader.storage.register_storage_manager(name, cls)"
        )
    return factory(info)
