"""The round ledger: what each data-parallel rank got for each batch index.

Ranks of one task ask for batch ``i`` independently and at different times, and several callers
(pipeline stages, tensor-parallel peers, a restarted worker) may ask for the same ``(dp_rank, i)``.
The first request for batch ``i`` cuts a whole :class:`Round` -- one disjoint slice per rank --
and the controller records it here under ``(partition_id, task_name)``; every later request for
``i`` is answered from the ledger. This gives TransferQueue's rank-aware caching for any sampler
(sequential, GRPO groups, seqlen-balanced) and keeps all ranks at the same number of batches.

**Retention rule:** rounds are kept until a key holds more than ``capacity_rounds`` of them; then
the lowest batch index goes first. A loader resuming further back than that gets
:class:`~tq_loader.errors.NotFoundError` from :meth:`RoundLedger.get` (see :meth:`is_evicted`)
instead of silently being served a fresh, different round. The ledger is not thread-safe: the
controller uses it from its one event loop.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tq_loader.errors import NotFoundError
from tq_loader.samplers.base import IndexLike, as_index_array, check_positive
from tq_loader.stats import RoundStats

__all__ = ["LedgerKey", "LedgerStatistics", "Round", "RoundLedger"]

LedgerKey = tuple[str, str]  # (partition_id, task_name)


@dataclass(frozen=True, eq=False)
class Round:
    """One round: ``per_rank[r]`` are the global indexes of rank ``r``'s batch (read-only arrays).

    ``end_of_stream`` marks the round cut after the partition was sealed and drained (it may be
    short, or empty when a tail too small for every rank was dropped): ranks reaching it stop.
    ``dp_size`` defaults to ``len(per_rank)`` and must equal it.
    """

    per_rank: tuple[np.ndarray, ...]
    end_of_stream: bool = False
    dp_size: int | None = None

    def __post_init__(self) -> None:
        arrays = []
        for part in self.per_rank:
            arr = np.array(as_index_array(part), dtype=np.int64)  # own copy: callers may mutate theirs
            arr.flags.writeable = False
            arrays.append(arr)
        if not arrays:
            raise ValueError("a round needs one per-rank list per data-parallel rank, got none")
        dp_size = len(arrays) if self.dp_size is None else check_positive("dp_size", self.dp_size)
        if dp_size != len(arrays):
            raise ValueError(
                f"a round for dp_size={dp_size} needs {dp_size} per-rank lists, got {len(arrays)}"
            )
        object.__setattr__(self, "per_rank", tuple(arrays))
        object.__setattr__(self, "dp_size", dp_size)
        object.__setattr__(self, "end_of_stream", bool(self.end_of_stream))

    @classmethod
    def from_lists(cls, per_rank: Sequence[IndexLike], *, end_of_stream: bool = False) -> Round:
        """A round from ``sample_round``'s per-rank lists."""
        return cls(tuple(np.asarray(p) for p in per_rank), end_of_stream=end_of_stream)

    @classmethod
    def empty(cls, dp_size: int, *, end_of_stream: bool = True) -> Round:
        """A round in which no rank gets rows (the dropped tail at the end of a stream)."""
        dp_size = check_positive("dp_size", dp_size)
        return cls(tuple(np.zeros(0, dtype=np.int64) for _ in range(dp_size)), end_of_stream=end_of_stream)

    def rank(self, dp_rank: int) -> np.ndarray:
        """Rank ``dp_rank``'s global indexes."""
        if isinstance(dp_rank, bool) or not 0 <= dp_rank < len(self.per_rank):
            raise ValueError(f"dp_rank {dp_rank!r} is outside this round's dp_size={self.dp_size}")
        return self.per_rank[dp_rank]

    @property
    def num_rows(self) -> int:
        return sum(len(p) for p in self.per_rank)

    @property
    def consumed(self) -> np.ndarray:
        """All global indexes of the round, rank after rank."""
        return np.concatenate(self.per_rank)

    def __repr__(self) -> str:
        sizes = [len(p) for p in self.per_rank]
        return f"Round(dp_size={self.dp_size}, rows_per_rank={sizes}, end_of_stream={self.end_of_stream})"


LedgerStatistics = RoundStats  # the snapshot of RoundLedger.statistics()


class RoundLedger:
    """Per ``(partition_id, task_name)``: batch index -> :class:`Round`, bounded per key."""

    def __init__(self, capacity_rounds: int = 4096) -> None:
        self.capacity_rounds = check_positive("capacity_rounds", capacity_rounds)
        self._rounds: dict[LedgerKey, dict[int, Round]] = {}
        self._heaps: dict[LedgerKey, list[int]] = {}  # min-heap of held batch indexes per key
        self._evicted_below: dict[LedgerKey, int] = {}
        self._puts = self._hits = self._misses = self._evictions = self._evicted_lookups = 0

    def get(self, key: LedgerKey, batch_index: int, dp_size: int | None = None) -> Round | None:
        """The round recorded for ``batch_index``, or ``None`` if none was cut yet.

        Raises :class:`NotFoundError` when the index was evicted (the caller resumed too far back)
        and ``ValueError`` when ``dp_size`` is given and differs from the round's.
        """
        batch_index = _check_index(batch_index)
        found = self._rounds.get(key, {}).get(batch_index)
        if found is None:
            if self.is_evicted(key, batch_index):
                self._evicted_lookups += 1
                raise NotFoundError(
                    f"batch_index {batch_index} of partition {key[0]!r} task {key[1]!r} is no longer "
                    f"recorded: the ledger keeps the last {self.capacity_rounds} rounds per task and has "
                    f"evicted every index below {self._evicted_below[key]}. Resume from a later batch "
                    "index, or raise capacity_rounds"
                )
            self._misses += 1
            return None
        if dp_size is not None and dp_size != found.dp_size:
            raise ValueError(
                f"batch_index {batch_index} of partition {key[0]!r} task {key[1]!r} was cut for "
                f"dp_size={found.dp_size} but this request says dp_size={dp_size}; every rank of a task "
                "must use the same dp_size"
            )
        self._hits += 1
        return found

    def put(self, key: LedgerKey, batch_index: int, round_: Round) -> None:
        """Record the round cut for ``batch_index``; rounds are immutable once recorded."""
        _check_key(key)
        batch_index = _check_index(batch_index)
        if not isinstance(round_, Round):
            raise TypeError(f"expected a Round, got {type(round_).__name__}")
        held = self._rounds.setdefault(key, {})
        if batch_index in held:
            raise ValueError(
                f"batch_index {batch_index} of partition {key[0]!r} task {key[1]!r} already has a round; "
                "get() it instead of cutting a new one"
            )
        if self.is_evicted(key, batch_index):
            raise ValueError(
                f"batch_index {batch_index} of partition {key[0]!r} task {key[1]!r} is below the eviction "
                f"watermark {self._evicted_below[key]}; it cannot be recorded again"
            )
        held[batch_index] = round_
        heap = self._heaps.setdefault(key, [])
        heapq.heappush(heap, batch_index)
        self._puts += 1
        while len(held) > self.capacity_rounds:
            oldest = heapq.heappop(heap)
            del held[oldest]
            self._evicted_below[key] = max(self._evicted_below.get(key, 0), oldest + 1)
            self._evictions += 1

    def is_evicted(self, key: LedgerKey, batch_index: int) -> bool:
        """Whether ``batch_index`` lies below what the ledger still holds for ``key``."""
        return batch_index < self._evicted_below.get(key, 0)

    def evicted_below(self, key: LedgerKey) -> int:
        """Every batch index below this was evicted for ``key`` (0 when nothing was)."""
        return self._evicted_below.get(key, 0)

    def batch_indexes(self, key: LedgerKey) -> list[int]:
        """Batch indexes held for ``key``, ascending."""
        return sorted(self._rounds.get(key, {}))

    def drop(self, key: LedgerKey) -> int:
        """Forget every round of ``key`` (and its eviction watermark); returns how many were held."""
        self._heaps.pop(key, None)
        self._evicted_below.pop(key, None)
        return len(self._rounds.pop(key, {}))

    def drop_partition(self, partition_id: str) -> int:
        """Forget every task's rounds of ``partition_id`` (cleared or deleted partition)."""
        keys = {k for k in (*self._rounds, *self._evicted_below) if k[0] == partition_id}
        return sum(self.drop(k) for k in keys)

    def __contains__(self, key: Any) -> bool:
        return bool(self._rounds.get(key))

    def __len__(self) -> int:
        return sum(len(r) for r in self._rounds.values())

    def statistics(self) -> LedgerStatistics:
        return LedgerStatistics(
            keys=sum(1 for r in self._rounds.values() if r),
            rounds=len(self),
            capacity_rounds=self.capacity_rounds,
            puts=self._puts,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            evicted_lookups=self._evicted_lookups,
        )


def _check_key(key: Any) -> None:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise ValueError(f"ledger key must be (partition_id, task_name) strings, got {key!r}")


def _check_index(batch_index: Any) -> int:
    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)) or batch_index < 0:
        raise ValueError(f"batch_index must be a non-negative integer, got {batch_index!r}")
    return int(batch_index)
