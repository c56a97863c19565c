"""Fetching one batch and cutting it into micro-batches (the defaults of ``StreamingDataset``).

Both functions keep TransferQueue's keyword names, so a user's ``fetch_batch_fn`` /
``process_batch_fn`` written for TransferQueue plugs in unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from tq_loader.metadata import BatchMeta

__all__ = ["chunk_batch_fn", "default_fetch_batch_fn", "meta_options", "meta_request"]


def default_fetch_batch_fn(
    tq_client: Any,
    data_fields: Sequence[str],
    batch_size: int,
    partition_id: str,
    task_name: str,
    sampling_config: Mapping[str, Any],
    batch_index: int,
    **options: Any,
) -> tuple[TensorDict | None, BatchMeta]:
    """``get_meta`` for ``batch_index`` (waits server-side), then ``get_data``; ``(None, meta)`` at the end."""
    meta = tq_client.get_meta(
        *meta_request(data_fields, batch_size, partition_id, task_name, sampling_config, batch_index),
        **meta_options(options),
    )
    if meta.size == 0:
        return None, meta
    return tq_client.get_data(meta, device=options.get("device"), copy=options.get("copy", True)), meta


def meta_request(
    data_fields: Sequence[str],
    batch_size: int,
    partition_id: str,
    task_name: str,
    sampling_config: Mapping[str, Any],
    batch_index: int,
) -> tuple[Any, ...]:
    """Positional ``get_meta`` arguments for batch ``batch_index`` (``batch_index`` rides in the config)."""
    return (
        data_fields,
        batch_size,
        partition_id,
        "fetch",
        task_name,
        {**sampling_config, "batch_index": batch_index},
    )


def meta_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword-only ``get_meta`` options of a dataset (timeout, tail handling, sampler)."""
    return {
        "timeout": options.get("timeout"),
        "allow_partial": options.get("allow_partial", False),
        "sampler": options.get("sampler"),
    }


def chunk_batch_fn(
    td: TensorDictBase, batch_meta: BatchMeta, micro_batch_size: int = 1, **_: Any
) -> list[tuple[TensorDictBase, BatchMeta]]:
    """Consecutive micro-batches of ``micro_batch_size`` rows (the last may be shorter), as a list.

    Data and metadata are cut at the same row boundaries (TransferQueue cuts them differently
    when the batch is not a multiple of the micro-batch size). Strided nested tensors -- columns
    ragged in more than one dim, which ``torch.nested`` cannot slice -- are unbound once and
    re-nested per micro-batch; jagged and dense columns are sliced directly (views).
    A ``micro_batch_size`` larger than the batch gives one micro-batch (TransferQueue raises).
    """
    if not isinstance(td, TensorDictBase):
        raise TypeError(f"chunk_batch_fn expects a TensorDict, got {type(td).__name__}")
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    if len(td.batch_size) == 0:
        raise ValueError("chunk_batch_fn needs a TensorDict with a batch dimension (batch_size=[n])")
    n = int(td.batch_size[0])
    if batch_meta.size != n:
        raise ValueError(f"the TensorDict has {n} rows but its BatchMeta {batch_meta.size}")
    strided = {
        key: value.unbind(0)
        for key, value in td.items(include_nested=True, leaves_only=True)
        if isinstance(value, torch.Tensor) and value.is_nested and value.layout == torch.strided
    }
    sliceable = td.exclude(*strided) if strided else td
    parts: list[tuple[TensorDictBase, BatchMeta]] = []
    for start in range(0, n, micro_batch_size):
        stop = min(start + micro_batch_size, n)
        part = sliceable[start:stop]
        for key, rows in strided.items():
            part.set(key, torch.nested.as_nested_tensor(list(rows[start:stop]), layout=torch.strided))
        parts.append((part, batch_meta[start:stop]))
    return parts
