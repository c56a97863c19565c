"""``StreamingDataset``: a rank-aware ``IterableDataset`` over one partition of the cluster.

Batch ``i`` of data-parallel rank ``r`` is the controller's round ``i`` cut for ``dp_size`` ranks
(see ``controller/service.py``): every caller with the same ``dp_rank`` -- the tensor/pipeline
parallel ranks of one DP group, a resumed loader -- gets the same rows in the same order; other
DP ranks get disjoint rows, and all DP ranks get the same number of batches. Waiting for data
happens in the controller (no client polling); a sealed, drained partition ends every rank's
iterator; an aborted one raises ``ClosedError``.

Inside a ``torch.utils.data.DataLoader(num_workers=W)`` worker ``w`` takes batch indexes
``w, w+W, w+2W, ...``, so workers never deliver a batch twice (TransferQueue's workers all start
at index 0 and duplicate batches). The client is created lazily in ``__iter__``, so the dataset
pickles into ``spawn`` workers and survives ``fork``. Pass ``batch_size=None`` and
``collate_fn=tq_loader.loader.passthrough``: items are already batches, and torch's default
conversion cannot walk a TensorDict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tensordict import TensorDict
from torch.utils.data import IterableDataset, get_worker_info

from tq_loader.errors import TQTimeoutError
from tq_loader.loader.batching import chunk_batch_fn, default_fetch_batch_fn, meta_options, meta_request
from tq_loader.loader.nodes import FetchedBatch
from tq_loader.metadata import BatchMeta

__all__ = ["StreamingDataset"]

FetchFn = Callable[..., tuple[TensorDict | None, BatchMeta]]
ProcessFn = Callable[..., Any]


class StreamingDataset(IterableDataset):
    """Yields ``(TensorDict, BatchMeta)`` micro-batches of this rank's batches, in batch order."""

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
        dp_size: int = 1,
        sampler: str | None = None,
        sampling_config: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        timeout: float | None = None,
        device: Any = None,
        start_batch_index: int = 0,
    ) -> None:
        super().__init__()
        fields = [data_fields] if isinstance(data_fields, str) else list(data_fields)
        micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
        if batch_size < 1 or micro_batch_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be >= 1"
            )
        if not fields:
            raise ValueError("data_fields must name at least one field to read")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.config = config
        self.batch_size, self.micro_batch_size = int(batch_size), int(micro_batch_size)
        self.data_fields, self.partition_id, self.task_name = fields, partition_id, task_name
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.should_check_consumption_status = should_check_consumption_status
        self.fetch_batch_fn = fetch_batch_fn or default_fetch_batch_fn
        self.process_batch_fn = process_batch_fn or chunk_batch_fn
        self.sampler = sampler
        self.sampling_config = dict(sampling_config or {})
        self.drop_last, self.timeout, self.device = drop_last, timeout, device
        self.start_batch_index = int(start_batch_index)

    # ------------------------------------------------------------------ pieces the loader reuses
    def client(self) -> Any:
        """The cluster client of this process (attaching lazily: safe after fork/spawn)."""
        from tq_loader import api

        if self.config is not None and not api.is_initialized():
            api.init(self.config)
        return api.get_client()

    def rank_sampling_config(self) -> dict[str, Any]:
        return {**self.sampling_config, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    @property
    def uses_default_fetch(self) -> bool:
        """Whether metadata and data can be fetched separately (the default ``fetch_batch_fn``)."""
        return self.fetch_batch_fn is default_fetch_batch_fn

    def fetch_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "allow_partial": not self.drop_last,
                "sampler": self.sampler, "device": self.device}  # fmt: skip

    def stream_done(self, client: Any) -> bool:
        """``should_check_consumption_status``: stop once the task consumed every row (TransferQueue)."""
        return bool(
            self.should_check_consumption_status
            and client.check_consumption_status(self.task_name, self.partition_id)
        )

    def meta_call(self, batch_index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the ``get_meta`` call for batch ``batch_index`` of this rank."""
        args = meta_request(self.data_fields, self.batch_size, self.partition_id, self.task_name,
                            self.rank_sampling_config(), batch_index)  # fmt: skip
        return args, meta_options(self.fetch_options())

    def fetch(self, client: Any, batch_index: int) -> tuple[TensorDict | None, BatchMeta]:
        """Batch ``batch_index`` of this rank: ``(None, meta)`` once the stream has ended."""
        batch = self.plan(client, batch_index)
        if batch.end:
            return None, batch.meta
        return (batch.td if batch.td is not None else self.load(client, batch.meta)), batch.meta

    def plan(
        self, client: Any, batch_index: int, get_meta: Callable[..., BatchMeta] | None = None
    ) -> FetchedBatch:
        """Batch ``batch_index``'s metadata (and its data too with a custom ``fetch_batch_fn``).

        With ``should_check_consumption_status``, once the task consumed every row a batch is only
        *replayed* from the controller's ledger (a TP peer or a slower DP rank still gets the
        rounds cut before) and the stream ends instead of waiting for rows that will not come.
        """
        if not self.uses_default_fetch:
            if self.stream_done(client):
                return FetchedBatch(batch_index, BatchMeta.empty(end_of_stream=True), end=True)
            td, meta = self.fetch_batch_fn(
                tq_client=client, data_fields=self.data_fields, batch_size=self.batch_size,
                partition_id=self.partition_id, task_name=self.task_name,
                sampling_config=self.rank_sampling_config(), batch_index=batch_index,
            )  # fmt: skip
            return FetchedBatch(batch_index, meta, td, end=td is None or meta.size == 0)
        get_meta = get_meta or client.get_meta
        args, kwargs = self.meta_call(batch_index)
        if self.stream_done(client):
            kwargs["timeout"] = 0.0  # the server answers from its ledger or times out at once
            try:
                meta = get_meta(*args, **kwargs)
            except TQTimeoutError:
                meta = BatchMeta.empty(end_of_stream=True)
        else:
            meta = get_meta(*args, **kwargs)
        return FetchedBatch(batch_index, meta, end=meta.size == 0)

    def load(self, client: Any, meta: BatchMeta) -> TensorDict:
        """The data of a batch whose metadata came from :meth:`meta_call`."""
        return client.get_data(meta, device=self.device)

    def dropped_rows(self, client: Any) -> int:
        """Rows of the partition this task never consumed (meaningful once the stream ended).

        After a sealed stream ends these are the tail that ``drop_last`` (or a tail smaller than
        ``dp_size``, or incomplete sampler groups) left undelivered -- for all dp ranks together.
        The controller's end-of-stream meta carries the same count (``extra_info["dropped_rows"]``);
        this is the fallback for end markers that lack it.
        """
        _, consumed = client.get_consumption_status(self.task_name, self.partition_id)
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
    def _batch_indexes(self) -> Iterator[int]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        index = self.start_batch_index + worker
        while True:
            yield index
            index += workers

    def __iter__(self) -> Iterator[tuple[TensorDict, BatchMeta]]:
        client = self.client()
        for batch_index in self._batch_indexes():
            batch = self.plan(client, batch_index)
            if batch.end:
                return
            td = batch.td if batch.td is not None else self.load(client, batch.meta)
            yield from self.split(td, batch.meta, batch_index)
