"""Storage: the backend contract (``base``), the built-in columnar units (``unit``, ``service``) and
their client-side manager (``simple``)."""

from tq_loader.storage.base import (
    BackendInfo,
    StorageLost,
    StorageManager,
    make_storage_manager,
    register_storage_manager,
    registered_storage_managers,
)
from tq_loader.storage.simple import SimpleStorageManager

__all__ = [
    "BackendInfo",
    "SimpleStorageManager",
    "StorageLost",
    "StorageManager",
    "make_storage_manager",
    "register_storage_manager",
    "registered_storage_managers",
]
