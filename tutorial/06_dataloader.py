"""Tutorial 06 -- the StreamingDataLoader: ranks, workers, a sealed stream, exact resume.

``StreamingDataset`` + ``StreamingDataLoader`` replace ``torch.utils.data.DataLoader`` in a
training loop whose data is produced while it trains. Each data-parallel rank builds its own
loader with its ``dp_rank`` / ``dp_size``; the controller cuts every *round* into disjoint
batches, one per rank, so ranks never see the same row and all get the same number of batches.
``num_workers`` are threads of this process that fetch batches' bytes in parallel. When the
producer seals the partition, every rank's loop ends by itself. ``state_dict()`` is an exact
resume point: a new loader that loads it continues after the last micro-batch you received.

Two ranks run here as two threads of one process; in real training each is its own process
(torchrun / Lightning), attached to the same cluster through ``TQ_LOADER_ADDRESS``.

Run: ``python tutorial/06_dataloader.py``
"""

from __future__ import annotations

import threading

import torch
from tensordict import TensorDict

import tq_loader as tq

ROWS, BATCH, MICRO, DP = 48, 8, 4, 2  # 48 rows = 3 rounds of 2 ranks x 8 rows


def make_loader(dp_rank: int) -> tq.StreamingDataLoader:
    dataset = tq.StreamingDataset(
        None,  # the cluster this process is attached to
        batch_size=BATCH, micro_batch_size=MICRO, data_fields=["x"],
        partition_id="train", task_name="fit", dp_rank=dp_rank, dp_size=DP,
        timeout=30,  # bound the wait for one batch (None: wait for producers as long as it takes)
    )  # fmt: skip
    return tq.StreamingDataLoader(dataset, num_workers=2, prefetch_factor=2)


def produce(client: tq.Client) -> None:
    """A stand-in for rollout workers: rows in chunks of 12, then seal (no more rows)."""
    for start in range(0, ROWS, 12):
        x = torch.arange(start, start + 12).unsqueeze(1)  # row i holds the value i
        client.put(TensorDict({"x": x}, batch_size=[12]), partition_id="train")
    client.seal("train")


def main() -> None:
    tq.init()
    client = tq.get_client()

    # Rank 1 trains in a thread; rank 0 in the main thread with a simulated crash and resume.
    seen: dict[int, list[int]] = {0: [], 1: []}

    def rank1() -> None:
        for td, _meta in make_loader(1):  # (TensorDict, BatchMeta) micro-batches
            seen[1] += td["x"].squeeze(1).tolist()

    worker = threading.Thread(target=rank1)
    worker.start()
    producer = threading.Thread(target=produce, args=(client,))
    producer.start()

    # Rank 0: take 3 micro-batches, save the position, "crash" (close the loader).
    loader = make_loader(0)
    for i, (td, _meta) in enumerate(loader):
        seen[0] += td["x"].squeeze(1).tolist()
        if i == 2:
            break
    state = loader.state_dict()  # plain data: store it with your model checkpoint
    loader.close()
    at = (state["next_batch_index"], state["skip_micro_batches"])
    print(f"rank 0 stopped after {len(seen[0])} rows; state: batch {at[0]}, {at[1]} micro-batches into it")

    # A fresh loader (in a real restart: a new process) continues exactly there.
    resumed = make_loader(0)
    resumed.load_state_dict(state)
    for td, _meta in resumed:
        seen[0] += td["x"].squeeze(1).tolist()
    producer.join()
    worker.join()

    print(f"rank 0 got {len(seen[0])} rows, rank 1 got {len(seen[1])} rows")
    assert not set(seen[0]) & set(seen[1]), "ranks never share a row"
    assert sorted(seen[0] + seen[1]) == list(range(ROWS)), "every row exactly once"
    assert len(seen[0]) == len(seen[1]), "ranks get equal numbers of rows"
    print("stream sealed and drained: loops ended by themselves; every row exactly once")
    print("resumed loader:", {k: resumed.statistics()[k] for k in ("micro_batches", "end_of_stream")})
    # A sealed partition's length is known: len() counts the micro-batches of the whole stream.
    print("len(loader) =", len(make_loader(0)))
    tq.close()
    print("done")


if __name__ == "__main__":
    main()
