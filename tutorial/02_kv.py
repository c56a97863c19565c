"""Tutorial 02 -- the KV interface: rows named by your own keys.

Instead of row ids handed out by the controller, name each row with a string key (a request id,
``"prompt7_sample2"``, ...). A key belongs to a partition. ``kv_batch_put`` creates rows for new
keys and updates existing ones; tags are small per-row dicts (``{"status": "rolled_out"}``)
that the controller keeps and ``kv_list`` shows -- a cheap way to track where each sample is.

What this shows:
1. a first put of some columns with tags;
2. a partial update: a new column for some keys, the other columns stay;
3. a tag-only update (no columns at all);
4. reads return the columns *every* requested key has (the intersection);
5. kv_clear.

Run: ``python tutorial/02_kv.py``
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

import tq_loader as tq


def main() -> None:
    tq.init()
    keys = [f"req{i}" for i in range(4)]

    # 1. Four rows, two columns, one tag dict per key.
    tq.kv_batch_put(
        keys, partition_id="kv_demo",
        fields=TensorDict({"input_ids": torch.arange(16).reshape(4, 4), "score": torch.zeros(4)}, batch_size=[4]),
        tags=[{"status": "prompt"} for _ in keys],
    )  # fmt: skip
    print("after put:", tq.kv_list("kv_demo")["kv_demo"])

    # 2. Partial update: only req0 and req1 get a "response"; their other columns are untouched.
    tq.kv_batch_put(
        keys[:2], partition_id="kv_demo",
        fields=TensorDict({"response": torch.ones(2, 3, dtype=torch.long)}, batch_size=[2]),
        tags=[{"status": "rolled_out"}, {"status": "rolled_out"}],
    )  # fmt: skip
    # kv_put writes one row: tensors without the batch dimension.
    tq.kv_put("req2", "kv_demo", fields={"response": torch.full((3,), 7)}, tag={"status": "rolled_out"})

    # 3. A tag-only update: merged into the row's tags with dict.update (old tag keys stay).
    tq.kv_batch_put(["req0"], partition_id="kv_demo", tags=[{"reward_model": "rm-v1"}])
    tags = tq.kv_list("kv_demo")["kv_demo"]
    print("tags now:", tags)
    assert tags["req0"] == {"status": "rolled_out", "reward_model": "rm-v1"}

    # 4. Reads: rows come back in the order of the keys you pass ...
    both = tq.kv_batch_get(["req1", "req0"], "kv_demo")
    print("req1, req0 ->", sorted(both.keys()), both["input_ids"][:, 0].tolist())
    assert sorted(both.keys()) == ["input_ids", "response", "score"]
    # ... with only the columns all of them have: req3 has no "response", so it is left out.
    mixed = tq.kv_batch_get(keys, "kv_demo")
    print("all four keys ->", sorted(mixed.keys()))
    assert "response" not in mixed
    # select_fields picks columns explicitly (each must exist for every key).
    scores = tq.kv_batch_get(keys, "kv_demo", select_fields=["score"])
    print("scores:", scores["score"].tolist())

    # An unknown key is an error that names it (TransferQueue would silently return fewer rows).
    try:
        tq.kv_batch_get(["req0", "nope"], "kv_demo")
    except tq.NotFoundError as exc:
        print("unknown key ->", type(exc).__name__)

    # 5. kv_clear removes rows (idempotent: clearing again is fine).
    tq.kv_clear(["req3"], "kv_demo")
    tq.kv_clear(["req3"], "kv_demo")
    print("after kv_clear:", sorted(tq.kv_list("kv_demo")["kv_demo"]))
    tq.kv_clear(keys, "kv_demo")
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
