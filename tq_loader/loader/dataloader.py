"""``StreamingDataLoader``: a drop-in for ``torch.utils.data.DataLoader`` over a StreamingDataset.

Built as a torchdata.nodes graph (see ``nodes.py``): metadata, one batch index after the other ->
data fetched by ``num_workers`` threads (prefetching, in order) -> micro-batches -> user nodes ->
optional pin-memory -> prefetcher. ``for td, meta in loader`` yields ``(TensorDict, BatchMeta)``
micro-batches, as TransferQueue's. Leaving the loop (``break``), re-iterating or ``close()``
stops the graph's threads at once.

Resumable: ``state_dict()`` records the position after the last micro-batch handed to the user;
``load_state_dict()`` in a new process continues exactly there -- nothing lost, nothing repeated --
because batch ``i`` is a round in the controller's ledger and asking for it again returns the
same rows. Re-iterating or breaking early follows the same rule.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchdata.nodes import BaseNode, Loader, Mapper, ParallelMapper, PinMemory, Prefetcher

from tq_loader.errors import ClosedError
from tq_loader.loader.dataset import StreamingDataset
from tq_loader.loader.nodes import BatchPlanner, FetchedBatch, MicroBatches
from tq_loader.metadata import BatchMeta

__all__ = ["StreamingDataLoader"]

NodeBuilder = Callable[[BaseNode], BaseNode]


class StreamingDataLoader:
    """Iterates a :class:`StreamingDataset` with parallel prefetching and exactly-once resume."""

    def __init__(
        self,
        dataset: StreamingDataset,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        pin_memory_device: str = "",
        *,
        collate: str | None = None,
        nodes: Sequence[NodeBuilder] = (),
    ) -> None:
        if not isinstance(dataset, StreamingDataset):
            raise TypeError(f"StreamingDataLoader needs a StreamingDataset, got {type(dataset).__name__}")
        if num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = max(1, prefetch_factor or 1)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.pin_memory_device = pin_memory_device
        self.collate_fn = _resolve_collate(collate_fn, collate)
        self.node_builders = list(nodes)
        self._next_batch = dataset.start_batch_index
        self._skip_micro = 0
        self._loader: Loader | None = None
        self._calls: _MetaCalls | None = None
        self._end: FetchedBatch | None = None
        self._stats: dict[str, Any] = {
            "batches": 0, "micro_batches": 0, "rows": 0, "bytes": 0, "wait_s": 0.0, "iter_s": 0.0,
            "end_of_stream": False, "dropped_rows": 0,
        }  # fmt: skip

    # ------------------------------------------------------------------ graph
    def build_graph(self) -> BaseNode:
        """The node graph from the current resume point (override or pass ``nodes=`` to extend)."""
        return self._graph(_MetaCalls(self.dataset.client()))

    def _graph(self, calls: _MetaCalls) -> BaseNode:
        ds, client = self.dataset, calls.client

        def plan(batch_index: int) -> FetchedBatch:
            return ds.plan(client, batch_index, calls.get_meta)

        def load(batch: FetchedBatch) -> FetchedBatch:
            if batch.td is None and not batch.end:
                batch.td = ds.load(client, batch.meta)
            return batch

        source: BaseNode = BatchPlanner(plan, self._next_batch)
        if self.num_workers > 0:
            fetched: BaseNode = ParallelMapper(source, load, num_workers=self.num_workers, in_order=True)
        else:
            fetched = Mapper(source, load)
        node: BaseNode = MicroBatches(fetched, ds.split, skip=self._skip_micro, on_end=self._on_end)
        if self.collate_fn is not None:
            node = Mapper(node, self.collate_fn)
        for build in self.node_builders:
            node = build(node)
        if self.pin_memory:
            node = PinMemory(node, self.pin_memory_device)
        return Prefetcher(node, prefetch_factor=self.prefetch_factor)

    @property
    def nodes(self) -> BaseNode:
        """A fresh graph from the current position (for inspection or wrapping)."""
        return self.build_graph()

    def _on_end(self, batch: FetchedBatch) -> None:
        self._end = batch  # set on the graph's thread, read after the stream ended

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[TensorDict, BatchMeta]]:
        self.close()
        self._end = None
        self._calls = _MetaCalls(self.dataset.client())
        self._loader = Loader(self._graph(self._calls), restart_on_stop_iteration=False)
        return self._iterate(self._loader)

    def _iterate(self, loader: Loader) -> Iterator[tuple[TensorDict, BatchMeta]]:
        try:
            started = time.perf_counter()
            it = iter(loader)  # starts the graph's threads: counted as waiting
            self._stats["wait_s"] += time.perf_counter() - started
            while True:
                before = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self._finished()
                    return
                finally:
                    now = time.perf_counter()
                    self._stats["wait_s"] += now - before
                    self._stats["iter_s"] += now - started
                    started = now
                self._delivered(item)
                yield item
        finally:
            if self._loader is loader:  # an early break: stop fetching ahead (position is kept)
                self.close()

    def _finished(self) -> None:
        end = self._end
        if end is None or not end.meta.is_end_of_stream:
            return
        self._stats["end_of_stream"] = True
        dropped = end.meta.get_extra_info("dropped_rows")  # sent by the controller with end-of-stream
        if dropped is None:
            dropped = self.dataset.dropped_rows(self.dataset.client())
        self._stats["dropped_rows"] = int(dropped)

    def _delivered(self, item: Any) -> None:
        meta = _find_meta(item)
        info = meta.extra_info
        batch, micro, total = info["batch_index"], info["micro_index"], info["num_micro_batches"]
        if micro + 1 >= total:
            self._next_batch, self._skip_micro = batch + 1, 0
            self._stats["batches"] += 1
        else:
            self._next_batch, self._skip_micro = batch, micro + 1
        self._stats["micro_batches"] += 1
        self._stats["rows"] += meta.size
        td = item[0] if isinstance(item, (tuple, list)) else None
        if isinstance(td, TensorDictBase):
            self._stats["bytes"] += int(td.bytes())

    def close(self) -> None:
        """Stop fetching ahead (cancels waiting metadata requests); the resume point is kept.

        Rounds already cut for undelivered batches stay in the controller's ledger and are
        replayed by the next ``iter()`` or by a loader that loads this one's ``state_dict()``.
        """
        calls, loader, self._calls, self._loader = self._calls, self._loader, None, None
        if calls is not None:
            calls.cancel()
        if loader is not None:
            _stop_threads(loader.root)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Resume point after the last delivered micro-batch (plain data: JSON/msgpack-able)."""
        ds = self.dataset
        return {
            "next_batch_index": self._next_batch,
            "skip_micro_batches": self._skip_micro,
            "partition_id": ds.partition_id,
            "task_name": ds.task_name,
            "dp_rank": ds.dp_rank,
            "dp_size": ds.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        mine = (ds.partition_id, ds.task_name, ds.dp_rank, ds.dp_size)
        theirs = (state["partition_id"], state["task_name"], state["dp_rank"], state["dp_size"])
        if mine != theirs:
            raise ValueError(
                f"state was saved for (partition, task, dp_rank, dp_size)={theirs}, this loader is {mine}"
            )
        self._next_batch = int(state["next_batch_index"])
        self._skip_micro = int(state["skip_micro_batches"])

    def statistics(self) -> dict[str, Any]:
        """Batches, rows, bytes delivered, the share of time the consumer waited for data, and --
        once a sealed stream ended -- ``dropped_rows``: rows of the partition the task never got
        (the ``drop_last`` tail; all dp ranks together)."""
        stats = dict(self._stats)
        stats["wait_fraction"] = stats["wait_s"] / stats["iter_s"] if stats["iter_s"] > 0 else 0.0
        return stats

    def writer(self, partition_id: str | None = None, **kwargs: Any) -> Any:
        """A :class:`~tq_loader.loader.writer.Writer` for this loader's partition."""
        from tq_loader.loader.writer import Writer

        return Writer(partition_id or self.dataset.partition_id, **kwargs)


class _MetaCalls:
    """The ``get_meta`` calls of one graph, cancellable when the loader closes it.

    A metadata request may wait server-side for rows that never come (an unsealed stream the
    user stopped reading); cancelling it frees the planner thread instead of leaking it.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def get_meta(self, *args: Any, **kwargs: Any) -> BatchMeta:
        if not hasattr(self.client, "submit"):
            return self.client.get_meta(*args, **kwargs)  # a client without the async core (a test double)
        with self._lock:
            if self._closed:
                raise ClosedError("the StreamingDataLoader iterator was closed")
            future = self.client.submit(lambda core: core.async_get_meta(*args, **kwargs))
            self._futures.add(future)
        try:
            return future.result()
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel(self) -> None:
        with self._lock:
            self._closed = True
            futures, self._futures = list(self._futures), set()
        for future in futures:
            future.cancel()


def _stop_threads(root: BaseNode) -> None:
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


def _find_meta(item: Any) -> BatchMeta:
    """The BatchMeta of a delivered item (a ``(td, meta)`` tuple, or a mapping holding one)."""
    values = item.values() if isinstance(item, Mapping) else item if isinstance(item, (tuple, list)) else ()
    for value in values:
        if isinstance(value, BatchMeta):
            return value
    raise TypeError(
        f"StreamingDataLoader items must carry their BatchMeta (a (td, meta) tuple or a mapping with one) "
        f"to track the resume point; got {type(item).__name__} -- keep the meta in collate_fn/nodes output"
    )


def _resolve_collate(
    collate_fn: Callable[[Any], Any] | None, collate: str | None
) -> Callable[[Any], Any] | None:
    if collate_fn is not None and collate is not None:
        raise ValueError("pass collate_fn or collate, not both")
    if collate is None:
        return collate_fn
    if collate == "pad":
        from tq_loader.loader.collate import pad_collate

        return pad_collate
    raise ValueError(f"unknown collate {collate!r}; use 'pad' or pass collate_fn")
