"""``len(StreamingDataLoader)``: this rank's micro-batches over a sealed partition of known size.

A stream has no length until it ends, so ``len()`` raises ``TypeError`` (as ``len()`` of a torch
DataLoader over an ``IterableDataset`` without ``__len__`` does) unless the total is known:

* the partition is sealed and no row of it was cleared (``rows`` is final);
* ``dp_size`` is given (rounds: every rank gets the same number of batches);
* the default ``fetch_batch_fn`` / ``process_batch_fn`` and a sampler that fills every batch with
  ``batch_size`` rows (sequential, rank-aware, GRPO groups).

Then, with ``R = batch_size x dp_size``: ``rows // R`` full batches of ``ceil(batch_size /
micro_batch_size)`` micro-batches each, from ``start_batch_index`` on; with ``drop_last=False`` the
tail of ``rows % R`` rows is split over the ranks in whole groups (earlier ranks get the extra
group; a tail with fewer groups than ranks is dropped) and adds ``ceil(tail rows / micro)``.
"""

from __future__ import annotations

import math
from typing import Any

from tq_loader.loader.waiting import partition_info

__all__ = ["stream_length"]

_UNIT_ONE = {"sequential", "SequentialSampler", "rank_aware", "RankAwareSampler"}
_GROUPED = {"grpo_group_n", "GRPOGroupNSampler"}


def stream_length(dataset: Any, client: Any) -> int:
    """Micro-batches this rank gets from the whole stream (``TypeError`` when it is not known)."""
    why = _unknown_because(dataset)
    if why:
        raise TypeError(f"len(StreamingDataLoader) is unknown: {why}")
    unit = _round_unit(dataset, client)
    info = partition_info(client, dataset.partition_id)
    if info is None:
        raise TypeError(
            f"len(StreamingDataLoader) is unknown: partition {dataset.partition_id!r} does not exist yet"
        )
    if not info.get("sealed"):
        raise TypeError(
            f"len(StreamingDataLoader) is unknown: partition {dataset.partition_id!r} is not sealed, so more "
            "rows may come (it is known once the producer calls seal())"
        )
    if info.get("rows_cleared"):
        raise TypeError(
            f"len(StreamingDataLoader) is unknown: {info['rows_cleared']} rows of partition "
            f"{dataset.partition_id!r} were cleared, so its total is not known any more"
        )
    return micro_batches(int(info["rows_live"]), dataset, unit)


def micro_batches(rows: int, dataset: Any, unit: int) -> int:
    """The count for ``rows`` rows in the partition (see the module docstring)."""
    batch, dp, micro = dataset.batch_size, dataset.dp_size, dataset.micro_batch_size
    full = rows // (batch * dp)
    count = max(0, full - dataset.start_batch_index) * math.ceil(batch / micro)
    tail_groups = (rows - full * batch * dp) // unit
    if dataset.drop_last or tail_groups < dp or dataset.start_batch_index > full:
        return count
    base, extra = divmod(tail_groups, dp)
    mine = (base + (1 if dataset.dp_rank < extra else 0)) * unit
    return count + math.ceil(mine / micro)


def _unknown_because(dataset: Any) -> str:
    if dataset.dp_size is None:
        return "dp_size was not given, so ranks take batches first come, first served; pass dp_size"
    if not dataset.uses_default_fetch:
        return "a custom fetch_batch_fn decides the batches"
    from tq_loader.loader.batching import chunk_batch_fn

    if dataset.process_batch_fn is not chunk_batch_fn:
        return "a custom process_batch_fn decides the micro-batches"
    return ""


def _round_unit(dataset: Any, client: Any) -> int:
    name = dataset.sampler
    kwargs: dict[str, Any] = {}
    if name is None:
        controller = client.describe().config.get("controller", {})
        name, kwargs = controller.get("sampler", "sequential"), dict(controller.get("sampler_kwargs") or {})
    if name in _UNIT_ONE:
        return 1
    if name in _GROUPED:
        n = dataset.sampling_config.get("n_samples_per_prompt", kwargs.get("n_samples_per_prompt"))
        if n:
            return int(n)
    raise TypeError(
        f"len(StreamingDataLoader) is unknown: sampler {name!r} may fill batches with other numbers of rows"
    )
