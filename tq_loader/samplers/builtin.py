"""Built-in samplers: sequential, whole-group (GRPO) and rank-aware.

Served by the controller they are stateless: what a rank saw for a given batch index is remembered
by the controller's :class:`~tq_loader.samplers.rounds.RoundLedger`, not by the sampler, so caching
composes with any sampler and checkpoints hold no sampler state. Called directly with ``dp_rank``
and ``batch_index`` (TransferQueue's way), ``RankAwareSampler`` caches each rank's batch in
``_states`` as TransferQueue's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tq_loader.errors import ArgumentError
from tq_loader.samplers.base import (
    BaseSampler,
    IndexLike,
    allow_partial,
    as_index_array,
    check_batch_size,
    check_positive,
    register_sampler,
)

__all__ = ["GRPOGroupNSampler", "RankAwareSampler", "SequentialSampler"]


@register_sampler("sequential")
@register_sampler("SequentialSampler")
class SequentialSampler(BaseSampler):
    """Up to ``batch_size`` ready rows in the order given; sampled == consumed.

    ``batch_size=0`` gives ``([], [])`` as in TransferQueue; a negative size raises (TransferQueue
    slices with it and returns every row but the last). Fewer ready rows than asked give what is
    ready, as in TransferQueue (``allow_partial=False`` asks for ``([], [])`` instead); the
    controller asks through :meth:`sample_batch`, which owns the "wait for ``batch_size`` rows" rule.
    """

    def ready_limit(self, rows: int, **sampling_config: Any) -> int | None:
        # the first ``rows`` ready rows are the batch -- unless a subclass samples differently
        return rows if type(self).sample is SequentialSampler.sample else None

    def sample(
        self, ready_indexes: IndexLike, batch_size: int, *args: Any, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        batch_size = check_batch_size(batch_size)
        ready = as_index_array(ready_indexes)
        if len(ready) < batch_size and sampling_config.get("allow_partial") is False:
            return [], []
        picked = ready[:batch_size].tolist()
        return picked, list(picked)


def _strict_first(ready_indexes: IndexLike, batch_size: int, cfg: Mapping[str, Any]) -> list[int]:
    """The first ``batch_size`` ready rows, or none while fewer are ready (unless allow_partial)."""
    ready = as_index_array(ready_indexes)
    if batch_size == 0 or (len(ready) < batch_size and not allow_partial(cfg)):
        return []
    return ready[:batch_size].tolist()


@register_sampler("rank_aware")
@register_sampler("RankAwareSampler")
class RankAwareSampler(SequentialSampler):
    """TransferQueue's rank-aware sampler: the same rows for every caller of one DP rank's batch.

    Called directly with ``dp_rank`` and ``batch_index`` (TransferQueue's positional order:
    ``ready, batch_size, dp_rank, batch_index, task_name, partition_id``) it serves the first
    ``batch_size`` ready rows -- none while fewer are ready -- and caches them in
    ``_states[partition_id][task_name][dp_rank][batch_index]``, so a second call (a TP/PP peer of the
    rank) gets the same rows; different ranks sample independently. The cache grows until
    :meth:`clear_cache`, as in TransferQueue.

    The controller never passes those arguments: it serves rank-aware requests from its bounded
    round ledger for *every* sampler, and here this class samples like a strict sequential sampler.
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
        if dp_rank is not None and (
            isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) or dp_rank < 0
        ):
            raise ArgumentError(f"dp_rank must be an integer greater than or equal to 0, got {dp_rank!r}")
        batch_size = check_batch_size(batch_size)
        if dp_rank is None or batch_index is None:
            picked = _strict_first(ready_indexes, batch_size, sampling_config)
            return picked, list(picked)
        cached = self._cached(partition_id, task_name, int(dp_rank), batch_index)
        if cached is not None:
            return list(cached), list(cached)
        picked = _strict_first(ready_indexes, batch_size, sampling_config)
        if picked:
            self._cache(partition_id, task_name, int(dp_rank), batch_index, list(picked))
        return picked, list(picked)


@register_sampler("grpo_group_n")
@register_sampler("GRPOGroupNSampler")
class GRPOGroupNSampler(BaseSampler):
    """Serves whole prompt groups of ``n_samples_per_prompt`` rows, never a part of one.

    GRPO normalises advantages over all responses of a prompt, so a group must be consumed by one
    batch (and, in rounds, by one rank). ``n`` comes from ``sampling_config["n_samples_per_prompt"]``
    when given, else from the constructor.

    **Which rows form a group**, first rule that applies:

    * ``sampling_config["group_ids"]``: an array aligned with ``ready_indexes``; rows with equal ids
      are one group, complete when ``n`` of them are ready (more than ``n`` is a ValueError).
      Groups are served in order of their first ready row. The controller always passes these
      (a prompt's ``n`` rows are the ones inserted together), so a run of ready indexes that
      straddles two prompts is never mistaken for a group in a served stream.
    * ``sampling_config["group_base"]``: the *aligned-block rule*: group ``g`` is exactly the
      indexes ``group_base + g*n .. group_base + g*n + n - 1``, complete when all are ready.
    * otherwise TransferQueue's rule, for direct calls: the ready indexes are sorted and every run
      of consecutive indexes is cut into groups of ``n`` from its start
      (``[3, 4, 5, 6, 9, 10, 11, 12]`` with ``n=4`` is two groups).

    Incomplete groups are skipped (served later, once complete). ``batch_size`` must be a multiple
    of ``n``; ``batch_size=0`` gives ``([], [])``. With ``allow_partial`` the complete groups
    available (fewer than asked) are served.
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
        if check_batch_size(batch_size) == 0:
            return [], []
        ready = as_index_array(ready_indexes)
        picked = ready[self._select_positions(ready, batch_size, sampling_config)].tolist()
        return picked, list(picked)

    def _whole_groups(self, batch_size: int, sampling_config: Mapping[str, Any], what: str) -> int:
        """The group size ``n``, after checking that ``batch_size`` holds whole groups."""
        batch_size = check_positive(what, batch_size)
        n = self._group_size(sampling_config)
        if batch_size % n:
            raise ArgumentError(
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
        if group_ids is not None:
            positions, found = _labelled_group_positions(ready, np.asarray(group_ids), n, wanted)
        else:
            base = sampling_config.get("group_base")
            order = None
            if len(ready) > 1 and bool((ready[1:] < ready[:-1]).any()):  # direct calls may pass any order
                order = np.argsort(ready, kind="stable")
            ordered = ready if order is None else ready[order]
            starts = _first_group_starts(ordered, n, None if base is None else int(base), wanted)
            found = len(starts)
            positions = (starts[:wanted, None] + np.arange(n)).ravel()
            if order is not None:
                positions = order[positions]
        if found < wanted and not allow_partial(sampling_config):
            return np.zeros(0, dtype=np.int64)
        return positions


def _first_group_starts(ready: np.ndarray, n: int, base: int | None, wanted: int) -> np.ndarray:
    """Starts of at least ``wanted`` complete groups if there are that many, else of all of them.

    Scans a doubling prefix of ascending ``ready`` so a large backlog of ready rows costs O(batch),
    not O(backlog): a group cut by the prefix end only looks incomplete, and it is the last one.
    ``base`` None: runs of consecutive indexes cut into groups of ``n``; else aligned blocks.
    """
    window = max(wanted * n, 1)
    while True:
        head = ready[:window]
        starts = _run_group_starts(head, n) if base is None else _aligned_group_starts(head, n, base)
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


def _run_group_starts(ready: np.ndarray, n: int) -> np.ndarray:
    """Positions starting a group of ``n`` consecutive indexes: each run cut from its start."""
    if len(ready) < n:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ready) != 1) + 1
    run_start = np.concatenate(([0], breaks))
    per_run = np.diff(np.concatenate((run_start, [len(ready)]))) // n
    first_of_run = np.repeat(np.cumsum(per_run) - per_run, per_run)
    return np.repeat(run_start, per_run) + (np.arange(per_run.sum()) - first_of_run) * n


def _labelled_group_positions(
    ready: np.ndarray, group_ids: np.ndarray, n: int, wanted: int
) -> tuple[np.ndarray, int]:
    """Positions of the first ``wanted`` complete labelled groups and how many are complete."""
    if group_ids.shape != ready.shape:
        raise ArgumentError(
            f"group_ids must align with ready_indexes: got shape {group_ids.shape}, expected {ready.shape}"
        )
    if len(ready) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, first_pos, inverse, counts = np.unique(
        group_ids, return_index=True, return_inverse=True, return_counts=True
    )
    if counts.max() > n:
        bad = int(np.argmax(counts > n))
        raise ArgumentError(
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
