"""Sequence-length balanced rounds: equal rows per rank, near-equal tokens per rank.

A data-parallel step is as slow as its slowest rank, and a rank's cost grows with the tokens it
holds, not the rows. :class:`SeqlenBalancedSampler` therefore picks a round of whole prompt groups
(as :class:`~tq_loader.samplers.builtin.GRPOGroupNSampler` does) and assigns the groups to ranks so
that the per-rank token sums are close, while every rank gets the same number of groups (ranks
must run the same number of micro-batches).

**Partitioning algorithm** (:func:`karmarkar_karp`): the largest differencing method of
Karmarkar and Karp generalised to k sets, with the equal-cardinality variant. Items are sorted by
weight (descending) and cut into blocks of k; each block is a partial solution of k one-item sets.
Repeatedly the two partial solutions with the largest spread (max set sum - min set sum) are
merged by pairing the heaviest set of one with the lightest set of the other, which cancels their
differences. Every merge adds one item per set per block, so cardinalities stay equal. It was
chosen over greedy LPT + local swaps because it is deterministic, needs no tuning or iteration
budget, and is the balancing rule verl/TransferQueue users already know. When the item
count is not a multiple of k, zero-weight dummies fill the last block and are removed at the end,
so set sizes then differ by at most one.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tq_loader.errors import ArgumentError
from tq_loader.samplers.base import (
    IndexLike,
    as_index_array,
    check_batch_size,
    check_positive,
    register_sampler,
    split_even,
)
from tq_loader.samplers.builtin import GRPOGroupNSampler

__all__ = [
    "PartitionCountError",
    "SeqlenBalancedSampler",
    "get_seqlen_balanced_partitions",
    "karmarkar_karp",
]

_DIRECT_KEYS = ("dp_rank", "batch_index", "partition")


class PartitionCountError(ArgumentError, AssertionError):
    """Items cannot be split into the requested partitions (also an ``AssertionError``, as in
    TransferQueue, whose helper asserts)."""


def karmarkar_karp(
    weights: Sequence[float] | np.ndarray, k: int, *, equal_size: bool = True
) -> list[np.ndarray]:
    """Split item positions ``0..len(weights)-1`` into ``k`` sets with near-equal weight sums.

    With ``equal_size`` every set gets the same number of items (at most one more when ``k`` does
    not divide the count). Returns ``k`` ascending int64 arrays, heaviest set first.
    """
    k = check_positive("k", k)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) and (not np.all(np.isfinite(w)) or w.min() < 0):
        raise ArgumentError("weights (sequence lengths) must be finite and non-negative")
    m = len(w)
    if k == 1:
        return [np.arange(m, dtype=np.int64)]
    heap: list[tuple[float, int, np.ndarray, list[list[int]]]] = []
    if equal_size:
        padded = np.concatenate((w, np.zeros((-m) % k)))
        # Descending weight, ties by position: the dummies (positions >= m, weight 0) come last,
        # so they all land in the final block and hence in distinct sets.
        order = np.lexsort((np.arange(len(padded)), -padded)).reshape(-1, k)
        for seq, block in enumerate(order):
            sums = padded[block]
            heap.append((-(sums[0] - sums[-1]), seq, sums, [[int(i)] for i in block]))
    else:
        for seq, i in enumerate(np.argsort(-w, kind="stable")):
            sums = np.zeros(k)
            sums[0] = w[i]
            heap.append((-w[i], seq, sums, [[int(i)]] + [[] for _ in range(k - 1)]))
    if not heap:
        return [np.zeros(0, dtype=np.int64) for _ in range(k)]
    heapq.heapify(heap)
    seq = len(heap)
    while len(heap) > 1:
        _, _, sums_a, sets_a = heapq.heappop(heap)
        _, _, sums_b, sets_b = heapq.heappop(heap)
        sums = sums_a + sums_b[::-1]  # heaviest of one with lightest of the other
        merged = [sets_a[i] + sets_b[k - 1 - i] for i in range(k)]
        perm = np.argsort(-sums, kind="stable")
        sums = sums[perm]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), seq, sums, [merged[p] for p in perm]))
        seq += 1
    _, _, _, sets = heap[0]
    out = []
    for members in sets:
        arr = np.asarray(members, dtype=np.int64)
        out.append(np.sort(arr[arr < m]))
    return out


def get_seqlen_balanced_partitions(
    seqlen_list: Sequence[int], k_partitions: int, equal_size: bool
) -> list[list[int]]:
    """TransferQueue/verl-compatible wrapper: ``k_partitions`` ascending lists of item positions.

    As there, every partition must get an item and ``equal_size`` needs a count divisible by
    ``k_partitions`` (:class:`PartitionCountError`, also an ``AssertionError``, otherwise);
    :func:`karmarkar_karp` itself pads uneven counts instead.
    """
    k = check_positive("k_partitions", k_partitions)
    if len(seqlen_list) < k:
        raise PartitionCountError(
            f"cannot split {len(seqlen_list)} items into {k} non-empty partitions; pass at least {k} items"
        )
    if equal_size and len(seqlen_list) % k:
        raise PartitionCountError(
            f"equal_size needs the {len(seqlen_list)} items to divide into {k} partitions; pass a multiple "
            f"of {k} items, or equal_size=False (or karmarkar_karp, which pads to near-equal sizes)"
        )
    return [p.tolist() for p in karmarkar_karp(seqlen_list, k, equal_size=equal_size)]


@register_sampler("seqlen_balanced")
@register_sampler("SeqlenBalancedSampler")
class SeqlenBalancedSampler(GRPOGroupNSampler):
    """Whole-group rounds whose groups are spread over ranks to balance token counts.

    :meth:`sample_round` takes the first ``batch_size * dp_size`` rows of complete groups (same
    rule as GRPOGroupNSampler; ``batch_size`` is per rank, as in TransferQueue) and balances the
    groups' summed ``sampling_config["seqlens"]`` (an array aligned with ``ready_indexes``) with
    :func:`karmarkar_karp`; each rank gets the same number of groups. Without ``seqlens`` it falls
    back to a contiguous split. ``dp_size`` of the request wins; the constructor's ``dp_size`` is
    kept for TransferQueue compatibility and as a default for callers that have none.

    :meth:`sample` without ``dp_rank``/``batch_index`` (the controller's plain request) behaves as
    GRPOGroupNSampler. With them (TransferQueue's direct call: ``sample(ready, per_rank_batch,
    task_name, partition_id, dp_rank=r, batch_index=i, partition=p)``) the first call cuts the
    round for the constructor's ``dp_size`` -- lengths from ``seqlens`` or from
    ``partition.get_custom_meta(indexes)[i]["total_lengths"]`` -- caches every rank's share in
    ``_states`` / ``_balanced_cache`` and returns rank ``r``'s (``([], [])`` for a rank outside
    ``dp_size`` or while too few complete groups are ready).
    """

    def __init__(self, n_samples_per_prompt: int = 1, dp_size: int = 1) -> None:
        super().__init__(n_samples_per_prompt)
        self.dp_size = check_positive("dp_size", dp_size)
        self._balanced_cache: dict[tuple[str, str, Any], list[list[int]]] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_samples_per_prompt={self.n_samples_per_prompt}, dp_size={self.dp_size})"
        )

    def sample(  # type: ignore[override]
        self,
        ready_indexes: IndexLike,
        batch_size: int,
        task_name: str = "",
        partition_id: str = "",
        *args: Any,
        **sampling_config: Any,
    ) -> tuple[list[int], list[int]]:
        if not any(k in sampling_config for k in ("dp_rank", "batch_index")):
            return super().sample(ready_indexes, batch_size, task_name, partition_id, **sampling_config)
        dp_rank = sampling_config.get("dp_rank", 0)
        key = (partition_id, task_name, sampling_config.get("batch_index", 0))
        if check_batch_size(batch_size) == 0:
            return [], []
        per_rank = self._balanced_cache.get(key)
        if per_rank is None:
            cfg = {k: v for k, v in sampling_config.items() if k not in _DIRECT_KEYS}
            ready = as_index_array(ready_indexes)
            if "seqlens" not in cfg and sampling_config.get("partition") is not None:
                cfg["seqlens"] = _partition_lengths(sampling_config["partition"], ready)
            per_rank, _ = self.sample_round(ready, batch_size, self.dp_size, **cfg)
            if not per_rank:
                return [], []
            self._balanced_cache[key] = per_rank
            for rank, share in enumerate(per_rank):
                self._cache(partition_id, task_name, rank, key[2], (list(share), list(share)))
        if not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < len(per_rank):
            return [], []
        return list(per_rank[dp_rank]), list(per_rank[dp_rank])

    def sample_round(
        self, ready_indexes: IndexLike, batch_size: int, dp_size: int, **sampling_config: Any
    ) -> tuple[list[list[int]], list[int]]:
        dp_size = check_positive("dp_size", dp_size)
        n = self._whole_groups(batch_size, sampling_config, "per-rank batch_size")
        ready = as_index_array(ready_indexes)
        positions = self._select_positions(ready, batch_size * dp_size, sampling_config)
        groups = len(positions) // n
        if groups < dp_size:  # nothing ready, or a tail too short to give every rank a group
            return [], []
        seqlens = sampling_config.get("seqlens")
        if seqlens is None:
            parts = split_even(positions, dp_size, n)
            assert parts is not None  # groups >= dp_size
        else:
            lens = np.asarray(seqlens)
            if lens.shape != ready.shape:
                raise ArgumentError(
                    f"seqlens must align with ready_indexes: got shape {lens.shape}, expected {ready.shape}"
                )
            group_tokens = lens[positions].reshape(groups, n).sum(axis=1)
            rank_groups = karmarkar_karp(group_tokens, dp_size, equal_size=True)
            rank_groups.sort(key=lambda g: int(g[0]))  # deterministic: rank 0 holds the first group
            parts = [positions[(g[:, None] * n + np.arange(n)).ravel()] for g in rank_groups]
        return [ready[p].tolist() for p in parts], ready[positions].tolist()

    def clear_cache(self, partition_id: str) -> None:
        """Forget the direct-call caches (``_states`` and ``_balanced_cache``) of ``partition_id``."""
        super().clear_cache(partition_id)
        for key in [k for k in self._balanced_cache if k[0] == partition_id]:
            del self._balanced_cache[key]

    def save_checkpoint(self) -> dict[str, Any]:
        return {**super().save_checkpoint(), "_balanced_cache": copy.deepcopy(self._balanced_cache)}

    def load_checkpoint(self, state: Mapping[str, Any]) -> None:
        super().load_checkpoint(state)
        self._balanced_cache = copy.deepcopy(dict(state.get("_balanced_cache", {})))


def _partition_lengths(partition: Any, ready: np.ndarray) -> np.ndarray:
    """Per-row ``total_lengths`` from a TransferQueue-style partition's ``get_custom_meta`` (1 if absent)."""
    getter = getattr(partition, "get_custom_meta", None)
    if not callable(getter):
        raise ArgumentError(
            f"partition must have get_custom_meta(indexes) -> {{index: {{'total_lengths': n}}}}, got "
            f"{type(partition).__name__}; or pass seqlens= aligned with ready_indexes"
        )
    meta = getter(ready.tolist())
    return np.asarray([int((meta.get(i) or {}).get("total_lengths", 1)) for i in ready.tolist()], np.int64)
