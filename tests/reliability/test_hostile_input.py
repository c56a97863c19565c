"""Hostile input: whatever arrives on a port, every port keeps serving and stored data is unchanged.

One ``tq-loader serve`` (a controller and two storage units, each its own ROUTER port) gets, from
raw DEALER sockets, hypothesis-generated multipart messages: random bytes, truncated headers,
deeply nested headers, large frames, envelopes and bodies of every message type with wrong-typed
fields, frames out of order, and writes aimed at the stored partition whose column specs lie. After
each message the port must answer a normal request; every reply must be a well-formed envelope.
Afterwards a normal client works against every port and the data stored before is intact.

A pickle whose ``__reduce__`` would create a file is sent as a header and as a buffer frame to
every port, and stored and read back as a value: the file never appears (nothing is unpickled).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_wire import describe, raw_request, request, serve

from tq_loader import protocol as p
from tq_loader.codec import ColumnSpec, encode_columns
from tq_loader.schema import FieldSchema

KEEP = "keep"  # the partition stored before the fuzzing; no generated message names it validly
N_KEEP = 150  # > stripe_rows (64): the rows live on both units
SKIP_TAGS = {"ImportState", "ReportLost"}  # valid ones would legitimately replace / drop state
REQUEST_TYPES = {cls.__name__: cls for cls in p.Request.__args__ if cls.__name__ not in SKIP_TAGS}


# ---------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def served():
    with serve("storage.num_units=2") as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    from tq_loader.client import Client

    c = Client(served.address)
    yield c
    c.close()


def _keep_columns() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(N_KEEP, 3, generator=g),
        "j": torch.nested.nested_tensor(
            [torch.arange(float(i % 5 + 1)) for i in range(N_KEEP)], layout=torch.jagged
        ),
        "s": [f"row-{i}" for i in range(N_KEEP)],
    }


def _snapshot(client, meta, address: str) -> dict[str, Any]:
    """Everything observable about the stored partition: values, production, per-unit rows."""
    td = client.get_data(meta)
    stats = client.statistics()
    part = dict(stats["controller"]["partitions"]["partitions"][KEEP])
    part.pop("bytes", None)
    units = {a: u["partitions"].get(KEEP, {}).get("rows") for a, u in stats["storage"]["units"].items()}
    status, _ = request(address, p.ProductionStatus(partition_id=KEEP))
    return {
        "x": td["x"].tolist(),
        "j": [row.tolist() for row in td["j"].unbind()],
        "s": list(td["s"].tolist()) if hasattr(td["s"], "tolist") else list(td["s"]),
        "controller": part,
        "units": units,
        "production": status.body,
    }


@pytest.fixture(scope="module")
def stored(served, client):
    meta = client.put(_keep_columns(), partition_id=KEEP)
    meta.update_custom_meta([{"n": i} for i in range(N_KEEP)])
    client.set_custom_meta(meta)
    return meta, _snapshot(client, meta, served.address)


# ---------------------------------------------------------------------------- strategies
_text = st.text(max_size=12).filter(lambda s: s != KEEP)
_ints = st.integers(-1000, 1000) | st.integers(2**62, 2**64 - 1) | st.sampled_from([-(2**63), 2**31, 2**32])
_leaves = st.none() | st.booleans() | _ints | st.floats() | _text | st.binary(max_size=48)
_values = st.recursive(
    _leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4), max_leaves=16
)


_FUZZ_IDS = p.ids_to_wire([10**9, 10**9 + 1])  # rows of no partition
_F32 = FieldSchema("float32", (3,))
_TEMPLATES = [  # one valid request of every type (partition "fuzz"), mutated field by field below
    p.Describe(), p.CreatePartition(partition_id="fuzz"), p.ListPartitions(),
    p.GetMeta(partition_id="fuzz", data_fields=["x"], batch_size=2, mode="force_fetch"),
    p.PrepareWrite(partition_id="fuzz", schemas={"x": _F32}, new_rows=2, insert=True),
    p.NotifyProduced(partition_id="fuzz", global_indexes=_FUZZ_IDS, schemas={"x": _F32}),
    p.SetTags(partition_id="fuzz", global_indexes=_FUZZ_IDS, tags=[{}, {}]),
    p.ClearSamples(partition_id="fuzz", global_indexes=_FUZZ_IDS), p.ClearPartition(partition_id="fuzz"),
    p.ResetConsumption(partition_id="fuzz"), p.ProductionStatus(partition_id="fuzz"),
    p.ConsumptionStatus(partition_id="fuzz", task_name="t"), p.KVLookup(partition_id="fuzz", keys=["k"]),
    p.KVList(), p.Seal(partition_id="fuzz"), p.Abort(partition_id="fuzz", reason="fuzz"), p.Stats(),
    p.Cancel(request_id=1), p.ExportState(),
    p.PutRows(partition_id="fuzz", global_indexes=_FUZZ_IDS, columns=[], schemas={}),
    p.GetRows(partition_id="fuzz", global_indexes=_FUZZ_IDS, fields=["x"]),
    p.DropRows(partition_id="fuzz", global_indexes=_FUZZ_IDS), p.DropPartition(partition_id="fuzz"),
    p.ExportRows(partition_id="fuzz"),
    # a segment of another host (the boot id is never this one's): refused, nothing is mapped
    p.AttachSegment(arena="fuzz", segment=p.ArenaSegment(0, 1, 0, 4096, b"t" * 16, "not-this-host")),
    p.DetachArena(arena="fuzz"), p.KVKeys(partition_id="fuzz", global_indexes=_FUZZ_IDS),
    p.PartitionInfo(partition_id="fuzz"), p.AnnounceMetrics(endpoint="127.0.0.1:9"),
]  # fmt: skip
assert {type(t).__name__ for t in _TEMPLATES} == set(REQUEST_TYPES)


@st.composite
def _body(draw) -> dict[str, Any]:
    """A request of any type with some fields replaced by arbitrary (mostly wrong-typed) values,
    some dropped and some unknown ones added; the tag itself is sometimes junk."""
    body = msgspec.to_builtins(draw(st.sampled_from(_TEMPLATES)))
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            del body[name]
        else:
            body[name] = draw(_values)
    body.update(draw(st.dictionaries(_text, _values, max_size=2)))
    return body


@st.composite
def _envelope(draw) -> bytes:
    """Mostly a readable envelope around a mutated body; sometimes any list at all."""
    if draw(st.integers(0, 4)) == 0:
        return msgspec.msgpack.encode(draw(st.lists(_values, max_size=6)))

    def mostly(good: Any, bad: st.SearchStrategy) -> Any:  # 4 in 5: the well-formed value
        return good if draw(st.integers(0, 4)) else draw(bad)

    fields = [
        mostly(draw(st.integers(0, 2**31)), _values),
        mostly(draw(_body()), _values),
        mostly(None, st.floats(0, 2) | _values),
        mostly(None, _values),
        mostly(p.PROTOCOL_VERSION, _values),
    ]
    return msgspec.msgpack.encode(fields[: mostly(5, st.integers(0, 4))])


def _valid_put(pid: str, n: int) -> list[Any]:
    specs, buffers = encode_columns({"x": torch.ones(n, 3)})
    body = p.PutRows(partition_id=pid, global_indexes=p.ids_to_wire(range(n)), columns=specs, schemas={})
    return [p.encode(p.RequestEnvelope(1, body)), *(bytes(memoryview(b)) for b in buffers)]


@st.composite
def _lying_put(draw) -> list[Any]:
    """A write to the stored rows that must be refused: specs that lie about their buffers, or a
    dtype that conflicts with the column (all-or-nothing: nothing may change)."""
    ids = draw(st.lists(st.integers(0, N_KEEP - 1), min_size=1, max_size=8, unique=True))
    n = len(ids)
    if draw(st.booleans()):  # a dtype conflict with correct sizes
        name = draw(st.sampled_from(["x", "j", "s"]))
        value = torch.zeros(n, 3, dtype=torch.int64) if name != "s" else torch.zeros(n)
        specs, buffers = encode_columns({name: value})
        buffers = [bytes(memoryview(b)) for b in buffers]
    else:  # a spec whose buffers never add up to what it announces
        kind = draw(st.sampled_from(["dense", "jagged", "rows", "object", "junk"]))
        dtype = draw(st.sampled_from(["float32", "int64", "object", "no-such-dtype"]))
        shape = tuple(draw(st.lists(st.integers(-2, 2**40), min_size=0, max_size=4)))
        nbuf = draw(st.integers(0, 3))
        nbytes = draw(st.integers(0, 4096))
        delta = draw(st.integers(1, 64))
        sizes = [nbytes + delta] + [0] * max(nbuf - 1, 0) if nbuf else []
        specs = [ColumnSpec(draw(st.sampled_from(["x", "j", "s"])), kind, dtype, shape, nbuf, nbytes=nbytes)]
        buffers = [
            draw(st.binary(min_size=size, max_size=size)) if size < 256 else bytes(size) for size in sizes
        ]
    body = p.PutRows(partition_id=KEEP, global_indexes=p.ids_to_wire(ids), columns=specs, schemas={})
    return [p.encode(p.RequestEnvelope(draw(st.integers(0, 2**31)), body)), *buffers]


def _deep(levels: int, where: str) -> bytes:
    """A header whose ``where`` field nests ``levels`` arrays deep."""
    marker = "\x00marker"
    bodies = {
        "sampling_config": p.GetMeta(
            partition_id="f", data_fields=[], batch_size=1, sampling_config={"k": marker}
        ),
        "tags": p.SetTags(partition_id="f", global_indexes=b"", tags=[{"k": marker}]),
        "keys": p.KVLookup(partition_id="f", keys=[marker]),
    }
    encoded_marker = msgspec.msgpack.encode(marker)
    header = p.encode(p.RequestEnvelope(5, bodies[where]))
    return header.replace(encoded_marker, b"\x91" * levels + b"\xc0")


_frame = st.binary(max_size=300)
_messages = st.one_of(
    st.lists(_frame, min_size=1, max_size=4),  # random bytes
    _envelope().map(lambda h: [h]),  # wrong types (weighted: most of the space is here)
    _envelope().map(lambda h: [h]),
    st.builds(lambda h, extra: [h, *extra], _envelope(), st.lists(_frame, max_size=3)),
    st.builds(lambda h, cut: [h[: cut % max(len(h), 1)]], _envelope(), st.integers(0, 10**6)),  # truncated
    st.builds(  # deeply nested, past msgspec's recursion limit or just past MAX_PAYLOAD_DEPTH
        lambda n, where: [_deep(n, where)],
        st.sampled_from([p.MAX_PAYLOAD_DEPTH + 1, 1500, 100_000]),
        st.sampled_from(["sampling_config", "tags", "keys"]),
    ),
    st.builds(  # large frames (a few MiB): as a header, and as a buffer nobody announced
        lambda size, as_header: [bytes(size)] if as_header else [*_valid_put("fuzz", 2), bytes(size)],
        st.integers(1 << 20, 4 << 20),
        st.booleans(),
    ),
    st.builds(  # a valid message's frames out of order, duplicated or missing
        lambda frames, order: [frames[i % len(frames)] for i in order],
        st.builds(_valid_put, st.just("fuzz"), st.integers(1, 4)),
        st.lists(st.integers(0, 3), min_size=1, max_size=5),
    ),
    _lying_put(),
)


# ---------------------------------------------------------------------------- the probe
class _Port:
    """A raw DEALER to one port; ``probe`` proves the port still answers (reading every reply)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.next_id = 1 << 40  # probe ids: never used by the fuzz messages
        self.replies = 0

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)

    def probe(self, timeout: float = 20.0) -> None:
        self.next_id += 1
        self.sock.send_multipart([p.encode(p.RequestEnvelope(self.next_id, p.Stats(), 10.0))])
        while True:
            assert self.sock.poll(int(timeout * 1000)), f"{self.address} stopped answering"
            header, *_ = self.sock.recv_multipart()
            reply = p.decode_reply(header)  # a server never sends a malformed reply
            self.replies += 1
            if reply.id == self.next_id:
                assert reply.error_kind is None, reply
                return

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_fuzzed_frames_on_every_port_leave_the_cluster_serving_and_the_data_intact(served, client, stored):
    meta, before = stored
    info = describe(served.address)
    ports = [_Port(a) for a in (info.controller, *info.storage_units)]

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames=_messages, target=st.integers(0, len(ports) - 1))
    def fuzz(frames: list[Any], target: int) -> None:
        ports[target].send(frames)
        ports[target].probe()

    try:
        fuzz()
        for port in ports:
            port.probe()
    finally:
        for port in ports:
            port.close()
    # a normal client works against every port: rows striped over both units, read back
    after = client.put({"x": torch.arange(3.0 * N_KEEP).reshape(N_KEEP, 3)}, partition_id="after")
    got = client.get_meta(["x"], N_KEEP, "after", task_name="t", timeout=30)
    assert sorted(got.global_index_array.tolist()) == sorted(after.global_index_array.tolist())
    assert client.get_data(after)["x"].tolist() == torch.arange(3.0 * N_KEEP).reshape(N_KEEP, 3).tolist()
    units = client.statistics()["storage"]["units"]
    assert all("error" not in u and u["partitions"]["after"]["rows"] > 0 for u in units.values())
    # and the data stored before the fuzzing is exactly as it was
    assert _snapshot(client, meta, served.address) == before


# ---------------------------------------------------------------------------- pickle
class _CreatesFile:
    """Unpickling this creates ``path`` (what a server that unpickles received bytes would do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_payloads_are_never_unpickled(served, client, tmp_path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control)))  # the payload is live: unpickling creates a file
    assert control.exists()
    target = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(target))
    info = describe(served.address)
    put_header, *_ = _valid_put("pickled", 1)
    blob = ColumnSpec("o", "object", "object", (1,), 1, nbytes=len(payload))
    as_object = p.PutRows(
        partition_id="pickled", global_indexes=p.ids_to_wire([0]), columns=[blob], schemas={}
    )
    for address in (info.controller, *info.storage_units):
        for frames in (
            [payload],  # as the header
            [payload, payload],
            [put_header, payload],  # as a buffer frame in place of the tensor's bytes
            [p.encode(p.RequestEnvelope(3, as_object)), payload],  # as an object column's blob
        ):
            reply, _ = raw_request(address, frames)
            assert reply.error_kind is not None
    # stored as a value (bytes) and read back: it comes back as the same bytes, never unpickled
    meta = client.put({"blob": [payload]}, partition_id="pickled-value")
    meta.update_custom_meta([{"tag": payload}])
    client.set_custom_meta(meta)
    got = client.get_meta(["blob"], 1, "pickled-value", task_name="t", timeout=30)
    value = client.get_data(got)["blob"]
    assert list(value.tolist() if hasattr(value, "tolist") else value) == [payload]
    assert got.get_all_custom_meta() == [{"tag": payload}]
    assert not target.exists()


def test_unit_ports_answer_a_normal_request_after_hostile_ones(served) -> None:
    """The quick version of the fuzz for every CI run: one of each kind, then a normal request."""
    info = describe(served.address)
    for address in (info.controller, *info.storage_units):
        for frames in ([b"\x91" * 5000 + b"\xc0"], [_deep(100_000, "sampling_config")], [b""]):
            raw_reply = raw_request(address, frames)[0]
            assert raw_reply.error_kind == "ProtocolError"
        reply, _ = request(address, p.Stats())
        assert reply.error_kind is None
