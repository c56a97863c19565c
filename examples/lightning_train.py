"""Lightning on a tq_loader stream: ``StreamingDataModule``, CPU, one process or DDP, resumable.

    python examples/lightning_train.py                               # one process
    python examples/lightning_train.py --devices 2 --strategy ddp    # two DDP ranks (gloo)
    python examples/lightning_train.py --max-steps 5 --ckpt-dir ckpt --every-n-steps 3
    python examples/lightning_train.py --ckpt-path ckpt/step=3.ckpt  # resume the stream exactly there

Without ``TQ_LOADER_ADDRESS`` this process hosts the cluster and produces the rows first; the DDP
ranks Lightning launches inherit the address and only train. With it (``tq-loader serve`` or a
test hosting the cluster) the script only trains. ``--record DIR`` writes each rank's global
indexes per step to ``DIR/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.lightning import StreamingDataModule


class Regressor(lightning.LightningModule):
    """A linear model; remembers which rows each step trained on."""

    def __init__(self, features: int, lr: float = 0.05, record: str | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 1)
        self.lr, self.record = lr, record
        self.steps: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        td, meta = batch
        self.steps.append(meta.global_index_array.tolist())
        return torch.nn.functional.mse_loss(self.layer(td["x"]), td["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_train_end(self) -> None:
        if self.record:
            path = Path(self.record) / f"rank{self.global_rank}.json"
            path.write_text(json.dumps({"rank": self.global_rank, "steps": self.steps}))


def produce(partition: str, rows: int, features: int) -> None:
    client = tq.get_client()
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    client.put(TensorDict({"x": x, "y": y}, batch_size=[rows]), partition_id=partition)
    client.seal(partition)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per data-parallel rank per batch")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per training step")
    parser.add_argument("--partition", default="lightning")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="auto | ddp (gloo on CPU)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--ckpt-dir", help="save a checkpoint every --every-n-steps steps here")
    parser.add_argument("--every-n-steps", type=int, default=0)
    parser.add_argument("--ckpt-path", help="resume from this checkpoint")
    parser.add_argument("--record", help="write each rank's rows per step to this directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    hosting = tq.api.ENV_ADDRESS not in os.environ  # False in the DDP ranks Lightning launches
    tq.init()
    if hosting:
        produce(args.partition, args.rows, args.features)

    datamodule = StreamingDataModule(
        {
            "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size,
            "data_fields": ["x", "y"],
            "partition_id": args.partition,
            "task_name": "fit",
            "num_workers": 1,
        }
    )
    callbacks = []
    if args.ckpt_dir and args.every_n_steps:
        callbacks.append(
            lightning.pytorch.callbacks.ModelCheckpoint(
                dirpath=args.ckpt_dir,
                filename="{step}",
                every_n_train_steps=args.every_n_steps,
                save_top_k=-1,
            )
        )
    strategy: Any = args.strategy
    if strategy == "ddp":
        strategy = lightning.pytorch.strategies.DDPStrategy(process_group_backend="gloo")
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=1,  # the stream is one epoch: it ends when the partition is sealed and drained
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Regressor(args.features, record=args.record)
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    rows = sum(len(step) for step in model.steps)
    position = datamodule.state_dict()["train"]
    print(f"rank {trainer.global_rank}: {len(model.steps)} steps, {rows} rows, stream position {position}")
    tq.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
