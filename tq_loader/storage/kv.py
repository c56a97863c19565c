"""A :class:`StorageManager` over a key-value store (``storage.backend = mooncake | yuanrong``).

**Keys and values.** A put stores one value per (partition, block, field) it touches, where a block
is ``storage.stripe_rows`` consecutive global indexes (the stripe of :mod:`tq_loader.striping`): the
value is the whole column slice of the batch's rows in that block, so a batch costs backend calls
and keys that grow with fields x blocks, never with rows -- and each backend call carries many keys
(the client's batched ``reserve``/``commit`` and ``get``). A value is self-describing: a small
msgspec header (the codec's :class:`~tq_loader.codec.ColumnSpec` -- kind, dtype, shape -- the global
indexes of its rows, the sizes of its buffers) and then the raw buffers, 64-byte aligned. Dense
columns are their raw bytes; jagged, "rows" and string/object columns go through
:mod:`tq_loader.codec` (no pickle anywhere).

**Why one value per (partition, block, field, put).** Several processes write rows of the same
block (two producers' batches share a stripe; a later put adds other fields to the same rows).
A single value per block would need read-modify-write across processes, which neither Mooncake
nor Yuanrong can do atomically. So every put writes its own values, keyed
``tq:<cluster>/<partition>/<field>/<block>/<put id>.<rows>.<bytes>``, and the *index* -- which
value holds field ``f`` of row ``i`` -- is one per-row tag per put, ``_tq_kv:<put id> =
"<rows>|<field>:<bytes>|..."``, kept by the controller (one ``SetTags`` request per put, sent
before the client core makes the rows visible, so a reader that sees a row also sees where it
lives). Readers find it in the metadata that ``get_meta``, ``put`` and ``kv_retrieve_meta`` return;
for each field the latest put naming it wins. The replaced value is deleted once no row of it is
left pointing at it. The tags are visible in the rows' ``custom_meta`` under the ``_tq_kv:``
prefix (one small string per row and put: metadata copies stay cheap).

**Lost data.** A key the backend no longer has, for a row the controller says is produced, raises
:class:`StorageLost` naming those rows (the client core drops them and re-raises a
``DataLostError``); a service that does not answer is a ``TQConnectionError`` after the backend's
own request timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import fields as dc_fields
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

from tq_loader import protocol as p
from tq_loader.backend_config import MooncakeConfig, YuanrongConfig
from tq_loader.batch import PreparedBatch
from tq_loader.codec import ColumnSpec, decode_columns, encode_columns, to_tensordict
from tq_loader.errors import NotFoundError, TQConnectionError, TQError
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
from tq_loader.storage.columns import (
    assemble,
    column_schema,
    copy_rows,
    take_rows,
    target_kind,
    torch_dtype,
)
from tq_loader.storage.kv_client import KVClient
from tq_loader.storage.kv_layout import (
    ALL,
    TAG_PREFIX,
    Group,
    Header,
    Loc,
    Value,
    encode_header,
    has_index,
    index_of,
    index_rows,
    locations,
    merge_tags,
    parse_value,
    quote,
    size_of,
)
from tq_loader.storage.kv_registry import KeyRegistry
from tq_loader.striping import DEFAULT_STRIPE_ROWS, check_stripe_rows

__all__ = ["TAG_PREFIX", "KVStorageManager", "backend_section"]

_MAX_KEYS = 1000  # keys per backend call (Yuanrong refuses 2000)


def backend_section(info: BackendInfo, name: str, cls: type[Any]) -> Any:
    """The ``storage.<name>`` section of the cluster's config as a ``cls`` dataclass."""
    section = ((info.cluster.config or {}).get("storage") or {}).get(name) or {}
    names = {f.name for f in dc_fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})


class KVStorageManager(StorageManager):
    """Stores each (partition, block, field) slice of a put as one value of a :class:`KVClient`."""

    def __init__(self, info: BackendInfo, client: KVClient, services: dict[str, Any] | None = None) -> None:
        config = info.cluster.config or {}
        storage = config.get("storage") or {}
        self.name = client.name
        self.client = client
        self.stripe_rows = check_stripe_rows(storage.get("stripe_rows", DEFAULT_STRIPE_ROWS))
        self.request_timeout = (config.get("client") or {}).get("request_timeout", 120.0)
        self.max_call_bytes: int | None = getattr(client, "max_call_bytes", None)
        self._services = dict(services or client.services())
        self._ns = (info.cluster.cluster_id or "default")[:16]
        self._controller = info.cluster.controller
        self._connect = info.connect
        self._writer = uuid.uuid4().hex[:10]
        self._seq = itertools.count()
        # backends that cannot list keys record each partition's keys in the store itself
        self._registry = None if client.lists_keys else KeyRegistry(client, self._writer)

    # ------------------------------------------------------------------ keys
    def _prefix(self, pid: str) -> str:
        return f"tq:{self._ns}/{quote(pid)}/"

    def _key(self, pid: str, name: str, block: int, tag: str) -> str:
        return f"{self._prefix(pid)}{quote(name)}/{block}/{tag}"

    def _groups(self, meta: BatchMeta) -> list[tuple[str, int, np.ndarray]]:
        """(partition, block, positions in meta) for every (partition, block) with rows."""
        pids, blocks = meta.partition_id_array, meta.global_index_array // self.stripe_rows
        if (blocks == blocks[0]).all() and (pids == pids[0]).all():
            return [(str(pids[0]), int(blocks[0]), np.arange(meta.size))]
        out: dict[tuple[str, int], list[int]] = {}
        for i, (pid, block) in enumerate(zip(pids.tolist(), blocks.tolist())):
            out.setdefault((str(pid), int(block)), []).append(i)
        return [(pid, block, np.asarray(pos, np.int64)) for (pid, block), pos in out.items()]

    def _where(self, meta: BatchMeta, name: str, index: list[Group]) -> dict[str, list[int]]:
        """key -> positions in ``meta`` of the rows whose field ``name`` that value holds."""
        out: dict[str, list[int]] = {}
        missing: list[int] = []
        for group in index:
            loc = group.found.get(name)
            if loc is None:
                missing += group.positions
            else:
                out.setdefault(self._key(group.pid, name, group.block, loc.tag), []).extend(group.positions)
        if missing:
            ids = meta.global_index_array[sorted(missing)[:8]].tolist()
            raise NotFoundError(
                f"field {name!r} of rows {ids} (of {len(missing)}) has no {self.name} storage index in this "
                "metadata: the field was never written, or the BatchMeta was built by hand. Pass the "
                "metadata that get_meta() or put() returned (its custom_meta carries the index)"
            )
        return out

    def key_of(self, meta: BatchMeta, row: int, name: str) -> str | None:
        """The key of the value holding field ``name`` of row ``row`` of ``meta`` (None: no index)."""
        loc = locations(meta)[row].get(name)
        if loc is None:
            return None
        block = int(meta.global_index_array[row]) // self.stripe_rows
        return self._key(str(meta.partition_id_array[row]), name, block, loc.tag)

    # ------------------------------------------------------------------ put
    async def put_data(self, batch: PreparedBatch, meta: BatchMeta) -> None:
        n = rows_to_store(batch, meta)
        if n == 0:
            return
        old = self._replaced(meta, list(batch.columns))
        putid = f"{self._writer}{next(self._seq):x}"
        groups = self._groups(meta)
        values: list[Value] = []
        row_tags: list[dict[str, str]] = [{} for _ in range(n)]
        for pid, block, pos in groups:
            ids = np.ascontiguousarray(meta.global_index_array[pos], dtype="<i8").tobytes()
            sizes = []
            for name, column in batch.columns.items():
                part = column if len(groups) == 1 else take_rows(column, pos, copy=False)
                specs, bufs = encode_columns({name: part})
                value = Value("", encode_header(Header(specs[0], ids, [b.nbytes for b in bufs])), bufs)
                value.key = self._key(pid, name, block, Loc(putid, len(pos), value.nbytes).tag)
                values.append(value)
                sizes.append(f"|{quote(name)}:{value.nbytes}")
            # one tag per row and put: rows in the block's values, then each field's value size
            tags = {TAG_PREFIX + putid: f"{len(pos)}{''.join(sizes)}"}
            for i in pos.tolist():
                row_tags[i] = tags
        await asyncio.to_thread(self._write, values, sorted({pid for pid, *_ in groups}))
        try:
            await self._publish_index(meta, row_tags)
        except BaseException:
            await asyncio.to_thread(self._forget, [v.key for v in values])
            raise
        merge_tags(meta, row_tags)
        if old:  # values no row points at any more (every row of them was overwritten)
            await asyncio.to_thread(self._forget, old)

    def _batches(self, values: list[Value]) -> list[list[Value]]:
        """Values split into backend calls of at most _MAX_KEYS keys and ``max_call_bytes`` bytes."""
        out: list[list[Value]] = [[]]
        total = 0
        for value in values:
            cap = self.max_call_bytes
            if out[-1] and (len(out[-1]) >= _MAX_KEYS or (cap is not None and total + value.nbytes > cap)):
                out.append([])
                total = 0
            out[-1].append(value)
            total += value.nbytes
        return out

    def _write(self, values: list[Any], pids: list[str]) -> None:
        if self._registry is not None:  # the manifest of this put, written with its values
            for pid in pids:
                prefix = self._prefix(pid)
                keys = (
                    [v.key for v in values if v.key.startswith(prefix)]
                    if len(pids) > 1
                    else [v.key for v in values]
                )
                values = [*values, self._registry.manifest(prefix, keys)]
        done: list[str] = []
        try:
            for call in self._batches(values):
                with self.client.reserve([v.key for v in call], [v.nbytes for v in call]) as pending:
                    for value, dst in zip(call, pending.buffers, strict=True):
                        value.fill(dst)
                done += [v.key for v in call]
        except BaseException:
            self._forget(done)  # no half batch stays stored (its rows never become visible)
            raise

    def _forget(self, keys: list[str]) -> None:
        """Delete keys, best effort (a dead service has lost them anyway)."""
        if not keys:
            return
        try:
            for start in range(0, len(keys), _MAX_KEYS):
                self.client.delete(keys[start : start + _MAX_KEYS])
        except TQError:
            pass

    async def _publish_index(self, meta: BatchMeta, row_tags: list[dict[str, str]]) -> None:
        """Tell the controller where each row's fields live (before the rows become visible)."""
        channel = self._connect(self._controller)
        pids = meta.partition_id_array
        for part in {str(x) for x in pids.tolist()}:
            pos = np.flatnonzero(pids == part)
            await channel.request(
                p.SetTags(
                    partition_id=part,
                    global_indexes=p.ids_to_wire(meta.global_index_array[pos]),
                    tags=[row_tags[i] for i in pos.tolist()],
                ),
                timeout=self.request_timeout,
            )

    def _replaced(self, meta: BatchMeta, names: Sequence[str]) -> list[str]:
        """Keys of the values of ``names`` all of whose rows are in ``meta`` (a put of those fields
        for these rows replaces them; a clear of these rows frees them)."""
        if not has_index(meta):
            return []
        counts: dict[tuple[str, str, int, Loc], int] = {}
        for group in index_rows(meta, self.stripe_rows):
            for name in names:
                loc = group.found.get(name)
                if loc is not None:
                    k = (group.pid, name, group.block, loc)
                    counts[k] = counts.get(k, 0) + len(group.positions)
        return [
            self._key(pid, name, b, loc.tag) for (pid, name, b, loc), c in counts.items() if loc.rows == c
        ]

    # ------------------------------------------------------------------ get
    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        known = meta.field_schema
        fields = list(known) if fields is None else list(fields)
        n = meta.size
        if n == 0:
            return to_tensordict({f: assemble([], 0, known[f], field=f) for f in fields if f in known}, 0)
        index = index_rows(meta, self.stripe_rows)
        wanted = {name: self._where(meta, name, index) for name in fields}
        reading = _Reading(meta, known, wanted)
        await asyncio.to_thread(self._fetch, reading)
        return to_tensordict(reading.columns(), n)

    def _fetch(self, reading: _Reading) -> None:
        """Every value ``reading`` wants, copied out of the backend's memory as it arrives."""
        keys = reading.keys
        sizes = [size_of(k) for k in keys]
        try:
            for start in range(0, len(keys), _MAX_KEYS):
                part = slice(start, start + _MAX_KEYS)
                known = None if any(n is None for n in sizes[part]) else sizes[part]
                self.client.get_views(keys[part], known, reading.consume)
        except NotFoundError as exc:
            meta, wanted = reading.meta, reading.wanted
            present = self.client.exists(keys)
            gone = {k for k, ok in zip(keys, present, strict=True) if not ok}
            if not gone:
                raise
            rows: dict[str, set[int]] = {}
            for where in wanted.values():
                for key, pos in where.items():
                    if key in gone:
                        for i in pos:
                            rows.setdefault(str(meta.partition_id_array[i]), set()).add(
                                int(meta.global_index_array[i])
                            )
            raise StorageLost(
                f"the {self.name} backend no longer holds {len(gone)} value(s) such as {sorted(gone)[0]!r} "
                f"({exc}); their rows are lost",
                rows=[(pid, np.array(sorted(r), np.int64)) for pid, r in rows.items()],
            ) from None

    # ------------------------------------------------------------------ clear
    async def clear_data(self, meta: BatchMeta) -> None:
        """Delete the values every row of which is in ``meta`` (a value shared with rows that stay is
        kept until they are cleared together or the partition is)."""
        if meta.size == 0:
            return
        names = {name for row in locations(meta) for name in row}
        keys = self._replaced(meta, sorted(names))
        if keys:
            await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _MAX_KEYS):
            self.client.delete(keys[start : start + _MAX_KEYS])

    async def clear_partition(self, partition_id: str) -> None:
        def run() -> None:
            prefix = self._prefix(partition_id)
            if self._registry is None:
                self.client.delete_prefix(prefix)
                return
            keys = self._registry.collect(prefix)  # every writer's keys, from the store itself
            for start in range(0, len(keys), _MAX_KEYS):
                self.client.delete(keys[start : start + _MAX_KEYS])
            self._registry.forget(prefix)

        await asyncio.to_thread(run)

    # ------------------------------------------------------------------ status
    async def statistics(self) -> StorageStats:
        stats = self.client.statistics()
        return StorageStats(
            backend=self.name,
            stripe_rows=self.stripe_rows,
            services=self._services,
            details={"client": stats.as_dict()},
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)


class _Reading:
    """One get: the values it wants, and the result columns they are copied into as they arrive.

    Dense columns are allocated up front and every value's rows are copied straight from the
    backend's (or its staging) memory into them -- one copy; other kinds are decoded into private
    memory per value and assembled at the end.
    """

    def __init__(
        self, meta: BatchMeta, known: dict[str, FieldSchema], wanted: dict[str, dict[str, list[int]]]
    ):
        self.meta, self.wanted = meta, wanted
        self.field_of = {key: name for name, where in wanted.items() for key in where}
        self.keys = list(self.field_of)
        self.known = known
        self.dense: dict[str, torch.Tensor] = {}
        for name in wanted:
            schema = known.get(name)
            if schema is not None and target_kind(schema)[0] == "dense":
                self.dense[name] = torch.empty((meta.size, *schema.shape), dtype=torch_dtype(schema.dtype))
        self.parts: dict[str, list[tuple[np.ndarray, Any]]] = {name: [] for name in wanted}

    def consume(self, keys: list[str], views: list[memoryview]) -> None:
        ids = self.meta.global_index_array
        for key, raw in zip(keys, views, strict=True):
            name = self.field_of[key]
            spec, value_ids, bufs = parse_value(key, raw)
            pos = np.asarray(self.wanted[name][key], np.int64)
            idx = index_of(value_ids, ids[pos])
            if idx is None:
                raise NotFoundError(
                    f"the KV value {key!r} does not hold rows {ids[pos][:8].tolist()} of field {name!r}"
                )
            out = self.dense.get(name)
            if out is not None and spec.kind == "dense" and _fits(out, spec):
                col = decode_columns([spec], bufs, copy=False)[spec.name]
                copy_rows(out, pos, col, None if idx is ALL else idx)
                self.parts[name].append((pos, None))  # rows already in ``out``
                continue
            if out is not None:  # a stale schema: assemble this field from private parts instead
                self.dense.pop(name)
                self.parts[name] = [(q, out[torch.from_numpy(q)]) for q, _ in self.parts[name]]
            col = decode_columns([spec], bufs, copy=True)[spec.name]
            self.parts[name].append((pos, col if idx is ALL else take_rows(col, idx)))

    def columns(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.wanted:
            if name in self.dense:
                out[name] = self.dense[name]
            else:
                parts = self.parts[name]
                out[name] = assemble(
                    parts, self.meta.size, _schema(name, self.known.get(name), parts), field=name
                )
        return out


def _fits(out: torch.Tensor, spec: ColumnSpec) -> bool:
    return str(out.dtype).removeprefix("torch.") == spec.dtype and tuple(out.shape[1:]) == tuple(
        spec.shape[1:]
    )


def _schema(name: str, known: FieldSchema | None, parts: list[tuple[np.ndarray, Any]]) -> FieldSchema:
    schema = column_schema(name, known, parts)
    if schema is None:
        raise NotFoundError(f"field {name!r}: no schema and no rows")
    return schema


# --------------------------------------------------------------------------- the registered backends


def _services(cfg: Any, roles: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {role: getattr(cfg, attr) for role, attr in roles.items() if getattr(cfg, attr)}
    if cfg.pids:
        out["pids"] = list(cfg.pids)
    return out


def _mooncake(info: BackendInfo) -> KVStorageManager:
    from tq_loader.storage.mooncake import MooncakeKVClient

    cfg = backend_section(info, "mooncake", MooncakeConfig)
    if not cfg.master_server_address:
        raise TQConnectionError(
            "the cluster names no Mooncake master (storage.mooncake.master_server_address); start the "
            "cluster with tq.init({'storage': {'backend': 'mooncake'}}) or give the address of a running one"
        )
    roles = {"master": "master_server_address", "metadata": "metadata_server", "store": "store_address"}
    return KVStorageManager(info, MooncakeKVClient(cfg), _services(cfg, roles))


def _yuanrong(info: BackendInfo) -> KVStorageManager:
    from tq_loader.storage.yuanrong import YuanrongKVClient

    cfg = backend_section(info, "yuanrong", YuanrongConfig)
    if not cfg.worker_address:
        raise TQConnectionError(
            "the cluster names no Yuanrong worker (storage.yuanrong.worker_address); start the cluster "
            "with tq.init({'storage': {'backend': 'yuanrong'}}) or give the address of a running one"
        )
    roles = {"worker": "worker_address", "metastore": "metastore_address"}
    return KVStorageManager(info, YuanrongKVClient(cfg), _services(cfg, roles))


register_storage_manager("mooncake", _mooncake)
register_storage_manager("yuanrong", _yuanrong)
