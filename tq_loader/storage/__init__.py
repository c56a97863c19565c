"""Storage: the backend contract (``base``), the built-in columnar units (``unit``, ``service``) and
their client-side manager (``simple``), and the manager of key-value backends (``kv``: mooncake, yuanrong)."""

from tq_loader.storage import ray_rdt as _ray_rdt  # noqa: F401  (registers ray_rdt)
from tq_loader.storage.base import (
    BackendInfo,
    StorageLost,
    StorageManager,
    make_storage_manager,
    register_storage_manager,
    registered_storage_managers,
)
from tq_loader.storage.kv import KVStorageManager
from tq_loader.storage.simple import SimpleStorageManager

__all__ = [
    "BackendInfo",
    "KVStorageManager",
    "SimpleStorageManager",
    "StorageLost",
    "StorageManager",
    "make_storage_manager",
    "register_storage_manager",
    "registered_storage_managers",
]
