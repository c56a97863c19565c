"""How a dataset's data-parallel rank maps onto the controller's rounds.

Two modes, chosen by whether ``dp_size`` is given:

* **Rounds** (``dp_size=N``, recommended): batch ``i`` of every rank is one round cut for ``N``
  ranks at once (``controller/service.py``): disjoint rows, the same number of batches on every
  rank, an exact ``len(loader)`` for a sealed partition.
* **Independent** (``dp_size`` not given -- TransferQueue's ``StreamingDataset(..., dp_rank=r)``):
  each data-parallel rank takes its batches first come, first served, as TransferQueue's
  ``RankAwareSampler`` does. Ranks with the same ``dp_rank`` (tensor/pipeline-parallel peers, a
  resumed loader) still get identical batches; different ranks get disjoint rows, but they may
  end with different numbers of batches. The dataset asks the controller for a one-rank round
  under a per-rank ledger index ``i * RANK_STRIDE + dp_rank`` (interleaved by ``i``, so the
  ledger's lowest-index-first retention keeps every rank's recent rounds). A process that can see
  several ranks exist (``dp_rank > 0``, or a ``torch.distributed`` world larger than one) warns
  once that it should pass ``dp_size``: TransferQueue has no such argument, so nothing else can
  tell the loader how many ranks there are.
"""

from __future__ import annotations

from dataclasses import dataclass

from tq_loader._meta_util import warn_once
from tq_loader.errors import ArgumentError

__all__ = ["RANK_STRIDE", "RankLayout", "resolve_ranks"]

RANK_STRIDE = 1 << 20  # independent mode: at most this many data-parallel ranks


@dataclass(frozen=True)
class RankLayout:
    """One dataset's data-parallel position; ``dp_size`` is None in independent mode."""

    dp_rank: int
    dp_size: int | None

    @property
    def independent(self) -> bool:
        return self.dp_size is None

    def ledger_index(self, batch_index: int) -> int:
        """The controller's batch index for this rank's batch ``batch_index``."""
        if self.dp_size is None:
            return batch_index * RANK_STRIDE + self.dp_rank
        return batch_index

    def request(self) -> dict[str, int]:
        """``dp_rank`` / ``dp_size`` as sent to the controller."""
        if self.dp_size is None:
            return {"dp_rank": 0, "dp_size": 1}
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size}


def resolve_ranks(dp_rank: int, dp_size: int | None) -> RankLayout:
    """Check ``dp_rank``/``dp_size``; without ``dp_size`` choose independent mode (see module doc)."""
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or dp_rank < 0:
        raise ArgumentError(f"dp_rank must be a non-negative int, got {dp_rank!r}")
    if dp_size is not None:
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ArgumentError(f"dp_size must be a positive int, got {dp_size!r}")
        if dp_rank >= dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        return RankLayout(dp_rank, dp_size)
    if dp_rank >= RANK_STRIDE:
        raise ValueError(f"dp_rank {dp_rank} without dp_size must be below {RANK_STRIDE}; pass dp_size")
    world = _distributed_world_size()
    if dp_rank > 0 or world > 1:
        hint = f" (torch.distributed world_size is {world})" if world > 1 else ""
        warn_once(
            ("StreamingDataset", "no dp_size"),
            f"StreamingDataset(dp_rank={dp_rank}) without dp_size{hint}: data-parallel ranks take batches "
            "first come, first served, as in TransferQueue -- ranks may end with different numbers of "
            "batches and len(loader) is unknown. Pass dp_size=<number of data-parallel groups> (e.g. "
            "world_size // tensor-parallel size) so the controller cuts equal rounds for every rank.",
            stacklevel=4,
        )
    return RankLayout(dp_rank, None)


def _distributed_world_size() -> int:
    """``torch.distributed``'s world size if a default process group is initialised, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1
