"""The client half of the same-host shared-memory data path of the built-in storage units.

One :class:`~tq_loader.shm.Arena` per storage manager; each unit is offered its segments the
first time a big request goes to it. A unit that cannot map them (another host, another kernel,
``/proc`` closed to it) answers with an error and is reached over ZMQ from then on -- the path
is chosen by what works, never assumed. Small requests stay on the socket: under
:data:`MIN_SHM_BYTES` a copy into the arena costs more than the frame.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import torch

from tq_loader import protocol as p
from tq_loader import shm
from tq_loader.errors import TQConnectionError

__all__ = ["MIN_SHM_BYTES", "SharedMemoryPath"]

log = logging.getLogger(__name__)

MIN_SHM_BYTES = 256 << 10
_BUFFER_ALIGN = 64  # every buffer starts at a cache-line boundary: vectorised copies read it in place

Request = Callable[[int, Any], Awaitable[Any]]


class SharedMemoryPath:
    """Which units take shared memory, and the arena their bytes go through."""

    def __init__(self, enabled: bool, request: Request) -> None:
        self.enabled = enabled and shm.supported()
        self._pool = shm.supported()  # the arena also serves as this client's pool of result memory
        self.arena_id = secrets.token_hex(8)
        self._request = request
        self._arena: shm.Arena | None = None
        self._usable: dict[int, bool] = {}
        self._offered: dict[int, set[int]] = {}

    def arena(self) -> shm.Arena:
        if self._arena is None:
            self._arena = shm.Arena()
        return self._arena

    async def usable(self, unit: int) -> bool:
        """Whether ``unit`` maps this client's arena (asked once per unit)."""
        if not self.enabled:
            return False
        known = self._usable.get(unit)
        if known is None:
            known = self._usable[unit] = await self._offer(unit)
        return known

    def is_usable(self, unit: int) -> bool:
        """What :meth:`usable` found, without asking (False until it was asked)."""
        return bool(self._usable.get(unit))

    async def _offer(self, unit: int) -> bool:
        """Offer every segment the unit has not mapped yet; False if it cannot map them."""
        arena = self.arena()
        if not arena.segments():
            arena.alloc(1)  # a first segment to offer: "it maps nothing" proves nothing
        done = self._offered.setdefault(unit, set())
        for info in self.arena().segments():
            if info.index in done:
                continue
            seg = p.ArenaSegment(
                info.index, info.pid, info.fd, info.nbytes, info.token, info.boot_id, info.node_id
            )
            try:
                await self._request(unit, p.AttachSegment(arena=self.arena_id, segment=seg))
            except TQConnectionError as exc:
                log.info("storage unit %d takes no shared memory from this client (%s): using TCP", unit, exc)
                return False
            done.add(info.index)
        return True

    async def prepare(self, units: Sequence[int]) -> None:
        """Make sure ``units`` mapped every segment (a region may lie in one made since)."""
        for unit in units:
            if self._usable.get(unit) and not await self._offer(unit):
                self._usable[unit] = False

    def stage(self, buffers: Sequence[memoryview]) -> tuple[shm.Region, list[p.ShmSlice]]:
        """Copy ``buffers`` into one arena region (the put's one copy); keep the region until sent."""
        sizes = [memoryview(b).nbytes for b in buffers]
        offsets = np.zeros(len(sizes), dtype=np.int64)
        at = 0
        for i, size in enumerate(sizes):
            offsets[i] = at
            at += -(-size // _BUFFER_ALIGN) * _BUFFER_ALIGN
        region = self.arena().alloc(max(at, 1))
        for off, size, buf in zip(offsets.tolist(), sizes, buffers, strict=True):
            if size:
                np.copyto(region.array[off : off + size], np.frombuffer(buf, dtype=np.uint8))
        slices = [
            p.ShmSlice(region.segment, region.offset + off, size)
            for off, size in zip(offsets.tolist(), sizes)
        ]
        return region, slices

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, p.ShmSlice]:
        """A result column in the arena (units copy rows straight into it) and its slice."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        region = self.arena().alloc(max(nbytes, 1))
        # from the region's own array: the tensor holds that very object, whose end frees the region
        tensor = region.tensor(torch.uint8, (region.nbytes,))[:nbytes].view(dtype).view(shape)
        return tensor, p.ShmSlice(region.segment, region.offset, nbytes)

    def pooled(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A result tensor from the arena (memory already touched, reused once its tensors die)
        when the arena is available and the tensor is big enough to be worth it; else None."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not self._pool or nbytes < MIN_SHM_BYTES:
            return None
        return self.output(shape, dtype)[0]

    async def close(self) -> None:
        for unit, ok in self._usable.items():
            if ok:
                with contextlib.suppress(TQConnectionError):  # a unit that is gone has nothing to detach
                    await self._request(unit, p.DetachArena(arena=self.arena_id))
        self._usable.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
