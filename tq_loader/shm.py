"""Same-host shared memory for the data path: a client's *arena* that its storage units map.

A client on the same host as a storage unit (another process: ``tq-loader serve``, a Ray actor,
the process that owns an embedded cluster seen from a DataLoader worker) moves a batch's bytes
through memory both map instead of through a socket; ZMQ carries only the control message:

* put: the client lays the batch's buffers into an arena region once (one copy into memory that
  stays mapped and is reused, so no page faults) and every unit copies its rows out of it;
* get: the client allocates each dense result column in its arena and the units copy their rows
  straight into it -- the result *is* that region (one copy in all), kept until its tensors die.

Segments are ``memfd`` files: they have no name, so nothing can leak -- the kernel frees one when
the last process holding it exits or unmaps it (a SIGKILLed client or server leaves nothing
behind). A unit opens a client's segment through ``/proc/<pid>/fd/<fd>`` and accepts it only if
the host's boot id matches and the segment starts with the random token the client sent, so a
client on another host (or a recycled pid) falls back to TCP instead of being trusted.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tq_loader.errors import ProtocolError, TQConnectionError

__all__ = ["Arena", "ArenaMap", "Region", "SegmentInfo", "boot_id", "supported"]

_TOKEN_BYTES = 16
_MIN_SEGMENT = 64 << 20
_ALIGN = 4096


def boot_id() -> str:
    """This host's boot id (equal for every process of one running kernel)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def ray_node_id() -> str:
    """This process's Ray node id when it runs under Ray (a driver or a worker), else ``""``: two Ray
    nodes simulated on one host share a boot id but must not share memory as if they were one."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


def supported() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") and bool(boot_id())


@dataclass(frozen=True)
class SegmentInfo:
    """How a unit opens a segment: the creator's pid and fd, the segment's size and token."""

    index: int
    pid: int
    fd: int
    nbytes: int
    token: bytes
    boot_id: str
    node_id: str = ""


class _Segment:
    def __init__(self, index: int, nbytes: int) -> None:
        self.index, self.nbytes = index, nbytes
        self.fd = os.memfd_create(f"tq_loader-arena-{index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self.map = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.token = secrets.token_bytes(_TOKEN_BYTES)
        self.map[:_TOKEN_BYTES] = self.token
        self.view = np.frombuffer(self.map, dtype=np.uint8)
        self.view[_ALIGN:] = 0  # touch every page once: later copies into it never fault
        self.free: list[tuple[int, int]] = [(_ALIGN, nbytes - _ALIGN)]  # (offset, length), sorted

    def info(self) -> SegmentInfo:
        return SegmentInfo(
            self.index, os.getpid(), self.fd, self.nbytes, self.token, boot_id(), ray_node_id()
        )

    def take(self, nbytes: int) -> int | None:
        for i, (off, length) in enumerate(self.free):
            if length >= nbytes:
                rest = length - nbytes
                self.free[i : i + 1] = [(off + nbytes, rest)] if rest else []
                return off
        return None

    def give(self, off: int, nbytes: int) -> None:
        free = sorted([*self.free, (off, nbytes)])
        merged: list[tuple[int, int]] = []
        for o, n in free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self.free = merged

    def close(self) -> None:
        self.view = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):  # regions still viewed by tensors: unmapped with them
            self.map.close()
        os.close(self.fd)


@dataclass(eq=False)
class Region:
    """``nbytes`` at ``offset`` of segment ``segment``; ``array`` is a uint8 view of it."""

    segment: int
    offset: int
    nbytes: int
    array: np.ndarray = field(repr=False)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The region as a tensor; the region is returned to the arena when the tensor (and every
        view of it) dies. (``torch.from_numpy`` holds ``array`` itself; a numpy re-slice of it would
        not, since numpy views point at the mapping, so only this tensor may be derived from.)"""
        return torch.from_numpy(self.array).view(dtype).view(shape)


class Arena:
    """A client's growable set of shared segments with a first-fit region allocator (thread-safe).

    ``on_segment(info)`` is called (under no lock) for each new segment, so the client can offer it
    to the units before it is used.
    """

    def __init__(self, *, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._returned: collections.deque[tuple[_Segment, int, int]] = collections.deque()
        self._closed = False
        self.listeners: list[Callable[[SegmentInfo], None]] = []

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._segments)

    def segments(self) -> list[SegmentInfo]:
        with self._lock:
            return [s.info() for s in self._segments]

    def alloc(self, nbytes: int) -> Region:
        """A region of at least ``nbytes`` (page aligned); freed when its array is garbage."""
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        new: _Segment | None = None
        with self._lock:
            if self._closed:
                raise TQConnectionError("the shared-memory arena is closed")
            self._take_returned()
            for seg in self._segments:
                off = seg.take(size)
                if off is not None:
                    return self._region(seg, off, size, nbytes)
            grow = max(_MIN_SEGMENT, size + _ALIGN, self.nbytes)  # geometric: few segments in all
            if self.max_bytes is not None and self.nbytes + grow > self.max_bytes:
                raise MemoryError(
                    f"shared-memory arena full ({self.nbytes} of {self.max_bytes} bytes in use)"
                )
            new = _Segment(len(self._segments), grow)
            self._segments.append(new)
            off = new.take(size)
            assert off is not None
            region = self._region(new, off, size, nbytes)
        for listener in list(self.listeners):
            listener(new.info())
        return region

    def _region(self, seg: _Segment, off: int, size: int, nbytes: int) -> Region:
        array = seg.view[off : off + nbytes]
        region = Region(seg.index, off, nbytes, array)
        weakref.finalize(array, self._give, seg, off, size)
        return region

    def _give(self, seg: _Segment, off: int, size: int) -> None:
        # A finalizer may run anywhere -- even inside alloc(), under the lock, when a collection
        # is triggered there -- so it only queues the region (deque.append is atomic); the next
        # alloc() returns it to its segment.
        self._returned.append((seg, off, size))

    def _take_returned(self) -> None:
        """Put queued regions back into their segments (called with the lock held)."""
        while self._returned:
            seg, off, size = self._returned.popleft()
            if not self._closed:
                seg.give(off, size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            segments, self._segments = self._segments, []
        for seg in segments:
            seg.close()


class ArenaMap:
    """The unit side: the segments of each client arena it was offered, mapped once.

    A segment is accepted only from this host (boot id) and only if its first bytes are the token
    the client sent; otherwise ``TQConnectionError`` tells the client to use TCP.
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[str, int], tuple[int, mmap.mmap, np.ndarray]] = {}
        self._pruned = 0.0

    def attach(self, arena: str, info: SegmentInfo) -> None:
        if info.boot_id != boot_id():
            raise TQConnectionError("shared memory: the client runs on another host")
        mine = ray_node_id()
        if info.node_id and mine and info.node_id != mine:
            raise TQConnectionError("shared memory: the client runs on another Ray node")
        key = (arena, info.index)
        if key in self._maps:
            return
        try:
            fd = os.open(f"/proc/{info.pid}/fd/{info.fd}", os.O_RDWR)
        except OSError as exc:
            raise TQConnectionError(f"shared memory: cannot open the client's segment ({exc})") from None
        try:
            if os.fstat(fd).st_size != info.nbytes:
                raise TQConnectionError("shared memory: the segment has another size than announced")
            mapped = mmap.mmap(fd, info.nbytes)
        finally:
            os.close(fd)
        if mapped[:_TOKEN_BYTES] != info.token:
            mapped.close()
            raise TQConnectionError("shared memory: the segment's token does not match")
        self._maps[key] = (info.pid, mapped, np.frombuffer(mapped, dtype=np.uint8))

    def view(self, arena: str, segment: int, offset: int, nbytes: int) -> memoryview:
        found = self._maps.get((arena, segment))
        if found is None:
            raise ProtocolError(f"shared memory: segment {segment} of arena {arena!r} was never attached")
        _, mapped, array = found
        if offset < _TOKEN_BYTES or nbytes < 0 or offset + nbytes > len(mapped):
            raise ProtocolError(f"shared memory: slice [{offset}, +{nbytes}) outside segment {segment}")
        return memoryview(array[offset : offset + nbytes])

    def detach(self, arena: str) -> int:
        """Forget a client's arena (its close); returns how many segments were unmapped."""
        keys = [k for k in self._maps if k[0] == arena]
        for key in keys:
            self._unmap(key)
        return len(keys)

    def prune(self, min_interval: float = 0.0) -> int:
        """Unmap the segments of clients that exited without detaching (their memory is then freed);
        with ``min_interval``, at most that often."""
        now = time.monotonic()
        if now - self._pruned < min_interval:
            return 0
        self._pruned = now
        dead = [k for k, (pid, _, _) in self._maps.items() if not _alive(pid)]
        for key in dead:
            self._unmap(key)
        return len(dead)

    def _unmap(self, key: tuple[str, int]) -> None:
        _, mapped, _ = self._maps.pop(key)
        with contextlib.suppress(BufferError):  # a view still in use by a request: freed with it
            mapped.close()

    def statistics(self) -> dict[str, Any]:
        return {"arenas": len({a for a, _ in self._maps}), "segments": len(self._maps),
                "bytes": sum(len(m) for _, m, _ in self._maps.values())}  # fmt: skip

    def close(self) -> None:
        for key in list(self._maps):
            self._unmap(key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
