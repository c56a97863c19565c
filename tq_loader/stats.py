"""Statistics as frozen, typed snapshots: what ``statistics()`` of every component returns.

Each snapshot is a msgspec Struct (so it travels in protocol replies as itself and IDEs show its
fields) that also reads like the plain dict it replaces -- ``stats["rows"]``, ``stats.get(...)``,
``"rows" in stats``, ``stats.to_dict()`` (plain nested dicts) -- so dict-style code and ``json.dumps(stats.to_dict())``
keep working. A snapshot never changes after it is taken (trio's ``statistics()`` convention).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = [
    "ClientStats",
    "ClusterStats",
    "ControllerStats",
    "PartitionStats",
    "RegistryStats",
    "RoundStats",
    "ServerStats",
    "Snapshot",
    "StorageStats",
    "UnitStats",
]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every statistics snapshot: typed fields, read-only, dict-style reads."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (nested snapshots too): for JSON, logs, comparisons."""
        return msgspec.to_builtins(self)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__struct_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.__struct_fields__ else default

    def __contains__(self, key: object) -> bool:
        return key in self.__struct_fields__

    def keys(self) -> tuple[str, ...]:
        return self.__struct_fields__

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.__struct_fields__]

    def __iter__(self) -> Iterator[str]:
        return iter(self.__struct_fields__)

    def __len__(self) -> int:
        return len(self.__struct_fields__)


class ServerStats(Snapshot, frozen=True):
    """One ZMQ server (a service's socket)."""

    address: str
    requests: int = 0
    errors: int = 0
    malformed: int = 0
    in_flight: int = 0
    cancelled: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: int = 0


class PartitionStats(Snapshot, frozen=True):
    """The controller's view of one partition."""

    partition_id: str
    rows_live: int
    rows_cleared: int
    fields: dict[str, int]  # rows that produced each field
    tasks: dict[str, int]  # rows each task consumed
    keyed_rows: int  # rows put under a KV key
    tagged_rows: int
    abandoned_rows: int
    sealed: bool
    aborted: str | None
    bytes: int  # the controller's bookkeeping, not the data


class RegistryStats(Snapshot, frozen=True):
    num_partitions: int
    next_row_id: int
    partitions: dict[str, PartitionStats]


class RoundStats(Snapshot, frozen=True):
    """The rank-aware round ledger (replay of batches for TP peers and resumed loaders)."""

    keys: int
    rounds: int
    capacity_rounds: int
    puts: int
    hits: int
    misses: int
    evictions: int
    evicted_lookups: int


class ControllerStats(Snapshot, frozen=True):
    partitions: RegistryStats
    waiting_requests: int
    lost_units: dict[str, str]
    rounds: RoundStats
    get_meta: int = 0
    rows_out: int = 0
    eos: int = 0
    timeouts: int = 0
    notifies: int = 0
    lost_rows: int = 0
    abandoned_rows: int = 0


class UnitStats(Snapshot, frozen=True):
    """One built-in storage unit."""

    rows: int
    capacity_rows: int | None
    free_rows: int | None
    bytes: int
    partitions: dict[str, dict[str, Any]]  # rows, slots, index_capacity, per-field kind/rows/bytes
    requests: dict[str, int]
    bytes_in: int
    bytes_out: int
    service: dict[str, int] = {}
    shared_memory: dict[str, int] = {}


class StorageStats(Snapshot, frozen=True):
    """The storage backend as this client sees it: ``units`` (built-in units by address, an error
    text for one that does not answer) or ``services`` (an external backend's addresses)."""

    backend: str
    rows: int = 0
    num_units: int = 0
    stripe_rows: int = 0
    units: dict[str, UnitStats | dict[str, str]] = {}
    services: dict[str, Any] = {}
    details: dict[str, Any] = {}


class ClientStats(Snapshot, frozen=True):
    puts: int = 0
    gets: int = 0
    rows_put: int = 0
    rows_got: int = 0
    get_meta_calls: int = 0
    put_s: float = 0.0
    get_s: float = 0.0
    get_meta_wait_s: float = 0.0


class ClusterStats(Snapshot, frozen=True):
    """``tq.statistics()``: this client, the controller and the storage, in one snapshot."""

    client: ClientStats
    controller: ControllerStats
    storage: StorageStats
