"""Built-in samplers: sequential, whole-group (GRPO) and rank-aware.

All are stateless: what a rank saw for a given batch index is remembered by the controller's
:class:`~tq_loader.samplers.rounds.RoundLedger`, not by the sampler, so caching composes with any
sampler and checkpoints hold no sampler state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tq_loader.samplers.base import (
    BaseSampler,
    IndexLike,
    allow_partial,
    as_index_array,
    check_positive,
    register_sampler,
)

__all__ = ["GRPOGroupNSampler", "RankAwareSampler", "SequentialSampler"]


@register_sampler("sequential")
@register_sampler("SequentialSampler")
class SequentialSampler(BaseSampler):
    """The first ``batch_size`` ready rows in ascending index order; sampled == consumed."""

    def sample(
        self, ready_indexes: IndexLike, batch_size: int, *args: Any, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        batch_size = check_positive("batch_size", batch_size)
        ready = as_index_array(ready_indexes)
        if len(ready) < batch_size and not allow_partial(sampling_config):
            return [], []
        picked = ready[:batch_size].tolist()
        return picked, list(picked)


@register_sampler("rank_aware")
@register_sampler("RankAwareSampler")
class RankAwareSampler(SequentialSampler):
    """TransferQueue's rank-aware sampler, reduced to its sampling rule (sequential).

    In TransferQueue this sampler caches each ``(partition, task, dp_rank, batch_index)`` batch so
    that every caller of one data-parallel rank gets the same rows and different ranks get disjoint
    rows. Here the controller does that for *every* sampler through the round ledger whenever a
    request carries ``dp_rank`` and ``batch_index``; this class only keeps TransferQueue's
    signatures (extra arguments are accepted and ignored) so configurations naming it still work.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def sample(  # type: ignore[override]
        self,
        ready_indexes: IndexLike,
        batch_size: int,
        dp_rank: int | None = None,
        batch_index: int | None = None,
        task_name: str = "",
        partition_id: str = "",
        *args: Any,
        **sampling_config: Any,
    ) -> tuple[list[int], list[int]]:
        if dp_rank is not None and (isinstance(dp_rank, bool) or int(dp_rank) < 0):
            raise ValueError(f"dp_rank must be a non-negative integer, got {dp_rank!r}")
        return super().sample(ready_indexes, batch_size, **sampling_config)


@register_sampler("grpo_group_n")
@register_sampler("GRPOGroupNSampler")
class GRPOGroupNSampler(BaseSampler):
    """Serves whole prompt groups of ``n_samples_per_prompt`` rows, never a part of one.

    GRPO normalises advantages over all responses of a prompt, so a group must be consumed by one
    batch (and, in rounds, by one rank). ``n`` comes from ``sampling_config["n_samples_per_prompt"]``
    when given, else from the constructor.

    **Which rows form a group.** Either

    * ``sampling_config["group_ids"]``: an array aligned with ``ready_indexes``; rows with equal ids
      are one group, complete when ``n`` of them are ready (more than ``n`` is a ValueError).
      Groups are served in order of their first ready row. Use this when rows of a prompt are not
      stored contiguously or several producers share the index space.
    * otherwise the *aligned-block rule*: producers insert the ``n`` responses of a prompt as
      consecutive global indexes starting at ``group_base + g*n`` (``group_base`` from
      sampling_config, default 0), so group ``g`` is exactly the indexes
      ``group_base + g*n .. group_base + g*n + n - 1``, complete when all of them are ready.
      Unlike TransferQueue's sliding scan, a run of ``n`` consecutive ready indexes that straddles
      two prompts is never mistaken for a group.

    Incomplete groups are skipped (served later, once complete). ``batch_size`` must be a multiple
    of ``n``. With ``allow_partial`` the complete groups available (fewer than asked) are served.
    """

    def __init__(self, n_samples_per_prompt: int = 1) -> None:
        super().__init__()
        self.n_samples_per_prompt = check_positive("n_samples_per_prompt", n_samples_per_prompt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples_per_prompt={self.n_samples_per_prompt})"

    def round_unit(self, **sampling_config: Any) -> int:
        return self._group_size(sampling_config)

    def _group_size(self, sampling_config: Mapping[str, Any]) -> int:
        n = sampling_config.get("n_samples_per_prompt")
        return self.n_samples_per_prompt if n is None else check_positive("n_samples_per_prompt", n)

    def sample(  # type: ignore[override]
        self,
        ready_indexes: IndexLike,
        batch_size: int,
        task_name: str = "",
        partition_id: str = "",
        *args: Any,
        **sampling_config: Any,
    ) -> tuple[list[int], list[int]]:
        ready = as_index_array(ready_indexes)
        picked = ready[self._select_positions(ready, batch_size, sampling_config)].tolist()
        return picked, list(picked)

    def _whole_groups(self, batch_size: int, sampling_config: Mapping[str, Any], what: str) -> int:
        """The group size ``n``, after checking that ``batch_size`` holds whole groups."""
        batch_size = check_positive(what, batch_size)
        n = self._group_size(sampling_config)
        if batch_size % n:
            raise ValueError(
                f"{what} ({batch_size}) must be a multiple of n_samples_per_prompt ({n}) so batches "
                f"hold whole prompt groups; ask for k*{n} rows (e.g. {max(1, batch_size // n) * n})"
            )
        return n

    def _select_positions(
        self, ready: np.ndarray, batch_size: int, sampling_config: Mapping[str, Any]
    ) -> np.ndarray:
        """Positions into ``ready`` of the first complete groups, group after group (maybe empty)."""
        n = self._whole_groups(batch_size, sampling_config, "batch_size")
        wanted = batch_size // n
        group_ids = sampling_config.get("group_ids")
        if group_ids is None:
            starts = _first_aligned_group_starts(ready, n, int(sampling_config.get("group_base", 0)), wanted)
            found = len(starts)
            positions = (starts[:wanted, None] + np.arange(n)).ravel()
        else:
            positions, found = _labelled_group_positions(ready, np.asarray(group_ids), n, wanted)
        if found < wanted and not allow_partial(sampling_config):
            return np.zeros(0, dtype=np.int64)
        return positions


def _first_aligned_group_starts(ready: np.ndarray, n: int, base: int, wanted: int) -> np.ndarray:
    """Starts of at least ``wanted`` complete groups if there are that many, else of all of them.

    Scans a doubling prefix of ``ready`` so a large backlog of ready rows costs O(batch), not
    O(backlog): a group cut by the prefix end only looks incomplete, and it is the last one.
    """
    window = max(wanted * n, 1)
    while True:
        starts = _aligned_group_starts(ready[:window], n, base)
        if len(starts) >= wanted or window >= len(ready):
            return starts
        window *= 2


def _aligned_group_starts(ready: np.ndarray, n: int, base: int) -> np.ndarray:
    """Positions where a complete aligned block of ``n`` indexes starts in ascending ``ready``."""
    if len(ready) < n:
        return np.zeros(0, dtype=np.int64)
    gid = (ready - base) // n
    run_start = np.flatnonzero(np.concatenate(([True], gid[1:] != gid[:-1])))
    run_len = np.diff(np.concatenate((run_start, [len(ready)])))
    # Indexes are unique, so a run of the same block id holds at most n rows: n means complete.
    return run_start[run_len == n]


def _labelled_group_positions(
    ready: np.ndarray, group_ids: np.ndarray, n: int, wanted: int
) -> tuple[np.ndarray, int]:
    """Positions of the first ``wanted`` complete labelled groups and how many are complete."""
    if group_ids.shape != ready.shape:
        raise ValueError(
            f"group_ids must align with ready_indexes: got shape {group_ids.shape}, expected {ready.shape}"
        )
    if len(ready) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, first_pos, inverse, counts = np.unique(
        group_ids, return_index=True, return_inverse=True, return_counts=True
    )
    if counts.max() > n:
        bad = int(np.argmax(counts > n))
        raise ValueError(
            f"group id {group_ids[first_pos[bad] : first_pos[bad] + 1].tolist()[0]!r} has {counts[bad]} ready rows but "
            f"n_samples_per_prompt is {n}; fix group_ids or n_samples_per_prompt"
        )
    complete = np.flatnonzero(counts == n)
    chosen = complete[np.argsort(first_pos[complete], kind="stable")][:wanted]
    slot = np.full(len(counts), -1, dtype=np.int64)
    slot[chosen] = np.arange(len(chosen))
    row_slot = slot[inverse.reshape(-1)]
    rows = np.flatnonzero(row_slot >= 0)
    return rows[np.argsort(row_slot[rows], kind="stable")], len(complete)
