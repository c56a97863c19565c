"""get_data(copy=False): views of stored rows where the storage allows it, never another row's data."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import tq_loader as tq
from tq_loader.storage.pins import SlotPins
from tq_loader.storage.unit import SimpleStorageUnit


@pytest.fixture
def one_unit():
    tq.init({"storage": {"num_units": 1}})
    try:
        yield tq.get_client()
    finally:
        tq.close()


def _stored(client, pid: str, values: torch.Tensor):
    meta = client.put({"x": values}, partition_id=pid)
    return meta


def test_copy_false_is_a_view_and_default_is_private(one_unit):
    c = one_unit
    meta = _stored(c, "p", torch.arange(32.0).reshape(8, 4))
    a = c.get_data(meta, copy=False)["x"]
    b = c.get_data(meta, copy=False)["x"]
    fresh = c.get_data(meta)["x"]
    assert torch.equal(a, torch.arange(32.0).reshape(8, 4))
    assert a.data_ptr() == b.data_ptr()  # both look at the stored rows
    assert fresh.data_ptr() != a.data_ptr()  # the default is the caller's own memory
    fresh.zero_()
    assert torch.equal(c.get_data(meta)["x"], torch.arange(32.0).reshape(8, 4))


def test_a_view_never_shows_another_rows_data(one_unit):
    c = one_unit
    first = _stored(c, "p", torch.full((6, 3), 1.0))
    view = c.get_data(first, copy=False)["x"]
    c.clear_samples(first)
    second = _stored(c, "p", torch.full((6, 3), 2.0))  # would reuse the freed slots
    assert torch.equal(view, torch.full((6, 3), 1.0))
    assert torch.equal(c.get_data(second)["x"], torch.full((6, 3), 2.0))
    del view
    gc.collect()
    c.clear_samples(second)
    third = _stored(c, "p", torch.full((6, 3), 3.0))
    assert torch.equal(c.get_data(third)["x"], torch.full((6, 3), 3.0))


def test_slots_are_reused_once_the_views_are_gone():
    unit = SimpleStorageUnit()
    unit.put("p", np.arange(4), {"x": torch.ones(4, 2)})
    view = unit.get("p", np.arange(4), ["x"], copy=False)["x"]
    derived = view[1:3]  # a view of the view keeps the pin
    del view
    gc.collect()
    unit.drop("p", np.arange(4))
    unit.put("p", np.arange(10, 14), {"x": torch.zeros(4, 2)})
    assert torch.equal(derived, torch.ones(2, 2))
    part = unit._parts["p"]
    assert part.pins.pinned_slots == 4 and part.hwm == 8  # new rows went past the pinned slots
    del derived
    gc.collect()
    unit.drop("p", np.arange(10, 14))
    unit.put("p", np.arange(20, 28), {"x": torch.zeros(8, 2)})
    assert part.hwm == 8  # all eight slots were free again
    assert part.pins.pinned_slots == 0


def test_views_of_bfloat16_and_scattered_rows():
    unit = SimpleStorageUnit()
    vals = torch.randn(8, 3).to(torch.bfloat16)
    unit.put("p", np.arange(8), {"x": vals})
    view = unit.get("p", np.arange(2, 6), ["x"], copy=False)["x"]
    assert view.dtype == torch.bfloat16 and torch.equal(view, vals[2:6])
    scattered = unit.get("p", np.array([5, 1, 3]), ["x"], copy=False)["x"]  # not one run: a copy
    assert torch.equal(scattered, vals[[5, 1, 3]])


def test_pins_release_from_another_thread():
    import threading

    pins = SlotPins()
    data = torch.arange(10.0).reshape(5, 2)
    view = pins.view(data, 1, 4)
    holder = [view]
    del view
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    gc.collect()
    assert pins.pinned_slots == 0
    assert pins.defer(np.arange(5)).size == 5


def test_copy_must_be_a_bool(one_unit):
    meta = _stored(one_unit, "p", torch.ones(2, 2))
    with pytest.raises(tq.TQError, match="copy"):
        one_unit.get_data(meta, copy="no")


def test_streaming_dataset_passes_copy(one_unit):
    from tq_loader.loader.dataset import StreamingDataset

    c = one_unit
    meta = _stored(c, "train", torch.arange(8.0).reshape(4, 2))
    c.seal("train")
    ds = StreamingDataset(batch_size=4, data_fields=["x"], partition_id="train", task_name="t", copy=False)
    td, got = next(iter(ds))
    assert torch.equal(td["x"], torch.arange(8.0).reshape(4, 2))
    assert got.size == meta.size
