"""Gathering runs of rows: slices and one ``cat`` where the runs are long, an index where they are not.

Every hop of the data path picks jagged rows out of flat buffers: the manager splitting a batch
over units, a unit copying a put into its own memory or answering a get from it, a client
reassembling the parts of a get. A row is a *segment* ``[start, start + length)`` along the ragged
dim of a source tensor (a jagged column's values). (Dense rows need no element index: they are
picked with one index entry per row.)

:func:`gather` first merges segments that follow each other in the same source (a batch of
consecutive ids striped in blocks is a few long runs), then

* one run: a ``narrow`` -- a view, or one copy if a fresh tensor is wanted;
* long runs: ``tensor_split`` of each source at the run boundaries (views, made in one C++ call
  per source, no Python step per run) and one ``torch.cat``: one copy, no index;
* short runs (fragmented selections of small rows): one ``index_select`` with an element index
  (``int32`` when it fits: half the memory of ``int64``), which beats making a view per run there.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["MIN_RUN_BYTES", "gather", "merge_runs", "ragged_range"]

# Below this many bytes per run on average, making a view per run costs more than an element
# index (measured on 1024 runs: equal at 1 KiB, views 2x faster at 2 KiB, 4x at 8 KiB).
MIN_RUN_BYTES = 1024
_FEW_RUNS = 4  # this few runs always take the views: no index to build at all


def ragged_range(starts: np.ndarray, lens: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=dtype)
    out_starts = np.cumsum(lens) - lens
    return (np.repeat(starts - out_starts, lens) + np.arange(total, dtype=np.int64)).astype(dtype, copy=False)


def merge_runs(
    src: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments in the same order and covering the same elements, with every segment that starts
    where the previous one (of the same source) ends merged into it, and empty ones dropped."""
    keep = lens > 0
    if not keep.all():
        src, starts, lens = src[keep], starts[keep], lens[keep]
    if starts.size <= 1:
        return src, starts, lens
    joined = (src[1:] == src[:-1]) & (starts[1:] == starts[:-1] + lens[:-1])
    if not joined.any():
        return src, starts, lens
    heads = np.concatenate(([0], np.flatnonzero(~joined) + 1))
    return src[heads], starts[heads], np.add.reduceat(lens, heads)


def _element_bytes(t: torch.Tensor, dim: int) -> int:
    """Bytes of one step along ``dim`` (a row's worth of the other dims)."""
    return int(np.prod([s for i, s in enumerate(t.shape) if i != dim], dtype=np.int64)) * t.element_size()


def _split_runs(
    sources: Sequence[torch.Tensor], dim: int, src: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> list[torch.Tensor] | None:
    """Views of the runs in output order; ``None`` if runs of a source overlap (a row taken twice)."""
    pieces: list[torch.Tensor] = []
    order: list[np.ndarray] = []
    for j, source in enumerate(sources):  # one step per source (units), never per run
        mine = np.flatnonzero(src == j) if len(sources) > 1 else np.arange(src.size)
        if mine.size == 0:
            continue
        s, e = starts[mine], starts[mine] + lens[mine]
        if mine.size > 1 and (s[1:] < s[:-1]).any():
            by_start = np.argsort(s, kind="stable")
            mine, s, e = mine[by_start], s[by_start], e[by_start]
        if mine.size > 1 and (s[1:] < e[:-1]).any():
            return None
        bounds = np.empty(2 * s.size, dtype=np.int64)
        bounds[0::2], bounds[1::2] = s, e
        pieces.extend(source.tensor_split(bounds.tolist(), dim)[1::2])  # odd pieces: the runs
        order.append(mine)
    where = np.concatenate(order)
    if np.array_equal(where, np.arange(where.size)):
        return pieces
    at = np.empty_like(where)
    at[where] = np.arange(where.size)
    return list(operator.itemgetter(*at.tolist())(pieces)) if at.size > 1 else pieces


def _index(positions: np.ndarray, limit: int, device: torch.device | None = None) -> torch.Tensor:
    """An index tensor for ``index_select`` over ``limit`` elements: int32 when it fits."""
    dtype = np.int32 if limit < 2**31 else np.int64
    index = torch.from_numpy(np.ascontiguousarray(positions, dtype=dtype))
    return index if device is None or device.type == "cpu" else index.to(device)


def gather(
    sources: Sequence[torch.Tensor],
    dim: int,
    src: np.ndarray | None,
    starts: np.ndarray,
    lens: np.ndarray,
    *,
    copy: bool = True,
) -> torch.Tensor:
    """Segment ``i`` -- ``sources[src[i]].narrow(dim, starts[i], lens[i])`` -- for every ``i``, laid
    end to end along ``dim`` (``src=None``: all from ``sources[0]``).

    ``copy=False`` may return a view of a source (one run); ``copy=True`` always returns fresh,
    contiguous memory. All sources must agree in every dim but ``dim``.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    lens = np.asarray(lens, dtype=np.int64).reshape(-1)
    src = np.zeros(starts.size, dtype=np.int64) if src is None else np.asarray(src, dtype=np.int64)
    src, starts, lens = merge_runs(src, starts, lens)
    sizes = np.asarray([s.size(dim) for s in sources], dtype=np.int64)
    if starts.size and ((starts < 0).any() or (starts + lens > sizes[src]).any()):
        raise IndexError(
            f"gather: a segment lies outside its source (sizes {sizes.tolist()} along dim {dim})"
        )
    first = sources[0]
    if starts.size == 0:
        shape = list(first.shape)
        shape[dim] = 0
        return first.new_empty(shape)
    if starts.size == 1:
        run = sources[int(src[0])].narrow(dim, int(starts[0]), int(lens[0]))
        return run.clone(memory_format=torch.contiguous_format) if copy else run
    total = int(lens.sum())
    if starts.size <= _FEW_RUNS or total * _element_bytes(first, dim) >= MIN_RUN_BYTES * starts.size:
        pieces = _split_runs(sources, dim, src, starts, lens)
        if pieces is not None:
            return torch.cat(pieces, dim)
    # Fragmented (or overlapping) runs: one element index over the sources laid end to end.
    if len(sources) > 1:
        starts = starts + (np.cumsum(sizes) - sizes)[src]
        flat = torch.cat(list(sources), dim)
    else:
        flat = first
    return flat.index_select(dim, _index(ragged_range(starts, lens), flat.size(dim), flat.device))
