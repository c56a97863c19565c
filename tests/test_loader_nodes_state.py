"""The loader's torchdata nodes keep exact state: resuming from a saved state yields exactly what
the original would have yielded next (the contract torchdata checks for its own nodes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torchdata.nodes import BaseNode, Mapper

from tq_loader.loader.nodes import BatchPlanner, FetchedBatch, MicroBatches
from tq_loader.metadata import BatchMeta

BATCHES, ROWS, MICRO = 5, 6, 2  # 5 batches of 6 rows, 3 micro-batches each


def _plan(i: int) -> FetchedBatch:
    if i >= BATCHES:
        return FetchedBatch(i, BatchMeta.empty(end_of_stream=True), end=True)
    ids = list(range(i * ROWS, (i + 1) * ROWS))
    td = TensorDict({"x": torch.tensor(ids)}, batch_size=[ROWS])
    return FetchedBatch(i, BatchMeta(ids, "p"), td)


def _split(td: TensorDict, meta: BatchMeta, batch_index: int) -> list[tuple[TensorDict, BatchMeta]]:
    return [(td[j : j + MICRO], meta[j : j + MICRO]) for j in range(0, ROWS, MICRO)]


def _key(item: Any) -> Any:
    if isinstance(item, FetchedBatch):
        return item.batch_index, item.end
    _td, meta = item
    return tuple(meta.global_indexes)


def check_save_load_state(make: Callable[[], BaseNode], stop_after: int) -> None:
    """Take ``stop_after`` items, save the state, and check a fresh node loaded with it yields
    exactly the rest (and that the original goes on yielding that same rest)."""
    node = make()
    node.reset()
    head = [_key(next(node)) for _ in range(stop_after)]
    state = node.state_dict()
    rest = [_key(x) for x in node]
    again = make()
    again.reset(state)
    assert [_key(x) for x in again] == rest, f"after {stop_after} items: {head}"


@pytest.mark.parametrize("stop_after", [0, 1, 2, 4, BATCHES])
def test_batch_planner_state_is_exact(stop_after: int) -> None:
    check_save_load_state(lambda: BatchPlanner(_plan), stop_after)


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 4, 7, 3 * BATCHES - 1])
def test_micro_batches_state_is_exact_even_mid_batch(stop_after: int) -> None:
    check_save_load_state(lambda: MicroBatches(Mapper(BatchPlanner(_plan), lambda b: b), _split), stop_after)
