"""The client side of the transport seam: a :class:`Channel` carries one request to one service.

``await channel.request(body, buffers, timeout=...)`` returns ``(reply, buffers)`` or raises the
typed error the service raised. Two implementations:

* :class:`~tq_loader.transport.Connection` -- ZMQ DEALER to a service in another process (or host);
* :class:`LocalChannel` -- a service of *this* process: the memoryviews of the caller's tensors
  are handed straight to the service's handler (no socket, no copy of the buffers); the small
  control message is encoded and decoded once (microseconds), so both sides see exactly what the
  wire would carry and never share a mutable object. When the caller runs on the service's own event loop (the
  embedded placement shares one loop, see :data:`tq_loader.loop.shared_loop`) there is no thread
  hop either; otherwise the call is scheduled on the service's loop.

Services of this process announce themselves with :func:`register_local` under the address they
also serve over ZMQ, so a client needs nothing but that address to take the fast path. Both
channels give the same semantics: the deadline travels with the request, errors come back with
the same type and message, and giving up on a request (timeout, cancellation) cancels it in the
service, so a waiting ``get_meta`` consumes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tq_loader import protocol as p
from tq_loader.errors import (
    ClosedError,
    ProtocolError,
    TQConnectionError,
    TQError,
    TQTimeoutError,
    error_from_wire,
    error_to_wire,
)
from tq_loader.protocol import Reply, Request, copy_reply, copy_request
from tq_loader.transport import Handler, RequestContext

__all__ = ["Channel", "LocalChannel", "find_local", "register_local", "unregister_local"]

Buffer = Any  # anything with the buffer protocol


class Channel(ABC):
    """One request/reply route to one service; safe for many concurrent requests on its loop."""

    address: str
    #: True once the service answered or the connection came up (a later failure means it died).
    ever_connected: bool = False
    #: True when reply buffers are private to the caller (received frames); False when they may be
    #: views of the service's own memory (an in-process service), which the caller must copy
    #: before handing them out as writable tensors.
    private_replies: bool = True
    #: True when the service runs in this process: buffers may be handed over by reference (an
    #: output buffer to fill, the whole batch to copy rows from) instead of being sent.
    in_process: bool = False

    @abstractmethod
    async def request(
        self, body: Request, buffers: Sequence[Buffer] = (), *, timeout: float | None = None
    ) -> tuple[Reply, list[memoryview]]:
        """Send ``body`` (+ raw ``buffers``) and return its reply; typed errors are re-raised."""

    @abstractmethod
    async def close(self) -> None:
        """Stop using the channel; requests still in flight fail with ``ClosedError``."""


@dataclass(frozen=True)
class LocalEndpoint:
    """A service of this process: its handler and the event loop it runs on."""

    handler: Handler
    loop: asyncio.AbstractEventLoop
    name: str
    pid: int


_endpoints: dict[str, LocalEndpoint] = {}
_endpoints_lock = threading.Lock()


def register_local(address: str, handler: Handler, loop: asyncio.AbstractEventLoop, name: str) -> None:
    """Offer the service at ``address`` to in-process clients (the embedded placement calls this)."""
    with _endpoints_lock:
        _endpoints[address] = LocalEndpoint(handler, loop, name, os.getpid())


def unregister_local(address: str) -> None:
    with _endpoints_lock:
        _endpoints.pop(address, None)


def find_local(address: str) -> LocalEndpoint | None:
    """The in-process service at ``address``, if this very process hosts it (never after a fork)."""
    with _endpoints_lock:
        found = _endpoints.get(address)
    if found is None or found.pid != os.getpid() or found.loop.is_closed():
        return None
    return found


# requests a service may park (waiting for rows, for room): run as tasks so that giving up or
# closing the channel cancels them in the service; every other request completes without waiting
_MAY_WAIT = (p.GetMeta, p.PutRows)


class LocalChannel(Channel):
    """A :class:`Channel` to a service hosted by this process (see the module docstring)."""

    private_replies = False
    in_process = True

    def __init__(self, address: str, *, grace: float = 5.0) -> None:
        self.address = address
        self.grace = grace
        self._ids = itertools.count(1)
        self._closed = False
        self._inflight: set[asyncio.Future[Any]] = set()
        self.ever_connected = find_local(address) is not None

    def _endpoint(self) -> LocalEndpoint:
        if self._closed:
            raise ClosedError(f"channel to {self.address} is closed")
        endpoint = find_local(self.address)
        if endpoint is None:
            raise TQConnectionError(f"the in-process service at {self.address} stopped")
        return endpoint

    async def request(
        self, body: Request, buffers: Sequence[Buffer] = (), *, timeout: float | None = None
    ) -> tuple[Reply, list[memoryview]]:
        endpoint = self._endpoint()
        views = [b if isinstance(b, memoryview) else memoryview(b) for b in buffers]
        call = _serve(endpoint, next(self._ids), body, views, timeout)
        same_loop = asyncio.get_running_loop() is endpoint.loop
        if same_loop and not isinstance(body, _MAY_WAIT):
            return await call  # the embedded placement: no thread hop, not even a task
        if same_loop:
            pending: asyncio.Future[Any] = asyncio.ensure_future(call)
        else:
            pending = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, endpoint.loop))
        self._inflight.add(pending)
        wait = None if timeout is None else max(0.0, timeout) + self.grace
        try:
            return await asyncio.wait_for(pending, wait)  # giving up cancels it in the service
        except TQError:
            raise
        except TimeoutError:
            raise TQTimeoutError(
                f"{type(body).__name__} to {self.address}: no reply within {wait:.1f}s"
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise ClosedError(f"channel to {self.address} was closed") from None
            raise
        finally:
            self._inflight.discard(pending)

    async def close(self) -> None:
        """Requests still running fail with ``ClosedError`` (and are cancelled in the service)."""
        self._closed = True
        for pending in list(self._inflight):
            pending.cancel()


async def _serve(
    endpoint: LocalEndpoint, request_id: int, body: Request, views: list[memoryview], timeout: float | None
) -> tuple[Reply, list[memoryview]]:
    """Run the handler on its own loop with the request's deadline; errors keep their wire type."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + max(0.0, timeout)
    ctx = RequestContext(request_id, deadline, loop, in_process=True)
    try:
        reply, out = await endpoint.handler(ctx, copy_request(body), views)
    except TQError:
        raise
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # the same conversion the ZMQ server applies: same types on both channels
        raise error_from_wire(*error_to_wire(exc)) from exc
    if reply is None:
        raise ProtocolError(f"{endpoint.name} returned no reply to {type(body).__name__}")
    return copy_reply(reply), [b if isinstance(b, memoryview) else memoryview(b) for b in out]
