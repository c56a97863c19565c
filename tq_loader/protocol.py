"""Wire messages: one frozen, tagged ``msgspec.Struct`` per request and reply, one typed decoder.

A ZMQ message is ``[header, *buffers]``. The header is msgpack of a :class:`RequestEnvelope` or
:class:`ReplyEnvelope`; tensor payloads never go inside msgpack -- they follow as raw frames that
the codec described in ``ColumnSpec``s. Row ids travel as little-endian int64 bytes. Decoding
builds only plain data (no pickle, nothing executable), and anything malformed raises
:class:`~tq_loader.errors.ProtocolError`.

Deadlines travel as a relative ``timeout`` (seconds): the server turns it into its own clock's
deadline on arrival, so clocks of different hosts need not agree.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
import numpy as np

from tq_loader.codec import ColumnSpec
from tq_loader.errors import ProtocolError
from tq_loader.schema import FieldSchema

__all__ = [
    "PROTOCOL_VERSION",
    "ReplyEnvelope",
    "RequestEnvelope",
    "decode_reply",
    "decode_request",
    "encode",
    "ids_from_wire",
    "ids_to_wire",
]

PROTOCOL_VERSION = 1
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
    """Sent by a storage manager only after every unit acknowledged the write."""

    partition_id: str
    global_indexes: bytes
    schemas: dict[str, FieldSchema]


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
    partition_id: str
    keys: list[str]
    create: bool = False
    missing_ok: bool = False  # drop unknown keys (and an unknown partition) instead of NotFoundError


class KVList(_Msg):
    partition_id: str | None = None


class Seal(_Msg):
    partition_id: str


class Abort(_Msg):
    partition_id: str
    reason: str


class Stats(_Msg):
    pass


class Cancel(_Msg):
    """The client gave up on request ``request_id``: stop serving it (a waiting get_meta then
    consumes nothing). Fire-and-forget: the server sends no reply."""

    request_id: int


class ReportLost(_Msg):
    """A storage unit died: every live row striped to it (``storage.striping.unit_of(id, num_units,
    stripe_rows) == unit``) is lost."""

    unit: int
    num_units: int
    reason: str = ""
    stripe_rows: int = 1


class ExportState(_Msg):
    """Whole controller state as plain data (checkpoint)."""


class ImportState(_Msg):
    state: dict[str, Any]


# ---------------------------------------------------------------- storage unit requests
class PutRows(_Msg):
    partition_id: str
    global_indexes: bytes
    columns: list[ColumnSpec]
    schemas: dict[str, FieldSchema]
    timeout: float | None = None


class GetRows(_Msg):
    partition_id: str
    global_indexes: bytes
    fields: list[str]
    schemas: dict[str, FieldSchema] = {}


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


class MetaReply(_Msg):
    meta: dict[str, Any]


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
    meta: dict[str, Any]  # BatchMeta of the keys' rows (fields: those every row has produced)
    created: bytes  # bool per key


class KVListReply(_Msg):
    partitions: dict[str, dict[str, Any]]  # pid -> {"keys": [...], "tags": [...]}


class StatsReply(_Msg):
    stats: dict[str, Any]


class StateReply(_Msg):
    state: dict[str, Any]


class RowsReply(_Msg):
    global_indexes: bytes
    columns: list[ColumnSpec]


Request = Union[
    Describe, CreatePartition, ListPartitions, GetMeta, PrepareWrite, NotifyProduced, SetTags,
    ClearSamples, ClearPartition, ResetConsumption, ProductionStatus, ConsumptionStatus, KVLookup,
    KVList, Seal, Abort, Stats, Cancel, ReportLost, ExportState, ImportState, PutRows, GetRows, DropRows, DropPartition,
    ExportRows,
]  # fmt: skip
Reply = Union[
    Ok, ClusterInfo, MetaReply, WriteReply, IdsReply, NamesReply, StatusReply, KVLookupReply,
    KVListReply, StatsReply, StateReply, RowsReply,
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


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(RequestEnvelope)
_reply_decoder = msgspec.msgpack.Decoder(ReplyEnvelope)


def encode(envelope: RequestEnvelope | ReplyEnvelope) -> bytes:
    return _encoder.encode(envelope)


def decode_request(raw: bytes | memoryview) -> RequestEnvelope:
    try:
        return _request_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed request header: {exc}") from None


def decode_reply(raw: bytes | memoryview) -> ReplyEnvelope:
    try:
        return _reply_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed reply header: {exc}") from None
