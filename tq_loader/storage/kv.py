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
``tq:<cluster>/<partition>/<field>/<block>/<put id>.<rows>``, and the *index* -- which value holds
field ``f`` of row ``i`` -- is a per-row tag ``_tq_kv:<f> = "<put id>.<rows>"`` kept by the
controller (one ``SetTags`` request per put, sent before the client core makes the rows visible,
so a reader that sees a row also sees where it lives). Readers find it in the metadata that
``get_meta`` (and ``put``) return. A later put of the same field for a row replaces its tag; the
replaced value is deleted once no row of it is left pointing at it. The tags are visible in the
rows' ``custom_meta`` under the ``_tq_kv:`` prefix.

**Lost data.** A key the backend no longer has, for a row the controller says is produced, raises
:class:`StorageLost` naming those rows (the client core drops them and re-raises a
``DataLostError``); a service that does not answer is a ``TQConnectionError`` after the backend's
own request timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import fields as dc_fields
from typing import Any

import msgspec
import numpy as np
from tensordict import TensorDict

from tq_loader import protocol as p
from tq_loader.backend_config import MooncakeConfig, YuanrongConfig
from tq_loader.batch import PreparedBatch
from tq_loader.codec import ColumnSpec, decode_columns, encode_columns, to_tensordict
from tq_loader.errors import NotFoundError, ProtocolError, SchemaError, TQConnectionError, TQError
from tq_loader.metadata import BatchMeta, schema_of
from tq_loader.schema import FieldSchema
from tq_loader.stats import StorageStats
from tq_loader.storage.base import BackendInfo, StorageLost, StorageManager, register_storage_manager
from tq_loader.storage.columns import assemble, take_rows
from tq_loader.storage.kv_client import KVClient, as_bytes_view
from tq_loader.striping import DEFAULT_STRIPE_ROWS, check_stripe_rows

__all__ = ["TAG_PREFIX", "KVStorageManager", "backend_section"]

TAG_PREFIX = "_tq_kv:"  # the controller tag naming the value of a row's field
_MAX_KEYS = 1000  # keys per backend call (Yuanrong refuses 2000)
_ALIGN = 64
_HEAD = struct.Struct("<4sI")  # magic, header length
_MAGIC = b"TQK1"


class _Header(msgspec.Struct, frozen=True, array_like=True):
    spec: ColumnSpec
    ids: bytes  # little-endian int64 global indexes of the value's rows, in value order
    sizes: list[int]  # bytes of each codec buffer


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Header).decode


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _quote(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


class _Value:
    """One value to write: its key, header and the codec buffers that follow it."""

    __slots__ = ("buffers", "header", "key", "nbytes", "offsets")

    def __init__(self, key: str, header: bytes, buffers: list[memoryview]) -> None:
        self.key, self.header, self.buffers = key, header, buffers
        off = _align(_HEAD.size + len(header))
        self.offsets = []
        for buf in buffers:
            self.offsets.append(off)
            off = _align(off + buf.nbytes)
        self.nbytes = off

    def fill(self, dst: memoryview) -> None:
        dst[: _HEAD.size] = _HEAD.pack(_MAGIC, len(self.header))
        dst[_HEAD.size : _HEAD.size + len(self.header)] = self.header
        for off, buf in zip(self.offsets, self.buffers, strict=True):
            if buf.nbytes:
                dst[off : off + buf.nbytes] = as_bytes_view(buf)


def _parse(key: str, raw: memoryview) -> tuple[ColumnSpec, np.ndarray, list[memoryview]]:
    """(spec, row ids, buffers) of a stored value; ProtocolError if it is not one of ours."""
    raw = as_bytes_view(raw)
    if raw.nbytes < _HEAD.size:
        raise ProtocolError(f"KV value {key!r} is too short to be a tq_loader value")
    magic, hlen = _HEAD.unpack(raw[: _HEAD.size])
    if magic != _MAGIC or _HEAD.size + hlen > raw.nbytes:
        raise ProtocolError(f"KV value {key!r} was not written by this tq_loader version")
    try:
        header = _decode(raw[_HEAD.size : _HEAD.size + hlen])
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"KV value {key!r}: bad header ({exc})") from None
    bufs, off = [], _align(_HEAD.size + hlen)
    for size in header.sizes:
        if size < 0 or off + size > raw.nbytes:
            raise ProtocolError(f"KV value {key!r}: its buffers overrun the value")
        bufs.append(raw[off : off + size])
        off = _align(off + size)
    return header.spec, np.frombuffer(header.ids, dtype="<i8"), bufs


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
        self._lock = threading.Lock()
        self._known: dict[
            str, set[str]
        ] = {}  # partition -> keys written here (backends without prefix delete)

    # ------------------------------------------------------------------ keys
    def _prefix(self, pid: str) -> str:
        return f"tq:{self._ns}/{_quote(pid)}/"

    def _key(self, pid: str, name: str, block: int, tag: str) -> str:
        return f"{self._prefix(pid)}{_quote(name)}/{block}/{tag}"

    def _groups(self, meta: BatchMeta) -> list[tuple[str, int, np.ndarray]]:
        """(partition, block, positions in meta) for every (partition, block) with rows."""
        pids, blocks = meta.partition_id_array, meta.global_index_array // self.stripe_rows
        if (blocks == blocks[0]).all() and (pids == pids[0]).all():
            return [(str(pids[0]), int(blocks[0]), np.arange(meta.size))]
        out: dict[tuple[str, int], list[int]] = {}
        for i, (pid, block) in enumerate(zip(pids.tolist(), blocks.tolist())):
            out.setdefault((str(pid), int(block)), []).append(i)
        return [(pid, block, np.asarray(pos, np.int64)) for (pid, block), pos in out.items()]

    def _where(self, meta: BatchMeta, name: str, custom: list[dict[str, Any]]) -> dict[str, list[int]]:
        """key -> positions in ``meta`` of the rows whose field ``name`` that value holds."""
        tag_key = TAG_PREFIX + name
        pids, blocks = (
            meta.partition_id_array.tolist(),
            (meta.global_index_array // self.stripe_rows).tolist(),
        )
        out: dict[str, list[int]] = {}
        missing = []
        for i, row in enumerate(custom):
            tag = row.get(tag_key)
            if tag is None:
                missing.append(i)
                continue
            out.setdefault(self._key(str(pids[i]), name, int(blocks[i]), str(tag)), []).append(i)
        if missing:
            ids = meta.global_index_array[missing[:8]].tolist()
            raise NotFoundError(
                f"field {name!r} of rows {ids} (of {len(missing)}) has no {self.name} storage index in this "
                "metadata: the field was never written, or the BatchMeta was built by hand. Pass the "
                "metadata that get_meta() or put() returned (its custom_meta carries the index)"
            )
        return out

    # ------------------------------------------------------------------ put
    async def put_data(self, batch: PreparedBatch, meta: BatchMeta) -> None:
        n = meta.size
        if batch.size != n:
            raise SchemaError(
                f"put_data(): data has {batch.size} rows but the metadata has {n}; "
                "pass the BatchMeta of exactly these rows, in the same order"
            )
        if n == 0 or not batch.columns:
            return
        old = self._replaced(meta, list(batch.columns))
        putid = f"{self._writer}{next(self._seq):x}"
        groups = self._groups(meta)
        values: list[_Value] = []
        row_tags: list[dict[str, str]] = [{} for _ in range(n)]
        for pid, block, pos in groups:
            tag = f"{putid}.{len(pos)}"
            ids = np.ascontiguousarray(meta.global_index_array[pos], dtype="<i8").tobytes()
            for name, column in batch.columns.items():
                part = column if len(groups) == 1 else take_rows(column, pos, copy=False)
                specs, bufs = encode_columns({name: part})
                header = _encode(_Header(specs[0], ids, [b.nbytes for b in bufs]))
                values.append(_Value(self._key(pid, name, block, tag), header, bufs))
            for i in pos.tolist():
                row_tags[i] = {TAG_PREFIX + name: tag for name in batch.columns}
        await asyncio.to_thread(self._write, values)
        try:
            await self._publish_index(meta, row_tags)
        except BaseException:
            await asyncio.to_thread(self._forget, [v.key for v in values])
            raise
        with self._lock:
            for pid, *_ in groups:
                self._known.setdefault(pid, set()).update(
                    v.key for v in values if v.key.startswith(self._prefix(pid))
                )
        meta.update_custom_meta(row_tags)
        if old:  # values no row points at any more (every row of them was overwritten)
            await asyncio.to_thread(self._forget, old)

    def _batches(self, values: list[_Value]) -> list[list[_Value]]:
        """Values split into backend calls of at most _MAX_KEYS keys and ``max_call_bytes`` bytes."""
        out: list[list[_Value]] = [[]]
        total = 0
        for value in values:
            cap = self.max_call_bytes
            if out[-1] and (len(out[-1]) >= _MAX_KEYS or (cap is not None and total + value.nbytes > cap)):
                out.append([])
                total = 0
            out[-1].append(value)
            total += value.nbytes
        return out

    def _write(self, values: list[_Value]) -> None:
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
        with self._lock:
            gone = set(keys)
            for known in self._known.values():
                known -= gone

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

    def _replaced(self, meta: BatchMeta, names: list[str]) -> list[str]:
        """Keys of the values this put replaces entirely (all their rows are rewritten, same fields)."""
        custom = meta.get_all_custom_meta()
        if not any(any(k.startswith(TAG_PREFIX) for k in row) for row in custom):
            return []
        out = []
        pids, blocks = (
            meta.partition_id_array.tolist(),
            (meta.global_index_array // self.stripe_rows).tolist(),
        )
        for name in names:
            counts: dict[tuple[str, int, str], int] = {}
            for i, row in enumerate(custom):
                tag = row.get(TAG_PREFIX + name)
                if tag is not None:
                    k = (str(pids[i]), int(blocks[i]), str(tag))
                    counts[k] = counts.get(k, 0) + 1
            out += [self._key(pid, name, b, t) for (pid, b, t), c in counts.items() if _rows_of(t) == c]
        return out

    # ------------------------------------------------------------------ get
    async def get_data(self, meta: BatchMeta, fields: Sequence[str] | None = None) -> TensorDict:
        known = meta.field_schema
        fields = list(known) if fields is None else list(fields)
        n = meta.size
        if n == 0:
            return to_tensordict({f: assemble([], 0, known[f], field=f) for f in fields if f in known}, 0)
        custom = meta.get_all_custom_meta()
        wanted = {name: self._where(meta, name, custom) for name in fields}
        keys = list(dict.fromkeys(k for where in wanted.values() for k in where))
        raws = dict(zip(keys, await asyncio.to_thread(self._fetch, keys, meta, wanted), strict=True))
        ids = meta.global_index_array
        columns: dict[str, Any] = {}
        for name, where in wanted.items():
            parts = []
            for key, pos_list in where.items():
                spec, value_ids, bufs = _parse(key, raws[key])
                col = decode_columns([spec], bufs, copy=False)[spec.name]
                pos = np.asarray(pos_list, np.int64)
                idx = _index_of(value_ids, ids[pos])
                if idx is None:
                    raise NotFoundError(
                        f"the {self.name} value {key!r} does not hold rows {ids[pos][:8].tolist()} of field {name!r}"
                    )
                parts.append((pos, col if idx is _ALL else take_rows(col, idx, copy=False)))
            schema = _schema(name, known.get(name), parts)
            columns[name] = assemble(parts, n, schema, field=name)
        return to_tensordict(columns, n)

    def _fetch(self, keys: list[str], meta: BatchMeta, wanted: dict[str, dict[str, list[int]]]) -> list[Any]:
        out: list[Any] = []
        try:
            for start in range(0, len(keys), _MAX_KEYS):
                out += self.client.get(keys[start : start + _MAX_KEYS])
        except NotFoundError as exc:
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
        return out

    # ------------------------------------------------------------------ clear
    async def clear_data(self, meta: BatchMeta) -> None:
        """Delete the values every row of which is in ``meta`` (a value shared with rows that stay is
        kept until they are cleared together or the partition is)."""
        if meta.size == 0:
            return
        custom = meta.get_all_custom_meta()
        names = {k[len(TAG_PREFIX) :] for row in custom for k in row if k.startswith(TAG_PREFIX)}
        keys = self._replaced(meta, sorted(names))
        if keys:
            await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _MAX_KEYS):
            self.client.delete(keys[start : start + _MAX_KEYS])
        with self._lock:
            gone = set(keys)
            for known in self._known.values():
                known -= gone

    async def clear_partition(self, partition_id: str) -> None:
        def run() -> None:
            removed = self.client.delete_prefix(self._prefix(partition_id))
            with self._lock:
                mine = sorted(self._known.pop(partition_id, set()))
            if removed is None and mine:  # the backend cannot list keys: delete the ones written here
                for start in range(0, len(mine), _MAX_KEYS):
                    self.client.delete(mine[start : start + _MAX_KEYS])

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


_ALL = object()


def _rows_of(tag: str) -> int:
    try:
        return int(tag.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return -1


def _index_of(value_ids: np.ndarray, want: np.ndarray) -> Any:
    """Positions in the value of the rows ``want`` (``_ALL``: exactly the value, in order); None if absent."""
    if value_ids.shape == want.shape and (value_ids == want).all():
        return _ALL
    order = np.argsort(value_ids, kind="stable")
    j = np.searchsorted(value_ids, want, sorter=order)
    j = np.minimum(j, max(len(value_ids) - 1, 0))
    idx = order[j] if len(value_ids) else j
    if not len(value_ids) or not (value_ids[idx] == want).all():
        return None
    return idx


def _schema(name: str, known: FieldSchema | None, parts: list[tuple[np.ndarray, Any]]) -> FieldSchema:
    """The column's schema: the metadata's, widened by what the values hold (only if it is stale)."""
    schema = known
    try:
        for pos, value in parts:
            if len(pos):
                seen = schema_of(value, name)
                schema = seen if schema is None else schema.merge(seen)
    except SchemaError as exc:
        raise SchemaError(f"field {name!r}: {exc}") from None
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
