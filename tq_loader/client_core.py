"""The client core: :class:`AsyncClient`, the one implementation behind every client call.

It owns the rules that make the data plane correct, once for every storage backend:

* **readiness** -- a put stores its columns through the backend's :class:`StorageManager`, and only
  after the backend acknowledged every byte does the client tell the controller
  (``NotifyProduced``), which is what makes the rows visible to consumers;
* **lost rows** -- rows a backend reports gone (:class:`StorageLost`) are reported to the
  controller, which drops them so they are never served, and the caller gets a ``DataLostError``;
* **arguments** are checked before anything is sent (:mod:`tq_loader.args`), so a wrong type fails
  at once with an ``ArgumentError`` naming the argument instead of waiting for a timeout.

Requests go through a :class:`~tq_loader.channel.Channel` per service: in-process services (the
embedded placement) are called directly (:class:`~tq_loader.channel.LocalChannel`), others over ZMQ.
The requests that only ask the controller (status, streams, KV lookups, state) are in
``client_queries``; the sync facade is ``tq_loader.client``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from tensordict import TensorDict

from tq_loader import args
from tq_loader import protocol as p
from tq_loader.batch import PreparedBatch, prepare_batch
from tq_loader.channel import Channel, LocalChannel, find_local
from tq_loader.client_queries import ControllerQueries
from tq_loader.config import ClientConfig
from tq_loader.errors import ArgumentError, DataLostError, SchemaError, TQError
from tq_loader.metadata import BatchMeta
from tq_loader.schema import FieldSchema
from tq_loader.stats import ClientStats, ClusterStats, StorageStats
from tq_loader.storage import BackendInfo, StorageLost, StorageManager, make_storage_manager
from tq_loader.transport import Connection

__all__ = ["DEFAULT_TIMEOUT", "AsyncClient"]

P = ParamSpec("P")
R = TypeVar("R")
_MODES = ("fetch", "force_fetch", "insert")


class _Default:
    """Marks "use the configured request timeout" (``None`` already means "wait forever")."""

    def __repr__(self) -> str:
        return "DEFAULT_TIMEOUT"


DEFAULT_TIMEOUT = _Default()

log = logging.getLogger("tq_loader.client")  # the public module's name: what users configure


def _single_partition(meta: BatchMeta, what: str) -> str:
    pids = meta.partition_id_array
    if meta.size and not (pids == pids[0]).all():
        raise SchemaError(
            f"{what} of one batch into several partitions {sorted(set(pids.tolist()))}: "
            "split it with meta.chunk_by_partition() first"
        )
    return str(pids[0])


def client_args(
    controller_address: str, config: ClientConfig | None, auth_token: str | None
) -> tuple[str, ClientConfig, str | None]:
    """A client's constructor arguments, checked (``ArgumentError`` naming the bad one)."""
    return (
        args.name("controller_address", controller_address),
        args.instance("config", config, ClientConfig, "a ClientConfig", optional=True) or ClientConfig(),
        None if auth_token is None else args.key("auth_token", auth_token),
    )


class AsyncClient(ControllerQueries):
    """Talks to one cluster, reached through its controller's address. Owned by one event loop."""

    def __init__(
        self, controller_address: str, *, config: ClientConfig | None = None, auth_token: str | None = None
    ) -> None:
        self.controller_address, self.config, self._token = client_args(
            controller_address, config, auth_token
        )
        self._channels: dict[str, Channel] = {}
        self._storage: StorageManager | None = None
        self._cluster: p.ClusterInfo | None = None
        self._setup_lock: asyncio.Lock | None = None
        self._stats = {"puts": 0, "gets": 0, "rows_put": 0, "rows_got": 0, "get_meta_calls": 0}
        self._stats_time = {"put_s": 0.0, "get_s": 0.0, "get_meta_wait_s": 0.0}

    # ------------------------------------------------------------------ plumbing
    def channel(self, address: str) -> Channel:
        """The channel to the service at ``address`` (in-process when this process hosts it)."""
        channel = self._channels.get(address)
        if channel is None:
            if self.config.in_process and find_local(address) is not None:
                channel = LocalChannel(address)
            else:
                channel = Connection(
                    address, auth_token=self._token, connect_timeout=self.config.connect_timeout
                )
            self._channels[address] = channel
        return channel

    async def _call(self, body: Any, *, timeout: float | _Default | None = DEFAULT_TIMEOUT) -> Any:
        """One controller request; ``timeout`` defaults to ``client.request_timeout`` (None = wait)."""
        t = self.config.request_timeout if isinstance(timeout, _Default) else timeout
        reply, _ = await self.channel(self.controller_address).request(body, timeout=t)
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
                        info.storage_backend, BackendInfo(info, self.channel)
                    )
        return self._storage

    async def _report_lost(self, lost: StorageLost) -> DataLostError:
        """Tell the controller which rows a backend lost; the error to raise to the caller."""
        dropped = 0
        if lost.unit is not None:
            reply: p.LostReply = await self._call(
                p.ReportLost(
                    unit=lost.unit, num_units=lost.num_units, reason=str(lost), stripe_rows=lost.stripe_rows
                )
            )
            dropped += reply.lost_rows
        for pid, ids in lost.rows:
            reply_ids: p.IdsReply = await self._call(
                p.ClearSamples(partition_id=pid, global_indexes=p.ids_to_wire(ids))
            )
            dropped += len(p.ids_from_wire(reply_ids.global_indexes))
        return DataLostError(
            f"{lost}; its rows are lost -- {dropped} row(s) were removed from the controller and will "
            "not be served again. Re-produce them if needed"
        )

    async def _stored(self, coro: Awaitable[R]) -> R:
        """Await a storage call; a backend's lost rows are reported before the error reaches the caller."""
        try:
            return await coro
        except StorageLost as lost:
            raise await self._report_lost(lost) from lost

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
        """Rows of ``partition_id`` whose ``data_fields`` are ready; waits server-side (up to ``timeout``
        seconds, ``None`` = until rows come, the partition is sealed and drained, or it is aborted)."""
        fields = args.names("data_fields", data_fields)
        cfg = args.plain_mapping("sampling_config", sampling_config)
        dp_rank = cfg.pop("dp_rank", dp_rank)
        dp_size = cfg.pop("dp_size", dp_size)
        batch_index = cfg.pop("batch_index", batch_index)
        sampler = cfg.pop("sampler", sampler)
        req = p.GetMeta(
            partition_id=args.name("partition_id", partition_id),
            data_fields=fields,
            batch_size=args.count("batch_size", batch_size),
            mode=args.choice("mode", mode, _MODES),
            task_name=args.optional_name("task_name", task_name),
            sampler=args.optional_name("sampler", sampler),
            sampling_config=cfg,
            allow_partial=args.flag("allow_partial", allow_partial),
            dp_rank=None if dp_rank is None else args.count("dp_rank", dp_rank),
            dp_size=args.count("dp_size", dp_size, minimum=1),
            batch_index=None if batch_index is None else args.count("batch_index", batch_index),
        )
        wait = args.timeout("timeout", timeout)
        started = time.monotonic()
        reply: p.MetaReply = await self._waiting_call(req, wait)
        self._stats["get_meta_calls"] += 1
        self._stats_time["get_meta_wait_s"] += time.monotonic() - started
        return BatchMeta.from_wire(reply.meta)

    async def _waiting_call(self, req: p.GetMeta, timeout: float | None) -> Any:
        """A ``get_meta`` that may wait: never in silence. While it waits, say at INFO -- after 2 s,
        then at a doubling interval -- what it waits for; warn once if nobody ever wrote the
        partition or one of the fields (a typo waits forever otherwise)."""
        call = asyncio.ensure_future(self._call(req, timeout=timeout))
        if req.mode != "fetch" or self.config.wait_log_after is None:
            return await call
        interval, started, told = self.config.wait_log_after, time.monotonic(), False
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=interval)
                if done:
                    return call.result()
                told = await self._log_wait(req, time.monotonic() - started, told)
                interval *= 2
        except BaseException:
            call.cancel()  # the caller gave up (cancelled, closed): the server stops serving it
            raise

    async def _log_wait(self, req: p.GetMeta, waited: float, told: bool) -> bool:
        try:
            stats: p.ControllerStatsReply = await self._call(p.Stats())
        except TQError:  # the wait is what matters; a failed look at the status is no reason to fail it
            return told
        part = stats.stats.partitions.partitions.get(req.partition_id)
        rows = 0 if part is None else part.rows_live
        have = {} if part is None else part.fields
        ready = min((have.get(f, 0) for f in req.data_fields), default=0)
        log.info(
            "get_meta has waited %.1fs for %d rows of %s in partition %r (task %r): at most %d of its %d "
            "rows have all these fields, partition %s; pass timeout= to bound the wait",
            waited, req.batch_size, req.data_fields, req.partition_id, req.task_name, ready, rows,
            "sealed" if part is not None and part.sealed else "not sealed (producers may still write)",
        )  # fmt: skip
        if told:
            return True
        if part is None or (part.rows_live == 0 and part.rows_cleared == 0):
            known = [pid for pid, q in stats.stats.partitions.partitions.items() if q.rows_live]
            log.warning(
                "get_meta waits on partition %r, which nobody has written yet: check its name (partitions "
                "with rows: %s)", req.partition_id, known,
            )  # fmt: skip
        elif never := [f for f in req.data_fields if have.get(f, 0) == 0]:
            log.warning(
                "get_meta waits on fields %s of partition %r that no row has ever had (it has %s): check "
                "their names", never, req.partition_id, sorted(have),
            )  # fmt: skip
        return True

    async def async_set_custom_meta(self, metadata: BatchMeta) -> None:
        """Store ``metadata``'s per-row custom meta (tags) in the controller."""
        _check_meta("metadata", metadata)
        for part in metadata.chunk_by_partition():
            await self._call(
                p.SetTags(
                    partition_id=str(part.partition_id_array[0]),
                    global_indexes=p.ids_to_wire(part.global_index_array),
                    tags=part.get_all_custom_meta(),
                )
            )

    async def async_set_tags(self, metadata: BatchMeta, tags: Sequence[Mapping[str, Any]]) -> None:
        """Merge ``tags[i]`` into the tags of row ``i`` of ``metadata`` (``dict.update``; one partition)."""
        _check_meta("metadata", metadata)
        if metadata.size == 0:
            return
        rows = [args.plain_mapping(f"tags[{i}]", t) for i, t in enumerate(args.sequence("tags", tags))]
        await self._call(
            p.SetTags(
                partition_id=_single_partition(metadata, "set_tags()"),
                global_indexes=p.ids_to_wire(metadata.global_index_array),
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
        """Write columns. Without ``metadata`` new rows are inserted into ``partition_id``.

        The rows become visible to consumers once every byte is stored; the returned BatchMeta
        names the rows and carries the schema of every field written.
        """
        started = time.monotonic()
        batch = prepare_batch(data)
        if metadata is None:
            if partition_id is None:
                raise ArgumentError(
                    "put() needs either metadata (rows to write) or partition_id (to insert rows)"
                )
            out = await self._insert(batch, args.name("partition_id", partition_id))
        else:
            _check_meta("metadata", metadata)
            if metadata.size != batch.size:
                raise SchemaError(
                    f"put(): data has {batch.size} rows but metadata has {metadata.size}; pass the BatchMeta "
                    "of exactly these rows (same order)"
                )
            if partition_id is not None:
                args.name("partition_id", partition_id)
            out = await self._update(batch, metadata, partition_id)
        self._stats["puts"] += 1
        self._stats["rows_put"] += batch.size
        self._stats_time["put_s"] += time.monotonic() - started
        return out

    async def _insert(self, batch: PreparedBatch, pid: str) -> BatchMeta:
        if batch.size == 0:  # an empty batch is no error: it only makes sure the partition exists
            await self._call(p.CreatePartition(partition_id=pid))
            return BatchMeta.empty()
        reply: p.WriteReply = await self._call(
            p.PrepareWrite(partition_id=pid, schemas=batch.schemas, new_rows=batch.size, insert=True)
        )
        ids = p.ids_from_wire(reply.global_indexes)
        meta = BatchMeta(ids, pid)
        batch = _cast(batch, reply.schemas, pid)
        try:
            await self._write(batch, meta, pid, ids)
        except BaseException:
            await self._rollback_insert(pid, ids)
            raise
        return meta.produced_with(_written(reply.schemas, batch))

    async def _update(self, batch: PreparedBatch, meta: BatchMeta, partition_id: str | None) -> BatchMeta:
        if meta.size == 0:
            return meta.copy()
        pid = _single_partition(meta, "put()") if partition_id is None else partition_id
        ids = meta.global_index_array
        reply: p.WriteReply = await self._call(
            p.PrepareWrite(partition_id=pid, schemas=batch.schemas, global_indexes=p.ids_to_wire(ids))
        )
        batch = _cast(batch, reply.schemas, pid)
        await self._write(batch, meta, pid, ids)
        return meta.produced_with(_written(reply.schemas, batch))

    async def _write(
        self,
        batch: PreparedBatch,
        meta: BatchMeta,
        pid: str,
        ids: np.ndarray,
        tags: list[dict[str, Any]] | None = None,
    ) -> None:
        """The readiness rule: store every byte, then (and only then) make the rows visible."""
        if not batch.columns and tags is None:
            return
        if batch.columns:
            storage = await self.storage()
            await self._stored(storage.put_data(batch, meta))
        await self._call(
            p.NotifyProduced(
                partition_id=pid, global_indexes=p.ids_to_wire(ids), schemas=batch.schemas, tags=tags
            )
        )

    async def _rollback_insert(self, pid: str, ids: np.ndarray) -> None:
        """A failed insert-put must not leave rows that will never be produced (a sealed stream
        would wait for them): forget them in the controller and the storage."""
        try:
            await self._call(p.ClearSamples(partition_id=pid, global_indexes=p.ids_to_wire(ids)))
            storage = await self.storage()
            await storage.clear_data(BatchMeta(ids, pid))
        except TQError as exc:  # the original error is the one to report
            log.warning("could not roll back %d rows of a failed put into %r: %s", len(ids), pid, exc)

    async def async_get_data(
        self, metadata: BatchMeta, device: str | torch.device | None = None, *, copy: bool = True
    ) -> TensorDict:
        """The columns named by ``metadata`` for its rows, in its row order, in memory the caller owns.

        ``copy=False`` is for consumers that only read: where the storage allows it (in-process
        units, rows stored in one run) tensors are views of the stored rows -- never write to them;
        their rows' memory is not reused while they live. Elsewhere it is the usual private copy.
        """
        _check_meta("metadata", metadata)
        if not isinstance(copy, bool):
            raise ArgumentError(f"copy must be True or False, not {type(copy).__name__}")
        device = args.device("device", device)
        started = time.monotonic()
        storage = await self.storage()
        if not copy and storage.supports_views:
            fetch = storage.get_data(metadata, copy=False)  # type: ignore[call-arg]
        else:
            fetch = storage.get_data(metadata)
        td = await self._stored(fetch)
        if device is not None:
            td = td.to(device)
        self._stats["gets"] += 1
        self._stats["rows_got"] += metadata.size
        self._stats_time["get_s"] += time.monotonic() - started
        return td

    async def async_clear_samples(self, metadata: BatchMeta) -> None:
        _check_meta("metadata", metadata)
        storage = await self.storage()
        for part in metadata.chunk_by_partition():
            await self._call(
                p.ClearSamples(
                    partition_id=str(part.partition_id_array[0]),
                    global_indexes=p.ids_to_wire(part.global_index_array),
                )
            )
        await self._stored(storage.clear_data(metadata))

    async def async_clear_partition(self, partition_id: str) -> None:
        pid = args.name("partition_id", partition_id)
        storage = await self.storage()
        await self._call(p.ClearPartition(partition_id=pid))
        await self._stored(storage.clear_partition(pid))

    async def async_kv_write(
        self,
        keys: Sequence[str],
        partition_id: str,
        data: TensorDict | Mapping[str, Any] | PreparedBatch,
        tags: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[BatchMeta, np.ndarray]:
        """Write ``data`` (one row per key) into the rows of ``keys``, creating rows for new keys, and
        merge ``tags`` (one dict per key) -- the KV put in two requests (lookup-and-check, store, then
        notify with the tags). All or nothing for new keys: a refused write removes the rows it
        created. Returns the rows' BatchMeta (before this write) and which rows it created."""
        keys = args.names("keys", keys, allow_empty=False)
        pid = args.name("partition_id", partition_id)
        batch = prepare_batch(data)
        tags = None if tags is None else args.mappings("tags", tags)
        if batch.size != len(keys):
            raise ArgumentError(f"{batch.size} rows of data for {len(keys)} keys")
        reply: p.KVLookupReply = await self._call(
            p.KVLookup(partition_id=pid, keys=keys, create=True, schemas=batch.schemas)
        )
        meta = BatchMeta.from_wire(reply.meta)
        created = np.frombuffer(reply.created, dtype=bool).copy()
        batch = _cast(batch, reply.schemas, pid)
        try:
            await self._write(batch, meta, pid, meta.global_index_array, None if tags is None else list(tags))
        except BaseException:
            if created.any():  # undo the rows this call created; the original error is the one to see
                try:
                    await self.async_clear_samples(meta.select_samples(np.flatnonzero(created)))
                except TQError as exc:
                    log.warning("could not remove %d rows of a failed KV write: %s", int(created.sum()), exc)
            raise
        self._stats["puts"] += 1
        self._stats["rows_put"] += batch.size
        return meta, created

    # ------------------------------------------------------------------ introspection
    async def async_statistics(self) -> ClusterStats:
        """Client counters plus the controller's and the storage's statistics, as one typed snapshot
        (``stats["controller"]``-style reads work; ``stats.to_dict()`` gives plain data).

        Storage is asked first: a unit found dead there is reported to the controller before the
        controller's counters are read, so one snapshot never shows a dead unit with no lost rows.
        """
        storage = await self.storage()
        storage_stats = await storage.statistics()
        for lost in storage.take_lost():
            await self._report_lost(lost)
        reply: p.ControllerStatsReply = await self._call(p.Stats())
        return ClusterStats(
            client=ClientStats(**self._stats, **{k: round(v, 6) for k, v in self._stats_time.items()}),
            controller=reply.stats,
            storage=_storage_stats(storage_stats),
        )

    async def async_close(self) -> None:
        if self._storage is not None:
            await self._storage.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


_CAST_WARNED: set[tuple[str, str, str, str]] = set()


def _cast(batch: PreparedBatch, columns: Mapping[str, FieldSchema], pid: str) -> PreparedBatch:
    """Convert fields whose column holds another (safely reachable) dtype; say so once per field."""
    batch, changed = batch.cast_to(columns)
    for name, src, dst in changed:
        if (pid, name, src, dst) not in _CAST_WARNED:
            _CAST_WARNED.add((pid, name, src, dst))
            warnings.warn(
                f"partition {pid!r}, field {name!r}: written as {src}, but the column holds {dst}; the rows "
                f"were converted to {dst} (a column has one dtype). Write {dst} to silence this, or use a "
                "new field name for another dtype",
                UserWarning,
                stacklevel=4,
            )
    return batch


def _storage_stats(stats: Any) -> StorageStats:
    """A backend's statistics as the typed snapshot (a backend may return a plain dict)."""
    if isinstance(stats, StorageStats):
        return stats
    known = {k: stats[k] for k in StorageStats.__struct_fields__ if k in stats and k != "details"}
    rest = {k: v for k, v in stats.items() if k not in known}
    return StorageStats(**{"backend": "unknown", **known}, details=rest)


def _check_meta(arg: str, meta: Any) -> None:
    if not isinstance(meta, BatchMeta):
        raise ArgumentError(f"{arg} must be a BatchMeta, got {type(meta).__name__}")


def _written(merged: Mapping[str, FieldSchema], batch: PreparedBatch) -> dict[str, FieldSchema]:
    """The schema of each field written: the controller's merged one, else the batch's own."""
    return {name: merged.get(name, schema) for name, schema in batch.schemas.items()}
