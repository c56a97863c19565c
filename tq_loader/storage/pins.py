"""Slots a reader still sees: a zero-copy read pins the slots it views until its tensors are gone.

A storage unit reuses the slots of dropped rows, so a view into its memory could show another row's
data later. :class:`SlotPins` keeps that from happening: :meth:`view` hands out a tensor over a run
of slots whose last reference, when it dies, releases the run; a dropped slot that is still pinned
waits in :meth:`defer` until :meth:`reclaim` finds it unpinned. Releases come from whichever thread
drops the last tensor (the garbage collector's too), so they only append to a deque; the counts are
changed only by the unit's own thread, in :meth:`_drain`.
"""

from __future__ import annotations

import collections
import weakref

import numpy as np
import torch

__all__ = ["SlotPins"]


class SlotPins:
    """Per-slot view counts of one partition's columns, and the dropped slots waiting on them."""

    def __init__(self) -> None:
        self._count = np.zeros(0, dtype=np.int32)
        self._released: collections.deque[tuple[int, int]] = collections.deque()
        self._deferred: list[np.ndarray] = []

    def view(self, data: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the contiguous tensor ``data`` without a copy, pinned while any
        tensor made from the result lives (the result's storage keeps a numpy array alive whose
        finalizer releases the pin)."""
        if stop > self._count.size:
            grown = np.zeros(max(stop, 2 * self._count.size), dtype=np.int32)
            grown[: self._count.size] = self._count
            self._count = grown
        row_bytes = data[0].numel() * data.element_size() if data.size(0) else 0
        raw = data.reshape(-1).view(torch.uint8).numpy()
        window = raw[start * row_bytes : stop * row_bytes]  # its own ndarray object: the pin's anchor
        self._count[start:stop] += 1
        weakref.finalize(window, self._released.append, (start, stop))
        return torch.from_numpy(window).view(data.dtype).view(stop - start, *data.shape[1:])

    def _drain(self) -> None:
        while self._released:
            start, stop = self._released.popleft()
            self._count[start:stop] -= 1

    def defer(self, slots: np.ndarray) -> np.ndarray:
        """Of dropped ``slots``, those free for reuse now; the pinned ones wait for :meth:`reclaim`."""
        self._drain()
        if not slots.size or not self._count.any():
            return slots
        inside = slots < self._count.size
        pinned = np.zeros(slots.size, dtype=bool)
        pinned[inside] = self._count[slots[inside]] > 0
        if pinned.any():
            self._deferred.append(slots[pinned])
            return slots[~pinned]
        return slots

    def reclaim(self) -> np.ndarray | None:
        """Deferred slots whose views are all gone (now reusable), or ``None``."""
        if not self._deferred:
            return None
        self._drain()
        waiting = np.concatenate(self._deferred)
        free = self._count[waiting] == 0
        if not free.any():
            return None
        self._deferred = [waiting[~free]] if not free.all() else []
        return waiting[free]

    @property
    def pinned_slots(self) -> int:
        self._drain()
        return int((self._count > 0).sum())
