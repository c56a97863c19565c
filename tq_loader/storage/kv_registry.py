"""Which keys a partition has, for KV backends that cannot list keys (Yuanrong).

``clear_partition`` runs after the controller forgot the partition's rows (and with them the index
tags), and any process may call it, so the keys of every writer must be findable from the store
alone. Each manager (a *writer*) claims a slot ``<partition>:w/<k>`` with an atomic
put-if-absent (the slot's value is the writer's id) and, with every put, writes a manifest
``<partition>:m/<writer>.<seq>`` listing the keys of that put -- in the same backend call as the
values, so a manifest exists exactly when its values do. ``collect`` walks the slots and each
writer's manifests (consecutive numbers, probed in batches) and returns every key to delete.
Keys with ``:`` right after the partition prefix cannot clash with field values: field names are
quoted there (``:`` -> ``%3A``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tq_loader.errors import CapacityError, NotFoundError
from tq_loader.storage.kv_client import KVClient

__all__ = ["Blob", "KeyRegistry"]

_PROBE = 64  # keys probed per exists() call while walking slots or manifests
_MAX_SLOTS = 1 << 16


class Blob:
    """A small raw value written beside the column values (same ``key``/``nbytes``/``fill``)."""

    __slots__ = ("key", "nbytes", "payload")

    def __init__(self, key: str, payload: bytes) -> None:
        self.key, self.payload, self.nbytes = key, payload, len(payload)

    def fill(self, dst: memoryview) -> None:
        dst[:] = self.payload


class KeyRegistry:
    """This writer's slots and manifests, per partition (thread-safe)."""

    def __init__(self, client: KVClient, writer: str) -> None:
        self.client, self.writer = client, writer
        self._slots: dict[str, str] = {}  # partition prefix -> this writer's slot key
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()

    def manifest(self, prefix: str, keys: list[str]) -> Blob:
        """The manifest to write with a put of ``keys`` under ``prefix`` (claims a slot if needed)."""
        self._ensure_slot(prefix)
        with self._lock:
            seq = self._seq.get(prefix, 0)
            self._seq[prefix] = seq + 1
        return Blob(f"{prefix}:m/{self.writer}.{seq}", "\n".join(keys).encode())

    def _ensure_slot(self, prefix: str) -> None:
        slot = self._slots.get(prefix)
        if slot is not None:
            try:  # still ours? (a clear_partition elsewhere deletes every slot)
                if bytes(self.client.get([slot])[0]) == self.writer.encode():
                    return
            except NotFoundError:
                pass
        for start in range(0, _MAX_SLOTS, _PROBE):
            probe = [f"{prefix}:w/{i}" for i in range(start, start + _PROBE)]
            for key, taken in zip(probe, self.client.exists(probe), strict=True):
                if not taken and self.client.put_if_absent(key, self.writer.encode()):
                    with self._lock:
                        self._slots[prefix], self._seq[prefix] = key, 0
                    return
        raise CapacityError(f"more than {_MAX_SLOTS} writers registered under {prefix!r}")

    def collect(self, prefix: str) -> list[str]:
        """Every key any writer recorded under ``prefix``, with the slots and manifests themselves."""
        slots = _walk(self.client, lambda i: f"{prefix}:w/{i}")
        writers = [bytes(v).decode() for v in self.client.get(slots)] if slots else []
        keys = set(slots)
        for writer in writers:
            manifests = _walk(self.client, lambda i, w=writer: f"{prefix}:m/{w}.{i}")
            keys.update(manifests)
            for start in range(0, len(manifests), _PROBE):
                for text in self.client.get(manifests[start : start + _PROBE]):
                    keys.update(k for k in bytes(text).decode().split("\n") if k)
        return sorted(keys)

    def forget(self, prefix: str) -> None:
        with self._lock:
            self._slots.pop(prefix, None)
            self._seq.pop(prefix, None)


def _walk(client: KVClient, key: Callable[[int], str]) -> list[str]:
    """The keys ``key(0), key(1), ...`` that exist, probing until a whole batch is missing (a failed
    put leaves a gap in its writer's manifest numbers)."""
    found: list[str] = []
    for start in range(0, 1 << 40, _PROBE):
        probe = [key(i) for i in range(start, start + _PROBE)]
        present = [k for k, ok in zip(probe, client.exists(probe), strict=True) if ok]
        if not present:
            return found
        found += present
    return found
