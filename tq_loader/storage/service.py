"""A :class:`SimpleStorageUnit` served over the transport: one ``handle`` for ``transport.Server``.

Puts into a full unit wait (without polling) on a condition that every drop notifies, bounded by
the request's deadline and ``put_timeout``; then they fail with a ``CapacityError`` that says how to
free space. Bad requests raise typed errors, which the Server turns into error replies.

``ExportRows`` (checkpoints) answers in the form of :mod:`tq_loader.storage.export`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import torch

from tq_loader import protocol as p
from tq_loader.codec import decode_columns, encode_columns
from tq_loader.errors import CapacityError, ProtocolError
from tq_loader.schema import FieldSchema
from tq_loader.shm import ArenaMap, SegmentInfo
from tq_loader.stats import UnitStats
from tq_loader.storage.columns import torch_dtype
from tq_loader.storage.export import encode_export
from tq_loader.storage.unit import SimpleStorageUnit
from tq_loader.transport import RequestContext

__all__ = ["StorageUnitService"]


class StorageUnitService:
    """Serves PutRows, GetRows, DropRows, DropPartition, ExportRows and Stats for one unit."""

    def __init__(self, unit: SimpleStorageUnit, put_timeout: float = 30.0) -> None:
        self.unit = unit
        self.put_timeout = put_timeout
        self._space: asyncio.Condition | None = None  # made lazily: bound to the serving loop
        self._waiting = 0
        self._capacity_errors = 0
        self._handlers = {
            p.PutRows: self._put,
            p.GetRows: self._get,
            p.DropRows: self._drop,
            p.DropPartition: self._drop_partition,
            p.ExportRows: self._export,
            p.Stats: self._stats,
            p.AttachSegment: self._attach,
            p.DetachArena: self._detach,
        }
        self.arenas = ArenaMap()

    async def handle(
        self, ctx: RequestContext, request: Any, buffers: list[memoryview]
    ) -> tuple[Any, Sequence[Any]]:
        handler = self._handlers.get(type(request))
        if handler is None:
            raise ProtocolError(
                f"a storage unit does not serve {type(request).__name__}; send it to the controller"
            )
        return await handler(ctx, request, buffers)

    def _condition(self) -> asyncio.Condition:
        if self._space is None:
            self._space = asyncio.Condition()
        return self._space

    async def _freed(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    # ------------------------------------------------------------ requests
    async def _attach(
        self, ctx: RequestContext, req: p.AttachSegment, buffers: list[memoryview]
    ) -> tuple[Any, list]:
        self.arenas.prune()  # clients that died without detaching: their memory goes now
        seg = req.segment
        info = SegmentInfo(seg.index, seg.pid, seg.fd, seg.nbytes, seg.token, seg.boot_id, seg.node_id)
        self.arenas.attach(req.arena, info)
        return p.Ok(), []

    async def _detach(
        self, ctx: RequestContext, req: p.DetachArena, buffers: list[memoryview]
    ) -> tuple[Any, list]:
        self.arenas.detach(req.arena)
        return p.Ok(), []

    def _shm_buffers(self, arena: str, slices: list[p.ShmSlice]) -> list[memoryview]:
        self.arenas.prune(min_interval=1.0)
        return [self.arenas.view(arena, s.segment, s.offset, s.nbytes) for s in slices]

    async def _put(self, ctx: RequestContext, req: p.PutRows, buffers: list[memoryview]) -> tuple[Any, list]:
        if req.shm:
            if buffers:
                raise ProtocolError(
                    "PutRows: buffers come either as frames or as shared-memory slices, not both"
                )
            buffers = self._shm_buffers(req.arena, req.shm)
        ids = p.ids_from_wire(req.global_indexes)
        columns = decode_columns(req.columns, buffers, copy=False)  # views; the unit copies them in
        pid, unit = req.partition_id, self.unit
        need = unit.new_row_count(pid, ids)
        if not unit.has_room(need):
            if unit.capacity_rows is not None and need > unit.capacity_rows:
                raise CapacityError(
                    f"partition {pid!r}: a put of {need} new rows can never fit a storage unit of "
                    f"{unit.capacity_rows} rows; split the batch or raise storage.capacity_rows"
                )
            await self._wait_for_room(ctx, req, ids, need)
        positions = p.ids_from_wire(req.positions) if req.positions else None
        unit.put(pid, ids, columns, req.schemas, copy_objects=False, positions=positions)
        return p.Ok(), []

    async def _wait_for_room(self, ctx: RequestContext, req: p.PutRows, ids: np.ndarray, need: int) -> None:
        limits = [t for t in (ctx.remaining(), req.timeout, self.put_timeout) if t is not None]
        timeout = max(0.0, min(limits)) if limits else None
        cond, unit, pid = self._condition(), self.unit, req.partition_id
        self._waiting += 1
        try:
            async with cond:
                await asyncio.wait_for(
                    cond.wait_for(lambda: unit.has_room(unit.new_row_count(pid, ids))), timeout
                )
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            self._capacity_errors += 1
            raise CapacityError(
                f"storage unit full: it holds {unit.rows} of {unit.capacity_rows} rows and partition "
                f"{pid!r} needs {need} more; waited {timeout:.1f}s for space. Free space by clearing "
                "consumed rows (clear_samples / clear_partition), or raise storage.capacity_rows / "
                "add storage units"
            ) from None
        finally:
            self._waiting -= 1

    async def _get(self, ctx: RequestContext, req: p.GetRows, buffers: list[memoryview]) -> tuple[Any, list]:
        ids = p.ids_from_wire(req.global_indexes)
        if req.into_shm:
            if buffers:
                raise ProtocolError(
                    "GetRows: 'into' outputs come either as buffers or as shared-memory slices"
                )
            buffers = self._shm_buffers(req.arena, req.into_shm)
        elif req.into and not ctx.in_process:
            raise ProtocolError(
                "GetRows: 'into' buffers are for in-process callers; use shared-memory slices"
            )
        written = self._read_into(req, ids, buffers) if req.into else []
        rest = [name for name in req.fields if name not in written]
        # views of the unit's write-once nested chunks: the reply's frames are sent without a copy
        columns = self.unit.get(req.partition_id, ids, rest, copy_objects=False, copy=False)
        specs, bufs = encode_columns(columns)
        return p.RowsReply(global_indexes=req.global_indexes, columns=specs, written=written), bufs

    def _read_into(self, req: p.GetRows, ids: np.ndarray, buffers: list[memoryview]) -> list[str]:
        """Copy dense fields straight into the caller's output tensors (an in-process caller)."""
        if len(buffers) != len(req.into) or len(set(req.into)) != len(req.into):
            raise ProtocolError(f"GetRows: {len(req.into)} 'into' fields but {len(buffers)} buffers")
        positions = p.ids_from_wire(req.positions)
        written = []
        for name, buf in zip(req.into, buffers, strict=True):
            schema = req.schemas.get(name)
            if schema is None or schema.is_non_tensor or name not in req.fields:
                raise ProtocolError(
                    f"GetRows: 'into' field {name!r} needs a tensor schema and must be requested"
                )
            out = _output_view(buf, schema, name)
            if positions.size and positions.max() >= out.size(0):
                raise ProtocolError(
                    f"GetRows: field {name!r}: positions beyond its {out.size(0)} output rows"
                )
            if self.unit.read_into(req.partition_id, ids, name, out, positions):
                written.append(name)
        return written

    async def _drop(
        self, ctx: RequestContext, req: p.DropRows, buffers: list[memoryview]
    ) -> tuple[Any, list]:
        freed = self.unit.drop(req.partition_id, p.ids_from_wire(req.global_indexes))
        if freed:
            await self._freed()
        return p.Ok(), []

    async def _drop_partition(
        self, ctx: RequestContext, req: p.DropPartition, buffers: list[memoryview]
    ) -> tuple[Any, list]:
        if self.unit.drop_partition(req.partition_id):
            await self._freed()
        return p.Ok(), []

    async def _export(
        self, ctx: RequestContext, req: p.ExportRows, buffers: list[memoryview]
    ) -> tuple[Any, list]:
        return encode_export(*self.unit.export(req.partition_id))

    async def _stats(self, ctx: RequestContext, req: p.Stats, buffers: list[memoryview]) -> tuple[Any, list]:
        return p.UnitStatsReply(stats=self.statistics()), []

    def statistics(self) -> UnitStats:
        """The unit's snapshot plus this service's own counters (waiting puts, shared memory)."""
        self.arenas.prune()
        return msgspec.structs.replace(
            self.unit.statistics(),
            service={"puts_waiting": self._waiting, "capacity_errors": self._capacity_errors},
            shared_memory=self.arenas.statistics(),
        )


def _output_view(buf: memoryview, schema: FieldSchema, name: str) -> torch.Tensor:
    """The caller's output buffer as a tensor of rows of ``schema`` (it must hold whole rows)."""
    dtype = torch_dtype(schema.dtype)
    row = math.prod(schema.shape) * dtype.itemsize
    if buf.readonly or buf.nbytes == 0 or row == 0 or buf.nbytes % row:
        raise ProtocolError(f"GetRows: the output buffer of {name!r} is not a writable array of whole rows")
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(-1, *schema.shape)
