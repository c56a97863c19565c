"""Clients of a tq_loader cluster: :class:`AsyncClient` (the one implementation) and :class:`Client`.

``Client`` is a thin sync facade: it runs ``AsyncClient`` coroutines on one private event-loop
thread, so it works from plain threads, DataLoader workers and inside a running loop (Jupyter).
Each sync method ``x`` has an ``async_x`` twin, as in TransferQueue's ``TransferQueueClient``.
One client is safe to use from several threads at once (all socket I/O happens on its loop).

Data never passes through the controller: ``put`` asks the controller to validate schemas (and
allocate rows), writes the columns straight to the storage units, and only then notifies the
controller, which is what makes the rows ready for consumers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from tq_loader import protocol as p
from tq_loader.codec import batch_length
from tq_loader.config import ClientConfig
from tq_loader.errors import ClosedError, SchemaError, TQError
from tq_loader.loop import LoopThread
from tq_loader.metadata import BatchMeta, schema_of
from tq_loader.schema import FieldSchema
from tq_loader.storage.manager import StorageManager, make_storage_manager
from tq_loader.transport import Connection

__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Client", "TransferQueueClient"]


class _Default:
    """Marks "use the configured request timeout" (``None`` already means "wait forever")."""


DEFAULT_TIMEOUT = _Default()

log = logging.getLogger(__name__)


class AsyncClient:
    """Talks to one cluster, reached through its controller's address. Owned by one event loop."""

    def __init__(
        self, controller_address: str, *, config: ClientConfig | None = None, auth_token: str | None = None
    ) -> None:
        self.controller_address = controller_address
        self.config = config or ClientConfig()
        self._token = auth_token
        self._conns: dict[str, Connection] = {}
        self._storage: StorageManager | None = None
        self._cluster: p.ClusterInfo | None = None
        self._setup_lock: asyncio.Lock | None = None
        self._stats = {"puts": 0, "gets": 0, "rows_put": 0, "rows_got": 0, "get_meta_calls": 0}
        self._stats_time = {"put_s": 0.0, "get_s": 0.0, "get_meta_wait_s": 0.0}

    # ------------------------------------------------------------------ plumbing
    def _conn(self, address: str) -> Connection:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = Connection(
                address, auth_token=self._token, connect_timeout=self.config.connect_timeout
            )
        return conn

    async def _call(self, body: Any, *, timeout: float | _Default | None = DEFAULT_TIMEOUT) -> Any:
        """One controller request; ``timeout`` defaults to ``client.request_timeout`` (None = wait)."""
        t = self.config.request_timeout if isinstance(timeout, _Default) else timeout
        reply, _ = await self._conn(self.controller_address).request(body, timeout=t)
        return reply

    async def storage(self) -> StorageManager:
        """The storage manager for this cluster's backend (built on first use)."""
        if self._storage is None:
            if self._setup_lock is None:
                self._setup_lock = asyncio.Lock()
            async with self._setup_lock:
                if self._storage is None:
                    info: p.ClusterInfo = await self._call(p.Describe())
                    self._cluster = info
                    self._storage = make_storage_manager(
                        info.storage_backend,
                        unit_addresses=list(info.storage_units),
                        connect=self._conn,
                        notify=self._notify_produced,
                        on_unit_lost=self._unit_lost,
                        config=info.config,
                    )
        return self._storage

    async def _notify_produced(self, pid: str, ids: np.ndarray, schemas: dict[str, FieldSchema]) -> None:
        await self._call(
            p.NotifyProduced(partition_id=pid, global_indexes=p.ids_to_wire(ids), schemas=schemas)
        )

    async def _unit_lost(self, unit: int, num_units: int, reason: str, stripe_rows: int = 1) -> int:
        reply: p.StatsReply = await self._call(
            p.ReportLost(unit=unit, num_units=num_units, reason=reason, stripe_rows=stripe_rows)
        )
        return int(reply.stats["lost_rows"])

    async def async_describe(self) -> p.ClusterInfo:
        await self.storage()
        assert self._cluster is not None
        return self._cluster

    # ------------------------------------------------------------------ metadata
    async def async_get_meta(
        self,
        data_fields: Sequence[str] | str,
        batch_size: int,
        partition_id: str,
        mode: str = "fetch",
        task_name: str | None = None,
        sampling_config: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        allow_partial: bool = False,
        sampler: str | None = None,
        dp_rank: int | None = None,
        dp_size: int = 1,
        batch_index: int | None = None,
    ) -> BatchMeta:
        """Rows of ``partition_id`` whose ``data_fields`` are ready; waits server-side (see DESIGN.md)."""
        fields = [data_fields] if isinstance(data_fields, str) else list(data_fields)
        cfg = dict(sampling_config or {})
        dp_rank = cfg.pop("dp_rank", dp_rank)
        dp_size = int(cfg.pop("dp_size", dp_size))
        batch_index = cfg.pop("batch_index", batch_index)
        sampler = cfg.pop("sampler", sampler)
        req = p.GetMeta(
            partition_id=partition_id, data_fields=fields, batch_size=int(batch_size), mode=mode,
            task_name=task_name, sampler=sampler, sampling_config=cfg, allow_partial=allow_partial,
            dp_rank=dp_rank, dp_size=dp_size, batch_index=batch_index,
        )  # fmt: skip
        started = time.monotonic()
        reply: p.MetaReply = await self._call(req, timeout=timeout)
        self._stats["get_meta_calls"] += 1
        self._stats_time["get_meta_wait_s"] += time.monotonic() - started
        return BatchMeta.from_wire(reply.meta)

    async def async_create_partition(self, partition_id: str) -> None:
        await self._call(p.CreatePartition(partition_id=partition_id))

    async def async_get_partition_list(self) -> list[str]:
        reply: p.NamesReply = await self._call(p.ListPartitions())
        return list(reply.names)

    async def async_set_custom_meta(self, metadata: BatchMeta) -> None:
        """Store ``metadata``'s per-row custom meta (tags) in the controller."""
        for part in metadata.chunk_by_partition():
            tags = part.get_all_custom_meta()
            rows = [tags.get(int(i), {}) if isinstance(tags, dict) else tags[k] for k, i in
                    enumerate(part.global_index_array)]  # fmt: skip
            await self._call(
                p.SetTags(
                    partition_id=str(part.partition_id_array[0]),
                    global_indexes=p.ids_to_wire(part.global_index_array),
                    tags=rows,
                )
            )

    # ------------------------------------------------------------------ data
    async def async_put(
        self,
        data: TensorDict | Mapping[str, Any],
        metadata: BatchMeta | None = None,
        partition_id: str | None = None,
    ) -> BatchMeta:
        """Write columns. Without ``metadata`` new rows are inserted into ``partition_id``."""
        started = time.monotonic()
        n = batch_length(data)
        schemas = {name: schema_of(value) for name, value in data.items()}
        if n == 0 and (metadata is None or metadata.size == 0):  # an empty batch is no error: no rows
            if metadata is None and partition_id is not None:
                await self._call(p.CreatePartition(partition_id=partition_id))
                return BatchMeta.empty()
            if metadata is not None:
                return metadata.copy()
        if metadata is None:
            if partition_id is None:
                raise ValueError(
                    "put() needs either metadata (rows to write) or partition_id (to insert rows)"
                )
            reply: p.WriteReply = await self._call(
                p.PrepareWrite(partition_id=partition_id, schemas=schemas, new_rows=n, insert=True)
            )
            ids = p.ids_from_wire(reply.global_indexes)
            metadata = BatchMeta(ids, np.full(n, partition_id, dtype=object))
            try:
                await self._write(partition_id, data, metadata, reply.schemas)
            except BaseException:
                await self._rollback_insert(partition_id, ids)
                raise
        else:
            if metadata.size != n:
                raise SchemaError(
                    f"put(): data has {n} rows but metadata has {metadata.size}; pass the BatchMeta of "
                    "exactly these rows (same order)"
                )
            pids = np.unique(np.asarray(metadata.partition_id_array, dtype=object).astype(str))
            if len(pids) != 1:
                raise ValueError(
                    f"put() of one batch into several partitions {list(pids)}: chunk_by_partition first"
                )
            pid = str(pids[0]) if partition_id is None else partition_id
            reply = await self._call(
                p.PrepareWrite(
                    partition_id=pid,
                    schemas=schemas,
                    global_indexes=p.ids_to_wire(metadata.global_index_array),
                )
            )
            await self._write(pid, data, metadata, reply.schemas)
        metadata = metadata.copy()
        metadata.add_fields(data if isinstance(data, TensorDict) else _as_tensordict(data, n))
        self._stats["puts"] += 1
        self._stats["rows_put"] += n
        self._stats_time["put_s"] += time.monotonic() - started
        return metadata

    async def _rollback_insert(self, pid: str, ids: np.ndarray) -> None:
        """A failed insert-put must not leave rows that will never be produced (a sealed stream
        would wait for them forever): forget them in the controller and the units."""
        try:
            await self._call(p.ClearSamples(partition_id=pid, global_indexes=p.ids_to_wire(ids)))
            storage = await self.storage()
            await storage.clear_data(BatchMeta(ids, np.full(len(ids), pid, dtype=object)))
        except TQError as exc:  # the original error is the one to report
            log.warning("could not roll back %d rows of a failed put into %r: %s", len(ids), pid, exc)

    async def _write(self, pid: str, data: Any, meta: BatchMeta, schemas: dict[str, FieldSchema]) -> None:
        storage = await self.storage()
        await storage.put_data(data, meta, schemas)

    async def async_get_data(
        self, metadata: BatchMeta, device: str | torch.device | None = None
    ) -> TensorDict:
        """The columns named by ``metadata`` for its rows, in its row order."""
        started = time.monotonic()
        storage = await self.storage()
        td = await storage.get_data(metadata)
        if device is not None:
            td = td.to(device)
        self._stats["gets"] += 1
        self._stats["rows_got"] += metadata.size
        self._stats_time["get_s"] += time.monotonic() - started
        return td

    async def async_clear_samples(self, metadata: BatchMeta) -> None:
        storage = await self.storage()
        for part in metadata.chunk_by_partition():
            await self._call(p.ClearSamples(partition_id=str(part.partition_id_array[0]),
                                            global_indexes=p.ids_to_wire(part.global_index_array)))  # fmt: skip
        await storage.clear_data(metadata)

    async def async_clear_partition(self, partition_id: str) -> None:
        storage = await self.storage()
        await self._call(p.ClearPartition(partition_id=partition_id))
        await storage.clear_partition(partition_id)

    # ------------------------------------------------------------------ status
    async def async_get_production_status(
        self, data_fields: Sequence[str] | str, partition_id: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global_indexes, status)``: status[i, j] is 1 when row i has field j (fields in given order)."""
        fields = [data_fields] if isinstance(data_fields, str) else list(data_fields)
        reply: p.StatusReply = await self._call(p.ProductionStatus(partition_id=partition_id, fields=fields))
        ids = p.ids_from_wire(reply.global_indexes)
        matrix = np.frombuffer(reply.matrix, dtype=bool).reshape(len(ids), len(reply.fields))
        return torch.from_numpy(ids), torch.from_numpy(matrix.astype(np.int8))

    async def async_check_production_status(
        self, data_fields: Sequence[str] | str, partition_id: str
    ) -> bool:
        """True when every live row of the partition has all ``data_fields``."""
        ids, status = await self.async_get_production_status(data_fields, partition_id)
        return bool(len(ids) > 0 and status.all())

    async def async_get_consumption_status(
        self, task_name: str, partition_id: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global_indexes, consumed)`` for every live row of the partition."""
        reply: p.StatusReply = await self._call(
            p.ConsumptionStatus(partition_id=partition_id, task_name=task_name)
        )
        ids = p.ids_from_wire(reply.global_indexes)
        consumed = np.frombuffer(reply.matrix, dtype=bool).astype(np.int8)
        return torch.from_numpy(ids), torch.from_numpy(consumed)

    async def async_check_consumption_status(self, task_name: str, partition_id: str) -> bool:
        ids, consumed = await self.async_get_consumption_status(task_name, partition_id)
        return bool(len(ids) > 0 and consumed.all())

    async def async_reset_consumption(self, partition_id: str, task_name: str | None = None) -> None:
        await self._call(p.ResetConsumption(partition_id=partition_id, task_name=task_name))

    # ------------------------------------------------------------------ streams
    async def async_seal(self, partition_id: str) -> None:
        """No new rows in ``partition_id``: consumers drain it and their streams end."""
        await self._call(p.Seal(partition_id=partition_id))

    async def async_abort(self, partition_id: str, reason: str = "aborted by producer") -> None:
        """Fail every waiting and later ``get_meta`` on ``partition_id`` with ``ClosedError(reason)``."""
        await self._call(p.Abort(partition_id=partition_id, reason=reason))

    # ------------------------------------------------------------------ KV
    async def async_kv_retrieve_meta(
        self, keys: Sequence[str] | str, partition_id: str, create: bool = False, *, missing_ok: bool = False
    ) -> BatchMeta:
        """BatchMeta of the rows named by ``keys``, in key order (rows created for new keys if ``create``).

        Its fields are those every one of the rows has produced. Unknown keys -> ``NotFoundError``
        (or, with ``missing_ok``, they are left out).
        """
        meta, _ = await self.async_kv_lookup(keys, partition_id, create, missing_ok=missing_ok)
        return meta

    async def async_kv_lookup(
        self, keys: Sequence[str] | str, partition_id: str, create: bool = False, *, missing_ok: bool = False
    ) -> tuple[BatchMeta, np.ndarray]:
        """``kv_retrieve_meta`` plus a bool per row: True where this call created the key's row.

        The KV API needs to know which rows it created so that a failed write can remove them again.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if not keys:
            raise ValueError("kv_retrieve_meta() needs at least one key")
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("keys must be strings")
        reply: p.KVLookupReply = await self._call(
            p.KVLookup(partition_id=partition_id, keys=keys, create=create, missing_ok=missing_ok)
        )
        meta = BatchMeta.from_wire(reply.meta)
        created = np.frombuffer(reply.created, dtype=bool).copy()
        if len(created) != meta.size:  # an empty reply (unknown partition, missing_ok) has none
            created = np.zeros(meta.size, dtype=bool)
        return meta, created

    async def async_kv_list(self, partition_id: str | None = None) -> dict[str, dict[str, Any]]:
        reply: p.KVListReply = await self._call(p.KVList(partition_id=partition_id))
        return dict(reply.partitions)

    # ------------------------------------------------------------------ introspection
    async def async_statistics(self) -> dict[str, Any]:
        """Client counters plus the controller's and every storage unit's statistics (plain dict)."""
        storage = await self.storage()
        reply: p.StatsReply = await self._call(p.Stats())
        return {
            "client": {**self._stats, **{k: round(v, 6) for k, v in self._stats_time.items()}},
            "controller": reply.stats,
            "storage": await storage.statistics(),
        }

    # ------------------------------------------------------------------ checkpoints
    async def async_export_state(self) -> dict[str, Any]:
        """The controller's whole state as plain data (partitions, rows, consumption, keys, tags)."""
        reply: p.StateReply = await self._call(p.ExportState())
        return dict(reply.state)

    async def async_import_state(self, state: Mapping[str, Any]) -> None:
        """Replace the controller's whole state with ``state`` (from ``export_state``); storage untouched."""
        await self._call(p.ImportState(state=dict(state)))

    async def async_close(self) -> None:
        if self._storage is not None:
            await self._storage.close()
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()


def _as_tensordict(data: Mapping[str, Any], n: int) -> TensorDict:
    from tq_loader.codec import to_tensordict

    return to_tensordict(dict(data), n)


async def _shutdown(core: AsyncClient, grace: float = 5.0) -> None:
    """Close ``core``, then let the calls still running on its loop finish before the loop stops.

    Closing fails their requests with ``ClosedError``, but the callers only see it once their tasks
    have run to the end: stopping the loop first would leave those callers blocked forever.
    """
    await core.async_close()
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        _, pending = await asyncio.wait(others, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)


def _sync(name: str) -> Any:
    async_name = f"async_{name}"

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._core(), async_name)(*args, **kwargs))

    async def async_method(self: Client, *args: Any, **kwargs: Any) -> Any:
        future = self._thread().submit(getattr(self._core(), async_name)(*args, **kwargs))
        return await asyncio.wrap_future(future)

    doc = getattr(AsyncClient, async_name).__doc__
    method.__name__, async_method.__name__ = name, async_name
    method.__doc__ = async_method.__doc__ = doc
    return method, async_method


class Client:
    """Sync facade over :class:`AsyncClient` (plus ``async_*`` twins usable from any event loop).

    Fork-safe: a forked child gets a fresh loop thread and fresh sockets on first use.
    """

    def __init__(
        self, controller_address: str, *, config: ClientConfig | None = None, auth_token: str | None = None
    ) -> None:
        self.controller_address = controller_address
        self._config = config
        self._token = auth_token
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: LoopThread | None = None
        self._async: AsyncClient | None = None
        self._closed = False

    def _thread(self) -> LoopThread:
        with self._lock:
            if self._closed:  # fail fast: reconnecting to services that were stopped would hang
                raise ClosedError(
                    f"this client of {self.controller_address} is closed; use tq.get_client() or a new Client"
                )
            if self._loop is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._loop = LoopThread("tq-client")
                self._async = AsyncClient(
                    self.controller_address, config=self._config, auth_token=self._token
                )
            return self._loop

    def _core(self) -> AsyncClient:
        self._thread()
        assert self._async is not None
        return self._async

    def _run(self, coro: Any) -> Any:
        return self._thread().run(coro)

    def close(self) -> None:
        """Release the sockets and the loop thread; later calls raise ``ClosedError``."""
        with self._lock:
            self._closed = True
            loop, core, self._loop, self._async = self._loop, self._async, None, None
        if loop is not None and core is not None and loop.alive:
            loop.run(_shutdown(core))
            loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    get_meta, async_get_meta = _sync("get_meta")
    put, async_put = _sync("put")
    get_data, async_get_data = _sync("get_data")
    set_custom_meta, async_set_custom_meta = _sync("set_custom_meta")
    clear_samples, async_clear_samples = _sync("clear_samples")
    clear_partition, async_clear_partition = _sync("clear_partition")
    create_partition, async_create_partition = _sync("create_partition")
    get_partition_list, async_get_partition_list = _sync("get_partition_list")
    get_production_status, async_get_production_status = _sync("get_production_status")
    check_production_status, async_check_production_status = _sync("check_production_status")
    get_consumption_status, async_get_consumption_status = _sync("get_consumption_status")
    check_consumption_status, async_check_consumption_status = _sync("check_consumption_status")
    reset_consumption, async_reset_consumption = _sync("reset_consumption")
    seal, async_seal = _sync("seal")
    abort, async_abort = _sync("abort")
    kv_retrieve_meta, async_kv_retrieve_meta = _sync("kv_retrieve_meta")
    kv_lookup, async_kv_lookup = _sync("kv_lookup")
    kv_list, async_kv_list = _sync("kv_list")
    statistics, async_statistics = _sync("statistics")
    describe, async_describe = _sync("describe")
    export_state, async_export_state = _sync("export_state")
    import_state, async_import_state = _sync("import_state")


TransferQueueClient = Client
