"""The streaming loader: rank-aware dataset, torchdata.nodes DataLoader, Writer sink."""

from tq_loader.loader.batching import chunk_batch_fn, default_fetch_batch_fn
from tq_loader.loader.buffer import BatchBuffer
from tq_loader.loader.collate import pad_collate, passthrough
from tq_loader.loader.dataloader import StreamingDataLoader
from tq_loader.loader.dataset import StreamingDataset
from tq_loader.loader.identity import ResumeStateError
from tq_loader.loader.writer import Writer

__all__ = [
    "BatchBuffer",
    "ResumeStateError",
    "StreamingDataLoader",
    "StreamingDataset",
    "Writer",
    "chunk_batch_fn",
    "default_fetch_batch_fn",
    "pad_collate",
    "passthrough",
]
