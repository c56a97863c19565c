"""``StreamingDataModule``: Lightning train/val dataloaders over tq_loader streams, resumable by checkpoint.

Each rank builds its own :class:`~tq_loader.loader.StreamingDataLoader` from a
:class:`~tq_loader.config.LoaderConfig` (a dict, DictConfig or the dataclass) with
``dp_rank = trainer.global_rank // tp_size`` and ``dp_size = trainer.world_size // tp_size`` unless
given. Ranks attach to the cluster this process is attached to: under DDP the launching process
calls ``tq.init()`` (or ``tq-loader serve`` hosts the cluster) and the spawned ranks inherit
``TQ_LOADER_ADDRESS``.

**Why the module tracks positions itself.** Lightning fetches one batch ahead of the step it runs
(to know whether the epoch ended), so the loader's own ``state_dict()`` at checkpoint time counts a
micro-batch the model never trained on; resuming from it would lose that micro-batch. The module
records the loader position after every micro-batch Lightning *transfers to the device* (the
``on_after_batch_transfer`` hook) and checkpoints that; every new ``iter()`` starts there, so a
resumed fit, a new epoch, or the next validation run replays what was fetched ahead -- no row
lost, none repeated. Batches of the sanity check are replayed by the first real validation run.

Under DDP only rank 0's checkpoint is written; ranks step in lockstep (one micro-batch per rank
per step), so rank 0's position is every rank's and each rank applies it to its own ``dp_rank``.
A LightningModule that also overrides ``on_after_batch_transfer`` is overridden by this module's
hook (Lightning calls the datamodule's); do the transform in ``training_step`` instead.

**A finished stream ends ``trainer.fit``.** Lightning knows no "end of data": once a stream is
drained it would start empty epochs until ``max_epochs``/``max_steps`` (forever when only
``max_steps`` is set and the stream is shorter). When the training stream reports end-of-stream
(the partition was sealed and drained) the module sets ``trainer.should_stop``; the epoch in
progress finishes (its last batch trains, validation runs as at any epoch end) and ``fit``
returns. Every DDP rank sees the end after the same number of batches (equal rounds), so all
ranks stop together. ``min_epochs``/``min_steps`` that the stream cannot reach keep Lightning
running empty epochs (it warns). With a ``StreamingDataLoader`` handed to ``trainer.fit``
directly, add the :class:`StopAtEndOfStream` callback for the same effect.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from tq_loader.config import LoaderConfig
from tq_loader.hydra_conf import build_loader, loader_kwargs
from tq_loader.loader import StreamingDataLoader

__all__ = ["StopAtEndOfStream", "StreamingDataModule", "TrackedStream"]

log = logging.getLogger(__name__)

LoaderSpec = LoaderConfig | Mapping[str, Any]


class TrackedStream:
    """The iterable Lightning gets: a StreamingDataLoader plus the position the model has consumed.

    Deliberately not ``state_dict``-able itself: Lightning would checkpoint the fetched-ahead
    position of a stateful loader; the datamodule checkpoints :attr:`consumed` instead.
    """

    def __init__(self, loader: StreamingDataLoader, on_end: Callable[[], None] | None = None) -> None:
        self.loader = loader
        self.on_end = on_end  # called when an iteration ends because the stream ended
        self.consumed: dict[str, Any] = loader.state_dict()
        self._handed: deque[dict[str, Any]] = deque()  # positions after items not yet transferred

    def restore(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(dict(state))
        self.consumed = self.loader.state_dict()

    def __iter__(self) -> Iterator[Any]:
        self._handed.clear()
        self.loader.load_state_dict(self.consumed)  # replay whatever was fetched ahead last time
        for item in self.loader:
            self._handed.append(self.loader.state_dict())
            yield item
        if self.on_end is not None and self.loader.statistics()["end_of_stream"]:
            self.on_end()

    def used(self, *, commit: bool = True) -> None:
        """The oldest handed-out item reached the model (``commit=False``: a peek, replayed later)."""
        if self._handed:
            position = self._handed.popleft()
            if commit:
                self.consumed = position

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


class StreamingDataModule(LightningDataModule):
    """Train (and optional val) streams of one cluster as a LightningDataModule.

    Args:
        loader: the training loader's :class:`~tq_loader.config.LoaderConfig` fields.
        val_loader: the validation loader's (``None``: no validation).
        config: cluster config for ``tq.init`` when this process is not attached yet.
        tp_size: ranks per data-parallel group (they receive identical batches).
        dp_rank, dp_size: override the values derived from the trainer.
    """

    def __init__(
        self,
        loader: LoaderSpec | None = None,
        val_loader: LoaderSpec | None = None,
        *,
        config: Any = None,
        tp_size: int = 1,
        dp_rank: int | None = None,
        dp_size: int | None = None,
    ) -> None:
        super().__init__()
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.loader_kwargs = loader_kwargs(loader)
        self.val_loader_kwargs = None if val_loader is None else loader_kwargs(val_loader)
        self.config = config
        self.tp_size, self.dp_rank, self.dp_size = tp_size, dp_rank, dp_size
        self.streams: dict[str, TrackedStream] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ ranks
    def data_parallel(self) -> tuple[int, int]:
        """``(dp_rank, dp_size)`` of this process."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if world % self.tp_size:
            raise ValueError(f"world_size {world} is not a multiple of tp_size {self.tp_size}")
        dp_size = self.dp_size if self.dp_size is not None else world // self.tp_size
        dp_rank = self.dp_rank if self.dp_rank is not None else rank // self.tp_size
        return dp_rank, dp_size

    def _build(self, stage: str, kwargs: dict[str, Any]) -> TrackedStream:
        old = self.streams.pop(stage, None)
        if old is not None:  # rebuilt (reload_dataloaders_every_n_epochs): continue where it was
            self._pending.setdefault(stage, old.consumed)
            old.close()
        dp_rank, dp_size = self.data_parallel()
        stream = TrackedStream(
            build_loader(**{**kwargs, "dp_rank": dp_rank, "dp_size": dp_size, "config": self.config}),
            on_end=self._train_stream_ended if stage == "train" else None,
        )
        state = self._pending.pop(stage, None)
        if state is not None:
            stream.restore(_for_rank(state, dp_rank))
        self.streams[stage] = stream
        return stream

    def _train_stream_ended(self) -> None:
        """The training stream is sealed and drained: let the epoch finish, then end ``fit``."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return
        if not trainer.should_stop:
            log.info("the training stream ended (partition sealed and drained): stopping trainer.fit")
        trainer.should_stop = True

    # ------------------------------------------------------------------ Lightning hooks
    def train_dataloader(self) -> TrackedStream:
        return self._build("train", self.loader_kwargs)

    def val_dataloader(self) -> TrackedStream | list[Any]:
        if self.val_loader_kwargs is None:
            return []  # Lightning skips validation for an empty collection
        return self._build("val", self.val_loader_kwargs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None:
            return batch
        if trainer.training:
            stream = self.streams.get("train")
        elif trainer.validating or trainer.sanity_checking:
            stream = self.streams.get("val")
        else:
            stream = None
        if stream is not None:
            stream.used(commit=not trainer.sanity_checking)
        return batch

    def teardown(self, stage: str) -> None:
        for stream in self.streams.values():
            stream.close()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The consumed position of each stream (plain data), stored in Lightning checkpoints."""
        state = dict(self._pending)
        state.update({stage: stream.consumed for stage, stream in self.streams.items()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume each stream where the checkpoint's consumption stopped (applied when it is built)."""
        for stage, state in state_dict.items():
            if not state:
                continue
            stream = self.streams.get(stage)
            if stream is None:
                self._pending[stage] = dict(state)
            else:
                stream.restore(_for_rank(state, stream.loader.dataset.dp_rank))


def _for_rank(state: Mapping[str, Any], dp_rank: int) -> dict[str, Any]:
    """Rank 0's saved position applied to ``dp_rank`` (DDP ranks advance in lockstep)."""
    out = dict(state)
    if "dp_rank" in out:
        out["dp_rank"] = dp_rank
    return out


class StopAtEndOfStream(Callback):
    """Ends ``trainer.fit`` once a ``StreamingDataLoader`` given to it directly has no more batches.

    (:class:`StreamingDataModule` does this by itself.) Checked at the end of each training epoch
    with :meth:`~tq_loader.loader.StreamingDataLoader.exhausted` (an epoch bounded by ``len()``
    ends before the loader sees the end-of-stream marker); under DDP the ranks agree (any rank's end
    stops all) before ``trainer.should_stop`` is set.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ended = any(
            isinstance(loader, StreamingDataLoader) and loader.exhausted()
            for loader in _flattened(trainer.train_dataloader)
        )
        if trainer.strategy.reduce_boolean_decision(ended, all=False):
            trainer.should_stop = True


def _flattened(loaders: Any) -> list[Any]:
    """The loaders of Lightning's ``train_dataloader`` (one, a collection, or a CombinedLoader)."""
    flattened = getattr(loaders, "flattened", None)
    if flattened is not None:
        return list(flattened)
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]
