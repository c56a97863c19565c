"""Tutorial 04 -- the controller: partitions, per-task consumption, production status.

The controller is the one place that knows, for every partition, which row has which field
(the *production* matrix, rows x fields) and, for every task, which rows it already consumed.
It answers ``get_meta`` from that state -- waiting server-side until enough rows are ready --
and the status calls below read it directly.

What this shows:
1. partitions: one per training step is the usual pattern;
2. production status: which rows have which fields, as a 0/1 matrix;
3. consumption per task: two tasks read the same rows independently; reset_consumption;
4. sealing a partition ends the stream for consumers; statistics() for the whole picture.

Run: ``python tutorial/04_controller.py``
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

import tq_loader as tq


def main() -> None:
    tq.init()
    client = tq.get_client()

    # 1. Partitions are created by the first put (or explicitly) and listed by the controller.
    client.create_partition("step_1")
    for step in (0, 1):
        n = 4 + step
        client.put(TensorDict({"prompts": torch.zeros(n, 2)}, batch_size=[n]), partition_id=f"step_{step}")
    print("partitions:", client.get_partition_list())

    # 2. Production status. Half of step_0's rows get a "response" column.
    meta = client.get_meta(["prompts"], 2, "step_0", task_name="rollout", timeout=10)
    client.put(TensorDict({"response": torch.ones(2, 3)}, batch_size=[2]), metadata=meta)
    ids, status = client.get_production_status(["prompts", "response"], "step_0")
    print("rows", ids.tolist(), "x [prompts, response]:\n", status)
    assert status[:, 1].sum() == 2
    print("every row has prompts:", client.check_production_status(["prompts"], "step_0"))
    print("every row has response:", client.check_production_status(["prompts", "response"], "step_0"))
    # A partition nobody created yet is not an error for the status calls (as in TransferQueue).
    print("unknown partition:", client.get_production_status(["prompts"], "step_9"))

    # 3. Consumption is kept per task. "rollout" has consumed 2 of 4 rows; "reward" none.
    ids, consumed = client.get_consumption_status("rollout", "step_0")
    print("rollout consumed:", dict(zip(ids.tolist(), consumed.tolist())))
    reward = client.get_meta(["prompts", "response"], 2, "step_0", task_name="reward", timeout=10)
    print("reward got rows", reward.global_indexes, "(the two with a response)")
    rest = client.get_meta(["prompts"], 2, "step_0", task_name="rollout", timeout=10)
    print("rollout got the other rows", rest.global_indexes)
    print("rollout done with step_0:", client.check_consumption_status("rollout", "step_0"))
    # reset_consumption: the task may read the partition again from the start (e.g. a retry).
    client.reset_consumption("step_0", task_name="rollout")
    print("after reset:", client.check_consumption_status("rollout", "step_0"))

    # 4. Sealing: no more rows will come, so a consumer is not left waiting for a full batch.
    #    step_1 has 5 rows: a batch of 4, then (allow_partial) the last row, then an empty batch
    #    marked end-of-stream.
    client.seal("step_1")
    first = client.get_meta(["prompts"], 4, "step_1", task_name="train", timeout=10)
    tail = client.get_meta(["prompts"], 4, "step_1", task_name="train", timeout=10, allow_partial=True)
    end = client.get_meta(["prompts"], 4, "step_1", task_name="train", timeout=10)
    print(f"sealed step_1: {first.size} rows, then {tail.size}, then end_of_stream={end.is_end_of_stream}")
    assert (first.size, tail.size, end.size, end.is_end_of_stream) == (4, 1, 0, True)

    # The whole picture: a typed snapshot (reads like a dict, has to_dict()).
    stats = tq.statistics()
    part = stats["controller"]["partitions"]["partitions"]["step_0"]
    print("step_0 per-field rows produced:", dict(part["fields"]))

    client.clear_partition("step_0")
    client.clear_partition("step_1")
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
