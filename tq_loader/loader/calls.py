"""The ``get_meta`` calls of one iteration: cancellable, never silent, retried in polling mode.

* **Cancellable.** A metadata request may wait server-side for rows that never come (an unsealed
  stream the user stopped reading). :meth:`MetaCalls.cancel` -- the loader's ``close()`` --
  cancels it and wakes any retry pause; the waiting thread then gets :class:`LoaderClosed`,
  which ends the iteration quietly (the close was intended). A ``ClosedError`` that was *not*
  caused by ``cancel()`` (an aborted partition, a closed cluster) is a real error and propagates.
* **Never silent.** While a request waits, :class:`~tq_loader.loader.waiting.WaitLog` logs at INFO
  what it waits for, at a growing interval.
* **Polling mode.** With ``controller.polling_mode: true`` the controller answers at once with an
  empty, not-end-of-stream batch when rows are not ready yet (TransferQueue's tutorials ask for
  it). The request is then retried after a short pause (10 ms, doubling to 1 s) until rows come,
  the sealed stream ends, or the request's ``timeout`` passes (``TQTimeoutError``). Without polling
  mode the controller waits instead, and no retry ever happens.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tq_loader._meta_util import warn_once
from tq_loader.errors import ClosedError, TQTimeoutError
from tq_loader.loader.waiting import WaitLog, WaitTarget, describe_wait
from tq_loader.metadata import BatchMeta

__all__ = [
    "FIRST_PAUSE_S",
    "MAX_PAUSE_S",
    "LoaderClosed",
    "MetaCalls",
    "Pauses",
    "earliest",
    "warn_tq_sleep_env",
]

FIRST_PAUSE_S = 0.01
MAX_PAUSE_S = 1.0
TQ_SLEEP_ENV = "TQ_STREAMING_DATASET_EMPTY_BATCH_SLEEP_INTERVAL"  # TransferQueue's knob, not honoured


def warn_tq_sleep_env() -> None:
    """Say once that TransferQueue's retry-interval variable has no effect here (and what does)."""
    if TQ_SLEEP_ENV in os.environ:
        warn_once(
            ("StreamingDataset", TQ_SLEEP_ENV),
            f"{TQ_SLEEP_ENV} is TransferQueue's and has no effect: in polling mode tq_loader retries after "
            f"{FIRST_PAUSE_S * 1000:.0f} ms, doubling up to {MAX_PAUSE_S:.0f} s; bound the wait with "
            "StreamingDataset(timeout=...)",
            stacklevel=4,
        )


class LoaderClosed(Exception):
    """The loader was closed on purpose while this thread waited: end the iteration quietly."""


class Pauses:
    """Retry pauses of one wait: doubling from :data:`FIRST_PAUSE_S` to :data:`MAX_PAUSE_S`,
    bounded by the wait's deadline (``timeout`` seconds after it started; ``None``: unbounded)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._next = FIRST_PAUSE_S

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next_delay(self) -> float | None:
        """The next pause, or ``None`` when the deadline has passed."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            return None
        delay = self._next if remaining is None else min(self._next, remaining)
        self._next = min(self._next * 2, MAX_PAUSE_S)
        return delay


class MetaCalls:
    """``get_meta`` for the batches of one iteration (one planner thread, or a dataset iterator).

    ``log_wait_after``: seconds before the first INFO report of a wait (``None``: never log).
    ``timeout``: used when a request has none (the loader's torch-style ``timeout``).
    """

    def __init__(
        self, client: Any, *, log_wait_after: float | None = 5.0, timeout: float | None = None
    ) -> None:
        self.client = client
        self.log_wait_after = log_wait_after
        self.timeout = timeout
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_log(self, target: WaitTarget) -> WaitLog:
        return WaitLog(self.client, target, self.log_wait_after)

    def get_meta(self, target: WaitTarget, args: Sequence[Any], kwargs: Mapping[str, Any]) -> BatchMeta:
        """Batch metadata for ``target``: rows, or the end-of-stream marker (retrying empty answers)."""
        timeout = earliest(kwargs.get("timeout"), self.timeout)
        pauses, wait = Pauses(timeout), self.wait_log(target)
        while True:
            call = {**kwargs, "timeout": pauses.remaining()}
            meta = self._request(wait, args, call)
            if meta.size > 0 or meta.is_end_of_stream:
                return meta
            self.pause(pauses, wait, "the controller answered at once that no batch is ready (polling mode)")

    def pause(self, pauses: Pauses, wait: WaitLog, why: str) -> None:
        """Sleep before the next retry (woken by :meth:`cancel`); ``TQTimeoutError`` past the deadline."""
        delay = pauses.next_delay()
        if delay is None:
            waited = time.monotonic() - wait.started
            raise TQTimeoutError(f"{why}; gave up after the timeout of {pauses.timeout}s. "
                                 f"{describe_wait(self.client, wait.target, waited)}")  # fmt: skip
        due = wait.delay()
        while True:  # keep the wait reports on time during long pauses
            step = delay if due is None else min(delay, due)
            if self._closed.wait(step):
                raise LoaderClosed
            wait.tick()
            delay -= step
            if delay <= 0:
                return
            due = wait.delay()

    def _request(self, wait: WaitLog, args: Sequence[Any], kwargs: Mapping[str, Any]) -> BatchMeta:
        if not hasattr(self.client, "submit"):  # a client without the async core (a test double)
            return self.client.get_meta(*args, **kwargs)
        with self._lock:
            if self._closed.is_set():
                raise LoaderClosed
            future = self.client.submit(lambda core: core.async_get_meta(*args, **kwargs))
            self._futures.add(future)
        try:
            while not future.done():
                concurrent.futures.wait([future], timeout=wait.delay())
                wait.tick()
            return future.result()
        except concurrent.futures.CancelledError:
            raise LoaderClosed from None  # only cancel() cancels these futures
        except ClosedError:
            if self._closed.is_set():
                raise LoaderClosed from None
            raise
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel(self) -> None:
        """Cancel pending requests and wake retry pauses; later requests raise :class:`LoaderClosed`."""
        with self._lock:
            self._closed.set()
            futures, self._futures = list(self._futures), set()
        for future in futures:
            future.cancel()


def earliest(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional timeouts (``None``: unbounded)."""
    if a is None:
        return b
    return a if b is None else min(a, b)
