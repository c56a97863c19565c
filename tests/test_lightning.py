"""``StreamingDataModule`` with real ``lightning.Trainer`` runs on CPU.

Every model records the global indexes of the rows each training step received, so each test
checks the rows a run trained on against the rows that were put: none twice, none lost -- also
across a resume from a mid-stream checkpoint, and across the two ranks of a DDP run (gloo), whose
processes Lightning launches and which attach to this process's cluster via TQ_LOADER_ADDRESS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tensordict import TensorDict

lightning = pytest.importorskip("lightning")

import tq_loader as tq  # noqa: E402
from tq_loader.lightning import StopAtEndOfStream, StreamingDataModule  # noqa: E402
from tq_loader.loader.identity import cluster_identity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEATURES = 4


@pytest.fixture(scope="module")
def client(local_client: Any) -> Any:
    torch.set_num_threads(1)
    return local_client


def put_rows(client: Any, pid: str, n: int) -> list[int]:
    x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(1))
    meta = client.put(TensorDict({"x": x, "y": x.sum(1, keepdim=True)}, batch_size=[n]), partition_id=pid)
    client.seal(pid)
    return meta.global_index_array.tolist()


class Recorder(lightning.LightningModule):
    """Linear regression that records the rows of every training and validation step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(FEATURES, 1)
        self.steps: list[list[int]] = []
        self.val_steps: list[list[int]] = []
        self.sanity_steps: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        td, meta = batch
        self.steps.append(meta.global_index_array.tolist())
        return torch.nn.functional.mse_loss(self.layer(td["x"]), td["y"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, meta = batch
        (self.sanity_steps if self.trainer.sanity_checking else self.val_steps).append(
            meta.global_index_array.tolist()
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader_cfg(pid: str, task: str = "fit", **kw: Any) -> dict[str, Any]:
    return {"batch_size": 4, "micro_batch_size": 2, "data_fields": ["x", "y"], "partition_id": pid,
            "task_name": task, "num_workers": 1, **kw}  # fmt: skip


def trainer(**kw: Any) -> Any:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "max_epochs": 1,
               "num_sanity_val_steps": 0, **kw}  # fmt: skip
    return lightning.Trainer(**options)


def flat(steps: list[list[int]]) -> list[int]:
    return [i for step in steps for i in step]


def test_fit_trains_on_every_row_exactly_once(client: Any, pid: str) -> None:
    rows = put_rows(client, pid, 24)
    dm = StreamingDataModule(loader_cfg(pid))
    model = Recorder()
    trainer().fit(model, datamodule=dm)
    assert sorted(flat(model.steps)) == rows
    assert [len(s) for s in model.steps] == [2] * 12  # micro-batches of 2 rows, one per step
    assert dm.state_dict()["train"]["next_batch_index"] == 6  # 24 rows / batch 4: six batches consumed
    assert bool(client.check_consumption_status("fit", pid))


def test_checkpoint_position_excludes_the_batch_lightning_fetched_ahead(client: Any, pid: str) -> None:
    put_rows(client, pid, 24)
    dm = StreamingDataModule(loader_cfg(pid))
    model = Recorder()
    trainer(max_steps=5).fit(model, datamodule=dm)
    assert len(model.steps) == 5
    state = dm.state_dict()["train"]
    # five micro-batches of two per batch trained: batch 2, micro-batch 1 is next (Lightning had
    # already fetched it; the loader's own position would say batch 3)
    assert (state["next_batch_index"], state["skip_micro_batches"]) == (2, 1)
    assert dm.streams["train"].loader.state_dict()["next_batch_index"] == 3


def test_resume_from_mid_stream_checkpoint_continues_exactly(client: Any, pid: str, tmp_path: Path) -> None:
    rows = put_rows(client, pid, 40)
    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1
    )
    first = Recorder()
    trainer(max_steps=7, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, datamodule=StreamingDataModule(loader_cfg(pid))
    )
    assert (tmp_path / "step=6.ckpt").exists()
    # "crash" after step 7: step 7 is lost with the process; resume from the step-6 checkpoint
    second = Recorder()
    resumed = StreamingDataModule(loader_cfg(pid))
    trainer(enable_checkpointing=True).fit(second, datamodule=resumed, ckpt_path=tmp_path / "step=6.ckpt")
    seen = flat(first.steps[:6]) + flat(second.steps)
    assert sorted(seen) == rows  # none lost, none twice
    assert second.steps[0] == first.steps[6]  # the replayed step is the one trained after the checkpoint
    assert len(first.steps) + len(second.steps) == 20 + 1


def test_validation_stream_replays_sanity_check_rows(client: Any, pid: str) -> None:
    train_rows = put_rows(client, pid, 16)
    val_pid = f"{pid}-val"
    val_rows = put_rows(client, val_pid, 12)
    dm = StreamingDataModule(loader_cfg(pid), loader_cfg(val_pid, task="val"))
    model = Recorder()
    trainer(num_sanity_val_steps=2).fit(model, datamodule=dm)
    assert sorted(flat(model.steps)) == train_rows
    assert len(model.sanity_steps) == 2
    assert sorted(flat(model.val_steps)) == val_rows  # sanity rows were peeked, then replayed
    assert model.val_steps[:2] == model.sanity_steps


def test_data_parallel_rank_from_trainer_and_tp_size() -> None:
    dm = StreamingDataModule(loader_cfg("p"), tp_size=2)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=3)
    assert dm.data_parallel() == (1, 2)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match="tp_size"):
        dm.data_parallel()
    explicit = StreamingDataModule(loader_cfg("p"), dp_rank=0, dp_size=3)
    explicit.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert explicit.data_parallel() == (0, 3)


def test_rank_zero_checkpoint_applies_to_every_rank(client: Any, pid: str) -> None:
    saved = {"train": {"next_batch_index": 3, "skip_micro_batches": 1, "partition_id": pid,
                       "task_name": "fit", "dp_rank": 0, "dp_size": 2, "cluster": cluster_identity(client),
                       "max_row_id": None}}  # fmt: skip
    dm = StreamingDataModule(loader_cfg(pid), dp_rank=1, dp_size=2)
    dm.load_state_dict(saved)
    stream = dm.train_dataloader()
    assert stream.loader.state_dict() == {**saved["train"], "dp_rank": 1}
    assert dm.state_dict()["train"]["dp_rank"] == 1


def test_unknown_loader_key_is_rejected() -> None:
    with pytest.raises(Exception, match="batchsize"):
        StreamingDataModule({"batchsize": 4, "data_fields": ["x"]})


class EpochCounter(lightning.Callback):
    def __init__(self) -> None:
        self.epochs = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.epochs += 1


@pytest.mark.timeout(120)  # without the end-of-stream stop, max_steps alone would run empty epochs forever
@pytest.mark.parametrize(
    "limits", [{"max_epochs": None, "max_steps": 1000}, {"max_epochs": None}, {"max_epochs": 5}]
)
def test_a_finished_stream_ends_fit_by_itself(client: Any, pid: str, limits: dict[str, Any]) -> None:
    rows = put_rows(client, pid, 20)
    dm = StreamingDataModule(loader_cfg(pid))
    model, epochs = Recorder(), EpochCounter()
    fit = trainer(**limits, callbacks=[epochs])
    fit.fit(model, datamodule=dm)
    assert sorted(flat(model.steps)) == rows and len(model.steps) == 10
    assert epochs.epochs == 1 and fit.should_stop
    assert dm.streams["train"].loader.statistics()["end_of_stream"] is True


@pytest.mark.timeout(120)
def test_an_unfinished_stream_does_not_stop_fit(client: Any, pid: str) -> None:
    client.put(
        TensorDict({"x": torch.zeros(8, FEATURES), "y": torch.zeros(8, 1)}, batch_size=[8]), partition_id=pid
    )
    model = Recorder()
    fit = trainer(max_steps=3)
    fit.fit(model, datamodule=StreamingDataModule(loader_cfg(pid)))  # unsealed: only max_steps ends it
    assert len(model.steps) == 3 and not fit.should_stop


@pytest.mark.timeout(120)
def test_stop_at_end_of_stream_callback_for_a_loader_given_directly(client: Any, pid: str) -> None:
    rows = put_rows(client, pid, 16)
    dataset = tq.StreamingDataset(None, 4, 2, ["x", "y"], pid, "direct", 0, dp_size=1)
    loader = tq.StreamingDataLoader(dataset, num_workers=1)
    model, epochs = Recorder(), EpochCounter()
    fit = trainer(max_epochs=None, max_steps=1000, callbacks=[StopAtEndOfStream(), epochs])
    fit.fit(model, train_dataloaders=loader)
    assert sorted(flat(model.steps)) == rows and epochs.epochs == 1 and fit.should_stop


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_fit_ends_when_the_stream_ends(client: Any, pid: str, tmp_path: Path) -> None:
    """Two DDP ranks (gloo), no max_epochs: both ranks stop after the stream's last batch."""
    rows = put_rows(client, pid, 48)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "ddp-fit", pid, str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["epochs"] for r in ranks] == [1, 1] and all(r["should_stop"] for r in ranks)
    assert [len(r["steps"]) for r in ranks] == [12, 12]
    seen = [flat(r["steps"]) for r in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == rows


def ddp_fit(pid: str, outdir: Path) -> None:
    """One DDP rank's program (Lightning re-runs this file for rank 1): fit until the stream ends."""
    torch.set_num_threads(1)
    tq.init()  # attaches to TQ_LOADER_ADDRESS (the test's cluster)
    model, epochs = Recorder(), EpochCounter()
    fit = lightning.Trainer(
        accelerator="cpu", devices=2, max_steps=1000, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[epochs],
        strategy=lightning.pytorch.strategies.DDPStrategy(process_group_backend="gloo"),
    )  # fmt: skip
    fit.fit(model, datamodule=StreamingDataModule(loader_cfg(pid)))
    record = {"steps": model.steps, "epochs": epochs.epochs, "should_stop": fit.should_stop}
    (outdir / f"rank{fit.global_rank}.json").write_text(json.dumps(record))
    tq.close()


@pytest.mark.slow
def test_ddp_two_processes_resume_mid_stream(client: Any, pid: str, tmp_path: Path) -> None:
    """Two DDP ranks (gloo) attach to this process's cluster; a second fit resumes from a checkpoint."""
    rows = put_rows(client, pid, 64)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert env.get("TQ_LOADER_ADDRESS")  # set by tq.init in this process: the ranks inherit it
    script = [sys.executable, str(ROOT / "examples" / "lightning_train.py"), "--partition", pid,
              "--features", str(FEATURES), "--batch-size", "4", "--micro-batch-size", "2", "--devices", "2",
              "--strategy", "ddp"]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt = ["--ckpt-dir", str(tmp_path / "ckpt"), "--every-n-steps", "3"]
    first = [*script, "--max-steps", "5", *ckpt, "--record", str(tmp_path / "a")]
    for cmd in (
        first,
        [*script, "--ckpt-path", str(tmp_path / "ckpt" / "step=3.ckpt"), "--record", str(tmp_path / "b")],
    ):
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = {
        run: [json.loads((tmp_path / run / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
        for run in "ab"
    }
    per_rank = [flat(runs["a"][r][:3]) + flat(runs["b"][r]) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == rows  # across ranks and the restart: exactly once
    assert not set(per_rank[0]) & set(per_rank[1])
    assert [len(runs["a"][r]) for r in (0, 1)] == [5, 5]
    assert [len(runs["b"][r]) for r in (0, 1)] == [
        13,
        13,
    ]  # 16 steps per rank in all, 3 before the checkpoint


if __name__ == "__main__":
    if sys.argv[1] == "ddp-fit":
        ddp_fit(sys.argv[2], Path(sys.argv[3]))
