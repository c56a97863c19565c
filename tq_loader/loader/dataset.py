"""``StreamingDataset``: a rank-aware ``IterableDataset`` over one partition of the cluster.

Batch ``i`` of data-parallel rank ``r`` is the controller's round ``i`` cut for ``dp_size`` ranks
(see ``controller/service.py``): every caller with the same ``dp_rank`` -- the tensor/pipeline
parallel ranks of one DP group, a resumed loader -- gets the same rows in the same order; other
DP ranks get disjoint rows, and all DP ranks get the same number of batches. Without ``dp_size``
(TransferQueue's signature) ranks take batches first come, first served (``ranks.py``).
Waiting for data happens in the controller; a wait is logged at INFO at a growing interval
(``waiting.py``); with ``controller.polling_mode`` empty answers are retried (``calls.py``). A
sealed, drained partition ends every rank's iterator; an aborted one raises ``ClosedError``.

Inside a ``torch.utils.data.DataLoader(num_workers=W)`` worker ``w`` takes batch indexes
``w, w+W, w+2W, ...``, so workers never deliver a batch twice (TransferQueue's workers all start
at index 0 and duplicate batches). The client is created lazily in ``__iter__``, so the dataset
pickles into ``spawn`` workers and survives ``fork``. Pass ``batch_size=None`` and
``collate_fn=tq_loader.loader.passthrough``: items are already batches, and torch's default
conversion cannot walk a TensorDict.

TransferQueue's ``reset()`` / ``step(partition_id)`` / ``buffer`` are kept: ``reset()`` rewinds to
the first batch (the controller's round ledger replays the same rows, so nothing is held in
memory), ``step()`` also switches the partition and empties ``buffer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tensordict import TensorDict
from torch.utils.data import IterableDataset, get_worker_info

from tq_loader import args
from tq_loader._meta_util import warn_once
from tq_loader.errors import TQTimeoutError
from tq_loader.loader.batching import chunk_batch_fn, default_fetch_batch_fn, meta_options, meta_request
from tq_loader.loader.buffer import BatchBuffer
from tq_loader.loader.calls import LoaderClosed, MetaCalls, Pauses, earliest, warn_tq_sleep_env
from tq_loader.loader.nodes import FetchedBatch
from tq_loader.loader.ranks import resolve_ranks
from tq_loader.loader.waiting import WaitTarget
from tq_loader.metadata import BatchMeta

__all__ = ["StreamingDataset"]

FetchFn = Callable[..., tuple[TensorDict | None, BatchMeta]]
ProcessFn = Callable[..., Any]


class StreamingDataset(IterableDataset):
    """Yields ``(TensorDict, BatchMeta)`` micro-batches of this rank's batches, in batch order.

    Keyword-only extras (TransferQueue has none of them): ``dp_size`` (see ``ranks.py``),
    ``sampler`` / ``sampling_config`` (the controller's sampler by name), ``drop_last`` (True: a
    tail smaller than ``batch_size x dp_size`` is not delivered, so every rank gets full, equal
    batches), ``timeout`` (seconds one batch may be waited for; ``None``: until rows come or the
    stream ends), ``device``, ``copy`` (False: batches may be read-only views of the stored rows;
    see ``Client.get_data``), ``start_batch_index`` and ``log_wait_after`` (seconds of waiting
    before the first INFO report of what is waited for; ``None``: never).
    """

    def __init__(
        self,
        config: Any = None,
        batch_size: int = 1,
        micro_batch_size: int | None = None,
        data_fields: Sequence[str] | str = (),
        partition_id: str = "train",
        task_name: str = "train",
        dp_rank: int = 0,
        should_check_consumption_status: bool = False,
        fetch_batch_fn: FetchFn | None = None,
        process_batch_fn: ProcessFn | None = None,
        *,
        dp_size: int | None = None,
        sampler: str | None = None,
        sampling_config: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        timeout: float | None = None,
        device: Any = None,
        copy: bool = True,
        start_batch_index: int = 0,
        log_wait_after: float | None = 5.0,
    ) -> None:
        super().__init__()
        _check_types(locals())
        fields = [data_fields] if isinstance(data_fields, str) else list(data_fields)
        micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
        if batch_size < 1 or micro_batch_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be >= 1"
            )
        if micro_batch_size > batch_size:
            warn_once(
                ("micro-larger", micro_batch_size, batch_size),
                f"StreamingDataset: micro_batch_size={micro_batch_size} is larger than batch_size="
                f"{batch_size}: each batch is yielded as one micro-batch of {batch_size} rows "
                "(TransferQueue 0.1.11 raises); set micro_batch_size <= batch_size",
            )
        if not fields:
            raise ValueError("data_fields must name at least one field to read")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
        self.ranks = resolve_ranks(dp_rank, dp_size)
        warn_tq_sleep_env()
        self.config = config
        self.batch_size, self.micro_batch_size = int(batch_size), int(micro_batch_size)
        self.data_fields, self.partition_id, self.task_name = fields, partition_id, task_name
        self.dp_rank, self.dp_size = self.ranks.dp_rank, self.ranks.dp_size
        self.should_check_consumption_status = should_check_consumption_status
        self.fetch_batch_fn = fetch_batch_fn or default_fetch_batch_fn
        self.process_batch_fn = process_batch_fn or chunk_batch_fn
        self.sampler = sampler
        self.sampling_config = dict(sampling_config or {})
        self.drop_last, self.timeout, self.device = drop_last, timeout, device
        self.copy = bool(copy)  # False: batches may be read-only views of storage (Client.get_data)
        self.start_batch_index = int(start_batch_index)
        self.log_wait_after = log_wait_after
        self.batch_index, self._skip_micro = self.start_batch_index, 0  # the plain-iteration position
        self.generation = 0  # bumped by reset()/step(): a loader rewinds when it sees a new value
        self._buffer: dict[int, BatchMeta] = {}

    # ------------------------------------------------------------------ TransferQueue's controls
    def reset(self) -> None:
        """Rewind to the first batch (TransferQueue): the next iteration replays the same batches."""
        self.batch_index, self._skip_micro = self.start_batch_index, 0
        self.generation += 1

    def step(self, partition_id: str) -> None:
        """Switch to ``partition_id`` from its first batch and empty :attr:`buffer` (TransferQueue)."""
        if not isinstance(partition_id, str) or not partition_id:
            raise ValueError(f"partition_id must be a non-empty str, got {partition_id!r}")
        self.partition_id = partition_id
        self._buffer = {}
        self.reset()

    @property
    def buffer(self) -> BatchBuffer:
        """The full batches delivered since the last :meth:`step`, oldest first (see ``buffer.py``)."""
        return BatchBuffer(
            [self._buffer[i] for i in sorted(self._buffer)], lambda m: self.load(self.client(), m)
        )

    def remember(self, batch_index: int, meta: BatchMeta) -> None:
        """Record a delivered batch for :attr:`buffer` (once per batch index)."""
        self._buffer.setdefault(batch_index, meta)

    # ------------------------------------------------------------------ pieces the loader reuses
    def client(self) -> Any:
        """The cluster client of this process (attaching lazily: safe after fork/spawn)."""
        from tq_loader import api

        if self.config is not None and not api.is_initialized():
            api.init(self.config)
        return api.get_client()

    def calls(self, client: Any, timeout: float | None = None) -> MetaCalls:
        """The cancellable, logged, polling-aware ``get_meta`` of one iteration."""
        return MetaCalls(client, log_wait_after=self.log_wait_after, timeout=timeout)

    def rank_sampling_config(self) -> dict[str, Any]:
        return {**self.sampling_config, **self.ranks.request()}

    @property
    def uses_default_fetch(self) -> bool:
        """Whether metadata and data can be fetched separately (the default ``fetch_batch_fn``)."""
        return self.fetch_batch_fn is default_fetch_batch_fn

    def fetch_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "allow_partial": not self.drop_last,
                "sampler": self.sampler, "device": self.device, "copy": self.copy}  # fmt: skip

    def stream_done(self, client: Any) -> bool:
        """``should_check_consumption_status``: stop once the task consumed every row (TransferQueue)."""
        return bool(
            self.should_check_consumption_status
            and client.check_consumption_status(self.task_name, self.partition_id)
        )

    def wait_target(self, batch_index: int) -> WaitTarget:
        wanted = self.batch_size * (self.dp_size or 1)
        return WaitTarget(self.partition_id, tuple(self.data_fields), self.task_name, wanted,
                          batch_index, self.dp_rank)  # fmt: skip

    def meta_call(self, batch_index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the ``get_meta`` call for batch ``batch_index`` of this rank."""
        args = meta_request(self.data_fields, self.batch_size, self.partition_id, self.task_name,
                            self.rank_sampling_config(), self.ranks.ledger_index(batch_index))  # fmt: skip
        return args, meta_options(self.fetch_options())

    def fetch(self, client: Any, batch_index: int) -> tuple[TensorDict | None, BatchMeta]:
        """Batch ``batch_index`` of this rank: ``(None, meta)`` once the stream has ended."""
        batch = self.plan(client, batch_index)
        if batch.end:
            return None, batch.meta
        return (batch.td if batch.td is not None else self.load(client, batch.meta)), batch.meta

    def plan(self, client: Any, batch_index: int, calls: MetaCalls | None = None) -> FetchedBatch:
        """Batch ``batch_index``'s metadata (and its data too with a custom ``fetch_batch_fn``).

        With ``should_check_consumption_status``, once the task consumed every row a batch is only
        *replayed* from the controller's ledger (a TP peer or a slower DP rank still gets the
        rounds cut before) and the stream ends instead of waiting for rows that will not come.
        Raises :class:`~tq_loader.loader.calls.LoaderClosed` when ``calls`` was cancelled.
        """
        calls = calls or self.calls(client)
        if not self.uses_default_fetch:
            return self._plan_custom(client, batch_index, calls)
        target = self.wait_target(batch_index)
        args, kwargs = self.meta_call(batch_index)
        if self.stream_done(client):
            kwargs["timeout"] = 0.0  # the server answers from its ledger or times out at once
            try:
                meta = calls.get_meta(target, args, kwargs)
            except TQTimeoutError:
                meta = BatchMeta.empty(end_of_stream=True)
        else:
            meta = calls.get_meta(target, args, kwargs)
        return FetchedBatch(batch_index, meta, end=meta.size == 0)

    def _plan_custom(self, client: Any, batch_index: int, calls: MetaCalls) -> FetchedBatch:
        """A user's ``fetch_batch_fn``: ``(None, meta)`` without end-of-stream means "not yet" (retry)."""
        pauses = Pauses(earliest(self.timeout, calls.timeout))
        wait = calls.wait_log(self.wait_target(batch_index))
        while True:
            if calls.closed:
                raise LoaderClosed
            if self.stream_done(client):
                return FetchedBatch(batch_index, BatchMeta.empty(end_of_stream=True), end=True)
            td, meta = self.fetch_batch_fn(
                tq_client=client, data_fields=self.data_fields, batch_size=self.batch_size,
                partition_id=self.partition_id, task_name=self.task_name,
                sampling_config=self.rank_sampling_config(),
                batch_index=self.ranks.ledger_index(batch_index),
            )  # fmt: skip
            if td is not None and meta.size > 0:
                return FetchedBatch(batch_index, meta, td)
            if meta.is_end_of_stream:
                return FetchedBatch(batch_index, meta, end=True)
            calls.pause(pauses, wait, "fetch_batch_fn returned no batch yet")

    def load(self, client: Any, meta: BatchMeta) -> TensorDict:
        """The data of a batch whose metadata came from :meth:`meta_call`."""
        return client.get_data(meta, device=self.device, copy=self.copy)

    def dropped_rows(self, client: Any) -> int:
        """Rows of the partition this task never consumed (meaningful once the stream ended).

        After a sealed stream ends these are the tail that ``drop_last`` (or a tail smaller than
        ``dp_size``, or incomplete sampler groups) left undelivered -- for all dp ranks together.
        The controller's end-of-stream meta carries the same count (``extra_info["dropped_rows"]``);
        this is the fallback for end markers that lack it.
        """
        _, consumed = client.get_consumption_status(self.task_name, self.partition_id)
        if consumed is None:
            return 0
        return int(len(consumed) - int(consumed.sum()))

    def split(self, td: TensorDict, meta: BatchMeta, batch_index: int) -> list[tuple[TensorDict, BatchMeta]]:
        """Micro-batches of one batch, each meta tagged with its (batch, micro) position."""
        parts = list(self.process_batch_fn(td, meta, micro_batch_size=self.micro_batch_size))
        for micro_index, (_, part_meta) in enumerate(parts):
            part_meta.update_extra_info(
                {"batch_index": batch_index, "micro_index": micro_index, "num_micro_batches": len(parts)}
            )
        return parts

    # ------------------------------------------------------------------ IterableDataset
    def __iter__(self) -> Iterator[tuple[TensorDict, BatchMeta]]:
        """This rank's micro-batches from :attr:`batch_index` on (in a DataLoader worker: its share).

        In the main process the position advances as micro-batches are yielded, so iterating again
        continues where the last iteration stopped (as in TransferQueue); :meth:`reset` rewinds.
        """
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        client = self.client()
        calls = self.calls(client)
        batch_index, skip = self.batch_index + worker, self._skip_micro if worker == 0 else 0
        try:
            while True:
                batch = self.plan(client, batch_index, calls)
                if batch.end:
                    return
                td = batch.td if batch.td is not None else self.load(client, batch.meta)
                parts = self.split(td, batch.meta, batch_index)
                if info is None:
                    self.remember(batch_index, batch.meta)
                for micro, part in enumerate(parts[skip:], start=skip):
                    if info is None:
                        done = micro + 1 >= len(parts)
                        self.batch_index, self._skip_micro = (
                            (batch_index + 1, 0) if done else (batch_index, micro + 1)
                        )
                    yield part
                batch_index, skip = batch_index + workers, 0
        except LoaderClosed:
            return
        finally:
            calls.cancel()


def _check_types(given: dict[str, Any]) -> None:
    """Wrong types fail here, by name, before anything is built or any request waits."""
    for name in ("batch_size", "dp_rank", "start_batch_index"):
        args.integer(name, given[name])
    for name in ("micro_batch_size", "dp_size"):
        if given[name] is not None:
            args.integer(name, given[name])
    args.names("data_fields", given["data_fields"])
    args.name("partition_id", given["partition_id"])
    args.name("task_name", given["task_name"])
    args.optional_name("sampler", given["sampler"])
    args.mapping("sampling_config", given["sampling_config"], optional=True)
    for name in ("should_check_consumption_status", "drop_last", "copy"):
        args.flag(name, given[name])
    for name in ("fetch_batch_fn", "process_batch_fn"):
        args.callable_or_none(name, given[name])
    args.number("timeout", given["timeout"], optional=True)
    args.number("log_wait_after", given["log_wait_after"], optional=True)
    args.device("device", given["device"])
