"""Tests of tq_loader.storage.stores: the nested store's write-once chunks, its views and their lifetime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tq_loader.codec import decode_columns, encode_columns
from tq_loader.schema import FieldSchema
from tq_loader.storage.unit import SimpleStorageUnit

JAG = FieldSchema("float32", (-1,), True)


def njt(rows: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    offsets = torch.tensor([0, *np.cumsum([r.shape[dim] for r in rows])], dtype=torch.int64)
    return torch.nested.nested_tensor_from_jagged(torch.cat(rows, dim), offsets, jagged_dim=dim + 1)


def rows_equal(value: torch.Tensor, expected: list[torch.Tensor]) -> bool:
    got = value.unbind()
    return len(got) == len(expected) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, expected, strict=True)
    )


def column(unit: SimpleStorageUnit, name: str, pid: str = "p"):
    return unit._parts[pid].columns[name]


def test_rows_put_together_are_one_slice_of_one_chunk() -> None:
    unit = SimpleStorageUnit()
    rows = [torch.full((n,), float(i)) for i, n in enumerate((3, 0, 5, 2, 4))]
    unit.put("p", [10, 11, 12, 13, 14], {"j": njt(rows)})
    col = column(unit, "j")
    assert len(col._chunks) == 1  # one private copy per put
    chunk = next(iter(col._chunks.values()))[0]
    view = unit.get("p", [11, 12, 13], ["j"], copy=False)["j"]
    assert rows_equal(view, rows[1:4]) and view.values().data_ptr() == chunk[3:].data_ptr()  # no copy
    fresh = unit.get("p", [11, 12, 13], ["j"])["j"]  # the default: fresh memory the caller may change
    assert rows_equal(fresh, rows[1:4]) and fresh.values().data_ptr() != chunk[3:].data_ptr()
    shuffled = unit.get("p", [14, 10, 12], ["j"], copy=False)["j"]  # not one run: gathered
    assert rows_equal(shuffled, [rows[4], rows[0], rows[2]])


def test_chunks_live_while_any_row_does_and_rewrites_never_change_a_view() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", np.arange(4), {"j": njt([torch.ones(2), torch.ones(3), torch.ones(1), torch.ones(2)])})
    col = column(unit, "j")
    view = unit.get("p", [0, 1], ["j"], copy=False)["j"]
    unit.put("p", [0, 1], {"j": njt([torch.zeros(1), torch.zeros(4)])})  # written again: a new chunk
    assert len(col._chunks) == 2 and sorted(col._live.values()) == [2, 2]
    assert bool((view.values() == 1).all())  # the old chunk is never written
    mixed = unit.get("p", [3, 0, 1, 2], ["j"])["j"]  # rows from two chunks, in request order
    assert rows_equal(mixed, [torch.ones(2), torch.zeros(1), torch.zeros(4), torch.ones(1)])
    unit.drop("p", [2, 3])
    assert len(col._chunks) == 1  # the first chunk had no row left
    unit.drop("p", [0, 1])
    assert not col._chunks and not col._live
    unit.put("p", [0, 9], {"j": njt([torch.ones(2), torch.ones(1)])})
    assert unit.statistics()["partitions"]["p"]["fields"]["j"]["bytes"] == 3 * 4


@pytest.mark.parametrize("dim", [0, 1])
def test_dense_values_and_any_ragged_dim(dim: int) -> None:
    unit = SimpleStorageUnit()
    schema = FieldSchema("float32", (-1, 2) if dim == 0 else (2, -1), True)
    dense = torch.arange(24.0).reshape(4, 3, 2) if dim == 0 else torch.arange(24.0).reshape(4, 2, 3)
    unit.put("p", [0, 1, 2, 3], {"x": dense}, {"x": schema})  # same-shape rows of a jagged column
    shapes = [(1, 2), (4, 2)] if dim == 0 else [(2, 1), (2, 4)]
    rows = [torch.randn(s) for s in shapes]
    unit.put("p", [4, 5], {"x": njt(rows, dim)}, {"x": schema})
    out = unit.get("p", [5, 1, 4, 2], ["x"], copy=False)["x"]
    assert out._ragged_idx == dim + 1
    assert rows_equal(out, [rows[1], dense[1], rows[0], dense[2]])


def test_dense_column_turned_jagged_keeps_its_rows_and_all_kinds_mix() -> None:
    unit = SimpleStorageUnit()
    unit.put("p", [0, 1, 2], {"x": torch.arange(6.0).reshape(3, 2)})
    unit.drop("p", [1])
    unit.put("p", [3], {"x": torch.ones(1, 5)})  # another shape: the column turns jagged
    assert unit.schemas("p")["x"] == JAG
    out = unit.get("p", [3, 2, 0], ["x"], copy=False)["x"]
    assert rows_equal(out, [torch.ones(5), torch.tensor([4.0, 5.0]), torch.tensor([0.0, 1.0])])
    # rows that differ in two dims: the column becomes "rows" (a strided nested tensor per row)
    unit.put("p", [4, 5], {"g": njt([torch.ones(1, 2), torch.ones(2, 2)])})
    unit.put("p", [6], {"g": [torch.zeros(3, 1)]})
    got = unit.get("p", [6, 4, 5], ["g"])["g"]
    assert got.is_nested and got.layout == torch.strided
    assert [tuple(t.shape) for t in got.unbind()] == [(3, 1), (1, 2), (2, 2)]


def test_service_reply_frames_are_views_of_the_chunks() -> None:
    """What the unit's service encodes for a get of rows put together: the chunk's own bytes."""
    unit = SimpleStorageUnit()
    rows = [torch.randn(n) for n in (5, 7, 2)]
    unit.put("p", [1, 2, 3], {"j": njt(rows)})
    chunk = next(iter(column(unit, "j")._chunks.values()))[0]
    specs, bufs = encode_columns(unit.get("p", [1, 2, 3], ["j"], copy=False))
    address = np.frombuffer(bufs[0], dtype=np.uint8).ctypes.data
    assert address == chunk.data_ptr()
    back = decode_columns(specs, [bytes(b) for b in bufs], copy=True)["j"]
    assert rows_equal(back, rows)
