"""The controller's bookkeeping for one partition: which rows exist, which fields they have, who read them.

The controller is the single source of truth for readiness, so this module answers "which rows may task T
read now" for a million rows in a few vectorised numpy operations (O(fields), never O(rows) in Python).
It knows nothing of tensors' bytes: only ids, field names, schemas, flags, keys and small per-row tags.

Layout (rows are kept in ascending global-id order, ``n`` = slots in use, cleared slots included):

* ``ids[:n]``      int64, ascending: global row ids (a shared monotonic allocator hands out blocks, so they
  ascend within a partition even though other partitions allocate in between).
* ``live[:n]``     bool: the row exists and was not cleared.
* ``prod[:n, :F]`` bool, Fortran order so that one field's column is contiguous: field produced.
* ``consumed[task][:n]`` bool per task.

Cleared rows stay as dead slots (their ids are never reused) until enough pile up; then the arrays are
compacted, which is why :meth:`PartitionState.positions` are only valid until the next ``clear``.

Rows whose insert write never completed (a producer died between allocating them and notifying) have
no produced field; once the partition is sealed the service drops them after a grace period
(:meth:`PartitionState.drop_abandoned`), so they cannot hold back the end of the stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from tq_loader.controller.allocator import RowIdAllocator
from tq_loader.errors import ClosedError, NotFoundError, SchemaError
from tq_loader.ids import as_ids as _as_ids
from tq_loader.schema import FieldSchema
from tq_loader.stats import PartitionStats

__all__ = ["PartitionState", "RowIdAllocator"]

_MIN_ROWS = 64
MAX_INSERT_ROWS = 1 << 26  # one insert allocates its bookkeeping at once: refuse absurd sizes up front
_MIN_FIELDS = 8
_COMPACT_MIN_DEAD = 4096  # compact when dead slots >= max(this, live rows): amortised O(1) per cleared row
_SHOW_IDS = 5  # how many offending ids an error message names

_tags_encoder = msgspec.msgpack.Encoder()


def _show(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_SHOW_IDS])
    return shown + (f" and {ids.size - _SHOW_IDS} more" if ids.size > _SHOW_IDS else "")


class PartitionState:
    """Rows x fields bookkeeping of one partition (one logical table).

    Not thread-safe: the controller service mutates it from one event loop.
    """

    def __init__(self, partition_id: str, allocator: RowIdAllocator) -> None:
        self.partition_id = partition_id
        self.sealed = False
        self.aborted: str | None = None
        self._alloc = allocator
        self._n = 0  # slots in use (live + dead)
        self._n_live = 0
        self._n_cleared = 0  # cumulative, survives compaction
        self._ids = np.empty(0, dtype=np.int64)
        self._ord = np.empty(0, dtype=np.int64)  # insertion ordinal per slot; survives compaction
        self._next_ord = 0
        self._live = np.zeros(0, dtype=bool)
        self._prod = np.zeros((0, 0), dtype=bool, order="F")
        self._consumed: dict[str, np.ndarray] = {}
        # per task: every slot below it is consumed or dead, so ``ready`` starts scanning there
        self._low: dict[str, int] = {}
        self._fields: dict[str, int] = {}  # field name -> column of _prod, in first-produced order
        self._schemas: dict[str, FieldSchema] = {}
        self._tags: dict[int, dict[str, Any]] = {}
        self._key_to_id: dict[str, int] = {}
        self._id_to_key: dict[int, str] = {}
        self._abandoned = np.empty(0, dtype=np.int64)  # ascending ids dropped by drop_abandoned
        self._abandon_grace: float | None = None  # the grace period they were given (for messages)

    # ------------------------------------------------------------------ sizes and growth
    @property
    def num_rows(self) -> int:
        """Live rows (inserted and not cleared)."""
        return self._n_live

    @property
    def num_fields(self) -> int:
        return len(self._fields)

    @property
    def tasks(self) -> list[str]:
        """Tasks that ever marked rows consumed here, in first-seen order."""
        return list(self._consumed)

    @property
    def field_schemas(self) -> dict[str, FieldSchema]:
        """A copy of the column schemas (FieldSchema is frozen, so sharing the values is safe)."""
        return dict(self._schemas)

    def _grow_rows(self, need: int) -> None:
        cap = self._ids.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap, _MIN_ROWS)
        ids = np.empty(cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        ords = np.empty(cap, dtype=np.int64)
        ords[: self._n] = self._ord[: self._n]
        self._ord = ords
        live = np.zeros(cap, dtype=bool)
        live[: self._n] = self._live[: self._n]
        prod = np.zeros((cap, self._prod.shape[1]), dtype=bool, order="F")
        prod[: self._n] = self._prod[: self._n]
        for task, vec in self._consumed.items():
            grown = np.zeros(cap, dtype=bool)
            grown[: self._n] = vec[: self._n]
            self._consumed[task] = grown
        self._ids, self._live, self._prod = ids, live, prod

    def _grow_fields(self, need: int) -> None:
        cap = self._prod.shape[1]
        if need <= cap:
            return
        cap = max(need, 2 * cap, _MIN_FIELDS)
        prod = np.zeros((self._prod.shape[0], cap), dtype=bool, order="F")
        prod[: self._n, : self._prod.shape[1]] = self._prod[: self._n]
        self._prod = prod

    def _check_open(self, what: str) -> None:
        if self.aborted is not None:
            raise ClosedError(f"partition {self.partition_id!r} was aborted ({self.aborted}); cannot {what}")
        if self.sealed:
            raise ClosedError(
                f"partition {self.partition_id!r} is sealed (no new rows); cannot {what}. "
                "Write to a new partition, or add rows before sealing"
            )

    # ------------------------------------------------------------------ rows
    def insert(self, n: int) -> np.ndarray:
        """Create ``n`` rows; returns their new global ids (int64, ascending)."""
        self._check_open(f"insert {n} rows")
        if n < 0:
            raise SchemaError(f"cannot insert a negative number of rows ({n}) into {self.partition_id!r}")
        if n > MAX_INSERT_ROWS:
            raise SchemaError(
                f"cannot insert {n} rows into {self.partition_id!r} in one call (at most {MAX_INSERT_ROWS}); "
                "insert in smaller batches"
            )
        new = self._alloc.allocate_ids(n)
        if n == 0:
            return new
        if self._n and new[0] <= self._ids[self._n - 1]:  # the allocator is monotonic; guard the invariant
            raise RuntimeError(f"row id allocator went backwards for partition {self.partition_id!r}")
        self._grow_rows(self._n + n)
        self._ids[self._n : self._n + n] = new
        self._ord[self._n : self._n + n] = np.arange(self._next_ord, self._next_ord + n)
        self._next_ord += n
        self._live[self._n : self._n + n] = True
        self._n += n
        self._n_live += n
        return new

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions clipped into range, found-and-live mask) for ``ids``."""
        pos = np.searchsorted(self._ids[: self._n], ids)
        safe = np.minimum(pos, max(self._n - 1, 0))
        if self._n == 0:
            return safe, np.zeros(ids.shape, dtype=bool)
        ok = (pos < self._n) & (self._ids[safe] == ids) & self._live[safe]
        return safe, ok

    def positions(self, global_ids: Any) -> np.ndarray:
        """Local slot positions of live rows (valid until the next clear, which may compact).

        Unknown or cleared rows raise ``NotFoundError``; rows dropped as abandoned ``ClosedError``."""
        ids = _as_ids(global_ids)
        pos, ok = self._lookup(ids)
        if not ok.all():
            bad = ids[~ok]
            gone = bad[np.isin(bad, self._abandoned)]
            if gone.size:
                raise ClosedError(
                    f"partition {self.partition_id!r} was sealed and rows {_show(gone)} were dropped as "
                    f"abandoned: their insert write did not complete within controller.seal_grace_s="
                    f"{self._abandon_grace}s of the seal. Write them to a new partition, or seal only after "
                    "every producer has finished (or raise controller.seal_grace_s)"
                )
            raise NotFoundError(
                f"partition {self.partition_id!r} has no live rows with global ids {_show(bad)}; "
                "they were never inserted here or were cleared. Ask get_meta for current rows"
            )
        return pos

    def ordinals(self, global_ids: Any) -> np.ndarray:
        """Insertion order of live rows within this partition (0, 1, 2, ...; stable across clears).

        Group samplers use it: the rows of one prompt are inserted together, so ``ordinal // n``
        is the group, whatever other partitions allocated in between.
        """
        return self._ord[self.positions(global_ids)]

    def clear(self, global_ids: Any) -> np.ndarray:
        """Forget rows (idempotent); returns the ids actually cleared. Their ids are never reused."""
        ids = _as_ids(global_ids)
        pos, ok = self._lookup(ids)
        pos = np.unique(pos[ok])
        if pos.size == 0:
            return np.empty(0, dtype=np.int64)
        cleared = self._ids[pos].copy()
        self._live[pos] = False
        self._prod[pos] = False
        for vec in self._consumed.values():
            vec[pos] = False
        self._n_live -= pos.size
        self._n_cleared += pos.size
        if self._tags:
            for gid in cleared.tolist():
                self._tags.pop(gid, None)
        if self._id_to_key:
            for gid in cleared.tolist():
                key = self._id_to_key.pop(gid, None)
                if key is not None:
                    del self._key_to_id[key]
        dead = self._n - self._n_live
        if dead >= max(_COMPACT_MIN_DEAD, self._n_live):
            self._compact()
        return cleared

    def clear_all(self) -> None:
        """Forget every row; fields, schemas, task names and the sealed/aborted flags stay."""
        self._n_cleared += self._n_live
        self._n = self._n_live = 0
        self._ids = np.empty(0, dtype=np.int64)
        self._ord = np.empty(0, dtype=np.int64)
        self._live = np.zeros(0, dtype=bool)
        self._prod = np.zeros((0, self._prod.shape[1]), dtype=bool, order="F")
        self._consumed = {task: np.zeros(0, dtype=bool) for task in self._consumed}
        self._low.clear()
        self._tags.clear()
        self._key_to_id.clear()
        self._id_to_key.clear()

    def _compact(self) -> None:
        """Drop dead slots so a long-lived, steadily cleared partition does not grow without bound."""
        keep = np.flatnonzero(self._live[: self._n])
        m = keep.size
        cap = max(2 * m, _MIN_ROWS)
        ids = np.empty(cap, dtype=np.int64)
        ids[:m] = self._ids[keep]
        ords = np.empty(cap, dtype=np.int64)
        ords[:m] = self._ord[keep]
        self._ord = ords
        live = np.zeros(cap, dtype=bool)
        live[:m] = True
        prod = np.zeros((cap, self._prod.shape[1]), dtype=bool, order="F")
        prod[:m] = self._prod[keep]
        for task, vec in self._consumed.items():
            kept = np.zeros(cap, dtype=bool)
            kept[:m] = vec[keep]
            self._consumed[task] = kept
        self._ids, self._live, self._prod, self._n = ids, live, prod, m
        self._low.clear()  # positions moved: the marks are recomputed from the front

    def seal(self) -> None:
        """No new rows from now on: consumers drain what is there and their streams end."""
        self.sealed = True

    def unproduced(self) -> np.ndarray:
        """Ascending ids of live rows with no produced field: their insert write has not completed."""
        n = self._n
        if not self._fields:
            return self._ids[np.flatnonzero(self._live[:n])].copy()
        mask = self._live[:n] & ~self._prod[:n, : len(self._fields)].any(axis=1)
        return self._ids[np.flatnonzero(mask)].copy()

    def drop_abandoned(self, global_ids: Any, grace_s: float) -> np.ndarray:
        """Drop rows whose write never completed within ``grace_s`` of the seal; returns their ids.

        Only rows still without any produced field are dropped (a write that completed meanwhile
        keeps its row). A later write or notify naming them gets a ``ClosedError`` saying why.
        """
        if not self.sealed:
            raise ClosedError(
                f"partition {self.partition_id!r} is not sealed; only sealed partitions drop rows"
            )
        ids = np.intersect1d(_as_ids(global_ids), self.unproduced())
        dropped = self.clear(ids)
        if dropped.size:
            self._abandoned = np.union1d(self._abandoned, dropped)
            self._abandon_grace = grace_s
        return dropped

    @property
    def abandoned_rows(self) -> int:
        """Rows dropped by :meth:`drop_abandoned` (they count as cleared too)."""
        return int(self._abandoned.size)

    def abort(self, reason: str) -> None:
        """Mark the partition failed: inserts are refused and consumers should fail fast with ``reason``."""
        self.aborted = str(reason) or "aborted"

    # ------------------------------------------------------------------ production
    def check_schemas(
        self, schemas: Mapping[str, FieldSchema], *, cast: bool = False
    ) -> dict[str, FieldSchema]:
        """All column schemas as they would be after a write of ``schemas``, without applying it.

        Lets the service validate a put before any storage unit stores it; raises ``SchemaError``
        naming the partition and field on a dtype/rank conflict. ``cast``: a write whose numbers
        convert safely to the column's dtype is no conflict -- the merged schema keeps the column's
        dtype and the writer converts (TransferQueue stores mixed dtypes per row; one column has one).
        """
        merged = dict(self._schemas)
        for name, schema in schemas.items():
            if not isinstance(name, str):
                raise SchemaError(f"field names must be str, got {name!r} in partition {self.partition_id!r}")
            if not isinstance(schema, FieldSchema):
                raise SchemaError(f"field {name!r}: expected a FieldSchema, got {type(schema).__name__}")
            old = merged.get(name)
            if old is None:
                merged[name] = schema
                continue
            try:
                merged[name] = old.merge(schema, cast=cast)
            except SchemaError as exc:
                raise SchemaError(f"partition {self.partition_id!r}, field {name!r}: {exc}") from None
        return merged

    def mark_produced(self, global_ids: Any, schemas: Mapping[str, FieldSchema]) -> None:
        """Record that ``schemas``' fields were stored for these rows; all-or-nothing on errors."""
        merged = self.check_schemas(schemas)
        pos = self.positions(global_ids)
        self._schemas = merged
        for name in schemas:
            if name not in self._fields:
                self._grow_fields(len(self._fields) + 1)
                self._fields[name] = len(self._fields)
        if pos.size and schemas:
            cols = np.fromiter((self._fields[name] for name in schemas), dtype=np.intp, count=len(schemas))
            self._prod[np.ix_(pos, cols)] = True

    def ready(self, fields: Sequence[str], task: str | None, limit: int | None = None) -> np.ndarray:
        """Ascending ids of live rows with all ``fields`` produced and not yet consumed by ``task``.

        ``task=None`` ignores consumption. A field nobody produced yet gives an empty result (not an
        error): a consumer may ask before the producer's first write.
        """
        if isinstance(fields, str):
            fields = [fields]
        cols = [self._fields.get(name) for name in fields]
        if any(c is None for c in cols):
            return np.empty(0, dtype=np.int64)
        consumed = None if task is None else self._consumed.get(task)
        start = self._advance(task) if consumed is not None else 0
        if limit is None:
            return self._ids[self._ready_in(start, self._n, cols, consumed)]
        # a stream reads from its low-water mark on: scan windows until ``limit`` rows are found,
        # so a call costs O(rows looked at), not O(rows in the partition x fields)
        want, found, at = max(int(limit), 0), [], start
        window = max(4 * want, 4096)
        while at < self._n and want > 0:
            end = min(self._n, at + window)
            idx = self._ready_in(at, end, cols, consumed)[:want]
            found.append(idx)
            want -= idx.size
            at, window = end, 2 * window
        return self._ids[np.concatenate(found)] if found else np.empty(0, dtype=np.int64)

    def _ready_in(self, start: int, end: int, cols: list[Any], consumed: np.ndarray | None) -> np.ndarray:
        """Positions in ``[start, end)`` that are live, produced in ``cols`` and not ``consumed``."""
        mask = self._live[start:end].copy()
        for col in cols:
            mask &= self._prod[start:end, col]
        if consumed is not None:
            mask &= ~consumed[start:end]
        return np.flatnonzero(mask) + start

    def _advance(self, task: str | None) -> int:
        """Move ``task``'s low-water mark past the consumed or dead slots at its front; return it."""
        if task is None:
            return 0
        consumed = self._consumed.get(task)
        low = self._low.get(task, 0)
        if consumed is None:
            return low
        step = 4096
        while low < self._n:
            end = min(self._n, low + step)
            done = consumed[low:end] | ~self._live[low:end]
            if not done.all():
                low += int(np.argmin(done))
                break
            low, step = end, 2 * step
        self._low[task] = low
        return low

    def production_status(
        self, global_ids: Any = None, fields: Sequence[str] | None = None
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(ids, fields, bool matrix ids x fields); defaults: all live rows, all fields in column order."""
        if global_ids is None:
            pos = np.flatnonzero(self._live[: self._n])
        else:
            pos = self.positions(global_ids)
        names = list(self._fields) if fields is None else list(fields)
        out = np.zeros((pos.size, len(names)), dtype=bool)
        for j, name in enumerate(names):
            col = self._fields.get(name)
            if col is not None:
                out[:, j] = self._prod[pos, col]
        return self._ids[pos].copy(), names, out

    # ------------------------------------------------------------------ consumption
    def mark_consumed(self, task: str, global_ids: Any) -> None:
        """Record that ``task`` was handed these rows; they are no longer ready for it."""
        pos = self.positions(global_ids)
        vec = self._consumed.get(task)
        if vec is None:
            vec = self._consumed[task] = np.zeros(self._ids.shape[0], dtype=bool)
        vec[pos] = True

    def reset_consumption(self, task: str | None = None) -> None:
        """Make rows ready again for ``task`` (None: every task), e.g. for a new epoch over the same data."""
        for name, vec in self._consumed.items():
            if task is None or name == task:
                vec[:] = False
                self._low.pop(name, None)

    def count_unconsumed(self, task: str) -> int:
        """Live rows ``task`` has not consumed, produced or not (sealed and < batch size: stream ends)."""
        vec = self._consumed.get(task)
        if vec is None:
            return self._n_live
        return self._n_live - int(np.count_nonzero(vec[: self._n] & self._live[: self._n]))

    def consumption_status(self, task: str, global_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, consumed-by-task bool); default: all live rows."""
        if global_ids is None:
            pos = np.flatnonzero(self._live[: self._n])
        else:
            pos = self.positions(global_ids)
        vec = self._consumed.get(task)
        flags = np.zeros(pos.size, dtype=bool) if vec is None else vec[pos]
        return self._ids[pos].copy(), flags

    # ------------------------------------------------------------------ tags (opt-in per-row metadata)
    def set_tags(self, global_ids: Any, tags: Sequence[Mapping[str, Any]]) -> None:
        """Merge ``tags[i]`` into row ``global_ids[i]``'s tags (dict.update semantics).

        Values must be plain msgpack-able data (numbers, str, bytes, lists, dicts): tags travel on the
        wire, and nothing executable may.
        """
        ids = _as_ids(global_ids)
        if len(tags) != ids.size:
            raise SchemaError(
                f"partition {self.partition_id!r}: {len(tags)} tag dicts for {ids.size} rows; pass one per row"
            )
        self.positions(ids)
        for tag in tags:
            if not isinstance(tag, Mapping) or not all(isinstance(k, str) for k in tag):
                raise SchemaError(f"tags must be dicts with str keys, got {tag!r}")
        try:
            _tags_encoder.encode(list(tags))
        except (TypeError, ValueError, OverflowError) as exc:
            raise SchemaError(
                f"partition {self.partition_id!r}: tags must be plain values (numbers, str, bytes, lists, "
                f"dicts): {exc}"
            ) from None
        for gid, tag in zip(ids.tolist(), tags, strict=True):
            self._tags.setdefault(gid, {}).update(tag)

    @property
    def num_tagged(self) -> int:
        """Rows that carry tags (custom meta); 0 lets callers skip per-row work entirely."""
        return len(self._tags)

    def get_tags(self, global_ids: Any) -> list[dict[str, Any]]:
        """Copies of the rows' tags ({} for untagged rows)."""
        ids = _as_ids(global_ids)
        self.positions(ids)
        return [dict(self._tags.get(gid, ())) for gid in ids.tolist()]

    def tag_values(self, global_ids: Any, name: str, default: Any = 0) -> np.ndarray:
        """One tag across rows as an array (e.g. ``"seqlen"`` for the seqlen-balanced sampler)."""
        ids = _as_ids(global_ids)
        self.positions(ids)
        empty: dict[str, Any] = {}
        return np.asarray([self._tags.get(gid, empty).get(name, default) for gid in ids.tolist()])

    # ------------------------------------------------------------------ keys (KV interface: key -> row)
    def lookup_keys(self, keys: Iterable[str]) -> np.ndarray:
        """Row ids of ``keys``; -1 where a key is unknown (or its row was cleared)."""
        get = self._key_to_id.get
        keys = list(keys)
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def get_or_create_keys(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Row ids of ``keys``, creating rows (one insert) for keys not seen before.

        ``created[i]`` is True when ``keys[i]`` had no row before this call (a key repeated in the call
        maps to one new row). Needing new rows in a sealed/aborted partition raises ``ClosedError``.
        """
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str):
                raise SchemaError(f"keys must be str, got {k!r} for partition {self.partition_id!r}")
        ids = self.lookup_keys(keys)
        created = ids < 0
        if created.any():
            new_keys = list(dict.fromkeys(k for k, c in zip(keys, created.tolist(), strict=True) if c))
            self._check_open(f"create rows for new keys {new_keys[:_SHOW_IDS]}")
            new_ids = self.insert(len(new_keys))
            for k, gid in zip(new_keys, new_ids.tolist(), strict=True):
                self._key_to_id[k] = gid
                self._id_to_key[gid] = k
            ids = self.lookup_keys(keys)
        return ids, created

    def keys_of(self, global_ids: Any) -> list[str | None]:
        """The key of each row (None for rows inserted without a key)."""
        ids = _as_ids(global_ids)
        self.positions(ids)
        return [self._id_to_key.get(gid) for gid in ids.tolist()]

    def list_keys(self) -> tuple[list[str], np.ndarray]:
        """Live keyed rows in insertion order: (keys, ids)."""
        keys = list(self._key_to_id)
        ids = np.fromiter(self._key_to_id.values(), dtype=np.int64, count=len(keys))
        return keys, ids

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> PartitionStats:
        """A snapshot: row counts, per-field produced and per-task consumed counts, flags, bytes."""
        n = self._n
        produced = np.count_nonzero(self._prod[:n], axis=0) if n else np.zeros(self._prod.shape[1], int)
        nbytes = self._ids.nbytes + self._live.nbytes + self._prod.nbytes
        nbytes += sum(vec.nbytes for vec in self._consumed.values())
        return PartitionStats(
            partition_id=self.partition_id,
            rows_live=self._n_live,
            rows_cleared=self._n_cleared,
            fields={name: int(produced[col]) for name, col in self._fields.items()},
            tasks={task: int(np.count_nonzero(vec[:n])) for task, vec in self._consumed.items()},
            keyed_rows=len(self._key_to_id),
            tagged_rows=len(self._tags),
            abandoned_rows=self.abandoned_rows,
            sealed=self.sealed,
            aborted=self.aborted,
            bytes=int(nbytes),
        )
