"""Every tutorial script and examples/single_controller.py runs to the end, each in its own process.

Each script asserts its own results (rows exactly once, the right tags, the right columns), so a
zero exit status means the behaviour it teaches holds on the current code. Sizes are small; each
run is bounded by a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorial").glob("[0-9][0-9]_*.py"))
TIMEOUT = 240  # seconds per script; 07 starts five processes on a shared 2-core machine


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_LOADER_")}  # never a test's cluster
    env["RAY_AUTH_MODE"] = "disabled"
    return subprocess.run(
        [sys.executable, str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_all_seven_tutorials_exist() -> None:
    names = [p.name[:2] for p in TUTORIALS]
    assert names == ["01", "02", "03", "04", "05", "06", "07"], names
    index = (ROOT / "tutorial" / "README.md").read_text()
    for path in TUTORIALS:
        assert path.name in index, f"tutorial/README.md does not list {path.name}"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path) -> None:
    proc = run_script(path)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.rstrip().endswith("done"), proc.stdout[-2000:]


def test_single_controller_example() -> None:
    proc = run_script(
        ROOT / "examples" / "single_controller.py", "--steps", "6", "--prompts", "4", "--n", "4"
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 6, proc.stdout
    assert all("16 samples" in line for line in steps), steps
    rewards = [float(line.split("mean reward ")[1].split(",")[0]) for line in steps]
    # the policy learns to say the rewarded token: the last steps score above the first
    assert sum(rewards[-2:]) > sum(rewards[:2]), rewards
