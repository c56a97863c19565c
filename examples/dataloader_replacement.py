"""A plain PyTorch training loop whose ``DataLoader`` is replaced by a ``StreamingDataLoader``.

Before::

    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    for x, y in loader:
        ...

After: rows are produced while training runs (here by a thread standing in for rollout workers),
and the loop consumes them as soon as they are ready; the stream ends when the producer seals the
partition and the rows are drained::

    dataset = tq.StreamingDataset(None, 16, 8, ["x", "y"], "regression", "fit", dp_rank)
    loader = tq.StreamingDataLoader(dataset, num_workers=2)
    for td, meta in loader:
        x, y = td["x"], td["y"]
        ...

Run: ``python examples/dataloader_replacement.py --rows 2048``. Exits non-zero if a row was missed
or seen twice.
"""

from __future__ import annotations

import argparse
import sys
import threading

import torch
from tensordict import TensorDict

import tq_loader as tq


def produce(client: tq.Client, partition: str, rows: int, features: int, chunk: int, ids: list[int]) -> None:
    """Stand-in for rollout workers: put rows in chunks of ``chunk``, then seal (no more rows)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.arange(1.0, features + 1).unsqueeze(1) / features
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = torch.randn(n, features, generator=generator)
        y = x @ weights + 0.01 * torch.randn(n, 1, generator=generator)
        meta = client.put(TensorDict({"x": x, "y": y}, batch_size=[n]), partition_id=partition)
        ids += meta.global_index_array.tolist()
    client.seal(partition)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    tq.init()  # the embedded cluster (or the one TQ_LOADER_ADDRESS names)
    client = tq.get_client()
    partition = "regression"
    produced: list[int] = []
    producer = threading.Thread(
        target=produce, args=(client, partition, args.rows, args.features, 64, produced), daemon=True
    )
    producer.start()

    # --- the only lines that change compared with a DataLoader-based loop ---------------------
    dataset = tq.StreamingDataset(
        None, args.batch_size, args.micro_batch_size, ["x", "y"], partition, "fit", 0, drop_last=False
    )
    loader = tq.StreamingDataLoader(dataset, num_workers=args.num_workers, prefetch_factor=2)
    # -----------------------------------------------------------------------------------------------

    model = torch.nn.Linear(args.features, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    seen: list[int] = []
    loss = torch.tensor(float("nan"))
    for step, (td, meta) in enumerate(loader):
        loss = torch.nn.functional.mse_loss(model(td["x"]), td["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += meta.global_index_array.tolist()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    producer.join()

    stats = loader.statistics()
    exactly_once = sorted(seen) == sorted(produced) and client.check_consumption_status("fit", partition)
    print(
        f"trained on {len(seen)} rows in {stats['micro_batches']} steps, final loss {loss.item():.4f}, "
        f"waited {stats['wait_fraction']:.0%} of the time; every row exactly once: {exactly_once}"
    )
    tq.close()
    return 0 if exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
