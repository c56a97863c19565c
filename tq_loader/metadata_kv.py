"""``KVBatchMeta``: the keys, tags and fields of a KV batch (TransferQueue's KV metadata)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tq_loader._meta_util import (
    _WIRE_VERSION,
    _check_plain,
    _chunk_slices,
    _int_array,
    _merge_extra_info,
    _values_equal,
)
from tq_loader.errors import NotFoundError, ProtocolError, SchemaError

__all__ = ["KVBatchMeta", "KeysNotInBatchError"]


class KeysNotInBatchError(NotFoundError, RuntimeError):
    """``select_keys`` named keys the batch does not hold (a ``RuntimeError`` too, as TransferQueue raises)."""


class KVBatchMeta:
    """Metadata of the key-value interface: user keys with per-key tags in one partition."""

    __slots__ = ("extra_info", "fields", "keys", "partition_id", "tags")

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        tags: Sequence[dict[str, Any]] | None = None,
        partition_id: str | None = None,
        fields: Sequence[str] | None = None,
        extra_info: dict[str, Any] | None = None,
    ) -> None:
        self.keys: list[str] = list(keys or [])
        self.tags: list[dict[str, Any]] = (
            [{} for _ in self.keys] if tags is None else copy.deepcopy(list(tags))
        )
        if len(self.keys) != len(self.tags):
            raise SchemaError(
                f"keys and tags must have same length: got {len(self.keys)} keys and {len(self.tags)} tags"
            )
        if not all(isinstance(k, str) for k in self.keys) or not all(isinstance(t, dict) for t in self.tags):
            raise SchemaError("KVBatchMeta keys must be strings and tags dicts (one per key)")
        if len(set(self.keys)) != len(self.keys):
            raise SchemaError(f"duplicated keys: {[k for k, c in Counter(self.keys).items() if c > 1]}")
        if fields is not None and len(set(fields)) != len(fields):
            raise SchemaError(f"duplicated fields in {list(fields)}")
        self.partition_id = partition_id
        self.fields: list[str] | None = None if fields is None else list(fields)
        self.extra_info: dict[str, Any] = copy.deepcopy(extra_info or {})

    @property
    def size(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def _with(self, keys: list[str], tags: list[dict[str, Any]]) -> KVBatchMeta:
        return KVBatchMeta(keys, tags, self.partition_id, self.fields, self.extra_info)

    def select_keys(self, keys_to_select: Sequence[str]) -> KVBatchMeta:
        """New batch of ``keys_to_select`` (in that order); unknown keys raise :class:`KeysNotInBatchError`."""
        keys = [keys_to_select] if isinstance(keys_to_select, str) else list(keys_to_select)
        if len(set(keys)) != len(keys):
            dup = sorted(k for k, c in Counter(keys).items() if c > 1)
            raise SchemaError(f"select_keys: duplicate keys {dup}; name each key once")
        where = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise KeysNotInBatchError(
                f"keys {missing} not found in this batch (partition {self.partition_id!r}); it holds "
                f"{len(self.keys)} keys -- select only keys in meta.keys"
            )
        return self._with(keys, [self.tags[where[k]] for k in keys])

    def reorder(self, indexes: Sequence[int]) -> None:
        """Permute the keys (and tags) in place: key ``i`` becomes the old key ``indexes[i]``."""
        pos = _int_array(indexes, "reorder indexes").tolist()
        if len(pos) != self.size:
            raise SchemaError(f"reorder: {len(pos)} indexes does not match the batch size {self.size}")
        if len(set(pos)) != len(pos):
            raise SchemaError(
                f"reorder: duplicate indexes in {pos}; give a permutation of range({self.size})"
            )
        if sorted(pos) != list(range(self.size)):
            raise SchemaError(f"reorder indexes must be a permutation of range({self.size}), got {pos}")
        self.keys = [self.keys[i] for i in pos]
        self.tags = [self.tags[i] for i in pos]

    def chunk(self, chunks: int) -> list[KVBatchMeta]:
        """Split into ``chunks`` batches; the first ``size % chunks`` are one key longer."""
        return [self._with(self.keys[s], self.tags[s]) for s in _chunk_slices(self.size, chunks)]

    @classmethod
    def concat(cls, data: Iterable[KVBatchMeta]) -> KVBatchMeta:
        """All keys of ``data`` in order; partitions and field sets must match (``SchemaError``)."""
        parts = [b for b in data if b.size > 0]
        if not parts:
            return cls()
        first = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            if part.partition_id != first.partition_id:
                raise SchemaError(
                    f"concat: batch {i} is in partition {part.partition_id!r}, not {first.partition_id!r}"
                )
            if part.fields is not None and first.fields is not None and set(part.fields) != set(first.fields):
                raise SchemaError(f"concat: batch {i} has fields {part.fields}, batch 0 has {first.fields}")
        return cls(
            [k for p in parts for k in p.keys], [t for p in parts for t in p.tags], first.partition_id,
            first.fields, _merge_extra_info([p.extra_info for p in parts]),
        )  # fmt: skip

    def copy(self) -> KVBatchMeta:
        return self._with(self.keys, self.tags)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KVBatchMeta):
            return NotImplemented
        return (
            self.keys == other.keys
            and self.partition_id == other.partition_id
            and self.fields == other.fields
            and _values_equal(self.tags, other.tags)
            and _values_equal(self.extra_info, other.extra_info)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KVBatchMeta(size={self.size}, partition_id={self.partition_id!r}, fields={self.fields})"

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict; see :meth:`from_wire`."""
        _check_plain(self.extra_info, "extra_info")
        _check_plain(self.tags, "tags")
        return {
            "v": _WIRE_VERSION,
            "keys": list(self.keys),
            "tags": list(self.tags),
            "partition_id": self.partition_id,
            "fields": self.fields,
            "extra_info": dict(self.extra_info),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> KVBatchMeta:
        """Inverse of :meth:`to_wire`; ``ProtocolError`` on a malformed dict."""
        try:
            if d["v"] != _WIRE_VERSION:
                raise ProtocolError(f"KVBatchMeta wire version {d['v']!r}, this side speaks {_WIRE_VERSION}")
            return cls(d["keys"], d["tags"], d["partition_id"], d["fields"], d["extra_info"])
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed KVBatchMeta wire form: {type(e).__name__}: {e}") from e
