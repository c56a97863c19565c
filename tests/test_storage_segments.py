"""Tests of tq_loader.storage.segments (gathering runs of rows) and its use by take_rows/assemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_loader.schema import FieldSchema
from tq_loader.storage import segments
from tq_loader.storage.columns import assemble, take_rows
from tq_loader.storage.segments import gather, merge_runs, ragged_range


def reference(sources, dim, src, starts, lens) -> torch.Tensor:
    """The definition: the segments' narrows laid end to end (a Python loop, fine in a test)."""
    src = np.zeros(len(starts), np.int64) if src is None else src
    pieces = [sources[int(j)].narrow(dim, int(s), int(n)) for j, s, n in zip(src, starts, lens, strict=True)]
    if not pieces:
        shape = list(sources[0].shape)
        shape[dim] = 0
        return sources[0].new_empty(shape)
    return torch.cat(pieces, dim)


def test_merge_runs_joins_adjacent_segments_of_one_source_and_drops_empty_ones() -> None:
    src = np.array([0, 0, 0, 1, 1, 0, 0])
    starts = np.array([0, 3, 5, 5, 9, 7, 9])
    lens = np.array([3, 2, 0, 4, 1, 2, 1])
    m_src, m_starts, m_lens = merge_runs(src, starts, lens)
    assert m_src.tolist() == [0, 1, 0] and m_starts.tolist() == [0, 5, 7] and m_lens.tolist() == [5, 5, 3]
    # the same (source, element) sequence
    assert np.repeat(src, lens).tolist() == np.repeat(m_src, m_lens).tolist()
    assert ragged_range(starts, lens).tolist() == ragged_range(m_starts, m_lens).tolist()


def test_one_run_is_a_view_only_when_no_copy_is_asked_for() -> None:
    values = torch.arange(100.0)
    view = gather([values], 0, None, np.array([10, 13, 20]), np.array([3, 7, 5]), copy=False)
    assert torch.equal(view, torch.arange(10.0, 25.0)) and view.data_ptr() == values[10:].data_ptr()
    fresh = gather([values], 0, None, np.array([10, 13]), np.array([3, 7]))
    assert torch.equal(fresh, torch.arange(10.0, 20.0)) and fresh.data_ptr() != values[10:].data_ptr()
    fresh.zero_()
    assert values[10] == 10.0


@pytest.mark.parametrize("row_len", [1, 3, 2000])  # index path for short runs, views for long ones
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_matches_reference_from_several_sources(row_len: int, dim: int) -> None:
    g = torch.Generator().manual_seed(row_len)
    shape = lambda n: (n, 2) if dim == 0 else (2, n)  # noqa: E731
    sources = [torch.randn(shape(row_len * k), generator=g) for k in (40, 25)]
    rng = np.random.default_rng(row_len)
    src = rng.integers(0, 2, 60)
    rows = np.where(src == 0, rng.integers(0, 40, 60), rng.integers(0, 25, 60))
    starts, lens = rows * row_len, np.full(60, row_len)  # duplicates included: overlap falls back
    out = gather(sources, dim, src, starts, lens)
    assert out.is_contiguous() and torch.equal(out, reference(sources, dim, src, starts, lens))


def test_index_is_int32_when_it_fits() -> None:
    assert segments._index(np.arange(5), 10).dtype == torch.int32
    assert segments._index(np.arange(5), 2**31).dtype == torch.int64


segment_lists = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(0, 12)), min_size=0, max_size=25
)


@settings(max_examples=150, deadline=None)
@given(segs=segment_lists, min_run=st.sampled_from([0, 4096, 10**9]), dim=st.sampled_from([0, 1]))
def test_gather_property(segs, min_run: int, dim: int) -> None:
    """Any segments of any sources (overlapping, repeated, empty, out of order), on both paths."""
    sources = [torch.arange(126.0).reshape(42, 3) + 1000 * j for j in range(3)]
    if dim == 1:
        sources = [s.T.contiguous() for s in sources]
    src = np.asarray([s for s, _, _ in segs], np.int64)
    starts = np.asarray([a for _, a, _ in segs], np.int64)
    lens = np.asarray([n for _, _, n in segs], np.int64)
    old = segments.MIN_RUN_BYTES
    segments.MIN_RUN_BYTES = min_run
    try:
        for copy in (True, False):
            out = gather(sources, dim, src, starts, lens, copy=copy)
            assert torch.equal(out, reference(sources, dim, src, starts, lens))
    finally:
        segments.MIN_RUN_BYTES = old


def njt(lens: list[int], offset: float = 0.0) -> torch.Tensor:
    values = torch.arange(float(sum(lens))) + offset
    return torch.nested.nested_tensor_from_jagged(
        values, torch.tensor([0, *np.cumsum(lens)], dtype=torch.int64)
    )


@pytest.mark.parametrize("row_len", [2, 3000])
def test_take_rows_and_assemble_jagged_runs_and_fragments(row_len: int) -> None:
    lens = [row_len + (i % 3) for i in range(40)]
    nt = njt(lens)
    rows = nt.unbind()
    for pos in (np.arange(8, 24), np.r_[0:4, 10:20, 30:33], np.arange(40)[::-3], np.array([5, 5, 1])):
        for copy in (True, False):
            out = take_rows(nt, pos, copy=copy)
            assert all(torch.equal(a, rows[i]) for a, i in zip(out.unbind(), pos, strict=True))
    view = take_rows(nt, np.arange(8, 24), copy=False)
    assert view.values().data_ptr() == rows[8].data_ptr()  # one run: sent as a view, not copied
    assert take_rows(nt, np.arange(8, 24)).values().data_ptr() != rows[8].data_ptr()
    # two parts as two units would return them; rows back in request order, in fresh memory
    order = np.random.default_rng(0).permutation(40)
    a_pos, b_pos = order[:25], order[25:]
    a, b = njt([lens[i] for i in a_pos]), njt([lens[i] for i in b_pos], 1e6)
    want = [*a.unbind(), *b.unbind()]
    where = np.concatenate([a_pos, b_pos])
    out = assemble([(a_pos, a), (b_pos, b)], 40, FieldSchema("float32", (-1,), True))
    got = out.unbind()
    assert all(torch.equal(got[p], w) for p, w in zip(where, want, strict=True))
    out.values().zero_()
    assert a.values()[1] == 1.0


def test_take_rows_dense_one_run_view_and_copies() -> None:
    x = torch.arange(40.0).reshape(20, 2)
    assert take_rows(x, np.arange(3, 9), copy=False).data_ptr() == x[3].data_ptr()
    for pos in (np.arange(3, 9), np.r_[0:5, 10:12], np.array([7, 2, 2])):
        out = take_rows(x, pos)
        assert torch.equal(out, x[torch.from_numpy(pos)]) and out.data_ptr() != x.data_ptr()


def test_segments_outside_their_source_raise() -> None:
    with pytest.raises(IndexError, match="outside"):
        gather([torch.zeros(5)], 0, None, np.array([0, 3]), np.array([2, 3]))
    with pytest.raises(IndexError, match="outside"):
        gather([torch.zeros(5), torch.zeros(2)], 0, np.array([0, 1]), np.array([0, 1]), np.array([2, 2]))
