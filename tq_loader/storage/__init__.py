"""Storage: the in-memory columnar unit, its network service, and the client-side managers."""

from tq_loader.storage.columns import assemble, take_rows
from tq_loader.storage.manager import (
    SimpleStorageManager,
    StorageManager,
    make_storage_manager,
    register_storage_manager,
    registered_storage_managers,
)
from tq_loader.storage.service import StorageUnitService, decode_export
from tq_loader.storage.unit import SimpleStorageUnit

__all__ = [
    "SimpleStorageManager",
    "SimpleStorageUnit",
    "StorageManager",
    "StorageUnitService",
    "assemble",
    "decode_export",
    "make_storage_manager",
    "register_storage_manager",
    "registered_storage_managers",
    "take_rows",
]
