"""``StreamingDataLoader``: a ``torch.utils.data.DataLoader`` over a StreamingDataset.

A true ``DataLoader`` subclass (``isinstance`` checks in Lightning and user code hold) with
TransferQueue's signature -- ``(dataset, num_workers, collate_fn, pin_memory, worker_init_fn,
multiprocessing_context, prefetch_factor, persistent_workers, pin_memory_device)`` in that order --
and torch's other arguments keyword-only (``options.py``: honoured, or refused saying why). Its
own iterator is a torchdata.nodes graph (see ``nodes.py``): metadata, one batch index after the
other -> data fetched by ``num_workers`` threads (prefetching, in order) -> micro-batches -> user
nodes -> optional pin-memory -> prefetcher. ``for td, meta in loader`` yields ``(TensorDict,
BatchMeta)`` micro-batches and ``collate_fn`` receives that pair, as in TransferQueue. Leaving the
loop (``break``), re-iterating or ``close()`` stops the graph's threads at once; a fetch pending at
that moment ends quietly (the close was intended), while real errors surface with their own type
and message.

Resumable: ``state_dict()`` records the position after the last micro-batch handed to the user,
and the cluster and partition it belongs to (``identity.py``); ``load_state_dict()`` in a new
process continues exactly there -- nothing lost, nothing repeated -- because batch ``i`` is a
round in the controller's ledger and asking for it again returns the same rows. Re-iterating or
breaking early follows the same rule. TransferQueue's ``step(partition_id)``, ``reset()`` and
``get_buffer()`` are kept (see ``dataset.py`` and ``buffer.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import DataLoader
from torchdata.nodes import BaseNode, Loader, Mapper, ParallelMapper, PinMemory, Prefetcher

from tq_loader import args
from tq_loader._meta_util import warn_once
from tq_loader.errors import ArgumentError, TQTimeoutError
from tq_loader.loader.buffer import BatchBuffer
from tq_loader.loader.calls import LoaderClosed, MetaCalls
from tq_loader.loader.collate import passthrough
from tq_loader.loader.dataset import StreamingDataset
from tq_loader.loader.identity import ResumeStateError, check_resume, cluster_identity
from tq_loader.loader.length import stream_length
from tq_loader.loader.nodes import BatchPlanner, FetchedBatch, MicroBatches, WorkerInit, stop_threads
from tq_loader.loader.options import UNSET, check_torch_options, effective_pin_memory
from tq_loader.metadata import BatchMeta

__all__ = ["StreamingDataLoader"]

NodeBuilder = Callable[[BaseNode], BaseNode]


class StreamingDataLoader(DataLoader):
    """Iterates a :class:`StreamingDataset` with parallel prefetching and exactly-once resume.

    ``num_workers`` are threads of this process that move batches' bytes in parallel (no worker
    processes: nothing is pickled); ``worker_init_fn(worker_id)`` runs on each of them before its
    first fetch (once per loader with ``persistent_workers``). ``prefetch_factor`` (default 2)
    micro-batches are kept ready. ``timeout`` (seconds, 0 = none) bounds the wait for one batch
    when the dataset sets no ``timeout`` of its own. Extras: ``collate="pad"`` (dense, padded
    jagged fields plus masks) and ``nodes=`` (functions that wrap the graph's node).
    """

    dataset: StreamingDataset

    def __init__(
        self,
        dataset: StreamingDataset,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        *,
        batch_size: Any = UNSET,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        drop_last: Any = UNSET,
        timeout: float = 0,
        generator: Any = None,
        in_order: bool = True,
        collate: str | None = None,
        nodes: Sequence[NodeBuilder] = (),
    ) -> None:
        if not isinstance(dataset, StreamingDataset):
            raise ArgumentError(
                f"StreamingDataLoader: dataset must be a StreamingDataset, got {type(dataset).__name__}"
            )
        for name, flag in (
            ("pin_memory", pin_memory),
            ("persistent_workers", persistent_workers),
            ("in_order", in_order),
        ):
            args.flag(name, flag)
        if drop_last is not UNSET:
            args.flag("drop_last", drop_last)
        for name, fn in (("collate_fn", collate_fn), ("worker_init_fn", worker_init_fn)):
            args.callable_or_none(name, fn)
        args.integer("num_workers", num_workers)  # the values: check_torch_options, in torch's words
        args.number("timeout", timeout)
        if prefetch_factor is not None:
            args.integer("prefetch_factor", prefetch_factor)
        args.key("pin_memory_device", pin_memory_device)
        args.optional_name("collate", collate)
        nodes = args.sequence("nodes", nodes, "a list of node builders")
        check_torch_options(
            dataset, num_workers=num_workers, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
            batch_sampler=batch_sampler, drop_last=drop_last, timeout=timeout, generator=generator,
            in_order=in_order, multiprocessing_context=multiprocessing_context,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
        )  # fmt: skip
        self._collate = _resolve_collate(collate_fn, collate)
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=self._collate or passthrough,
            pin_memory=pin_memory, timeout=timeout, worker_init_fn=worker_init_fn,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
        )  # fmt: skip
        object.__setattr__(self, "drop_last", dataset.drop_last)  # what the stream does (torch's guard)
        self._prefetch = max(1, prefetch_factor if prefetch_factor is not None else 2)
        self._pin = effective_pin_memory(pin_memory)
        self._wait_timeout = float(timeout) if timeout else None
        self._worker_init = WorkerInit(worker_init_fn, persistent_workers)
        self.node_builders = list(nodes)
        self._next_batch, self._skip_micro = dataset.start_batch_index, 0
        self._generation = dataset.generation
        self._max_row: int | None = None
        self._cluster: dict[str, Any] | None = None
        self._loader: Loader | None = None
        self._calls: MetaCalls | None = None
        self._end: FetchedBatch | None = None
        self._failures: list[BaseException] = []
        self._batch_metas: dict[int, BatchMeta] = {}
        self._stats: dict[str, Any] = {
            "batches": 0, "micro_batches": 0, "rows": 0, "bytes": 0, "wait_s": 0.0, "iter_s": 0.0,
            "end_of_stream": False, "dropped_rows": 0,
        }  # fmt: skip

    # ------------------------------------------------------------------ graph
    def build_graph(self) -> BaseNode:
        """The node graph from the current resume point (override or pass ``nodes=`` to extend)."""
        self._sync_dataset()
        return self._graph(self.dataset.calls(self.dataset.client(), self._wait_timeout))

    def _graph(self, calls: MetaCalls) -> BaseNode:
        ds, client, failures = self.dataset, calls.client, self._failures

        def plan(batch_index: int) -> FetchedBatch:
            try:
                return ds.plan(client, batch_index, calls)
            except LoaderClosed:
                raise StopIteration from None  # close() was called: end quietly, position kept
            except Exception as exc:
                failures.append(exc)
                raise

        def load(batch: FetchedBatch) -> FetchedBatch:
            self._worker_init()
            try:
                if batch.td is None and not batch.end:
                    batch.td = ds.load(client, batch.meta)
            except Exception as exc:
                failures.append(exc)
                raise
            return batch

        def split(td: TensorDict, meta: BatchMeta, batch_index: int) -> list[tuple[TensorDict, BatchMeta]]:
            self._batch_metas[batch_index] = meta
            return ds.split(td, meta, batch_index)

        source: BaseNode = BatchPlanner(plan, self._next_batch)
        if self.num_workers > 0:
            fetched: BaseNode = ParallelMapper(source, load, num_workers=self.num_workers, in_order=True)
        else:
            fetched = Mapper(source, load)
        node: BaseNode = MicroBatches(fetched, split, skip=self._skip_micro, on_end=self._on_end)
        if self._collate is not None:
            node = Mapper(node, self._collate)
        for build in self.node_builders:
            node = build(node)
        if self._pin:
            node = PinMemory(node, self.pin_memory_device)
        return Prefetcher(node, prefetch_factor=self._prefetch)

    @property
    def nodes(self) -> BaseNode:
        """A fresh graph from the current position (for inspection or wrapping)."""
        return self.build_graph()

    def _on_end(self, batch: FetchedBatch) -> None:
        self._end = batch  # set on the graph's thread, read after the stream ended

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[TensorDict, BatchMeta]]:  # type: ignore[override]
        self.close()
        self._sync_dataset()
        self._end, self._failures, self._batch_metas = None, [], {}
        self._worker_init.new_iteration()
        self._calls = self.dataset.calls(self.dataset.client(), self._wait_timeout)
        self._loader = Loader(self._graph(self._calls), restart_on_stop_iteration=False)
        return self._iterate(self._loader, self._failures)

    def _iterate(
        self, loader: Loader, failures: list[BaseException]
    ) -> Iterator[tuple[TensorDict, BatchMeta]]:
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
                except Exception as exc:
                    original = failures[0] if failures else None
                    if original is not None and isinstance(exc, type(original)):
                        raise original from None  # its own message, not torchdata's wrapper
                    raise
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

    def __len__(self) -> int:
        """Micro-batches of the whole stream, when its total is known (else ``TypeError``, see ``length.py``)."""
        if self.node_builders:
            raise TypeError("len(StreamingDataLoader) is unknown: nodes= may change the number of items")
        return stream_length(self.dataset, self.dataset.client())

    def _finished(self) -> None:
        end = self._end
        if end is None or not end.meta.is_end_of_stream:
            return  # closed (or a custom fetch ended without the controller's marker)
        self._stats["end_of_stream"] = True
        dropped = end.meta.get_extra_info("dropped_rows")  # sent by the controller with end-of-stream
        if dropped is None:
            dropped = self.dataset.dropped_rows(self.dataset.client())
        self._stats["dropped_rows"] = int(dropped)
        if dropped:
            self._warn_dropped(int(dropped))

    def _warn_dropped(self, dropped: int) -> None:
        ds = self.dataset
        per_round = ds.batch_size * (ds.dp_size or 1)
        if ds.drop_last:
            why = (
                f"drop_last=True delivers only full rounds of batch_size x dp_size = {per_round} rows, so every "
                "data-parallel rank gets the same number of full batches; pass StreamingDataset(drop_last=False) "
                "for a shorter last batch"
            )
        else:
            why = (
                "even with drop_last=False a tail with fewer rows (or sampler groups) than data-parallel ranks, "
                "and incomplete groups, are not delivered, so every rank gets the same number of batches"
            )
        warn_once(
            ("StreamingDataLoader", "dropped", ds.partition_id, ds.task_name),
            f"the stream of partition {ds.partition_id!r} ended with {dropped} rows never delivered to task "
            f"{ds.task_name!r} (all ranks together; rows that never got all of {ds.data_fields} count too): {why}",
            stacklevel=5,
        )

    def _delivered(self, item: Any) -> None:
        meta = _find_meta(item)
        info = meta.extra_info
        batch, micro, total = info["batch_index"], info["micro_index"], info["num_micro_batches"]
        full = self._batch_metas.pop(batch, None)
        if full is not None:
            self.dataset.remember(batch, full)
        if micro + 1 >= total:
            self._next_batch, self._skip_micro = batch + 1, 0
            self._stats["batches"] += 1
        else:
            self._next_batch, self._skip_micro = batch, micro + 1
        self._stats["micro_batches"] += 1
        self._stats["rows"] += meta.size
        if meta.size:
            top = int(meta.global_index_array.max())
            self._max_row = top if self._max_row is None else max(self._max_row, top)
        td = item[0] if isinstance(item, (tuple, list)) else None
        if isinstance(td, TensorDictBase):
            self._stats["bytes"] += _nbytes(td)

    def close(self) -> None:
        """Stop fetching ahead (cancels waiting metadata requests); the resume point is kept.

        Rounds already cut for undelivered batches stay in the controller's ledger and are
        replayed by the next ``iter()`` or by a loader that loads this one's ``state_dict()``.
        """
        calls, loader, self._calls, self._loader = self._calls, self._loader, None, None
        if calls is not None:
            calls.cancel()
        if loader is not None:
            stop_threads(loader.root)

    def exhausted(self) -> bool:
        """Whether the stream has ended at this loader's position (nothing more would be delivered).

        Asks the controller for the next batch without waiting; a round that this cuts is recorded
        in the ledger and delivered by the next iteration, so nothing is lost. ``False`` while rows
        may still come (an open partition), ``True`` once the sealed stream is drained.
        """
        self._sync_dataset()
        if self._skip_micro:
            return False  # the rest of a batch is still to be delivered
        ds = self.dataset
        client = ds.client()
        try:
            batch = ds.plan(client, self._next_batch, ds.calls(client, 0.0))
        except (TQTimeoutError, LoaderClosed):
            return False
        return batch.end and batch.meta.is_end_of_stream

    # ------------------------------------------------------------------ TransferQueue's controls
    def reset(self) -> None:
        """Rewind to the first batch: the next iteration replays the stream's batches (TransferQueue)."""
        self.close()
        self.dataset.reset()

    def step(self, partition_id: str) -> None:
        """Continue with partition ``partition_id`` from its first batch; empties the buffer (TransferQueue)."""
        self.close()
        self.dataset.step(partition_id)
        self._max_row = None

    def get_buffer(self) -> BatchBuffer:
        """The full ``(TensorDict, BatchMeta)`` batches delivered since the last ``step()`` (TransferQueue)."""
        return self.dataset.buffer

    def _sync_dataset(self) -> None:
        """Follow a ``reset()``/``step()`` of the dataset: start again from its first batch."""
        if self.dataset.generation != self._generation:
            self._generation = self.dataset.generation
            self._next_batch, self._skip_micro = self.dataset.start_batch_index, 0

    # ------------------------------------------------------------------ state
    def cluster(self) -> dict[str, Any]:
        """The identity of the cluster this loader reads from (cached; see ``identity.py``)."""
        if self._cluster is None:
            self._cluster = cluster_identity(self.dataset.client())
        return self._cluster

    def state_dict(self) -> dict[str, Any]:
        """Resume point after the last delivered micro-batch, and whose stream it is (JSON-able data)."""
        self._sync_dataset()
        ds = self.dataset
        return {
            "next_batch_index": self._next_batch,
            "skip_micro_batches": self._skip_micro,
            "partition_id": ds.partition_id,
            "task_name": ds.task_name,
            "dp_rank": ds.dp_rank,
            "dp_size": ds.dp_size,
            "cluster": dict(self.cluster()),
            "max_row_id": self._max_row,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, allow_other_cluster: bool = False) -> None:
        """Continue from ``state`` (see ``identity.py`` for the checks and ``allow_other_cluster``)."""
        ds = self.dataset
        mine = (ds.partition_id, ds.task_name, ds.dp_rank, ds.dp_size)
        theirs = (state["partition_id"], state["task_name"], state["dp_rank"], state["dp_size"])
        if mine != theirs:
            raise ResumeStateError(
                f"state was saved for (partition, task, dp_rank, dp_size)={theirs}, this loader is {mine}"
            )
        check_resume(ds.client(), state, self.cluster(), allow_other_cluster=allow_other_cluster)
        self._sync_dataset()
        self._next_batch = int(state["next_batch_index"])
        self._skip_micro = int(state["skip_micro_batches"])
        self._max_row = state.get("max_row_id")

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


def _nbytes(td: TensorDictBase) -> int:
    """Bytes of a micro-batch's tensors (tensordict's ``bytes()`` refuses strided nested tensors)."""
    try:
        return int(td.bytes())
    except RuntimeError:
        total = 0
        for value in td.values(include_nested=True, leaves_only=True):
            if isinstance(value, torch.Tensor):
                parts = value.unbind(0) if value.is_nested else (value,)
                total += sum(p.numel() * p.element_size() for p in parts)
        return total


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
