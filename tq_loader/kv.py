"""Redis-style KV API over the cluster (TransferQueue 0.1.11 semantics), sync and ``async_`` twins.

A key names one row of a partition. ``kv_batch_put`` creates rows for new keys, merges tags into
the row's custom meta (``dict.update``: old tag keys survive) and writes the given columns (other
columns of existing rows stay: partial updates). ``kv_batch_get`` returns rows in key order with
the columns every requested key has. Where TransferQueue drops unknown keys silently, this raises
:class:`~tq_loader.errors.NotFoundError` (a ``KeyError`` and ``ValueError``) naming them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from tq_loader.api import get_client
from tq_loader.errors import NotFoundError, SchemaError, TQError
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


def _as_keys(keys: Sequence[str] | str) -> list[str]:
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError("KV keys must be strings")
    return keys


def _one_row(fields: TensorDict | Mapping[str, Any]) -> TensorDict:
    """A single sample (no batch dim) or a batch of one, as a TensorDict of batch size [1]."""
    if isinstance(fields, TensorDict):
        return fields if fields.batch_size == torch.Size([1]) else fields.unsqueeze(0)
    if not isinstance(fields, Mapping):
        raise ValueError(f"kv_put fields must be a dict or TensorDict, not {type(fields).__name__}")
    columns: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            if value.is_nested:
                raise ValueError(f"kv_put field {name!r} is a nested tensor; use kv_batch_put for batches")
            columns[name] = value.unsqueeze(0)
        elif isinstance(value, (NonTensorData, NonTensorStack)):
            columns[name] = NonTensorStack(value) if isinstance(value, NonTensorData) else value
        else:
            columns[name] = NonTensorStack(NonTensorData(value))
    return TensorDict(columns, batch_size=[1])


async def async_kv_batch_put(
    keys: Sequence[str],
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tags: Sequence[Mapping[str, Any]] | None = None,
) -> KVBatchMeta:
    """Create/update the rows named by ``keys``: write ``fields`` (batch of len(keys)) and merge ``tags``.

    All or nothing for new keys: if the write is refused (schema conflict, full storage, ...), the
    rows this call created are removed again, so a failed put leaves no empty keys behind. Fields
    are written before tags, so a refused write does not merge its tags either.
    """
    keys = _as_keys(keys)
    if fields is None and tags is None:
        raise ValueError("kv_batch_put needs fields, tags or both; got neither")
    duplicated = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if duplicated:
        raise ValueError(f"kv_batch_put got duplicate keys {duplicated[:5]}; give each key once")
    if tags is not None:
        tags = _check_tags(tags, len(keys))
    if fields is not None:
        n = fields.batch_size[0] if isinstance(fields, TensorDict) and fields.batch_dims else None
        n = n if n is not None else _length(fields)
        if n != len(keys):
            raise ValueError(f"kv_batch_put got {n} rows of fields for {len(keys)} keys")
    client = get_client()
    meta, created = await client.async_kv_lookup(keys, partition_id, create=True)
    old_fields = set(meta.field_names)
    merged = [dict(old) for old in meta.get_all_custom_meta()]
    try:
        if fields is not None:
            await client.async_put(fields, meta)
            old_fields |= set(fields.keys())
        if tags is not None:
            for row, new in zip(merged, tags):
                row.update(new)
            meta.update_custom_meta(tags)
            await client.async_set_custom_meta(meta)
    except Exception:
        if created.any():  # undo the rows this call created; the original error is the one to see
            with contextlib.suppress(TQError):
                await client.async_clear_samples(meta.select_samples(np.flatnonzero(created)))
        raise
    return KVBatchMeta(keys=keys, tags=merged, partition_id=partition_id, fields=sorted(old_fields))


def _check_tags(tags: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """One dict of plain values (str keys) per key, checked before anything is written."""
    if isinstance(tags, Mapping) or len(tags) != n:
        got = "a single dict" if isinstance(tags, Mapping) else f"{len(tags)} tags"
        raise ValueError(f"kv_batch_put got {got} for {n} keys; give one tag dict per key")
    out = []
    for tag in tags:
        if not isinstance(tag, Mapping) or not all(isinstance(k, str) for k in tag):
            raise ValueError(f"a tag must be a dict with str keys, got {tag!r}")
        out.append(dict(tag))
    try:
        msgspec.msgpack.encode(out)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"tags must be plain values (numbers, str, bytes, lists, dicts): {exc}") from None
    return out


def _length(fields: Mapping[str, Any]) -> int:
    from tq_loader.codec import batch_length

    return batch_length(fields)


async def async_kv_put(
    key: str,
    partition_id: str,
    fields: TensorDict | Mapping[str, Any] | None = None,
    tag: Mapping[str, Any] | None = None,
) -> KVBatchMeta:
    """Put one row: ``fields`` holds one sample (tensors without a batch dim, or any plain value)."""
    if fields is None and tag is None:
        raise ValueError("kv_put needs fields, tag or both; got neither")
    row = None if fields is None else _one_row(fields)
    return await async_kv_batch_put([key], partition_id, row, None if tag is None else [tag])


async def async_kv_batch_get(
    keys: Sequence[str] | str, partition_id: str, select_fields: Sequence[str] | str | None = None
) -> TensorDict:
    """Rows of ``keys`` in key order, with the columns they all have (or ``select_fields`` of them)."""
    client = get_client()
    meta = await client.async_kv_retrieve_meta(_as_keys(keys), partition_id)
    fields = meta.field_names
    if select_fields is not None:
        wanted = [select_fields] if isinstance(select_fields, str) else list(select_fields)
        missing = [f for f in wanted if f not in fields]
        if missing:
            raise NotFoundError(
                f"fields {missing} are not present on every requested key of {partition_id!r} "
                f"(common fields: {fields}); put them first or select fewer"
            )
        fields = wanted
    if not fields:
        raise NotFoundError(
            f"the requested keys of {partition_id!r} have no field in common; put fields first"
        )
    return await client.async_get_data(meta.select_fields(fields))


async def async_kv_batch_get_by_meta(
    meta: KVBatchMeta, select_fields: Sequence[str] | str | None = None
) -> TensorDict:
    if meta.partition_id is None:
        raise ValueError("kv_batch_get_by_meta needs a KVBatchMeta with a partition_id")
    if select_fields is not None:
        wanted = [select_fields] if isinstance(select_fields, str) else list(select_fields)
        unknown = [f for f in wanted if f not in meta.fields]
        if unknown:
            raise NotFoundError(f"fields {unknown} are not in this KVBatchMeta (fields: {meta.fields})")
    return await async_kv_batch_get(meta.keys, meta.partition_id, select_fields)


async def async_kv_list(partition_id: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{partition_id: {key: tags}}`` for one partition or all of them."""
    return await get_client().async_kv_list(partition_id)


async def async_kv_clear(keys: Sequence[str] | str, partition_id: str) -> None:
    """Remove the rows of ``keys`` (idempotent: unknown keys and partitions are ignored)."""
    client = get_client()
    meta = await client.async_kv_retrieve_meta(_as_keys(keys), partition_id, missing_ok=True)
    if meta.size:
        await client.async_clear_samples(meta)


def _sync(fn: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        client = get_client()
        return client._thread().run(fn(*args, **kwargs))

    run.__name__ = fn.__name__.removeprefix("async_")
    run.__doc__ = fn.__doc__
    return run


kv_put = _sync(async_kv_put)
kv_batch_put = _sync(async_kv_batch_put)
kv_batch_get = _sync(async_kv_batch_get)
kv_batch_get_by_meta = _sync(async_kv_batch_get_by_meta)
kv_list = _sync(async_kv_list)
kv_clear = _sync(async_kv_clear)
