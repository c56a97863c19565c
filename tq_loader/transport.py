"""ZMQ transport on asyncio: a ROUTER ``Server`` and a DEALER ``Connection``.

* Every request carries an id that its reply echoes, so many requests are in flight on one socket
  and replies may come back in any order.
* Deadlines are the server's: a request's ``timeout`` travels with it and the server answers with
  a ``TQTimeoutError`` reply when it passes. The client waits a little longer (``grace``) and only
  then gives up on its own -- so a server never hands out rows to a client that stopped listening.
* A handler's exception becomes an error reply that the client re-raises with the same type. Any
  exception from decoding or handling one message (garbage, truncated or ~unboundedly nested
  headers, a body with wrong types, a handler bug) is answered to that request's id -- the
  envelope is decoded before the body, so the id is known -- and the receive loop goes on.
* A lost connection (peer process died) fails the requests in flight with ``TQConnectionError``.
* Binding beyond loopback requires an auth token, checked on every request.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

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
from tq_loader.protocol import (
    PROTOCOL_VERSION,
    Reply,
    ReplyEnvelope,
    Request,
    RequestEnvelope,
    decode_reply,
    encode,
)
from tq_loader.stats import ServerStats

__all__ = ["Connection", "Handler", "RequestContext", "Server", "check_bind", "is_loopback"]

log = logging.getLogger(__name__)
_CANCEL_LINGER_MS = 500
Buffer = Any  # anything with the buffer protocol
Handler = Callable[["RequestContext", Request, list[memoryview]], Awaitable[tuple[Reply, Sequence[Buffer]]]]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _buffers_nbytes(buffers: Sequence[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


@dataclass
class RequestContext:
    """What a handler knows about the request it serves."""

    request_id: int
    deadline: float | None  # loop.time() at which the client's timeout passes
    loop: asyncio.AbstractEventLoop = field(repr=False)
    in_process: bool = False  # the caller is in this process (buffers are its memory, not frames)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.loop.time()

    def expired(self) -> bool:
        return self.deadline is not None and self.loop.time() >= self.deadline


@dataclass
class _ServerStats:
    requests: int = 0
    errors: int = 0
    malformed: int = 0
    refused: int = 0  # requests without the right auth token
    in_flight: int = 0
    cancelled: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _Throttled:
    """A warning that may repeat often (hostile or misconfigured peers): the first one is logged,
    then at most one line per ``every`` seconds, saying how many were left unlogged."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self._last, self._unlogged = every, -float("inf"), 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._unlogged += 1
            return
        more = (
            f" (and {self._unlogged} more like it in the last {now - self._last:.0f}s)"
            if self._unlogged
            else ""
        )
        self._last, self._unlogged = now, 0
        log.warning(message + more, *args)


def check_bind(host: str, auth_token: str | None, name: str = "service") -> None:
    """Refuse to expose a service beyond this machine without a token (call before binding)."""
    if not is_loopback(host) and not auth_token:
        raise ValueError(
            f"{name}: binding to {host!r} exposes the service beyond this machine; "
            "set an auth_token (config `auth_token`) or bind to 127.0.0.1"
        )


class Server:
    """Serve ``handler`` on a ROUTER socket; each request runs as its own task.

    Whatever one message contains, the receive loop goes on: a frame that fails to decode, a
    handler that raises anything, even a reply that fails to encode, becomes an error reply to
    that request's id (``-1`` when not even the id can be read, which no client waits for).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        auth_token: str | None = None,
        name: str = "service",
        max_header_bytes: int = p.MAX_HEADER_BYTES,
    ) -> None:
        check_bind(host, auth_token, name)
        self.handler, self.host, self.port, self.name = handler, host, port, name
        self.max_header_bytes = max_header_bytes
        self._token = auth_token
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._sends: set[asyncio.Task[None]] = set()  # error replies sent from the receive loop
        self._malformed_log = _Throttled()
        self._refused_log = _Throttled()
        self.stats = _ServerStats()
        self.address = ""

    async def start(self) -> str:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.port:
            sock.bind(f"tcp://{self.host}:{self.port}")
        else:
            self.port = sock.bind_to_random_port(f"tcp://{self.host}")
        self._sock = sock
        self.address = f"tcp://{self.host}:{self.port}"
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self.address

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frames = await self._sock.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as exc:  # a closed socket ends the server; anything else is logged
                if self._sock is None or self._sock.closed:
                    return
                log.warning("%s: receive failed: %s", self.name, exc)
                continue
            try:
                self._dispatch(frames)
            except Exception:  # a bug in dispatch itself: one message is lost, never the server
                self.stats.errors += 1
                log.exception("%s: dropped a message that could not be dispatched", self.name)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        """Decode the envelope, then the body; start a handler task, or cancel one on ``Cancel``.

        Each failure is answered to the request's id as soon as that id is known (the envelope is
        read before the body, so a body with a wrong type still reaches its caller)."""
        identity = frames[0].bytes
        self.stats.bytes_in += sum(len(f) for f in frames[1:])
        request_id = -1
        try:
            if len(frames) < 2:
                raise ProtocolError("message without a header frame")
            header = frames[1].buffer
            try:
                head = p.decode_head(header, self.max_header_bytes)
            except ProtocolError:
                request_id = p.peek_id(header)
                raise
            request_id = head.id
            self._check(head)
            body = p.decode_body(head.body)
        except Exception as exc:
            self._reply_error(identity, request_id, exc)
            return
        if isinstance(body, p.Cancel):
            task = self._handlers.get((identity, body.request_id))
            if task is not None:
                task.cancel()
                self.stats.cancelled += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._handle(identity, request_id, head.timeout, body, [f.buffer for f in frames[2:]])
        )
        if request_id >= 0:
            key = (identity, request_id)
            self._handlers[key] = task
            task.add_done_callback(lambda _t, k=key: self._handlers.pop(k, None))

    def _reply_error(self, identity: bytes, request_id: int, exc: Exception) -> None:
        """Answer a message that never reached the handler (malformed or refused)."""
        self.stats.errors += 1
        if isinstance(exc, ProtocolError):
            self.stats.malformed += 1
            self._malformed_log.warn("%s: malformed request %d: %s", self.name, request_id, exc)
        elif isinstance(exc, TQConnectionError):  # from _check: no or a wrong auth token
            self.stats.refused += 1
            self._refused_log.warn("%s: refused request %d: %s", self.name, request_id, exc)
        else:
            log.exception("%s: failed to read request %d", self.name, request_id, exc_info=exc)
        task = asyncio.get_running_loop().create_task(
            self._send(self._error_frames(identity, request_id, exc))
        )
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _handle(
        self,
        identity: bytes,
        request_id: int,
        timeout: float | None,
        body: Request,
        buffers: list[memoryview],
    ) -> None:
        self.stats.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + max(0.0, timeout)
            ctx = RequestContext(request_id, deadline, loop)
            self.stats.requests += 1
            reply, out_buffers = await self.handler(ctx, body, buffers)
            out: list[Any] = [identity, encode(ReplyEnvelope(request_id, reply)), *out_buffers]
        except asyncio.CancelledError:
            return  # cancelled by the client (or by close): nobody is waiting for a reply
        except Exception as exc:  # every failure becomes a typed error reply; the server keeps serving
            self.stats.errors += 1
            if isinstance(exc, ProtocolError):
                self.stats.malformed += 1
            elif not isinstance(exc, TQError | ValueError | KeyError | TypeError | TimeoutError):
                log.exception("%s: handler failed on request %d", self.name, request_id)
            out = self._error_frames(identity, request_id, exc)
        finally:
            self.stats.in_flight -= 1
        await self._send(out)

    @staticmethod
    def _error_frames(identity: bytes, request_id: int, exc: BaseException) -> list[Any]:
        kind, message = error_to_wire(exc)
        try:
            return [identity, encode(ReplyEnvelope(request_id, None, kind, message))]
        except Exception:  # a message that cannot be encoded (e.g. lone surrogates): keep the kind
            return [identity, encode(ReplyEnvelope(request_id, None, kind, type(exc).__name__))]

    def _check(self, head: p.RequestHead) -> None:
        if head.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {head.version} != {PROTOCOL_VERSION}: "
                "client and server run different tq_loader versions"
            )
        if self._token and not hmac.compare_digest((head.token or "").encode(), self._token.encode()):
            raise TQConnectionError(
                f"{self.name}: request refused: {'wrong' if head.token else 'missing'} auth token. Pass the "
                "cluster's token (auth_token=..., or TQ_LOADER_AUTH_TOKEN in the environment)"
            )

    async def _send(self, frames: list[Any]) -> None:
        if self._sock is None or self._sock.closed:
            return
        try:
            await self._sock.send_multipart(frames, copy=False)
            self.stats.bytes_out += _buffers_nbytes(frames[1:])
        except zmq.ZMQError as exc:  # the client went away (EHOSTUNREACH): nothing to deliver to
            log.debug("%s: reply dropped: %s", self.name, exc)

    async def close(self) -> None:
        for task in [*self._handlers.values(), *self._sends, self._task]:
            if task is not None:
                task.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def statistics(self) -> ServerStats:
        return ServerStats(address=self.address, **vars(self.stats))


class Connection:
    """A DEALER socket to one server, owned by one event loop; safe for many concurrent requests.

    The ZMQ implementation of :class:`tq_loader.channel.Channel` (received frames are private to
    the request, so ``private_replies`` is True).
    """

    private_replies = True
    in_process = False

    def __init__(
        self,
        address: str,
        *,
        auth_token: str | None = None,
        connect_timeout: float = 10.0,
        grace: float = 5.0,
    ) -> None:
        self.address = address
        self._token = auth_token
        self.connect_timeout = connect_timeout
        self.grace = grace
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[ReplyEnvelope, list[memoryview]]]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._connected: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.ever_connected = False

    def _open(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise ClosedError(f"connection to {self.address} is closed")
        if self._sock is None:
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for a peer that is not there
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._connected = asyncio.Event()
            sock.connect(self.address)
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._read(sock)), loop.create_task(self._watch(monitor))]
            self._sock = sock
        return self._sock

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        assert self._connected is not None
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_CONNECTED:
                    self.ever_connected = True
                    self._connected.set()
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self._connected.clear()
                    self._fail_all(TQConnectionError(f"lost connection to {self.address} (did it stop?)"))
        except (asyncio.CancelledError, zmq.ZMQError):
            return
        finally:
            monitor.close(linger=0)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            try:
                envelope = decode_reply(frames[0].buffer)
            except ProtocolError as exc:  # fail its caller at once when its id can be read
                log.warning("dropping a malformed reply from %s: %s", self.address, exc)
                waiting = self._pending.pop(p.peek_id(frames[0].buffer), None)
                if waiting is not None and not waiting.done():
                    waiting.set_exception(ProtocolError(f"malformed reply from {self.address}: {exc}"))
                continue
            future = self._pending.pop(envelope.id, None)
            if future is not None and not future.done():
                future.set_result((envelope, [f.buffer for f in frames[1:]]))

    def _cancel_remote(self, request_id: int) -> None:
        """Tell the server to stop serving a request we no longer wait for (best effort)."""
        if self._sock is None or self._sock.closed:
            return
        header = encode(RequestEnvelope(next(self._ids), p.Cancel(request_id=request_id), None, self._token))
        try:
            sent = self._sock.send(header, zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # not connected: the server cannot reply to anyone anyway
        if isinstance(sent, asyncio.Future):  # fire and forget, but never leave an exception unread
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
                # a caller that already gave up (cancelled, timed out) never awaits it: marking it
                # retrieved keeps asyncio from logging "Future exception was never retrieved"
                future.exception()

    async def request(
        self, body: Request, buffers: Sequence[Buffer] = (), *, timeout: float | None = None
    ) -> tuple[Reply, list[memoryview]]:
        """Send ``body`` (+ raw ``buffers``) and wait for its reply; typed errors are re-raised."""
        sock = self._open()
        assert self._connected is not None
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.connect_timeout)
            except TimeoutError:
                raise TQConnectionError(
                    f"cannot reach {self.address} within {self.connect_timeout:.0f}s; is the service running?"
                ) from None
        request_id = next(self._ids)
        future: asyncio.Future[tuple[ReplyEnvelope, list[memoryview]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        header = encode(RequestEnvelope(request_id, body, timeout, self._token))
        started = time.monotonic()
        try:
            # With IMMEDIATE, a send to a peer that vanished after the check above waits for a
            # reconnect that may never come: bound it like a connect.
            await asyncio.wait_for(sock.send_multipart([header, *buffers], copy=False), self.connect_timeout)
        except (TimeoutError, zmq.Again):
            lost = self._pending.pop(request_id, None)
            if lost is not None and lost.done() and not lost.cancelled():
                lost.exception()  # read it: the disconnect may have failed it already
            raise TQConnectionError(
                f"{self.address} did not accept the request within {self.connect_timeout:.0f}s; "
                "is the service running?"
            ) from None
        wait = None if timeout is None else timeout + self.grace
        try:
            envelope, frames = await asyncio.wait_for(future, wait)
        except TimeoutError:
            self._cancel_remote(request_id)
            raise TQTimeoutError(
                f"{type(body).__name__} to {self.address}: no reply within {time.monotonic() - started:.1f}s"
            ) from None
        except asyncio.CancelledError:
            self._cancel_remote(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
        if envelope.error_kind is not None:
            raise error_from_wire(envelope.error_kind, envelope.error_message or "")
        if envelope.body is None:
            raise ProtocolError(f"empty reply to {type(body).__name__} from {self.address}")
        return envelope.body, frames

    async def close(self) -> None:
        """Close the socket; requests still waiting in the server are cancelled there first, so a
        parked get_meta of a closed client never takes rows that nobody will receive."""
        self._closed = True
        abandoned = list(self._pending)
        self._fail_all(ClosedError(f"connection to {self.address} was closed"))
        for task in self._tasks:
            task.cancel()
        if self._sock is not None:
            for request_id in abandoned:
                self._cancel_remote(request_id)
            # A short linger lets those Cancel messages leave before the socket goes away.
            self._sock.close(linger=_CANCEL_LINGER_MS if abandoned else 0)
            self._sock = None
