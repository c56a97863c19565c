"""Fresh tensor memory that is cheap to fill: big allocations are backed by transparent huge pages.

Filling freshly allocated memory costs a page fault per 4 KiB page; on the machines measured here
that caps a copy into a fresh ``torch.empty`` at ~2 GB/s while a copy into touched memory runs at
~15 GB/s. The data path allocates its big buffers (a get's output columns, a storage unit's
column memory) here: an anonymous mapping advised ``MADV_HUGEPAGE`` faults 2 MiB at a time (the
kernel's ``transparent_hugepage/enabled = madvise`` setting honours exactly such requests). Only
the library's own buffers are advised -- no process-wide switch. Elsewhere (no ``madvise``, small
sizes) this is plain ``torch.empty``.

The returned tensor owns its mapping: it is unmapped when the last tensor viewing it is freed.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Sequence

import torch

__all__ = ["HUGE_PAGE", "MIN_HUGE_BYTES", "empty"]

HUGE_PAGE = 2 << 20
MIN_HUGE_BYTES = 8 << 20  # below this the mapping's own cost outweighs the faults it saves
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, huge-page backed when big enough."""
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if _ADVICE is None or nbytes < MIN_HUGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without THP: plain pages, still correct
        region.madvise(_ADVICE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive
    skip = (-raw.data_ptr()) % HUGE_PAGE  # start on a huge-page boundary
    return raw.narrow(0, skip, nbytes).view(dtype).view(shape)
