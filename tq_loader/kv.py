"""Redis-style KV API over the cluster (TransferQueue 0.1.11 semantics), sync and ``async_`` twins.

A key names one row of a partition. ``kv_batch_put`` creates rows for new keys, merges tags into
the row's custom meta (``dict.update``: old tag keys survive) and writes the given columns (other
columns of existing rows stay: partial updates). ``kv_batch_get`` returns rows in key order with
the columns every requested key has. Where TransferQueue drops unknown keys silently, this raises
:class:`~tq_loader.errors.NotFoundError` (a ``KeyError`` and ``ValueError``) naming them. Every
error is a :class:`~tq_loader.errors.TQError`; bad arguments are
:class:`~tq_loader.errors.ArgumentError` (also a ``ValueError`` and ``TypeError``). An empty key
list is a no-op, as an empty ``put`` is.

Each operation is written once, as a coroutine of the :class:`~tq_loader.client.AsyncClient`
(``_batch_put`` ...), and runs on the client's event loop in one go: the sync function waits for
it (``Client.run``), the ``async_`` twin awaits it from any event loop (``Client.submit``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from tq_loader import args
from tq_loader.api import get_client
from tq_loader.client import AsyncClient
from tq_loader.errors import ArgumentError, NotFoundError, SchemaError, TQError
from tq_loader.metadata import KVBatchMeta

__all__ = [
    "async_kv_batch_get",
    "async_kv_batch_get_by_meta",
    "async_kv_batch_put",
    "async_kv_clear",
    "async_kv_list",
    "async_kv_put",
    "kv_batch_get",
    "kv_batch_get_by_meta",
    "kv_batch_put",
    "kv_clear",
    "kv_list",
    "kv_put",
]

R = TypeVar("R")
DataParser = Callable[[dict[str, Any]], Any]


def _keys(keys: Sequence[str] | str) -> list[str]:
    out = args.names("keys", keys)
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = sorted({k for k in out if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
        raise ArgumentError(f"keys must be unique, got duplicates {dup[:5]}; give each key once")
    return out


def _one_row(fields: TensorDict | Mapping[str, Any]) -> TensorDict:
    """A single sample (no batch dim) or a batch of one, as a TensorDict of batch size [1]."""
    if isinstance(fields, TensorDictBase):
        return fields if tuple(fields.batch_size) == (1,) else fields.unsqueeze(0)
    if not isinstance(fields, Mapping):
        raise ArgumentError(f"kv_put fields must be a dict or TensorDict, not {type(fields).__name__}")
    columns: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            if value.is_nested:
                raise ArgumentError(f"kv_put field {name!r} is a nested tensor; use kv_batch_put for batches")
            columns[name] = value.unsqueeze(0)
        elif isinstance(value, NonTensorStack):
            columns[name] = value
        elif isinstance(value, NonTensorData):
            columns[name] = NonTensorStack(value)
        else:
            columns[name] = NonTensorStack(NonTensorData(value))
    return TensorDict(columns, batch_size=[1])


def _check_tags(tags: Any, n: int) -> list[dict[str, Any]]:
    """One dict of plain values (str keys) per key, checked before anything is written."""
    if isinstance(tags, Mapping) or not isinstance(tags, Sequence) or len(tags) != n:
        got = (
            "a single dict"
            if isinstance(tags, Mapping)
            else f"{len(tags) if isinstance(tags, Sequence) else tags!r}"
        )
        raise ArgumentError(f"tags must be a list of one dict per key ({n} keys), got {got}")
    try:
        return [args.plain_mapping(f"tags[{i}]", tag) for i, tag in enumerate(tags)]
    except ArgumentError as exc:  # a value the wire cannot carry: the tags' schema is wrong
        raise SchemaError(f"tags must hold plain values (numbers, str, bytes, lists, dicts): {exc}") from None


def _parsed(fields: Any, parser: DataParser | None) -> Any:
    """``fields`` after ``parser`` rewrote its columns in place (TransferQueue's ``data_parser``)."""
    if parser is None:
        return fields
    if not callable(parser):
        raise ArgumentError(f"data_parser must be callable, got {type(parser).__name__}")
    plain = dict(fields.items())
    names = list(plain)
    parser(plain)
    if list(plain) != names:
        raise ArgumentError(
            f"data_parser must keep the fields {names} (it left {list(plain)}); modify values in place"
        )
    return plain


def _fields_length(fields: Any) -> int:
    from tq_loader.codec import batch_length

    if isinstance(fields, TensorDictBase) and fields.batch_dims:
        return int(fields.batch_size[0])
    if not isinstance(fields, (TensorDictBase, Mapping)):
        raise ArgumentError(f"fields must be a TensorDict or a dict of columns, got {type(fields).__name__}")
    return batch_length(fields)


# --------------------------------------------------------------------------- the operations


async def _batch_put(
    core: AsyncClient,
    keys: Sequence[str],
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None,
    tags: Sequence[Mapping[str, Any]] | None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    """All or nothing for new keys: if the write is refused (schema conflict, full storage, ...), the
    rows this call created are removed again. Fields are written before tags, so a refused write
    does not merge its tags either."""
    keys = _keys(keys)
    pid = args.name("partition_id", partition_id)
    if fields is None and tags is None:
        raise ArgumentError("kv_batch_put needs fields, tags or both; got neither")
    if not keys:
        return KVBatchMeta(keys=[], tags=[], partition_id=pid, fields=[])
    checked_tags = None if tags is None else _check_tags(tags, len(keys))
    if fields is not None:
        n = _fields_length(fields)
        if n != len(keys):
            raise ArgumentError(f"kv_batch_put got {n} rows of fields for {len(keys)} keys")
        fields = _parsed(fields, data_parser)
    if fields is not None:  # one lookup-and-check, one store, one notify carrying the tags
        meta, _ = await core.async_kv_write(keys, pid, fields, checked_tags)
        old_fields = set(meta.field_names) | set(fields.keys())
    else:  # tags only
        meta, created = await core.async_kv_lookup(keys, pid, create=True)
        old_fields = set(meta.field_names)
        try:
            await core.async_set_tags(meta, checked_tags)  # type: ignore[arg-type]
        except Exception:
            if created.any():
                with contextlib.suppress(TQError):
                    await core.async_clear_samples(meta.select_samples(np.flatnonzero(created)))
            raise
    merged = [dict(old) for old in meta.get_all_custom_meta()]
    for row, new in zip(merged, checked_tags or ()):
        row.update(new)
    return KVBatchMeta(keys=keys, tags=merged, partition_id=pid, fields=sorted(old_fields))


async def _put(
    core: AsyncClient,
    key: str,
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None,
    tag: Mapping[str, Any] | None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    if fields is None and tag is None:
        raise ArgumentError("kv_put needs fields, tag or both; got neither")
    row = None if fields is None else _one_row(fields)
    return await _batch_put(
        core, [args.name("key", key)], partition_id, row, None if tag is None else [tag], data_parser
    )


async def _batch_get(
    core: AsyncClient, keys: Sequence[str] | str, partition_id: str, select_fields: Sequence[str] | str | None
) -> TensorDict:
    keys = _keys(keys)
    pid = args.name("partition_id", partition_id)
    wanted = None if select_fields is None else args.names("select_fields", select_fields)
    if not keys:
        return TensorDict({}, batch_size=[0])
    meta = await core.async_kv_retrieve_meta(keys, pid)
    fields = meta.field_names
    if wanted is not None:
        missing = [f for f in wanted if f not in fields]
        if missing:
            raise NotFoundError(
                f"fields {missing} are not present on every requested key of {pid!r} "
                f"(common fields: {fields}); put them first or select fewer"
            )
        fields = wanted
    if not fields:
        raise NotFoundError(f"the requested keys of {pid!r} have no field in common; put fields first")
    return await core.async_get_data(meta.select_fields(fields))


def _check_kv_meta(meta: Any) -> KVBatchMeta:
    if not isinstance(meta, KVBatchMeta):
        raise ArgumentError(f"meta must be a KVBatchMeta, got {type(meta).__name__}")
    if meta.partition_id is None:
        raise ArgumentError("kv_batch_get_by_meta needs a KVBatchMeta with a partition_id")
    return meta


def _check_selected(meta: KVBatchMeta, select_fields: Sequence[str] | str | None) -> None:
    if select_fields is not None:
        unknown = [f for f in args.names("select_fields", select_fields) if f not in meta.fields]
        if unknown:
            raise NotFoundError(f"fields {unknown} are not in this KVBatchMeta (fields: {meta.fields})")


async def _list(core: AsyncClient, partition_id: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    return await core.async_kv_list(partition_id)


async def _clear(core: AsyncClient, keys: Sequence[str] | str, partition_id: str) -> None:
    keys = _keys(keys)
    pid = args.name("partition_id", partition_id)
    if not keys:
        return
    meta = await core.async_kv_retrieve_meta(keys, pid, missing_ok=True)
    if meta.size:
        await core.async_clear_samples(meta)


# --------------------------------------------------------------------------- public twins


def _run(fn: Callable[[AsyncClient], Awaitable[R]]) -> R:
    return get_client().run(fn)


async def _arun(fn: Callable[[AsyncClient], Awaitable[R]]) -> R:
    return await asyncio.wrap_future(get_client().submit(fn))


def kv_put(
    key: str,
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tag: Mapping[str, Any] | None = None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    """Put one row: ``fields`` holds one sample (tensors without a batch dim, or any plain value);
    ``tag`` is merged into the row's tags."""
    return _run(lambda c: _put(c, key, partition_id, fields, tag, data_parser))


async def async_kv_put(
    key: str,
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tag: Mapping[str, Any] | None = None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    """:func:`kv_put` for async code."""
    return await _arun(lambda c: _put(c, key, partition_id, fields, tag, data_parser))


def kv_batch_put(
    keys: Sequence[str],
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tags: Sequence[Mapping[str, Any]] | None = None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    """Create/update the rows named by ``keys``: write ``fields`` (a batch of ``len(keys)`` rows)
    and merge ``tags`` (one dict per key). All or nothing for new keys."""
    return _run(lambda c: _batch_put(c, keys, partition_id, fields, tags, data_parser))


async def async_kv_batch_put(
    keys: Sequence[str],
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tags: Sequence[Mapping[str, Any]] | None = None,
    data_parser: DataParser | None = None,
) -> KVBatchMeta:
    """:func:`kv_batch_put` for async code."""
    return await _arun(lambda c: _batch_put(c, keys, partition_id, fields, tags, data_parser))


def kv_batch_get(
    keys: Sequence[str] | str, partition_id: str, select_fields: Sequence[str] | str | None = None
) -> TensorDict:
    """Rows of ``keys`` in key order, with the columns they all have (or ``select_fields`` of them)."""
    return _run(lambda c: _batch_get(c, keys, partition_id, select_fields))


async def async_kv_batch_get(
    keys: Sequence[str] | str, partition_id: str, select_fields: Sequence[str] | str | None = None
) -> TensorDict:
    """:func:`kv_batch_get` for async code."""
    return await _arun(lambda c: _batch_get(c, keys, partition_id, select_fields))


def kv_batch_get_by_meta(meta: KVBatchMeta, select_fields: Sequence[str] | str | None = None) -> TensorDict:
    """The rows of a :class:`KVBatchMeta` (what ``kv_batch_put`` returned)."""
    meta = _check_kv_meta(meta)
    _check_selected(meta, select_fields)
    return kv_batch_get(meta.keys, meta.partition_id, select_fields)  # type: ignore[arg-type]


async def async_kv_batch_get_by_meta(
    meta: KVBatchMeta, select_fields: Sequence[str] | str | None = None
) -> TensorDict:
    """:func:`kv_batch_get_by_meta` for async code."""
    meta = _check_kv_meta(meta)
    _check_selected(meta, select_fields)
    return await async_kv_batch_get(meta.keys, meta.partition_id, select_fields)  # type: ignore[arg-type]


def kv_list(partition_id: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{partition_id: {key: tags}}`` for one partition or all of them."""
    return _run(lambda c: _list(c, partition_id))


async def async_kv_list(partition_id: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`kv_list` for async code."""
    return await _arun(lambda c: _list(c, partition_id))


def kv_clear(keys: Sequence[str] | str, partition_id: str) -> None:
    """Remove the rows of ``keys`` (idempotent: unknown keys and partitions are ignored)."""
    _run(lambda c: _clear(c, keys, partition_id))


async def async_kv_clear(keys: Sequence[str] | str, partition_id: str) -> None:
    """:func:`kv_clear` for async code."""
    await _arun(lambda c: _clear(c, keys, partition_id))
