"""The benchmark suite's quick mode runs end to end and writes complete, positive results.

No timing is asserted (the machine is shared); only that every group ran, checked its own data,
and reported finite positive numbers under the keys the report and plot read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive(value: object, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


@pytest.mark.slow
def test_quick_run_writes_json_and_plot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench-quick.json").read_text())
    assert (tmp_path / "bench-quick.png").stat().st_size > 0
    assert set(results) == {"meta", "transfer", "per_sample", "latency", "loader"}
    assert results["meta"]["quick"] is True

    assert set(results["transfer"]) == {"dense_2u", "jagged_2u"}
    for name, r in results["transfer"].items():
        _positive(r["bytes"], f"{name}.bytes")
        _positive(r["get_meta_ms"], f"{name}.get_meta_ms")
        for op in ("put", "get"):
            for key in ("tq_gibs", "floor_gibs", "pickle_gibs", "tq_over_floor", "tq_over_pickle",
                        "best_tq_over_floor", "best_tq_over_pickle"):  # fmt: skip
                _positive(r[op][key], f"{name}.{op}.{key}")

    per_sample = results["per_sample"]
    for key in (
        "columnar_s",
        "per_sample_s",
        "columnar_rows_per_s",
        "per_sample_rows_per_s",
        "columnar_speedup",
    ):
        _positive(per_sample[key], f"per_sample.{key}")

    latency = results["latency"]
    for key in ("blocking_ms", "poll_10ms_measured_ms", "empty_poll_ms", "zmq_rtt_ms", "poll_1s_analytic_ms",
                "poll_10ms_over_blocking", "poll_1s_analytic_over_blocking"):  # fmt: skip
        _positive(latency[key], f"latency.{key}")
    assert latency["poll_1s_analytic_ms"] >= 500.0  # by construction: half the 1 s interval plus a poll

    loader = results["loader"]
    assert set(loader["configs"]) == {"w0_step0ms", "w2_step0ms", "w0_step1ms", "w2_step1ms"}
    for key, cfg in loader["configs"].items():
        for metric in ("micro_batches_per_s", "rows_per_s", "seconds"):
            _positive(cfg[metric], f"loader.{key}.{metric}")
        assert 0.0 <= cfg["wait_fraction"] <= 1.0
    _positive(loader["w2_over_w0"], "loader.w2_over_w0")
