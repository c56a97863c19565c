"""How the KV storage manager lays rows out in a key-value store: its values and its index.

**Values.** One value holds one field of the rows one put wrote into one block: a small msgspec
header (the codec's :class:`~tq_loader.codec.ColumnSpec`, the rows' global indexes, the sizes of
the codec buffers) and then those buffers, 64-byte aligned.

**Index.** Which value holds field ``f`` of row ``i`` is one tag per row and put, kept by the
controller with the rows: ``_tq_kv:<put id> = "<rows>|<field>:<bytes>|..."`` (rows: how many rows
the put's values of that block hold; bytes: each field's value size). For a field, the latest put
naming it wins (tags merge in the order the controller received them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from tq_loader.codec import ColumnSpec
from tq_loader.errors import ProtocolError
from tq_loader.metadata import BatchMeta
from tq_loader.storage.kv_client import as_bytes_view

__all__ = [
    "ALL", "TAG_PREFIX", "Group", "Header", "Loc", "Value", "encode_header", "has_index", "index_of", "index_rows",
    "locations", "merge_tags", "parse_tag", "parse_value", "quote", "size_of", "tags_of", "unquote",
]  # fmt: skip

TAG_PREFIX = "_tq_kv:"  # the controller tag naming the value of a row's field
_ALIGN = 64
_HEAD = struct.Struct("<4sI")  # magic, header length
_MAGIC = b"TQK1"


class Header(msgspec.Struct, frozen=True, array_like=True):
    spec: ColumnSpec
    ids: bytes  # little-endian int64 global indexes of the value's rows, in value order
    sizes: list[int]  # bytes of each codec buffer


encode_header = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Header).decode


def align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def quote(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F").replace("|", "%7C").replace(":", "%3A")


class Value:
    """One value to write: its key, header and the codec buffers that follow it."""

    __slots__ = ("buffers", "header", "key", "nbytes", "offsets")

    def __init__(self, key: str, header: bytes, buffers: list[memoryview]) -> None:
        self.key, self.header, self.buffers = key, header, buffers
        off = align(_HEAD.size + len(header))
        self.offsets = []
        for buf in buffers:
            self.offsets.append(off)
            off = align(off + buf.nbytes)
        self.nbytes = off

    def fill(self, dst: memoryview) -> None:
        dst[: _HEAD.size] = _HEAD.pack(_MAGIC, len(self.header))
        dst[_HEAD.size : _HEAD.size + len(self.header)] = self.header
        for off, buf in zip(self.offsets, self.buffers, strict=True):
            if buf.nbytes:
                dst[off : off + buf.nbytes] = as_bytes_view(buf)


def parse_value(key: str, raw: memoryview) -> tuple[ColumnSpec, np.ndarray, list[memoryview]]:
    """(spec, row ids, buffers) of a stored value; ProtocolError if it is not one of ours."""
    raw = as_bytes_view(raw)
    if raw.nbytes < _HEAD.size:
        raise ProtocolError(f"KV value {key!r} is too short to be a tq_loader value")
    magic, hlen = _HEAD.unpack(raw[: _HEAD.size])
    if magic != _MAGIC or _HEAD.size + hlen > raw.nbytes:
        raise ProtocolError(f"KV value {key!r} was not written by this tq_loader version")
    try:
        header = _decode(raw[_HEAD.size : _HEAD.size + hlen])
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"KV value {key!r}: bad header ({exc})") from None
    bufs, off = [], align(_HEAD.size + hlen)
    for size in header.sizes:
        if size < 0 or off + size > raw.nbytes:
            raise ProtocolError(f"KV value {key!r}: its buffers overrun the value")
        bufs.append(raw[off : off + size])
        off = align(off + size)
    return header.spec, np.frombuffer(header.ids, dtype="<i8"), bufs


ALL = object()


class Loc(NamedTuple):
    """Where one field of a row lives: the put that wrote it, the rows and bytes of that value."""

    putid: str
    rows: int
    nbytes: int

    @property
    def tag(self) -> str:
        return f"{self.putid}.{self.rows}.{self.nbytes}"


def unquote(name: str) -> str:
    return name.replace("%7C", "|").replace("%3A", ":").replace("%2F", "/").replace("%25", "%")


def parse_tag(putid: str, text: Any) -> dict[str, Loc]:
    rows, *fields = str(text).split("|")
    out = {}
    for item in fields:
        name, _, size = item.rpartition(":")
        out[unquote(name)] = Loc(putid, int(rows), int(size))
    return out


class Group(NamedTuple):
    """Rows of one partition and block whose index tags are the same (so are their values' keys)."""

    pid: str
    block: int
    found: dict[str, Loc]
    positions: list[int]


def index_rows(meta: BatchMeta, stripe_rows: int) -> list[Group]:
    """``meta``'s rows grouped by (partition, block, where their fields live): keys are built per
    group, not per row."""
    locs = locations(meta)
    pids, blocks = meta.partition_id_array.tolist(), (meta.global_index_array // stripe_rows).tolist()
    groups: dict[tuple[str, int, int], Group] = {}
    for i, found in enumerate(locs):
        k = (str(pids[i]), int(blocks[i]), id(found))
        group = groups.get(k)
        if group is None:
            group = groups[k] = Group(k[0], k[1], found, [])
        group.positions.append(i)
    return list(groups.values())


def locations(meta: BatchMeta) -> list[dict[str, Loc]]:
    """Per row: field -> where its value is, from the rows' index tags (a later put wins)."""
    memo: dict[tuple[tuple[str, Any], ...], dict[str, Loc]] = {}
    out = []
    for row in tags_of(meta):
        items = tuple((k, v) for k, v in row.items() if k.startswith(TAG_PREFIX)) if row else ()
        found = memo.get(items)
        if found is None:
            found = {}
            for key, text in items:  # insertion order = the order the controller merged the puts
                found.update(parse_tag(key[len(TAG_PREFIX) :], text))
            memo[items] = found
        out.append(found)
    return out


def has_index(meta: BatchMeta) -> bool:
    return any(row and any(k.startswith(TAG_PREFIX) for k in row) for row in tags_of(meta))


def tags_of(meta: BatchMeta) -> Sequence[Any]:
    """Each row's custom meta (a dict, or None), read in place: the rows' ``get_all_custom_meta()``
    deep-copies every dict, which costs more than the backend call for a 1024-row batch."""
    custom = meta._custom
    return [None] * meta.size if custom is None else custom


def merge_tags(meta: BatchMeta, row_tags: list[dict[str, str]]) -> None:
    """Merge the index tags into ``meta``'s rows (``update_custom_meta`` without its deep copies:
    the tags are strings, so a new dict per row shares nothing mutable)."""
    custom = meta._custom
    if isinstance(custom, list):  # the batch's live list of dicts: update them in place
        for row, tags in zip(custom, row_tags, strict=True):
            row.update(tags)
        return
    merged = np.empty(meta.size, dtype=object)
    old = [None] * meta.size if custom is None else custom
    for i, (row, tags) in enumerate(zip(old, row_tags, strict=True)):
        merged[i] = {**row, **tags} if row else dict(tags)
    meta._custom = merged


def size_of(key: str) -> int | None:
    parts = key.rsplit("/", 1)[-1].split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None


def index_of(value_ids: np.ndarray, want: np.ndarray) -> Any:
    """Positions in the value of the rows ``want`` (``ALL``: exactly the value, in order); None if absent."""
    if value_ids.shape == want.shape and (value_ids == want).all():
        return ALL
    order = np.argsort(value_ids, kind="stable")
    j = np.searchsorted(value_ids, want, sorter=order)
    j = np.minimum(j, max(len(value_ids) - 1, 0))
    idx = order[j] if len(value_ids) else j
    if not len(value_ids) or not (value_ids[idx] == want).all():
        return None
    return idx
