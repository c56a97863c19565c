"""tq_loader: a streaming data plane for LLM post-training (TransferQueue-compatible).

``import tq_loader as tq`` offers TransferQueue's top-level names: ``init``, ``close``,
``get_client``, the KV API (``kv_put``, ``kv_batch_get``, ... and ``async_`` twins),
``save_checkpoint``/``load_checkpoint``, ``BatchMeta``, ``KVBatchMeta``, the samplers,
``TransferQueueClient``, ``StreamingDataset`` and ``StreamingDataLoader`` -- plus ``connect``,
``Writer``, ``seal``-aware streams and typed errors. See docs/compat.md.

The names are resolved on first use (PEP 562), so ``import tq_loader`` -- and ``tq-loader --help`` --
import neither torch nor Ray; the imports under ``TYPE_CHECKING`` keep them visible to IDEs and type
checkers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# the module that defines each public name
_MODULES: dict[str, str] = {
    "tq_loader.api": "close connect get_client get_config get_metrics_endpoint init is_initialized statistics",
    "tq_loader.checkpoint": "async_load_checkpoint async_save_checkpoint load_checkpoint save_checkpoint",
    "tq_loader.client": "AsyncClient Client TransferQueueClient",
    "tq_loader.config": "TQConfig",
    "tq_loader.errors": (
        "ArgumentError CapacityError ClosedError DataLostError NotFoundError ProtocolError SchemaError "
        "TQConnectionError TQError TQTimeoutError"
    ),
    "tq_loader.kv": (
        "async_kv_batch_get async_kv_batch_get_by_meta async_kv_batch_put async_kv_clear async_kv_list "
        "async_kv_put kv_batch_get kv_batch_get_by_meta kv_batch_put kv_clear kv_list kv_put"
    ),
    "tq_loader.loader": "StreamingDataLoader StreamingDataset Writer",
    "tq_loader.metadata": "BatchMeta KVBatchMeta",
    "tq_loader.samplers": (
        "BaseSampler GRPOGroupNSampler RankAwareSampler SeqlenBalancedSampler SequentialSampler register_sampler"
    ),
}
_EXPORTS: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names.split()}
# TransferQueue raises StorageKeyNotFoundError when a storage unit lacks a row; here: NotFoundError.
_ALIASES = {"StorageKeyNotFoundError": ("tq_loader.errors", "NotFoundError")}

__all__ = [
    "ArgumentError",
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
    "get_metrics_endpoint",
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

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on demand
    from tq_loader.api import (
        close,
        connect,
        get_client,
        get_config,
        get_metrics_endpoint,
        init,
        is_initialized,
        statistics,
    )
    from tq_loader.checkpoint import (
        async_load_checkpoint,
        async_save_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from tq_loader.client import AsyncClient, Client, TransferQueueClient
    from tq_loader.config import TQConfig
    from tq_loader.errors import (
        ArgumentError,
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
    from tq_loader.errors import NotFoundError as StorageKeyNotFoundError
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


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``tq.api``) on first access and cache it."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
        value = getattr(importlib.import_module(module), attr)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
