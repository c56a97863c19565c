"""tq_loader: a streaming data plane for LLM post-training (TransferQueue-compatible).

``import tq_loader as tq`` offers TransferQueue's top-level names: ``init``, ``close``,
``get_client``, the KV API (``kv_put``, ``kv_batch_get``, ... and ``async_`` twins),
``save_checkpoint``/``load_checkpoint``, ``BatchMeta``, ``KVBatchMeta``, the samplers,
``TransferQueueClient``, ``StreamingDataset`` and ``StreamingDataLoader`` -- plus ``connect``,
``Writer``, ``seal``-aware streams and typed errors. See docs/compat.md.
"""

from tq_loader.api import close, connect, get_client, get_config, init, is_initialized, statistics
from tq_loader.checkpoint import (
    async_load_checkpoint,
    async_save_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tq_loader.client import AsyncClient, Client, TransferQueueClient
from tq_loader.config import TQConfig
from tq_loader.errors import (
    CapacityError,
    ClosedError,
    DataLostError,
    NotFoundError,
    ProtocolError,
    SchemaError,
    TQConnectionError,
    TQError,
    TQTimeoutError,
)
from tq_loader.kv import (
    async_kv_batch_get,
    async_kv_batch_get_by_meta,
    async_kv_batch_put,
    async_kv_clear,
    async_kv_list,
    async_kv_put,
    kv_batch_get,
    kv_batch_get_by_meta,
    kv_batch_put,
    kv_clear,
    kv_list,
    kv_put,
)
from tq_loader.loader import StreamingDataLoader, StreamingDataset, Writer
from tq_loader.metadata import BatchMeta, KVBatchMeta
from tq_loader.samplers import (
    BaseSampler,
    GRPOGroupNSampler,
    RankAwareSampler,
    SeqlenBalancedSampler,
    SequentialSampler,
    register_sampler,
)

# TransferQueue raises this when a storage unit lacks a row; here it is the typed NotFoundError.
StorageKeyNotFoundError = NotFoundError

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BaseSampler",
    "BatchMeta",
    "CapacityError",
    "Client",
    "ClosedError",
    "DataLostError",
    "GRPOGroupNSampler",
    "KVBatchMeta",
    "NotFoundError",
    "ProtocolError",
    "RankAwareSampler",
    "SchemaError",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "StorageKeyNotFoundError",
    "StreamingDataLoader",
    "StreamingDataset",
    "TQConfig",
    "TQConnectionError",
    "TQError",
    "TQTimeoutError",
    "TransferQueueClient",
    "Writer",
    "__version__",
    "async_kv_batch_get",
    "async_kv_batch_get_by_meta",
    "async_kv_batch_put",
    "async_kv_clear",
    "async_kv_list",
    "async_kv_put",
    "async_load_checkpoint",
    "async_save_checkpoint",
    "close",
    "connect",
    "get_client",
    "get_config",
    "init",
    "is_initialized",
    "kv_batch_get",
    "kv_batch_get_by_meta",
    "kv_batch_put",
    "kv_clear",
    "kv_list",
    "kv_put",
    "load_checkpoint",
    "register_sampler",
    "save_checkpoint",
    "statistics",
]
