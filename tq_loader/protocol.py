"""Wire messages: one frozen, tagged ``msgspec.Struct`` per request and reply, one typed decoder.

A ZMQ message is ``[header, *buffers]``. The header is msgpack of a :class:`RequestEnvelope` or
:class:`ReplyEnvelope`; tensor payloads never go inside msgpack -- they follow as raw frames that
the codec described in ``ColumnSpec``s. Row ids travel as little-endian int64 bytes. Decoding
builds only plain data (no pickle, nothing executable), and anything malformed raises
:class:`~tq_loader.errors.ProtocolError`.

Deadlines travel as a relative ``timeout`` (seconds): the server turns it into its own clock's
deadline on arrival, so clocks of different hosts need not agree.

A server decodes a request in two steps (:func:`decode_head`, then :func:`decode_body`), so a body
it rejects (an ``int`` where a ``str`` belongs) is answered to the right request id; a header too
malformed even for that still yields its id when one can be read (:func:`peek_id`). Headers are
bounded before decoding (:data:`MAX_HEADER_BYTES`) and nesting while decoding: msgspec's own
recursion limit (about 1000 levels) becomes a ``ProtocolError``, and free-form payloads
(``sampling_config``, tags, imported state) may nest at most :data:`MAX_PAYLOAD_DEPTH` levels.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
import numpy as np

from tq_loader._meta_util import BatchMetaWire
from tq_loader.codec import ColumnSpec
from tq_loader.codec_objects import numpy_enc_hook, numpy_ext_hook
from tq_loader.errors import ProtocolError
from tq_loader.schema import FieldSchema
from tq_loader.stats import ControllerStats, PartitionStats, UnitStats

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_DEPTH",
    "PROTOCOL_VERSION",
    "ReplyEnvelope",
    "RequestEnvelope",
    "RequestHead",
    "decode_body",
    "decode_head",
    "decode_reply",
    "decode_request",
    "encode",
    "ids_from_wire",
    "ids_to_wire",
    "peek_id",
]

PROTOCOL_VERSION = 1
#: A request header larger than this is refused before it is decoded. Control messages are small;
#: bulk data travels as raw buffer frames, and the largest header (``ImportState`` of a checkpoint)
#: needs ~25 bytes per row.
MAX_HEADER_BYTES = 256 << 20
#: How deeply free-form values (``GetMeta.sampling_config``, one row's tags) may nest.
MAX_PAYLOAD_DEPTH = 32
_INT64 = np.dtype("<i8")


def ids_to_wire(ids: Any) -> bytes:
    """Row ids (any int sequence) as little-endian int64 bytes."""
    return np.ascontiguousarray(np.asarray(ids, dtype=_INT64)).tobytes()


def ids_from_wire(raw: bytes) -> np.ndarray:
    """Inverse of :func:`ids_to_wire`; a length that is not a multiple of 8 is a ProtocolError."""
    if len(raw) % 8:
        raise ProtocolError(f"row id payload of {len(raw)} bytes is not a whole number of int64 values")
    return np.frombuffer(raw, dtype=_INT64).astype(np.int64, copy=True)


class _Msg(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every request and reply (tagged by class name)."""


# ---------------------------------------------------------------- controller requests
class Describe(_Msg):
    """Ask the controller for the cluster layout (storage units, backend, settings)."""


class AnnounceMetrics(_Msg):
    """The process hosting the cluster's Prometheus endpoint says where it is (``Describe`` tells)."""

    endpoint: str


class CreatePartition(_Msg):
    partition_id: str


class ListPartitions(_Msg):
    pass


class GetMeta(_Msg):
    partition_id: str
    data_fields: list[str]
    batch_size: int
    mode: str = "fetch"  # insert | fetch | force_fetch
    task_name: str | None = None
    sampler: str | None = None
    sampling_config: dict[str, Any] = {}
    allow_partial: bool = False
    dp_rank: int | None = None
    dp_size: int = 1
    batch_index: int | None = None


class PrepareWrite(_Msg):
    """Validate a put's schemas against the columns; with ``insert``, allocate ``new_rows`` rows
    (creating the partition), else check that ``global_indexes`` are live rows."""

    partition_id: str
    schemas: dict[str, FieldSchema]
    global_indexes: bytes = b""
    new_rows: int = 0
    insert: bool = False


class NotifyProduced(_Msg):
    """Sent by the client core only after the storage acknowledged every byte of the write; ``tags``
    (one dict per row, merged like ``SetTags``) come with it so a KV write is one message."""

    partition_id: str
    global_indexes: bytes
    schemas: dict[str, FieldSchema]
    tags: list[dict[str, Any]] | None = None


class SetTags(_Msg):
    partition_id: str
    global_indexes: bytes
    tags: list[dict[str, Any]]


class ClearSamples(_Msg):
    partition_id: str
    global_indexes: bytes


class ClearPartition(_Msg):
    partition_id: str


class ResetConsumption(_Msg):
    partition_id: str
    task_name: str | None = None


class ProductionStatus(_Msg):
    partition_id: str
    global_indexes: bytes | None = None
    fields: list[str] | None = None


class ConsumptionStatus(_Msg):
    partition_id: str
    task_name: str
    global_indexes: bytes | None = None


class KVLookup(_Msg):
    """Rows of ``keys``. With ``schemas`` (a KV write about to store these fields) they are checked
    against the partition's columns first -- nothing is created on a conflict -- and the reply
    carries the merged ones, so the write needs no separate PrepareWrite."""

    partition_id: str
    keys: list[str]
    create: bool = False
    missing_ok: bool = False  # drop unknown keys (and an unknown partition) instead of NotFoundError
    schemas: dict[str, FieldSchema] | None = None


class KVKeys(_Msg):
    """The keys of rows ``global_indexes`` (TransferQueue's ``kv_retrieve_keys``)."""

    partition_id: str
    global_indexes: bytes


class KVList(_Msg):
    partition_id: str | None = None


class Seal(_Msg):
    partition_id: str


class Abort(_Msg):
    partition_id: str
    reason: str


class Stats(_Msg):
    pass


class PartitionInfo(_Msg):
    """One partition's counters and flags (cheap: no storage unit is asked)."""

    partition_id: str | None = None


class Cancel(_Msg):
    """The client gave up on request ``request_id``: stop serving it (a waiting get_meta then
    consumes nothing). Fire-and-forget: the server sends no reply."""

    request_id: int


class ReportLost(_Msg):
    """A storage unit died: every live row striped to it (``storage.striping.unit_of(id, num_units,
    stripe_rows) == unit``) is lost."""

    unit: int
    num_units: int
    stripe_rows: int  # no default: a sender must say how the cluster stripes (a wrong guess drops wrong rows)
    reason: str = ""


class ExportState(_Msg):
    """Whole controller state as plain data (checkpoint)."""


class ImportState(_Msg):
    """Replace the controller's whole state; ``dry_run``: only validate it (a checkpoint load asks
    before it touches the cluster)."""

    state: dict[str, Any]
    dry_run: bool = False


# ---------------------------------------------------------------- storage unit requests
class ShmSlice(msgspec.Struct, frozen=True, array_like=True):
    """``nbytes`` at ``offset`` of segment ``segment`` of the request's arena (see :mod:`tq_loader.shm`)."""

    segment: int
    offset: int
    nbytes: int


class ArenaSegment(msgspec.Struct, frozen=True, array_like=True):
    """How a unit opens one segment of a client's arena: ``/proc/<pid>/fd/<fd>`` on host ``boot_id``,
    ``nbytes`` long, starting with ``token``."""

    index: int
    pid: int
    fd: int
    nbytes: int
    token: bytes
    boot_id: str
    node_id: str = ""  # the client's Ray node, when it runs under Ray


class AttachSegment(_Msg):
    """A same-host client offers a shared segment of its arena; the unit maps it or says why not."""

    arena: str
    segment: ArenaSegment


class DetachArena(_Msg):
    """The client closes its arena: the unit unmaps its segments."""

    arena: str


class PutRows(_Msg):
    """Store rows. ``positions`` (int64 bytes; empty: row i is row i): row ``i`` of this put is row
    ``positions[i]`` of the columns sent -- an in-process caller hands a unit the whole batch and
    the unit copies its rows straight out of it."""

    partition_id: str
    global_indexes: bytes
    columns: list[ColumnSpec]
    schemas: dict[str, FieldSchema]
    timeout: float | None = None
    positions: bytes = b""
    arena: str = ""  # with ``shm``: the buffers lie in this client arena instead of following as frames
    shm: list[ShmSlice] = []


class GetRows(_Msg):
    """Read rows. ``into``: fields whose output tensors the caller provides -- as this request's
    buffers (an in-process caller) or as slices of its shared arena (``arena`` + ``into_shm``, a
    same-host caller), in that order, shapes per ``schemas``. The unit copies row ``i`` into row
    ``positions[i]`` of each and lists them in ``RowsReply.written`` -- one copy, no reply frames."""

    partition_id: str
    global_indexes: bytes
    fields: list[str]
    schemas: dict[str, FieldSchema] = {}
    positions: bytes = b""
    into: list[str] = []
    arena: str = ""  # with ``into_shm``: the ``into`` outputs are these slices of the client's arena
    into_shm: list[ShmSlice] = []


class DropRows(_Msg):
    partition_id: str
    global_indexes: bytes


class DropPartition(_Msg):
    partition_id: str


class ExportRows(_Msg):
    """Every row this unit holds for a partition, with every field it has (checkpoint)."""

    partition_id: str


# ---------------------------------------------------------------- replies
class Ok(_Msg):
    pass


class ClusterInfo(_Msg):
    controller: str
    storage_units: list[str]
    storage_backend: str = "simple"
    config: dict[str, Any] = {}
    cluster_id: str = ""  # made when the cluster starts: tells a fresh cluster from the one a state came from
    metrics_endpoint: str = ""  # host:port of the Prometheus endpoint, once announced ("" = none)


class MetaReply(_Msg):
    meta: BatchMetaWire


class WriteReply(_Msg):
    global_indexes: bytes
    schemas: dict[str, FieldSchema]


class IdsReply(_Msg):
    global_indexes: bytes


class NamesReply(_Msg):
    names: list[str]


class StatusReply(_Msg):
    global_indexes: bytes
    fields: list[str]
    matrix: bytes  # bool, row-major len(ids) x len(fields) (or len(ids) for consumption)


class KVLookupReply(_Msg):
    meta: BatchMetaWire  # BatchMeta of the keys' rows (fields: those every row has produced)
    created: bytes  # bool per key
    schemas: dict[str, FieldSchema] = {}  # with KVLookup.schemas: the columns' schemas after the write


class KVListReply(_Msg):
    partitions: dict[str, dict[str, Any]]  # pid -> {"keys": [...], "tags": [...]}


class ControllerStatsReply(_Msg):
    stats: ControllerStats


class UnitStatsReply(_Msg):
    stats: UnitStats


class PartitionInfoReply(_Msg):
    stats: PartitionStats | None  # None: the controller does not know the partition
    next_row_id: int


class LostReply(_Msg):
    """What ``ReportLost`` dropped."""

    lost_rows: int


class StateReply(_Msg):
    state: dict[str, Any]


class RowsReply(_Msg):
    global_indexes: bytes
    columns: list[ColumnSpec]
    written: list[str] = []  # fields copied into the request's ``into`` buffers (not in ``columns``)


Request = Union[
    Describe, CreatePartition, ListPartitions, GetMeta, PrepareWrite, NotifyProduced, SetTags,
    ClearSamples, ClearPartition, ResetConsumption, ProductionStatus, ConsumptionStatus, KVLookup,
    KVList, Seal, Abort, Stats, Cancel, ReportLost, ExportState, ImportState, PutRows, GetRows, DropRows, DropPartition,
    ExportRows, AttachSegment, DetachArena, KVKeys, PartitionInfo, AnnounceMetrics,
]  # fmt: skip
Reply = Union[
    Ok, ClusterInfo, MetaReply, WriteReply, IdsReply, NamesReply, StatusReply, KVLookupReply,
    KVListReply, ControllerStatsReply, UnitStatsReply, LostReply, PartitionInfoReply, StateReply, RowsReply,
]  # fmt: skip


class RequestEnvelope(msgspec.Struct, frozen=True, array_like=True):
    """``id`` is echoed by the reply; ``timeout`` (s) becomes a server-side deadline."""

    id: int
    body: Request
    timeout: float | None = None
    token: str | None = None
    version: int = PROTOCOL_VERSION


class ReplyEnvelope(msgspec.Struct, frozen=True, array_like=True):
    """Either ``body`` or ``error_kind``/``error_message`` (a typed error by name)."""

    id: int
    body: Reply | None = None
    error_kind: str | None = None
    error_message: str | None = None


class RequestHead(msgspec.Struct, frozen=True, array_like=True):
    """A :class:`RequestEnvelope` whose body is still encoded: the first of the two decode steps."""

    id: int
    body: msgspec.Raw
    timeout: float | None = None
    token: str | None = None
    version: int = PROTOCOL_VERSION


# Free-form (``Any``-typed) fields of requests and how deeply each may nest: a row's tags and a
# sampling config get MAX_PAYLOAD_DEPTH; the containers around them add their own levels (tags: the
# list of rows; imported state: state > partitions > partition > tags > a row's tags).
_FREE_FORM: dict[type, tuple[tuple[str, int], ...]] = {
    GetMeta: (("sampling_config", MAX_PAYLOAD_DEPTH),),
    SetTags: (("tags", MAX_PAYLOAD_DEPTH + 1),),
    NotifyProduced: (("tags", MAX_PAYLOAD_DEPTH + 1),),
    ImportState: (("state", MAX_PAYLOAD_DEPTH + 4),),
}

# numpy values in free-form fields travel as a validated msgpack extension (never pickle)
_encoder = msgspec.msgpack.Encoder(enc_hook=numpy_enc_hook)
_request_decoder = msgspec.msgpack.Decoder(RequestEnvelope, ext_hook=numpy_ext_hook)
_head_decoder = msgspec.msgpack.Decoder(RequestHead, ext_hook=numpy_ext_hook)
_body_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request, ext_hook=numpy_ext_hook)  # type: ignore[arg-type]
_reply_decoder = msgspec.msgpack.Decoder(ReplyEnvelope, ext_hook=numpy_ext_hook)
_TOO_DEEP = "it nests deeper than the decoder allows (about 1000 levels)"


def encode(envelope: RequestEnvelope | ReplyEnvelope) -> bytes:
    return _encoder.encode(envelope)


def peek_id(raw: bytes | memoryview) -> int:
    """The id of a request or reply header (its first element), or -1 when even that cannot be read.

    Reads only a msgpack array marker and one integer, so it works on headers that fail to decode
    (truncated, too deep, wrong types further on) and lets their error reply reach the right caller.
    """
    data = memoryview(raw).cast("B") if not isinstance(raw, bytes) else raw
    if len(data) < 2:
        return -1
    marker, at = data[0], 1
    if 0x90 <= marker <= 0x9F:
        count = marker & 0x0F
    elif marker in (0xDC, 0xDD):
        at = 3 if marker == 0xDC else 5
        count = int.from_bytes(bytes(data[1:at]), "big") if len(data) >= at else 0
    else:
        return -1
    if count == 0 or len(data) <= at:
        return -1
    first = data[at]
    if first <= 0x7F:
        return int(first)
    widths = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    width = widths.get(first)
    if width is None or len(data) < at + 1 + width:
        return -1
    value = int.from_bytes(bytes(data[at + 1 : at + 1 + width]), "big", signed=first >= 0xD0)
    return value if value >= 0 else -1


def decode_head(raw: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> RequestHead:
    """Step one: the envelope (id, timeout, token, version), the body left encoded."""
    size = memoryview(raw).nbytes
    if size > max_bytes:
        raise ProtocolError(
            f"request header of {size} bytes exceeds the limit of {max_bytes} bytes; send bulk data as "
            "buffer frames, not inside the header"
        )
    try:
        return _head_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed request header: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"malformed request header: {_TOO_DEEP}") from None


def decode_body(raw: bytes | memoryview | msgspec.Raw) -> Request:
    """Step two: the typed request, its free-form fields checked for depth."""
    try:
        body = _body_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(
            f"malformed request body: {exc}. Check the argument types: partition ids, task, field and "
            "sampler names and sampling_config keys are str, sizes and ranks int"
        ) from None
    except RecursionError:
        raise ProtocolError(f"malformed request body: {_TOO_DEEP}") from None
    for name, limit in _FREE_FORM.get(type(body), ()):
        if _nests_deeper(getattr(body, name), limit):
            raise ProtocolError(
                f"{type(body).__name__}.{name} nests deeper than {limit} levels; pass plain, shallow "
                "values (numbers, strings, short lists and dicts)"
            )
    return body


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` has more than ``limit`` levels of containers (iterative: no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def decode_request(raw: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> RequestEnvelope:
    """Both steps at once (for tools and tests; the server uses them separately)."""
    head = decode_head(raw, max_bytes)
    return RequestEnvelope(head.id, decode_body(head.body), head.timeout, head.token, head.version)


_reply_body_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply, ext_hook=numpy_ext_hook)  # type: ignore[arg-type]


def copy_request(body: Request) -> Request:
    """``body`` as the service would receive it over a socket: encoded and decoded again (a few
    microseconds for a control message). The in-process channel uses it so that a service and its
    caller never share a mutable object and every request passes the same checks as on the wire."""
    return decode_body(_encoder.encode(body))


def copy_reply(reply: Reply) -> Reply:
    """``reply`` as a client would receive it over a socket (see :func:`copy_request`)."""
    try:
        return _reply_body_decoder.decode(_encoder.encode(reply))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed reply: {exc}") from None


def decode_reply(raw: bytes | memoryview) -> ReplyEnvelope:
    try:
        return _reply_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed reply header: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"malformed reply header: {_TOO_DEEP}") from None
