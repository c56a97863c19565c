"""Clients of a tq_loader cluster: :class:`Client`, the sync facade over :class:`AsyncClient`.

``Client`` runs ``AsyncClient`` coroutines (``client_core``) on one event-loop thread (shared with
the embedded services of this process), so it works from plain threads, DataLoader workers and
inside a running loop (Jupyter). Each sync method ``x`` has an ``async_x`` twin, as in
TransferQueue's ``TransferQueueClient``; both carry the real signature. Code that needs several
calls in a row without a thread hop each runs a coroutine of the ``AsyncClient`` with
:meth:`Client.run` / :meth:`Client.submit`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

from tq_loader.client_core import DEFAULT_TIMEOUT, AsyncClient, client_args
from tq_loader.config import ClientConfig
from tq_loader.errors import ArgumentError, ClosedError
from tq_loader.loop import LoopThread, shared_loop

__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Client", "TransferQueueClient"]

P = ParamSpec("P")
R = TypeVar("R")


async def _shutdown(core: AsyncClient, grace: float = 5.0) -> None:
    """Close ``core``, then let the calls still running for it finish.

    Closing fails their requests with ``ClosedError``, but the callers only see it once their tasks
    have run to the end.
    """
    await core.async_close()
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current and getattr(t, "_tq_client", None) is core]
    if others:
        _, pending = await asyncio.wait(others, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)


def _sync(
    method: Callable[Concatenate[AsyncClient, P], Awaitable[R]],
) -> tuple[Callable[Concatenate[Client, P], R], Callable[Concatenate[Client, P], Awaitable[R]]]:
    """The sync method and its ``async_`` twin for ``AsyncClient.async_<name>``, with its signature."""

    @functools.wraps(method)
    def sync_method(self: Client, *a: P.args, **kw: P.kwargs) -> R:
        return self.run(lambda core: method(core, *a, **kw))

    @functools.wraps(method)
    async def async_method(self: Client, *a: P.args, **kw: P.kwargs) -> R:
        return await asyncio.wrap_future(self.submit(lambda core: method(core, *a, **kw)))

    sync_method.__name__ = sync_method.__qualname__ = method.__name__.removeprefix("async_")
    return sync_method, async_method


class Client:
    """Sync facade over :class:`AsyncClient` (plus ``async_*`` twins usable from any event loop).

    Fork-safe: a forked child gets a fresh loop thread and fresh sockets on first use.
    """

    def __init__(
        self, controller_address: str, *, config: ClientConfig | None = None, auth_token: str | None = None
    ) -> None:
        self.controller_address, self.config, self._token = client_args(
            controller_address, config, auth_token
        )
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: LoopThread | None = None
        self._async: AsyncClient | None = None
        self._closed = False

    def _ensure(self) -> tuple[LoopThread, AsyncClient]:
        with self._lock:
            if self._closed:  # fail fast: reconnecting to services that were stopped would hang
                raise ClosedError(
                    f"this client of {self.controller_address} is closed; use tq.get_client() or a new Client"
                )
            if self._loop is None or self._async is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._loop = shared_loop.acquire()
                self._async = AsyncClient(self.controller_address, config=self.config, auth_token=self._token)
            return self._loop, self._async

    # ------------------------------------------------------------------ the public seam
    def submit(self, fn: Callable[[AsyncClient], Awaitable[R]]) -> concurrent.futures.Future[R]:
        """Run ``fn(async_client)`` on the client's event loop; a future of its result.

        ``fn`` is a coroutine function of the :class:`AsyncClient` (e.g. ``lambda c: c.async_put(td,
        partition_id="p")``); cancelling the future cancels the call, in the server too.
        """
        if not callable(fn):
            raise ArgumentError(
                f"fn must be a coroutine function of the AsyncClient, got {type(fn).__name__}"
            )
        loop, core = self._ensure()

        async def call() -> R:
            task = asyncio.current_task()
            if task is not None:
                task._tq_client = core  # type: ignore[attr-defined]  # lets close() wait for it
            return await fn(core)

        return loop.submit(call())

    def run(self, fn: Callable[[AsyncClient], Awaitable[R]]) -> R:
        """Run ``fn(async_client)`` on the client's loop and wait for its result (from any thread
        but that loop's own)."""
        return self.submit(fn).result()

    def close(self) -> None:
        """Release the sockets and the loop; later calls raise ``ClosedError``."""
        with self._lock:
            self._closed = True
            loop, core, self._loop, self._async = self._loop, self._async, None, None
        if loop is not None and core is not None and loop.alive and self._pid == os.getpid():
            loop.run(_shutdown(core))
            shared_loop.release(loop)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.controller_address!r})"

    get_meta, async_get_meta = _sync(AsyncClient.async_get_meta)
    put, async_put = _sync(AsyncClient.async_put)
    get_data, async_get_data = _sync(AsyncClient.async_get_data)
    set_custom_meta, async_set_custom_meta = _sync(AsyncClient.async_set_custom_meta)
    set_tags, async_set_tags = _sync(AsyncClient.async_set_tags)
    clear_samples, async_clear_samples = _sync(AsyncClient.async_clear_samples)
    clear_partition, async_clear_partition = _sync(AsyncClient.async_clear_partition)
    create_partition, async_create_partition = _sync(AsyncClient.async_create_partition)
    get_partition_list, async_get_partition_list = _sync(AsyncClient.async_get_partition_list)
    get_production_status, async_get_production_status = _sync(AsyncClient.async_get_production_status)
    check_production_status, async_check_production_status = _sync(AsyncClient.async_check_production_status)
    get_consumption_status, async_get_consumption_status = _sync(AsyncClient.async_get_consumption_status)
    check_consumption_status, async_check_consumption_status = _sync(
        AsyncClient.async_check_consumption_status
    )
    reset_consumption, async_reset_consumption = _sync(AsyncClient.async_reset_consumption)
    seal, async_seal = _sync(AsyncClient.async_seal)
    partition_info, async_partition_info = _sync(AsyncClient.async_partition_info)
    next_row_id, async_next_row_id = _sync(AsyncClient.async_next_row_id)
    abort, async_abort = _sync(AsyncClient.async_abort)
    kv_retrieve_meta, async_kv_retrieve_meta = _sync(AsyncClient.async_kv_retrieve_meta)
    kv_lookup, async_kv_lookup = _sync(AsyncClient.async_kv_lookup)
    kv_write, async_kv_write = _sync(AsyncClient.async_kv_write)
    kv_retrieve_keys, async_kv_retrieve_keys = _sync(AsyncClient.async_kv_retrieve_keys)
    kv_list, async_kv_list = _sync(AsyncClient.async_kv_list)
    statistics, async_statistics = _sync(AsyncClient.async_statistics)
    describe, async_describe = _sync(AsyncClient.async_describe)
    announce_metrics, async_announce_metrics = _sync(AsyncClient.async_announce_metrics)
    metrics_endpoint, async_metrics_endpoint = _sync(AsyncClient.async_metrics_endpoint)
    export_state, async_export_state = _sync(AsyncClient.async_export_state)
    import_state, async_import_state = _sync(AsyncClient.async_import_state)


TransferQueueClient = Client
