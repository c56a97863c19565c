"""``get_buffer()``: TransferQueue's list of the full batches a loader delivered since ``step()``.

TransferQueue keeps every fetched ``(TensorDict, BatchMeta)`` in memory until ``step()``, so memory
grows with the stream. :class:`BatchBuffer` keeps only the batches' metadata and reads a batch's data
from storage when it is accessed: the same ``(td, meta)`` pairs, flat memory. The difference that
shows: rows cleared from storage since they were delivered can no longer be read from the buffer
(reading them raises); keep the rows until you are done with the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

from tensordict import TensorDict

from tq_loader.metadata import BatchMeta

__all__ = ["BatchBuffer"]


class BatchBuffer(Sequence[tuple[TensorDict, BatchMeta]]):
    """A read-only sequence of ``(TensorDict, BatchMeta)`` full batches, oldest first."""

    def __init__(self, metas: list[BatchMeta], load: Callable[[BatchMeta], TensorDict]) -> None:
        self.metas = metas
        self._load = load

    def __len__(self) -> int:
        return len(self.metas)

    @overload
    def __getitem__(self, index: int) -> tuple[TensorDict, BatchMeta]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[TensorDict, BatchMeta]]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [(self._load(m), m) for m in self.metas[index]]
        meta = self.metas[index]
        return self._load(meta), meta

    def __repr__(self) -> str:
        return f"BatchBuffer({len(self.metas)} batches, {sum(m.size for m in self.metas)} rows)"
