"""``Writer``: the sink of a stage -- writes computed columns for the rows of consumed batches.

``writer.write(data, meta)`` has ``put``'s argument order. With ``max_in_flight > 0`` writes are
asynchronous (the call returns once the write is queued; at most ``max_in_flight`` are pending,
so memory stays bounded) and ``flush()`` waits for all of them and re-raises the first error.
Rows become ready for downstream tasks when their write is stored and the controller notified.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping
from typing import Any

from tensordict import TensorDict

from tq_loader.metadata import BatchMeta

__all__ = ["Writer"]


class Writer:
    """Writes columns back to ``partition_id`` (the rows named by each call's ``meta``)."""

    def __init__(
        self, partition_id: str | None = None, *, client: Any = None, max_in_flight: int = 0
    ) -> None:
        self.partition_id = partition_id
        self.max_in_flight = max_in_flight
        self._client = client
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight > 0 else None
        self._lock = threading.Lock()
        self.rows_written = 0
        self.writes = 0

    def _get_client(self) -> Any:
        if self._client is None:
            from tq_loader import api

            self._client = api.get_client()
        return self._client

    def write(self, data: TensorDict | Mapping[str, Any], meta: BatchMeta) -> None:
        """Write ``data`` (one row per row of ``meta``, same order) into those rows."""
        if self.partition_id is not None and meta.size:
            pids = set(meta.partition_id_array.tolist())
            if pids != {self.partition_id}:
                raise ValueError(f"writer for {self.partition_id!r} got rows of partitions {sorted(pids)}")
        client = self._get_client()
        if self._slots is None:
            client.put(data, meta)
            self._count(meta)
            return
        self._slots.acquire()
        try:
            future = client.submit(lambda core: core.async_put(data, meta, self.partition_id))
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda f: self._done(f, meta))
        with self._lock:  # keep what flush() still needs: running writes and failures
            self._pending = [
                f for f in self._pending if not f.done() or f.cancelled() or f.exception() is not None
            ]
            self._pending.append(future)

    def _done(self, future: concurrent.futures.Future[Any], meta: BatchMeta) -> None:
        assert self._slots is not None
        self._slots.release()
        if future.exception() is None:
            self._count(meta)

    def _count(self, meta: BatchMeta) -> None:
        with self._lock:
            self.writes += 1
            self.rows_written += meta.size

    def flush(self) -> None:
        """Wait for every queued write; re-raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
