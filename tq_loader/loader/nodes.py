"""torchdata.nodes pieces of the streaming loader graph.

``BatchPlanner`` (metadata, one batch index after the other) -> ``ParallelMapper(load)`` (data,
``num_workers`` threads, in order) -> ``MicroBatches`` -> [user nodes] -> [PinMemory] ->
``Prefetcher`` -> ``Loader``.

Metadata is asked for strictly in batch-index order, on one thread: the controller cuts round
``i`` for the first caller of ``i``, so asking for ``i+1`` before ``i`` was answered could give the
later index the earlier rows -- or the last rows, leaving ``i`` an end-of-stream marker and the
rows of ``i+1`` undelivered. Data transfers (the bytes) run in parallel.

The loader's resume point is the position of the last *delivered* micro-batch: batches planned
or fetched ahead but not delivered are asked for again by batch index, and the controller's round
ledger hands out the very same rows (exactly once across a restart).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDict
from torchdata.nodes import BaseNode

from tq_loader.metadata import BatchMeta

__all__ = ["BatchPlanner", "FetchedBatch", "MicroBatches", "WorkerInit", "stop_threads"]


@dataclass
class FetchedBatch:
    """One batch of this rank: its metadata, and its data once loaded.

    ``end`` marks the end of the stream (the controller's end-of-stream meta, or an empty batch).
    """

    batch_index: int
    meta: BatchMeta
    td: TensorDict | None = None
    end: bool = False


class BatchPlanner(BaseNode[FetchedBatch]):
    """Plans batches ``start, start+1, ...`` one at a time; stops after the end-of-stream batch.

    ``plan(i)`` returns batch ``i`` (metadata, maybe data already). It runs on a single thread of
    the graph, so batch ``i`` is always requested after batch ``i-1`` was answered.
    """

    def __init__(self, plan: Callable[[int], FetchedBatch], start: int = 0) -> None:
        super().__init__()
        self.plan, self.start = plan, start
        self._next, self._ended = start, False

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:
            self._next, self._ended = self.start, False
        else:
            self._next, self._ended = int(initial_state["next"]), bool(initial_state["ended"])

    def next(self) -> FetchedBatch:
        if self._ended:
            raise StopIteration
        batch = self.plan(self._next)
        self._next += 1
        self._ended = batch.end
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "ended": self._ended}


class MicroBatches(BaseNode[tuple[TensorDict, BatchMeta]]):
    """Splits fetched batches into micro-batches; stops at the end-of-stream batch.

    ``skip`` micro-batches of the first batch are dropped: they were delivered before a restart.
    ``on_end`` is called with the end-of-stream meta (the loader's statistics use it).
    """

    def __init__(
        self,
        source: BaseNode[FetchedBatch],
        split: Callable[[TensorDict, BatchMeta, int], list[tuple[TensorDict, BatchMeta]]],
        skip: int = 0,
        on_end: Callable[[FetchedBatch], None] | None = None,
    ) -> None:
        super().__init__()
        self.source, self.split, self.skip, self.on_end = source, split, skip, on_end
        self._pending: list[tuple[TensorDict, BatchMeta]] = []
        self._to_skip = skip
        self._ended = False
        self._batch_state: dict[str, Any] | None = None  # the source's state before the current batch
        self._split_total = 0

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(None if initial_state is None else initial_state["source"])
        self._pending, self._ended = [], False
        self._to_skip = self.skip if initial_state is None else int(initial_state.get("skip", 0))

    def next(self) -> tuple[TensorDict, BatchMeta]:
        while not self._pending:
            if self._ended:
                raise StopIteration
            before = self.source.state_dict()
            batch: FetchedBatch = next(self.source)
            if batch.end or batch.td is None or batch.meta.size == 0:
                self._ended = True
                if self.on_end is not None:
                    self.on_end(batch)
                raise StopIteration
            parts = self.split(batch.td, batch.meta, batch.batch_index)
            self._pending = parts[self._to_skip :]
            self._to_skip = 0
            self._batch_state, self._split_total = before, len(parts)
        return self._pending.pop(0)

    def get_state(self) -> dict[str, Any]:
        """Exact: with micro-batches of a batch still pending, the state is "that batch again, minus
        the micro-batches already handed out" -- nothing fetched is lost across a save and load."""
        if self._pending:
            return {"source": self._batch_state, "skip": self._split_total - len(self._pending)}
        return {"source": self.source.state_dict(), "skip": self._to_skip}


class WorkerInit:
    """Runs ``worker_init_fn(worker_id)`` on each worker thread before its first fetch.

    Ids ``0 .. num_workers-1`` per iteration; with ``persistent_workers`` each id only once per
    loader (torch's persistent worker processes are initialised once).
    """

    def __init__(self, fn: Callable[[int], None] | None, persistent: bool) -> None:
        self.fn, self.persistent = fn, persistent
        self._local = threading.local()
        self._ids = itertools.count()
        self._initialised: set[int] = set()
        self._generation = 0

    def new_iteration(self) -> None:
        self._ids = itertools.count()
        self._generation += 1

    def __call__(self) -> None:
        if self.fn is None or getattr(self._local, "generation", None) == self._generation:
            return
        self._local.generation = self._generation
        worker_id = next(self._ids)
        if self.persistent and worker_id in self._initialised:
            return
        self._initialised.add(worker_id)
        self.fn(worker_id)


def stop_threads(root: BaseNode) -> None:
    """Stop the threads of a graph now, innermost first.

    torchdata stops a node's threads only when the node is garbage-collected -- possibly on one
    of those very threads ("cannot join current thread") or much later. Its iterators expose a
    ``_shutdown()`` (torchdata 0.11); nodes without one are left to the garbage collector.
    """
    found: list[Any] = []
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        stack.extend(getattr(obj, name, None) for name in ("source", "_it"))
    for obj in reversed(found):  # a node's inner nodes were found after it
        shutdown = getattr(obj, "_shutdown", None)
        if callable(shutdown):
            shutdown()
