"""Storage managers: where a client's ``put_data`` / ``get_data`` / ``clear_data`` go.

:class:`StorageManager` is the backend-neutral contract; :class:`SimpleStorageManager` talks to the
built-in ZMQ storage units. Other backends (mooncake, yuanrong, ray_rdt) plug in through
:func:`register_storage_manager` and are built by name with :func:`make_storage_manager`.

Rows are striped over the N units in blocks of ``storage.stripe_rows`` consecutive global indexes
(:func:`~tq_loader.striping.unit_of`), so a batch of consecutive ids reaches each unit as a
few contiguous runs, which move as slices rather than row by row (a unit whose rows are one run is
sent a view of the caller's columns, no copy). A put sends each unit its rows in one message, to
all units at once, and calls ``notify`` (which tells the controller) only after every involved
unit acknowledged: that is what makes the rows visible to consumers. A get asks all involved units
at once and reassembles the columns in the metadata's row order.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from tq_loader import protocol as p
from tq_loader.codec import batch_length, decode_columns, encode_columns, to_tensordict
from tq_loader.errors import ClosedError, DataLostError, NotFoundError, SchemaError, TQConnectionError
from tq_loader.metadata import BatchMeta, normalize_schema, schema_of
from tq_loader.schema import FieldSchema
from tq_loader.storage.columns import assemble, take_rows
from tq_loader.striping import DEFAULT_STRIPE_ROWS, check_stripe_rows, unit_of
from tq_loader.transport import Connection

__all__ = [
    "SimpleStorageManager",
    "StorageManager",
    "make_storage_manager",
    "register_storage_manager",
    "registered_storage_managers",
]

Notify = Callable[[str, np.ndarray, dict[str, FieldSchema]], Awaitable[None]]
# (unit, num_units, reason, stripe_rows) -> rows reported lost
_CONFIGURED = object()  # "the configured request timeout" (None means: wait forever)
UnitLost = Callable[[int, int, str, int], Awaitable[int]]


class StorageManager(ABC):
    """Moves the columns of a batch between a client and a storage backend."""

    @abstractmethod
    async def put_data(
        self,
        data: TensorDict | Mapping[str, Any],
        meta: BatchMeta,
        schemas: Mapping[str, FieldSchema] | None = None,
    ) -> None:
        """Store row ``i`` of every column of ``data`` as row ``meta[i]``, then mark them produced."""

    @abstractmethod
    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        """The ``fields`` (default: all of ``meta``'s) of ``meta``'s rows, in its order."""

    @abstractmethod
    async def clear_data(self, meta: BatchMeta) -> None:
        """Free the storage of ``meta``'s rows (unknown rows are ignored)."""

    @abstractmethod
    async def clear_partition(self, partition_id: str) -> None:
        """Free everything stored for a partition."""

    @abstractmethod
    async def statistics(self) -> dict[str, Any]:
        """A plain-dict snapshot of the backend's counters."""

    @abstractmethod
    async def close(self) -> None:
        """Release what this manager holds; later calls raise ``ClosedError``."""


# --------------------------------------------------------------------------- simple backend


def _groups(meta: BatchMeta, n_units: int, stripe_rows: int) -> list[tuple[str, int, np.ndarray]]:
    """(partition, unit, positions in meta, ascending) for every (partition, unit) pair that has rows."""
    if meta.size == 0:
        return []
    names, inv = np.unique(np.asarray(meta.partition_id_array, dtype=str), return_inverse=True)
    key = inv.reshape(-1).astype(np.int64) * n_units + unit_of(meta.global_index_array, n_units, stripe_rows)
    order = np.argsort(key, kind="stable")
    chunks = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
    return [(str(names[key[c[0]] // n_units]), int(key[c[0]] % n_units), c) for c in chunks]


def _as_column(value: Any, n: int) -> Any:
    """A user column (tensor, numpy array, NonTensorStack/Data, list) as a column value of ``n`` rows."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc" and value.dtype.fields is None:
            return torch.from_numpy(np.ascontiguousarray(value))
        return value.tolist()
    if isinstance(value, NonTensorStack):
        return value.tolist()
    if isinstance(value, NonTensorData):
        return [value.data] * n
    if isinstance(value, (list, tuple)):
        return list(value)
    raise SchemaError(
        f"a value of type {type(value).__name__} is not a column; pass a tensor, a numpy array, "
        "a NonTensorStack or a list with one value per row"
    )


def _items(data: Any) -> list[tuple[str, Any]]:
    if isinstance(data, (TensorDictBase, Mapping)):
        return list(data.items())
    raise SchemaError(
        f"put_data() takes a TensorDict or a mapping of field -> column, got {type(data).__name__}"
    )


class SimpleStorageManager(StorageManager):
    """Stripes rows over the built-in storage units (``unit_of(global_index, len(unit_addresses),
    stripe_rows)``).

    ``connect(address)`` returns the :class:`~tq_loader.transport.Connection` to use for a unit;
    its owner (usually the client) closes it -- :meth:`close` does not. ``notify(pid, ids, schemas)``
    is awaited once per partition after all units acknowledged a put. ``config``: the cluster's
    config dict (``client.request_timeout``, ``storage.put_timeout`` and ``storage.stripe_rows`` are
    read from it; every client of a cluster must stripe alike, so take it from there).
    """

    def __init__(
        self,
        unit_addresses: Sequence[str],
        connect: Callable[[str], Connection],
        notify: Notify | None = None,
        *,
        on_unit_lost: UnitLost | None = None,
        request_timeout: float | None = 120.0,
        put_timeout: float | None = None,
        stripe_rows: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if not unit_addresses:
            raise TQConnectionError(
                "the cluster has no storage units; start at least one (storage.num_units)"
            )
        config = config or {}
        storage = config.get("storage") or {}
        self.addresses = list(unit_addresses)
        self.request_timeout = (config.get("client") or {}).get("request_timeout", request_timeout)
        self.put_timeout = put_timeout if put_timeout is not None else storage.get("put_timeout")
        if stripe_rows is None:
            stripe_rows = storage.get("stripe_rows", DEFAULT_STRIPE_ROWS)
        self.stripe_rows = check_stripe_rows(stripe_rows)
        self._connect = connect
        self._notify = notify
        self._on_unit_lost = on_unit_lost
        self._closed = False

    # ------------------------------------------------------------ plumbing
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the storage manager is closed; make a new client")

    async def _request(
        self, unit: int, body: Any, buffers: Sequence[Any] = (), timeout: float | object | None = _CONFIGURED
    ) -> Any:
        address = self.addresses[unit]
        try:
            return await self._connect(address).request(
                body, buffers, timeout=self.request_timeout if timeout is _CONFIGURED else timeout
            )
        except DataLostError:
            raise
        except TQConnectionError as exc:
            if self._on_unit_lost is None or not self._connect(address).ever_connected:
                raise type(exc)(f"storage unit {unit} ({address}): {exc}") from exc
            # A unit we reached before is gone: its rows are lost. The controller drops them so
            # they are never served again; the other units keep working.
            lost = await self._on_unit_lost(unit, len(self.addresses), str(exc), self.stripe_rows)
            raise DataLostError(
                f"storage unit {unit} ({address}) is unreachable ({exc}); its rows are lost -- {lost} row(s) "
                "were removed from the controller and will not be served again. Re-produce them if needed"
            ) from exc

    @staticmethod
    async def _gather(coros: Sequence[Coroutine[Any, Any, Any]], *, lost_ok: bool = False) -> list[Any]:
        """Run all at once; if any failed, raise the first error after all have finished.

        ``lost_ok``: a dead unit is no error (clearing rows that are already gone succeeds).
        """
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not (lost_ok and isinstance(result, DataLostError)):
                raise result
        return results

    # ------------------------------------------------------------ data
    async def put_data(
        self,
        data: TensorDict | Mapping[str, Any],
        meta: BatchMeta,
        schemas: Mapping[str, FieldSchema] | None = None,
        *,
        notify: bool = True,
    ) -> None:
        """As :meth:`StorageManager.put_data`; ``notify=False`` stores without telling the controller
        (a checkpoint load, whose controller state is imported as saved)."""
        self._check_open()
        n = meta.size
        if batch_length(data) != n:
            raise SchemaError(
                f"put_data(): data has {batch_length(data)} rows but the metadata has {n}; "
                "pass the BatchMeta of exactly these rows, in the same order"
            )
        columns = {name: _as_column(value, n) for name, value in _items(data)}
        if n == 0 or not columns:
            return
        given = schemas or {}
        put_schemas = {  # only the fields written: the controller marks exactly these as produced
            name: normalize_schema(given[name], name) if name in given else schema_of(value, name)
            for name, value in columns.items()
        }
        groups = _groups(meta, len(self.addresses), self.stripe_rows)
        sends = []
        for pid, unit, pos in groups:
            whole = len(groups) == 1  # one unit takes the batch as is: no row copies
            # A part is only encoded and sent while the caller's columns are alive: a unit's rows
            # that form one contiguous run go as a view of them (copy=False), others are gathered.
            part = (
                columns
                if whole
                else {name: take_rows(value, pos, copy=False) for name, value in columns.items()}
            )
            specs, buffers = encode_columns(part)
            body = p.PutRows(
                partition_id=pid,
                global_indexes=p.ids_to_wire(meta.global_index_array[pos]),
                columns=specs,
                schemas=put_schemas,
                timeout=self.put_timeout,
            )
            sends.append(self._request(unit, body, buffers))
        await self._gather(sends)
        if notify and self._notify is not None:
            pids = np.asarray(meta.partition_id_array, dtype=str)
            await self._gather(
                [
                    self._notify(str(pid), meta.global_index_array[pids == pid], put_schemas)
                    for pid in np.unique(pids)
                ]
            )

    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        self._check_open()
        known = meta.field_schema
        fields = list(known) if fields is None else list(fields)
        n = meta.size
        groups = _groups(meta, len(self.addresses), self.stripe_rows) if fields else []
        replies = await self._gather(
            [
                self._request(
                    unit,
                    p.GetRows(
                        partition_id=pid,
                        global_indexes=p.ids_to_wire(meta.global_index_array[pos]),
                        fields=fields,
                    ),
                )
                for pid, unit, pos in groups
            ]
        )
        decoded = [
            (pos, decode_columns(reply.columns, frames, copy=False))
            for (_, _, pos), (reply, frames) in zip(groups, replies, strict=True)
        ]
        columns: dict[str, Any] = {}
        for name in fields:
            parts = []
            for pos, cols in decoded:
                if name not in cols:
                    raise NotFoundError(
                        f"field {name!r}: a storage unit answered without it (rows {meta.global_index_array[pos[:8]].tolist()})"
                    )
                parts.append((pos, cols[name]))
            schema = _column_schema(name, known.get(name), parts)
            if schema is None:
                continue  # no rows and no schema: nothing can be said about the column
            columns[name] = assemble(parts, n, schema, field=name)
        return to_tensordict(columns, n)

    async def clear_data(self, meta: BatchMeta) -> None:
        self._check_open()
        await self._gather(
            [
                self._request(
                    unit,
                    p.DropRows(partition_id=pid, global_indexes=p.ids_to_wire(meta.global_index_array[pos])),
                )
                for pid, unit, pos in _groups(meta, len(self.addresses), self.stripe_rows)
            ],
            lost_ok=True,
        )

    async def clear_partition(self, partition_id: str) -> None:
        self._check_open()
        await self._gather(
            [
                self._request(u, p.DropPartition(partition_id=partition_id))
                for u in range(len(self.addresses))
            ],
            lost_ok=True,
        )

    async def export_partition(
        self, partition_id: str
    ) -> list[tuple[np.ndarray, dict[str, tuple[np.ndarray, Any]]]]:
        """Per unit: every row of the partition and, per field, the rows having it and their values."""
        from tq_loader.storage.service import decode_export

        self._check_open()
        replies = await self._gather(
            [self._request(u, p.ExportRows(partition_id=partition_id)) for u in range(len(self.addresses))]
        )
        return [decode_export(reply, frames) for reply, frames in replies]

    async def statistics(self) -> dict[str, Any]:
        self._check_open()
        results = await asyncio.gather(
            *(self._request(u, p.Stats()) for u in range(len(self.addresses))), return_exceptions=True
        )
        units: dict[str, Any] = {}
        for address, result in zip(self.addresses, results, strict=True):
            if isinstance(result, BaseException):
                units[address] = {"error": f"{type(result).__name__}: {result}"}
            else:
                units[address] = result[0].stats
        rows = sum(u.get("rows", 0) for u in units.values())
        return {
            "backend": "simple",
            "num_units": len(self.addresses),
            "stripe_rows": self.stripe_rows,
            "rows": rows,
            "units": units,
        }

    async def close(self) -> None:
        self._closed = True


def _column_schema(
    name: str, known: FieldSchema | None, parts: list[tuple[np.ndarray, Any]]
) -> FieldSchema | None:
    """The column's schema: the metadata's, widened by what the units hold (only if it is stale)."""
    schema = known
    try:
        for pos, value in parts:
            if len(pos):
                seen = schema_of(value, name)
                schema = seen if schema is None else schema.merge(seen)
    except SchemaError as exc:
        raise SchemaError(f"field {name!r}: {exc}") from None
    return schema


# --------------------------------------------------------------------------- registry

_BACKENDS: dict[str, type[StorageManager]] = {}


def register_storage_manager(name: str, cls: type[StorageManager]) -> None:
    """Make ``cls`` buildable by ``make_storage_manager(name, ...)`` (names are case-insensitive)."""
    if not (isinstance(cls, type) and issubclass(cls, StorageManager)):
        raise TypeError(f"{cls!r} is not a StorageManager subclass")
    _BACKENDS[name.lower()] = cls


def registered_storage_managers() -> list[str]:
    return sorted(_BACKENDS)


def make_storage_manager(name: str, **kwargs: Any) -> StorageManager:
    """Build the storage manager registered as ``name`` with ``kwargs``."""
    cls = _BACKENDS.get(str(name).lower())
    if cls is None:
        raise NotFoundError(
            f"unknown storage backend {name!r}; registered: {registered_storage_managers()}. "
            "Register it with tq_loader.storage.register_storage_manager(name, cls)"
        )
    return cls(**kwargs)


register_storage_manager("simple", SimpleStorageManager)
