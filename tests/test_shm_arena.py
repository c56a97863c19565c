"""The client's shared-memory arena: regions are reused once their tensors die, never before."""

from __future__ import annotations

import pytest
import torch

from tq_loader import shm

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs Linux memfd and /proc")


def test_regions_are_reused_only_after_their_tensors_die() -> None:
    arena = shm.Arena()
    try:
        kept = arena.alloc(1 << 20).tensor(torch.float32, ((1 << 20) // 4,))
        kept.fill_(7.0)
        for _ in range(200):  # far more than one segment holds: only freed regions make room
            t = arena.alloc(1 << 20).tensor(torch.uint8, (1 << 20,))
            t.fill_(1)
            del t
        assert arena.nbytes <= 2 * (64 << 20)
        assert bool((kept == 7.0).all())  # a live region was never handed out again
    finally:
        arena.close()


def test_a_region_freed_while_the_arena_is_busy_does_not_wait_for_it() -> None:
    """A region's finalizer may run anywhere -- inside alloc() under the arena's lock, when a
    collection or a refcount drop happens there -- so it must never wait for that lock."""
    arena = shm.Arena()
    try:
        t = arena.alloc(4096).tensor(torch.uint8, (4096,))
        with arena._lock:  # what alloc() holds while it works
            del t  # the region dies here; its finalizer must return at once
        again = arena.alloc(4096)  # and the region is back in the pool
        assert again.offset == 4096  # the first region of the first segment, reused
    finally:
        arena.close()
