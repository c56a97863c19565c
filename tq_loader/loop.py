"""A private asyncio event loop on a daemon thread.

Services (embedded placement) and the sync ``Client`` facade both run their coroutines here, so
a caller can be a plain thread, a DataLoader worker or a Jupyter cell that already has a loop
running. After ``fork`` the thread is gone: :meth:`LoopThread.for_process` makes a fresh one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from tq_loader.errors import ClosedError

__all__ = ["LoopThread", "shared_loop"]

T = TypeVar("T")


class LoopThread:
    """Owns one event loop running forever on one daemon thread."""

    def __init__(self, name: str = "tq-loop") -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return not self._closed and self.pid == os.getpid() and self._thread.is_alive()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self.alive:
            coro.close()
            raise ClosedError("the event loop thread is closed (or this process was forked); reconnect")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        """Run ``coro`` on the loop and wait for its result from another thread."""
        if self.in_loop():
            raise RuntimeError("LoopThread.run() called from its own loop; await the coroutine instead")
        return self.submit(coro).result()  # type: ignore[arg-type]

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pid != os.getpid() or not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.in_loop():  # closed from a callback on the loop itself: it stops after this one
            return
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


class _SharedLoop:
    """One :class:`LoopThread` per process shared by embedded services and sync clients.

    Sharing the loop is what makes an in-process call cheap: a sync client's coroutine and the
    service it calls run on the same thread, so a request costs one thread hop (caller -> loop)
    instead of three. Reference counted: the thread stops when its last user releases it, so
    ``tq.close()`` leaves no thread behind. A forked child starts a fresh one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: LoopThread | None = None
        self._users = 0

    def acquire(self) -> LoopThread:
        with self._lock:
            if self._thread is None or not self._thread.alive:
                self._thread, self._users = LoopThread("tq-loop"), 0
            self._users += 1
            return self._thread

    def release(self, thread: LoopThread) -> None:
        """Drop one reference to ``thread`` (a stale thread from before a fork is ignored)."""
        with self._lock:
            if thread is not self._thread:
                return
            self._users -= 1
            if self._users > 0:
                return
            self._thread = None
        thread.close()


shared_loop = _SharedLoop()
