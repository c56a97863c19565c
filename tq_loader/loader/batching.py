"""Fetching one batch and cutting it into micro-batches (the defaults of ``StreamingDataset``).

Both functions keep TransferQueue's keyword names, so a user's ``fetch_batch_fn`` /
``process_batch_fn`` written for TransferQueue plugs in unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tensordict import TensorDict

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
    return tq_client.get_data(meta, device=options.get("device")), meta


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
    td: TensorDict, batch_meta: BatchMeta, micro_batch_size: int = 1, **_: Any
) -> Iterator[tuple[TensorDict, BatchMeta]]:
    """Consecutive micro-batches of ``micro_batch_size`` rows (the last may be shorter).

    Data and metadata are cut at the same row boundaries (TransferQueue cuts them differently
    when the batch is not a multiple of the micro-batch size).
    """
    n = batch_meta.size
    for start in range(0, n, micro_batch_size):
        stop = min(start + micro_batch_size, n)
        yield td[start:stop], batch_meta[start:stop]
