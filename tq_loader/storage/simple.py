"""The manager of the built-in storage units (``storage.backend = simple``): store and fetch only.

Rows are striped over the N units in blocks of ``storage.stripe_rows`` consecutive global indexes
(:func:`~tq_loader.striping.unit_of`), so a batch of consecutive ids reaches each unit as a few
contiguous runs, which move as slices rather than row by row (a unit whose rows are one run is
sent a view of the caller's columns, no copy). A put sends each unit its rows in one message, to
all units at once; a get asks all involved units at once and reassembles the columns in the
metadata's row order -- or, when one unit's reply already holds every row in order, hands that
reply out as is. Readiness (notify after every ack) and lost rows are the client core's business:
a unit that was reached before and stops answering raises :class:`~tq_loader.storage.base.StorageLost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from tq_loader import memory
from tq_loader import protocol as p
from tq_loader.batch import PreparedBatch
from tq_loader.codec import decode_columns, encode_columns, to_tensordict
from tq_loader.errors import DataLostError, NotFoundError, TQConnectionError
from tq_loader.metadata import BatchMeta
from tq_loader.schema import FieldSchema
from tq_loader.stats import StorageStats
from tq_loader.storage.base import (
    BackendInfo,
    StorageLost,
    StorageManager,
    register_storage_manager,
    rows_to_store,
)
from tq_loader.storage.columns import assemble, column_schema, take_rows, target_kind, torch_dtype
from tq_loader.storage.export import decode_export
from tq_loader.storage.shm_path import MIN_SHM_BYTES, SharedMemoryPath
from tq_loader.striping import DEFAULT_STRIPE_ROWS, check_stripe_rows, unit_of

__all__ = ["SimpleStorageManager"]

_CONFIGURED = object()  # "the configured request timeout" (None means: wait forever)


def _groups(meta: BatchMeta, n_units: int, stripe_rows: int) -> list[tuple[str, int, np.ndarray]]:
    """(partition, unit, positions in meta, ascending) for every (partition, unit) pair that has rows."""
    if meta.size == 0:
        return []
    pids, ids = meta.partition_id_array, meta.global_index_array
    units = unit_of(ids, n_units, stripe_rows)
    if (units == units[0]).all() and (pids == pids[0]).all():  # one partition, one unit: no sort
        return [(str(pids[0]), int(units[0]), np.arange(meta.size))]
    names, inv = np.unique(pids, return_inverse=True)
    key = inv.reshape(-1).astype(np.int64) * n_units + units
    order = np.argsort(key, kind="stable")
    chunks = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
    return [(str(names[key[c[0]] // n_units]), int(key[c[0]] % n_units), c) for c in chunks]


class SimpleStorageManager(StorageManager):
    """Stripes rows over the built-in storage units (``unit_of(global_index, num_units, stripe_rows)``).

    Every client of a cluster must stripe alike, so ``stripe_rows``, the request timeout and
    ``storage.put_timeout`` come from the cluster's own config (``ClusterInfo.config``).
    """

    name = "simple"
    supports_views = True

    def __init__(self, info: BackendInfo) -> None:
        if not info.cluster.storage_units:
            raise TQConnectionError(
                "the cluster has no storage units; start at least one (storage.num_units)"
            )
        config = info.cluster.config or {}
        storage = config.get("storage") or {}
        self.addresses = list(info.cluster.storage_units)
        self.request_timeout = (config.get("client") or {}).get("request_timeout", 120.0)
        self.put_timeout = storage.get("put_timeout")
        self.stripe_rows = check_stripe_rows(storage.get("stripe_rows", DEFAULT_STRIPE_ROWS))
        self._connect = info.connect
        self._lost: list[StorageLost] = []
        self.shm = SharedMemoryPath(bool(storage.get("shared_memory", True)), self._request)

    # ------------------------------------------------------------ plumbing
    async def _request(
        self, unit: int, body: Any, buffers: Sequence[Any] = (), timeout: float | object | None = _CONFIGURED
    ) -> tuple[Any, list[memoryview]]:
        address = self.addresses[unit]
        channel = self._connect(address)
        try:
            return await channel.request(
                body, buffers, timeout=self.request_timeout if timeout is _CONFIGURED else timeout
            )
        except DataLostError:
            raise
        except TQConnectionError as exc:
            if not channel.ever_connected:
                raise type(exc)(f"storage unit {unit} ({address}): {exc}") from exc
            # A unit we reached before is gone: every row striped to it is lost.
            raise StorageLost(
                f"storage unit {unit} ({address}) is unreachable ({exc})",
                unit=unit,
                num_units=len(self.addresses),
                stripe_rows=self.stripe_rows,
            ) from exc

    @staticmethod
    async def _gather(coros: Sequence[Coroutine[Any, Any, Any]], *, lost_ok: bool = False) -> list[Any]:
        """Run all at once; if any failed, raise the first error after all have finished.

        ``lost_ok``: a dead unit is no error (clearing rows that are already gone succeeds).
        """
        if len(coros) == 1:  # no task machinery for the single-unit case
            try:
                return [await coros[0]]
            except DataLostError:
                if lost_ok:
                    return [None]
                raise
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not (lost_ok and isinstance(result, DataLostError)):
                raise result
        return results

    # ------------------------------------------------------------ data
    async def _modes(self, units: Sequence[int], nbytes: int) -> dict[int, str]:
        """How each unit gets this request's bytes: ``local`` (in-process: by reference), ``shm``
        (same host: through the shared arena) or ``wire`` (frames)."""
        modes = {}
        for unit in units:
            if self._connect(self.addresses[unit]).in_process:
                modes[unit] = "local"
            elif nbytes >= MIN_SHM_BYTES and await self.shm.usable(unit):
                modes[unit] = "shm"
            else:
                modes[unit] = "wire"
        return modes

    async def put_data(self, batch: PreparedBatch, meta: BatchMeta) -> None:
        n = rows_to_store(batch, meta)
        if n == 0:
            return
        groups = _groups(meta, len(self.addresses), self.stripe_rows)
        whole = encode_columns(batch.columns)  # views of the caller's columns (no copy)
        modes = await self._modes([u for _, u, _ in groups], sum(b.nbytes for b in whole[1]))
        staged: tuple[Any, list[p.ShmSlice]] | None = None  # the whole batch in the arena, once
        if "shm" in modes.values():
            region, slices = self.shm.stage(whole[1])
            await self.shm.prepare([u for u, m in modes.items() if m == "shm"])  # the region's segment
            staged = (region, slices)
            modes = {u: "wire" if m == "shm" and not self.shm.is_usable(u) else m for u, m in modes.items()}
        sends = []
        for pid, unit, pos in groups:
            # local and shm units copy their rows out of the whole batch (positions); a wire unit
            # is sent its own rows: views where they form one run, gathered otherwise
            mode, single = modes[unit], len(groups) == 1
            specs, buffers = whole
            extra: dict[str, Any] = {} if single else {"positions": p.ids_to_wire(pos)}
            if mode == "shm":
                assert staged is not None
                buffers, extra = [], {**extra, "arena": self.shm.arena_id, "shm": staged[1]}
            elif mode == "wire" and not single:
                part = {name: take_rows(value, pos, copy=False) for name, value in batch.columns.items()}
                (specs, buffers), extra = encode_columns(part), {}
            body = p.PutRows(
                partition_id=pid,
                global_indexes=p.ids_to_wire(meta.global_index_array[pos]),
                columns=specs,
                schemas=batch.schemas,
                timeout=self.put_timeout,
                **extra,
            )
            sends.append(self._request(unit, body, buffers))
        await self._gather(sends)
        del staged  # the arena region is reused once every unit copied its rows out

    def _outputs(
        self, fields: list[str], known: dict[str, FieldSchema], n: int, modes: dict[int, str]
    ) -> dict[str, tuple[torch.Tensor, p.ShmSlice | None]]:
        """Dense result columns the units fill in place: in the arena (reused, already touched memory:
        no page faults) when it is available -- which a ``shm`` unit needs -- else fresh memory."""
        dense = [f for f in fields if _is_dense(known.get(f))]
        if not dense or all(m == "wire" for m in modes.values()):
            return {}
        out = {}
        for name in dense:
            schema = known[name]
            shape, dtype = (n, *schema.shape), torch_dtype(schema.dtype)
            if self.shm.enabled:
                out[name] = self.shm.output(shape, dtype)
            else:
                out[name] = (memory.empty(shape, dtype), None)
        return out

    async def get_data(
        self, meta: BatchMeta, fields: Sequence[str] | None = None, *, copy: bool = True
    ) -> TensorDict:
        """``copy=False``: in-process units answer dense rows that lie in one run of their slots with
        pinned views of their memory, and one unit's answer covering every row is the result as is."""
        known = meta.field_schema
        fields = list(known) if fields is None else list(fields)
        n = meta.size
        groups = _groups(meta, len(self.addresses), self.stripe_rows) if fields else []
        dense_bytes = sum(_row_bytes(known[f]) * n for f in fields if _is_dense(known.get(f)))
        modes = await self._modes([u for _, u, _ in groups], dense_bytes) if groups else {}
        views = not copy and all(m == "local" for m in modes.values())
        outputs = {} if views else self._outputs(fields, known, n, modes)  # units copy rows into these
        if outputs and "shm" in modes.values():
            await self.shm.prepare([u for u, m in modes.items() if m == "shm"])
            modes = {u: "wire" if m == "shm" and not self.shm.is_usable(u) else m for u, m in modes.items()}
        into_schemas = {name: known[name] for name in outputs}
        requests = []
        for pid, unit, pos in groups:
            mode, extra, buffers = modes[unit], {}, []
            if outputs and mode == "local":
                extra = {"into": list(outputs), "positions": p.ids_to_wire(pos)}
                buffers = [_byte_buffer(t) for t, _ in outputs.values()]
            elif outputs and mode == "shm":
                slices = [s for _, s in outputs.values()]
                extra = {"into": list(outputs), "positions": p.ids_to_wire(pos), "arena": self.shm.arena_id,
                         "into_shm": slices}  # fmt: skip
            body = p.GetRows(
                partition_id=pid,
                global_indexes=p.ids_to_wire(meta.global_index_array[pos]),
                fields=fields,
                schemas=into_schemas if extra else {},
                **extra,
            )
            requests.append(self._request(unit, body, buffers))
        replies = await self._gather(requests)
        decoded = [
            (pos, set(reply.written), decode_columns(reply.columns, frames, copy=False))
            for (_, _, pos), (reply, frames) in zip(groups, replies, strict=True)
        ]
        # One unit answered for every row, in order, in frames that belong to this call alone:
        # its columns are the result (no re-assembly copy).
        whole = len(groups) == 1 and (views or self._connect(self.addresses[groups[0][1]]).private_replies)
        columns: dict[str, Any] = {}
        for name in fields:
            if name in outputs and all(name in written for _, written, _ in decoded):
                columns[name] = outputs[name][0]
                continue
            parts = []
            for pos, written, cols in decoded:
                if name in written:  # a unit filled the dense result, another answered otherwise
                    parts.append((pos, outputs[name][0].index_select(0, torch.from_numpy(pos))))
                elif name in cols:
                    parts.append((pos, cols[name]))
                else:
                    raise NotFoundError(
                        f"field {name!r}: a storage unit answered without it "
                        f"(rows {meta.global_index_array[pos[:8]].tolist()})"
                    )
            schema = column_schema(name, known.get(name), parts)
            if schema is None:
                continue  # no rows and no schema: nothing can be said about the column
            if whole and _returns_as_is(schema, parts[0][1]):
                columns[name] = parts[0][1]
            else:  # dense rows land in the arena's reused memory when there is one (no page faults)
                out = (
                    self.shm.pooled((n, *schema.shape), torch_dtype(schema.dtype))
                    if _is_dense(schema)
                    else None
                )
                columns[name] = assemble(parts, n, schema, field=name, out=out)
        return to_tensordict(columns, n)

    async def clear_data(self, meta: BatchMeta) -> None:
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
        replies = await self._gather(
            [self._request(u, p.ExportRows(partition_id=partition_id)) for u in range(len(self.addresses))]
        )
        return [decode_export(reply, frames) for reply, frames in replies]

    def take_lost(self) -> list[StorageLost]:
        lost, self._lost = self._lost, []
        return lost

    async def close(self) -> None:
        await self.shm.close()

    async def statistics(self) -> StorageStats:
        results = await asyncio.gather(
            *(self._request(u, p.Stats()) for u in range(len(self.addresses))), return_exceptions=True
        )
        units: dict[str, Any] = {}
        for address, result in zip(self.addresses, results, strict=True):
            if isinstance(result, StorageLost):
                self._lost.append(result)
            if isinstance(result, BaseException):
                units[address] = {"error": f"{type(result).__name__}: {result}"}
            else:
                units[address] = result[0].stats
        return StorageStats(
            backend=self.name,
            num_units=len(self.addresses),
            stripe_rows=self.stripe_rows,
            rows=sum(u.get("rows", 0) for u in units.values()),
            units=units,
        )


def _is_dense(schema: FieldSchema | None) -> bool:
    return schema is not None and target_kind(schema)[0] == "dense"


def _row_bytes(schema: FieldSchema) -> int:
    return int(np.prod(schema.shape, dtype=np.int64)) * torch_dtype(schema.dtype).itemsize


def _byte_buffer(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor (what an in-process unit fills)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray())


def _returns_as_is(schema: FieldSchema, value: Any) -> bool:
    """Whether a decoded part already has the kind ``assemble`` would build for ``schema``."""
    kind, d = target_kind(schema)
    if kind == "object":
        return isinstance(value, list)
    if not hasattr(value, "dtype") or str(value.dtype).removeprefix("torch.") != schema.dtype:
        return False
    if kind == "dense":
        return not value.is_nested and tuple(value.shape[1:]) == tuple(schema.shape)
    if kind == "jagged":
        return value.is_nested and value.layout == torch.jagged and value._ragged_idx - 1 == d
    return False


register_storage_manager("simple", SimpleStorageManager)
