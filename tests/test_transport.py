"""Transport: request ids, out-of-order replies, typed errors, deadlines, garbage frames, auth."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest
import zmq
import zmq.asyncio

from tq_loader import protocol as p
from tq_loader.errors import (
    NotFoundError,
    ProtocolError,
    SchemaError,
    TQConnectionError,
    TQError,
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


# ---------------------------------------------------------------------- hostile headers (issue 7)
def _get_meta_header(request_id: int, config_bytes: bytes) -> bytes:
    """A GetMeta envelope whose ``sampling_config`` is the msgpack map ``config_bytes``."""
    marker = b"\x81\xa6marker\x00"  # msgpack of {"marker": 0}
    header = p.encode(
        p.RequestEnvelope(
            request_id,
            p.GetMeta(
                partition_id="p",
                data_fields=["x"],
                batch_size=1,
                mode="force_fetch",
                sampling_config={"marker": 0},
            ),
        )
    )
    assert header.count(marker) == 1
    return header.replace(marker, config_bytes)


def _nested(levels: int) -> bytes:
    """msgpack of {"k": [[[...[None]...]]]} with ``levels`` containers in all."""
    return b"\x81\xa1k" + b"\x91" * (levels - 1) + b"\xc0"


@pytest.fixture
async def controller():
    from tq_loader.controller.service import ControllerService

    server = Server(ControllerService().handle, name="controller", max_header_bytes=1 << 20)
    address = await server.start()
    raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    conn = Connection(address, grace=1.0)
    yield server, raw, conn
    raw.close()
    await conn.close()
    await server.close()


async def _raw_reply(raw: zmq.asyncio.Socket, frames: list[bytes]) -> p.ReplyEnvelope:
    await raw.send_multipart(frames)
    (header,) = await asyncio.wait_for(raw.recv_multipart(), 10)
    return p.decode_reply(header)


@pytest.mark.parametrize("levels", [2000, 200_000])
async def test_deeply_nested_header_gets_an_error_reply_and_the_port_keeps_serving(controller, levels):
    server, raw, conn = controller
    reply = await _raw_reply(raw, [_get_meta_header(17, _nested(levels))])
    assert (reply.id, reply.error_kind) == (17, "ProtocolError")
    assert "nests deeper" in reply.error_message
    # the receive loop survived: a normal request on the same port is answered
    answer, _ = await conn.request(p.ListPartitions(), timeout=5)
    assert isinstance(answer, p.NamesReply)
    assert server.statistics()["malformed"] == 1


async def test_free_form_fields_are_depth_limited(controller):
    _, raw, _ = controller
    reply = await _raw_reply(raw, [_get_meta_header(4, _nested(p.MAX_PAYLOAD_DEPTH + 1))])
    assert (reply.id, reply.error_kind) == (4, "ProtocolError")
    assert "GetMeta.sampling_config" in reply.error_message
    at_limit = await _raw_reply(raw, [_get_meta_header(5, _nested(p.MAX_PAYLOAD_DEPTH))])
    assert at_limit.id == 5 and at_limit.error_kind is None  # served


async def test_deep_tags_and_imported_state_are_refused_by_field(controller):
    _, raw, _ = controller
    deep: object = 0
    for _ in range(p.MAX_PAYLOAD_DEPTH + 5):
        deep = [deep]
    bodies = {
        "SetTags.tags": p.SetTags(partition_id="p", global_indexes=p.ids_to_wire([0]), tags=[{"t": deep}]),
        "ImportState.state": p.ImportState(state={"partitions": [{"tags": [{"t": deep}]}]}),
    }
    for i, (field, body) in enumerate(bodies.items()):
        reply = await _raw_reply(raw, [p.encode(p.RequestEnvelope(i, body))])
        assert (reply.id, reply.error_kind) == (i, "ProtocolError")
        assert field in reply.error_message


async def test_oversized_header_is_refused_before_decoding(controller):
    server, raw, conn = controller
    blob = 2 << 20
    huge = _get_meta_header(8, b"\x81\xa1k\xc6" + blob.to_bytes(4, "big") + b"\x00" * blob)
    assert len(huge) > server.max_header_bytes
    reply = await _raw_reply(raw, [huge])
    assert (reply.id, reply.error_kind) == (8, "ProtocolError")
    assert "exceeds the limit" in reply.error_message
    answer, _ = await conn.request(p.ListPartitions(), timeout=5)
    assert isinstance(answer, p.NamesReply)


async def test_any_handler_exception_becomes_an_error_reply():
    async def handle(ctx, req, buffers):
        if isinstance(req, p.Stats):
            raise RecursionError("maximum recursion depth exceeded")
        if isinstance(req, p.Describe):
            return p.StatsReply(stats={"unencodable": object()}), []
        return p.Ok(), []

    server = Server(handle)
    conn = Connection(await server.start(), grace=1.0)
    try:
        with pytest.raises(TQError, match="recursion"):
            await conn.request(p.Stats(), timeout=5)
        with pytest.raises(TQError):
            await conn.request(p.Describe(), timeout=5)
        reply, _ = await conn.request(p.ListPartitions(), timeout=5)
        assert isinstance(reply, p.Ok)
    finally:
        await conn.close()
        await server.close()


# ---------------------------------------------------------------------- undecodable bodies (issue 7, defect 4)
async def test_body_with_a_wrong_type_is_answered_to_its_request_id(controller):
    _, raw, _ = controller
    envelope = msgspec.msgpack.encode(
        [41, {"type": "GetMeta", "partition_id": 3, "data_fields": ["x"], "batch_size": 1}, 5.0, None, 1]
    )
    reply = await _raw_reply(raw, [envelope])
    assert (reply.id, reply.error_kind) == (41, "ProtocolError")
    assert "partition_id" in reply.error_message and "str" in reply.error_message


async def test_connection_gets_the_protocol_error_instead_of_a_timeout(controller):
    _, _, conn = controller
    bad = p.GetMeta(partition_id=3, data_fields=["x"], batch_size=1)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="partition_id"):
        await conn.request(bad, timeout=3)


def test_peek_id_reads_the_id_of_headers_that_do_not_decode():
    header = p.encode(p.RequestEnvelope(123456, p.Stats()))
    assert p.peek_id(header) == 123456
    assert p.peek_id(header[:6]) == 123456  # truncated after the id
    assert p.peek_id(memoryview(_get_meta_header(7, _nested(5000)))) == 7
    for junk in (b"", b"\x91", b"\xc0\x01", b"\x90\x01", b"\x91\xa1x", b"\x91\xff", b"\x91\xcd\x01"):
        assert p.peek_id(junk) == -1
