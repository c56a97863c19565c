"""Tutorial 05 -- a custom sampler: decide which ready rows a consumer gets next.

The controller owns *readiness* (which rows have every field a request names); a sampler only
picks among the ready rows. Its contract is one method::

    sample(ready_indexes, batch_size, **sampling_config) -> (sampled, consumed)

``sampled`` are the global indexes handed to the caller, ``consumed`` those marked consumed for
its task (usually the same; a sampler may consume rows it does not return, e.g. to discard stale
data). Samplers are chosen *by registered name*, because the controller may run in another
process and nothing executable crosses the wire.

Here: ``FreshestFirst`` serves the most recently produced rows first and drops rows older than
``max_lag`` ids behind the newest -- a small off-policy guard for asynchronous RL.

Run: ``python tutorial/05_custom_sampler.py``
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.samplers import BaseSampler


class FreshestFirst(BaseSampler):
    """Newest ready rows first; rows more than ``max_lag`` ids behind the newest are consumed unseen."""

    def __init__(self, max_lag: int = 1_000_000) -> None:
        super().__init__()
        self.max_lag = max_lag

    def sample(
        self, ready_indexes: Any, batch_size: int, *args: Any, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        ready = np.sort(np.asarray(ready_indexes, dtype=np.int64))[::-1]  # newest first
        if batch_size == 0 or ready.size == 0:
            return [], []
        max_lag = int(sampling_config.get("max_lag", self.max_lag))  # per request, else the default
        stale = ready[ready < ready[0] - max_lag]
        fresh = ready[ready >= ready[0] - max_lag]
        picked = fresh[:batch_size]
        return picked.tolist(), picked.tolist() + stale.tolist()


def main() -> None:
    # 1. A sampler is a plain object: try it directly first.
    sampler = FreshestFirst()
    print("direct call:", sampler.sample([3, 1, 2, 7, 5], 2))  # -> ([7, 5], [7, 5])
    print("with max_lag=3:", sampler.sample([1, 2, 5, 7], 2, max_lag=3))  # 1 and 2 are stale

    # 2. Register it by name; every process that hosts a controller must import this module.
    tq.register_sampler("freshest_first", FreshestFirst)

    # 3. Make it the cluster's default sampler (arguments in controller.sampler_kwargs) ...
    tq.init({"controller": {"sampler": "freshest_first", "sampler_kwargs": {"max_lag": 100}}})
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(10)}, batch_size=[10]), partition_id="p")
    meta = client.get_meta(["x"], 3, "p", task_name="learner", timeout=10)
    print("default sampler ->", meta.global_indexes)
    assert meta.global_indexes == [9, 8, 7]

    # ... or name it per request, with per-request options in sampling_config.
    meta = client.get_meta(
        ["x"],
        2,
        "p",
        task_name="critic",
        sampler="freshest_first",
        sampling_config={"max_lag": 4},
        timeout=10,
    )
    print("critic (max_lag=4) ->", meta.global_indexes)
    ids, consumed = client.get_consumption_status("critic", "p")
    print("critic's consumed rows (stale rows 0..4 dropped unseen):", ids[consumed.bool()].tolist())

    # A loader picks it the same way: StreamingDataset(..., sampler="freshest_first").
    # The built-in samplers: "sequential" (default), "grpo_group_n", "rank_aware", "seqlen_balanced".
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
