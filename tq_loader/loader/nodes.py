"""torchdata.nodes pieces of the streaming loader graph.

``BatchIndices`` -> ``ParallelMapper(fetch)`` -> ``MicroBatches`` -> [user nodes] -> [PinMemory]
-> ``Prefetcher`` -> ``Loader``. Each node keeps an explicit state (``get_state``/``reset``), and
the loader's own resume point is the position of the last *delivered* micro-batch: batches that
were fetched ahead but not delivered are fetched again by batch index, and the controller's
round ledger hands out the very same rows (exactly once across a restart).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDict
from torchdata.nodes import BaseNode

from tq_loader.metadata import BatchMeta

__all__ = ["BatchIndices", "FetchedBatch", "MicroBatches"]


@dataclass
class FetchedBatch:
    """One fetched batch (``td is None``: the stream ended at this index)."""

    batch_index: int
    td: TensorDict | None
    meta: BatchMeta


class BatchIndices(BaseNode[int]):
    """``start, start+1, ...`` -- the batch indexes this rank will ask the controller for."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.start = start
        self._next = start

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self._next = self.start if initial_state is None else int(initial_state["next"])

    def next(self) -> int:
        index, self._next = self._next, self._next + 1
        return index

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next}


class MicroBatches(BaseNode[tuple[TensorDict, BatchMeta]]):
    """Splits fetched batches into micro-batches; stops at the first end-of-stream batch.

    ``skip`` micro-batches of the first batch are dropped: they were delivered before a restart.
    """

    def __init__(
        self,
        source: BaseNode[FetchedBatch],
        split: Callable[[TensorDict, BatchMeta, int], list[tuple[TensorDict, BatchMeta]]],
        skip: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.split, self.skip = source, split, skip
        self._pending: list[tuple[TensorDict, BatchMeta]] = []
        self._to_skip = skip
        self._ended = False

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(None if initial_state is None else initial_state["source"])
        self._pending, self._ended = [], False
        self._to_skip = self.skip if initial_state is None else int(initial_state.get("skip", 0))

    def next(self) -> tuple[TensorDict, BatchMeta]:
        while not self._pending:
            if self._ended:
                raise StopIteration
            batch: FetchedBatch = next(self.source)
            if batch.td is None or batch.meta.size == 0:
                self._ended = True
                raise StopIteration
            parts = self.split(batch.td, batch.meta, batch.batch_index)
            self._pending = parts[self._to_skip :]
            self._to_skip = 0
        return self._pending.pop(0)

    def get_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "skip": self._to_skip}
