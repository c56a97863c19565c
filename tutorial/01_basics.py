"""Tutorial 01 -- the basics: start a cluster, write rows, find them, read them, clear them.

tq_loader keeps one logical table per *partition*: rows are samples, columns are fields. A
producer ``put``s a batch of rows; a consumer asks the controller which rows are ready
(``get_meta`` -> a ``BatchMeta``, the row ids and field schemas only) and then reads the bytes
from storage (``get_data`` -> a ``TensorDict``). Nothing here needs Ray or a second process: the
default cluster runs on threads of this process.

Run: ``python tutorial/01_basics.py``
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

import tq_loader as tq


def main() -> None:
    # 1. init(): with no TQ_LOADER_ADDRESS set, this starts the embedded default cluster
    #    (one controller + storage units on threads). It returns the resolved config.
    config = tq.init({"storage": {"num_units": 2}})
    print(f"cluster up: placement={config.placement}, storage units={config.storage.num_units}")
    client = tq.get_client()

    # 2. put(): insert 6 new rows into partition "step_0": an ordinary (n, L) tensor and an (n,)
    #    one; every column has the batch dimension first.
    prompts = torch.arange(6 * 4).reshape(6, 4)
    lengths = torch.tensor([4, 3, 4, 2, 4, 1])
    batch = TensorDict({"prompts": prompts, "prompt_len": lengths}, batch_size=[6])
    written = client.put(batch, partition_id="step_0")
    print(f"put {written.size} rows, global indexes {written.global_indexes}")
    print(f"fields written: {written.field_names}")

    # 3. get_meta(): ask for 4 rows whose "prompts" and "prompt_len" are ready, on behalf of the
    #    task "rollout". mode="fetch" marks them consumed by that task, so the next call gets
    #    the remaining rows. A finite timeout bounds the wait (None waits for producers).
    meta = client.get_meta(
        data_fields=["prompts", "prompt_len"], batch_size=4, partition_id="step_0",
        mode="fetch", task_name="rollout", timeout=10,
    )  # fmt: skip
    print(f"get_meta -> {meta.size} rows {meta.global_indexes}, fields {meta.field_names}")

    # 4. get_data(): the bytes of exactly those rows, in the same order.
    data = client.get_data(meta)
    assert torch.equal(data["prompts"], prompts[:4])
    print(f"get_data -> {data['prompts'].shape} prompts, lengths {data['prompt_len'].tolist()}")

    # The other 2 rows are still unconsumed for "rollout"; another task sees all 6.
    rest = client.get_meta(["prompts"], 2, "step_0", task_name="rollout", timeout=10)
    other = client.get_meta(["prompts"], 6, "step_0", task_name="logger", timeout=10)
    print(f"rollout's remaining rows {rest.global_indexes}; task 'logger' sees {other.size} rows")

    # 5. Write a new column for rows you already have: put with their metadata. A task that
    #    needs both columns now gets exactly those 4 rows (rows 4 and 5 have no "responses").
    responses = torch.ones(4, 3, dtype=torch.long)
    client.put(TensorDict({"responses": responses}, batch_size=[4]), metadata=meta)
    ready = client.get_meta(["prompts", "responses"], 4, "step_0", task_name="trainer", timeout=10)
    both = client.get_data(ready)
    print(f"rows {ready.global_indexes} have fields {sorted(both.keys())}")
    # force_fetch: every live row, nothing waited for, nothing marked consumed
    everything = client.get_meta(["prompts"], 6, "step_0", mode="force_fetch", task_name="peek")
    print(f"force_fetch sees {everything.size} rows")

    # 6. clear: drop some rows, then the whole partition.
    client.clear_samples(rest)
    print(f"after clear_samples: {client.get_partition_list()} still listed")
    client.clear_partition("step_0")
    print(f"after clear_partition: partitions {client.get_partition_list()}")

    # 7. close(): in the process that started the cluster this also stops its services.
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
