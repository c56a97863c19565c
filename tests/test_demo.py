"""The GRPO demo (``tq-loader demo``): small runs must pass every check and exit 0; broken runs must
exit non-zero quickly instead of hanging. Each run writes its summary and checks as JSON
(``demo.report``), which the tests read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import stop_cluster
from tensordict import TensorDict

from tq_loader.app.config import compose
from tq_loader.app.demo import make_plan, run_demo
from tq_loader.app.demo_stages import grpo_loss, reward_fn, tiny_policy

SMALL = ["demo.prompts=32", "demo.rollout_chunk=4", "demo.reward_batch_size=16", "loader.batch_size=8",
         "loader.micro_batch_size=4", "demo.progress=false"]  # fmt: skip
EXACTLY_ONCE = {"reward: every row consumed exactly once", "actor_update: every row consumed exactly once"}


@pytest.fixture
def no_cluster() -> Iterator[None]:
    """In-process runs start their own embedded cluster: none may be attached before or after."""
    stop_cluster()
    yield
    stop_cluster()


def read(report: Path) -> dict[str, Any]:
    result = json.loads(report.read_text())
    result["by_name"] = {c["name"]: c for c in result["checks"]}
    return result


def assert_passed(result: dict[str, Any], rows: int, dp: int = 2) -> None:
    failed = [c for c in result["checks"] if not c["ok"]]
    assert result["ok"] and not failed, failed
    assert set(result["by_name"]) >= EXACTLY_ONCE
    assert "tp peers saw identical micro-batches" in result["by_name"]
    assert result["stages"]["rollout"]["rows"] == result["stages"]["reward"]["rows"] == rows
    assert [result["stages"][f"train-dp{r}"]["rows"] for r in range(dp)] == [rows // dp] * dp
    assert all(0.0 <= s["wait_fraction"] <= 1.0 and s["bytes"] > 0 for s in result["stages"].values())


@pytest.mark.slow
def test_cli_demo_with_stage_processes(tmp_path: Path) -> None:
    """``tq-loader demo``: rollout, reward and two trainer ranks as separate processes."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TQ_LOADER_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "tq_loader",
        "demo",
        *SMALL,
        "demo.workers=process",
        f"demo.report={report}",
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # off a terminal the demo says what it starts, as plain lines, before any stage reports
    said = [line for line in done.stderr.splitlines() if line.startswith("demo: ")]
    assert said[0].startswith("demo: starting the cluster (placement=local"), done.stderr[-2000:]
    assert said[1].startswith("demo: starting 4 stages as processes"), said
    assert any("attached after" in line for line in said[2:]), said
    result = read(report)
    assert_passed(result, rows=128)
    assert done.stdout.count("PASS") == len(result["checks"]) and "FAIL" not in done.stdout  # the table


def test_demo_with_stage_threads(no_cluster: None, tmp_path: Path) -> None:
    assert run_demo([*SMALL, "demo.workers=thread", f"demo.report={tmp_path / 'r.json'}"]) == 0
    assert_passed(read(tmp_path / "r.json"), rows=128)


def test_demo_seqlen_balanced_and_wider_tp(no_cluster: None, tmp_path: Path) -> None:
    overrides = [*SMALL, "demo.workers=thread", "sampler=seqlen_balanced", "demo.tp_size=3",
                 "demo.n_samples=2", f"demo.report={tmp_path / 'r.json'}"]  # fmt: skip
    assert run_demo(overrides) == 0
    assert_passed(read(tmp_path / "r.json"), rows=64)


def test_uneven_sizes_exit_2_before_starting(no_cluster: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(["demo.prompts=3"]) == 2
    assert "must divide by loader.batch_size*dp_size" in capsys.readouterr().err
    assert os.environ.get("TQ_LOADER_ADDRESS") is None  # nothing was started


def test_failing_stage_fails_the_run_fast(no_cluster: None, tmp_path: Path) -> None:
    """The reward stage cannot build its loader: the partition is aborted, every stage stops, exit 1."""
    started = time.monotonic()
    code = run_demo([*SMALL, "demo.workers=thread", "demo.reward_fetch_workers=-1", "demo.timeout=60",
                     f"demo.report={tmp_path / 'r.json'}"])  # fmt: skip
    assert code == 1 and time.monotonic() - started < 30
    result = read(tmp_path / "r.json")
    finished = result["by_name"]["every stage finished"]
    assert not finished["ok"] and "reward: ValueError" in finished["detail"]


def test_stuck_stage_times_out_instead_of_hanging(no_cluster: None, tmp_path: Path) -> None:
    """Trainers wait for a field nobody writes: the deadline aborts the partition and the run fails."""
    fields = "loader.data_fields=[prompts,responses,rewards,prompt_id,never]"
    code = run_demo(
        [*SMALL, "demo.workers=thread", fields, "demo.timeout=5", f"demo.report={tmp_path / 'r.json'}"]
    )
    assert code == 1
    finished = read(tmp_path / "r.json")["by_name"]["every stage finished"]
    assert not finished["ok"] and "still running after demo.timeout=5.0s" in finished["detail"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loader.batch_size=6", "multiple of demo.n_samples"),
        ("loader.collate=null", "collate must be 'pad'"),
        ("loader.data_fields=[prompts,responses]", "lacks ['prompt_id', 'rewards']"),
        ("demo.min_response_len=1", "min_response_len"),
        ("demo.workers=fork", "process or thread"),
    ],
)
def test_plan_validation_names_the_size_to_change(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_plan(compose([override]))


def test_reward_and_loss_on_padded_batches() -> None:
    prompts = torch.tensor([[1, 9], [2, 9]])
    responses = torch.tensor([[5, 1, 0], [2, 6, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: target 1 % 4 = 1 -> tokens 5, 1 hit (the padded 0 is ignored); row 1: 2, 6 hit of 3
    assert torch.allclose(reward_fn(prompts, responses, mask), torch.tensor([1.0, 2 / 3]))
    td = TensorDict({"responses": responses, "responses_mask": mask, "rewards": torch.tensor([1.0, 0.0]),
                     "prompt_id": torch.tensor([7, 7])}, batch_size=[2])  # fmt: skip
    model = tiny_policy(vocab_size=10, hidden=4)
    loss = grpo_loss(model, td)
    loss.backward()
    assert torch.isfinite(loss) and model[0].weight.grad is not None


def test_dataloader_replacement_example_runs_as_is() -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "dataloader_replacement.py"
    env = {k: v for k, v in os.environ.items() if k != "TQ_LOADER_ADDRESS"}
    out = subprocess.run(
        [sys.executable, str(script), "--rows", "256", "--batch-size", "32", "--micro-batch-size", "16"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every row exactly once: True" in out.stdout
