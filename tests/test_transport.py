"""Transport: request ids, out-of-order replies, typed errors, deadlines, garbage frames, auth."""

from __future__ import annotations

import asyncio
import socket

import pytest
import zmq
import zmq.asyncio

from tq_loader import protocol as p
from tq_loader.errors import (
    NotFoundError,
    ProtocolError,
    SchemaError,
    TQConnectionError,
    TQTimeoutError,
)
from tq_loader.transport import Connection, RequestContext, Server


class EchoService:
    """Replies to CreatePartition with Ok after an optional per-partition delay gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.seen: list[str] = []

    async def handle(self, ctx: RequestContext, req: p.Request, buffers: list[memoryview]):
        if isinstance(req, p.CreatePartition):
            self.seen.append(req.partition_id)
            gate = self.gates.get(req.partition_id)
            if gate is not None:
                await gate.wait()
            return p.NamesReply(names=[req.partition_id, *(bytes(b).decode() for b in buffers)]), [b"x" * 3]
        if isinstance(req, p.Seal):
            raise NotFoundError(f"no partition {req.partition_id!r}")
        if isinstance(req, p.Abort):
            raise ValueError("plain value error")
        if isinstance(req, p.Stats):
            remaining = ctx.remaining()
            await asyncio.sleep(0)  # yield once; the deadline below is what ends the wait
            assert remaining is not None
            raise p_timeout(remaining)
        raise RuntimeError("unexpected")


def p_timeout(remaining: float) -> Exception:
    return TQTimeoutError(f"deadline {remaining:.3f}")


@pytest.fixture
async def served():
    service = EchoService()
    server = Server(service.handle, name="echo")
    address = await server.start()
    conn = Connection(address, grace=2.0)
    yield service, server, conn
    await conn.close()
    await server.close()


async def test_round_trip_with_buffers(served):
    _, server, conn = served
    reply, frames = await conn.request(p.CreatePartition(partition_id="a"), [b"hello", memoryview(b"w")])
    assert isinstance(reply, p.NamesReply)
    assert reply.names == ["a", "hello", "w"]
    assert [bytes(f) for f in frames] == [b"xxx"]
    assert server.statistics()["requests"] == 1


async def test_replies_out_of_order_on_one_socket(served):
    service, _, conn = served
    service.gates["slow"] = asyncio.Event()
    slow = asyncio.ensure_future(conn.request(p.CreatePartition(partition_id="slow")))
    while "slow" not in service.seen:  # the slow request is parked in the server
        await asyncio.sleep(0.001)
    fast, _ = await conn.request(p.CreatePartition(partition_id="fast"))
    assert fast.names == ["fast"]
    assert not slow.done()
    service.gates["slow"].set()
    reply, _ = await slow
    assert reply.names == ["slow"]


async def test_many_in_flight(served):
    _, _, conn = served
    replies = await asyncio.gather(
        *(conn.request(p.CreatePartition(partition_id=str(i))) for i in range(200))
    )
    assert [r.names[0] for r, _ in replies] == [str(i) for i in range(200)]


async def test_typed_errors_cross_the_wire(served):
    _, server, conn = served
    with pytest.raises(NotFoundError, match="no partition 'x'"):
        await conn.request(p.Seal(partition_id="x"))
    with pytest.raises(SchemaError, match="plain value error"):
        await conn.request(p.Abort(partition_id="x", reason="r"))
    with pytest.raises(TQTimeoutError):
        await conn.request(p.Stats(), timeout=5)
    # the server still serves after errors
    reply, _ = await conn.request(p.CreatePartition(partition_id="ok"))
    assert reply.names == ["ok"]
    assert server.statistics()["errors"] == 3


async def test_client_gives_up_when_server_never_replies(served):
    service, _, conn = served
    conn.grace = 0.05
    service.gates["never"] = asyncio.Event()
    with pytest.raises(TQTimeoutError, match="no reply"):
        await conn.request(p.CreatePartition(partition_id="never"), timeout=0.05)
    service.gates["never"].set()


async def test_garbage_frames_do_not_kill_the_server(served):
    _, server, conn = served
    raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    try:
        for junk in (
            [b"\xff\x00garbage"],
            [b""],
            [p.encode(p.RequestEnvelope(1, p.Stats()))[:-3]],
            [b"\x93\x01"],
        ):
            await raw.send_multipart(junk)
            (header,) = await raw.recv_multipart()
            envelope = p.decode_reply(header)
            assert envelope.error_kind == "ProtocolError"
        # an unknown message tag is malformed too
        await raw.send_multipart([b"\x93\x07\x81\xa4type\xa7Unknown\xc0"])
        (header,) = await raw.recv_multipart()
        assert p.decode_reply(header).error_kind == "ProtocolError"
    finally:
        raw.close()
    reply, _ = await conn.request(p.CreatePartition(partition_id="alive"))
    assert reply.names == ["alive"]
    assert server.statistics()["malformed"] == 5


async def test_decode_rejects_malformed_header():
    with pytest.raises(ProtocolError):
        p.decode_request(b"\x00\x01\x02")
    with pytest.raises(ProtocolError):
        p.ids_from_wire(b"1234567")


async def test_unreachable_server_is_a_connection_error():
    holder = socket.socket()  # bound, never listening: connections to it are refused, and no one else gets it
    holder.bind(("127.0.0.1", 0))
    try:
        conn = Connection(f"tcp://127.0.0.1:{holder.getsockname()[1]}", connect_timeout=0.2)
        with pytest.raises(TQConnectionError, match="cannot reach"):
            await conn.request(p.Stats(), timeout=1)
        await conn.close()
    finally:
        holder.close()


async def test_server_death_fails_requests_in_flight():
    service = EchoService()
    server = Server(service.handle)
    conn = Connection(await server.start())
    await conn.request(p.CreatePartition(partition_id="warm"))
    service.gates["hang"] = asyncio.Event()
    pending = asyncio.ensure_future(conn.request(p.CreatePartition(partition_id="hang")))
    while "hang" not in service.seen:
        await asyncio.sleep(0.001)
    await server.close()
    with pytest.raises(TQConnectionError, match="lost connection"):
        await pending
    await conn.close()


def test_wide_bind_requires_token():
    with pytest.raises(ValueError, match="auth_token"):
        Server(EchoService().handle, host="0.0.0.0")


async def test_auth_token_checked():
    service = EchoService()
    server = Server(service.handle, auth_token="s3cret")
    address = await server.start()
    good, bad = Connection(address, auth_token="s3cret"), Connection(address, auth_token="nope")
    try:
        reply, _ = await good.request(p.CreatePartition(partition_id="a"))
        assert reply.names == ["a"]
        with pytest.raises(TQConnectionError, match="auth token"):
            await bad.request(p.CreatePartition(partition_id="b"))
        assert service.seen == ["a"]
    finally:
        await good.close()
        await bad.close()
        await server.close()


async def test_cancelled_request_is_cancelled_on_the_server(served):
    service, server, conn = served
    service.gates["parked"] = asyncio.Event()
    waiting = asyncio.ensure_future(conn.request(p.CreatePartition(partition_id="parked")))
    while "parked" not in service.seen:
        await asyncio.sleep(0.001)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The Cancel message travels on the same socket before this request, so it is handled first.
    await conn.request(p.CreatePartition(partition_id="after"))
    assert server.statistics()["cancelled"] == 1
    assert server.statistics()["in_flight"] == 0
