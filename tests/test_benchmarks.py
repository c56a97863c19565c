"""The benchmark suite (``tq_loader.bench``): its quick run works end to end, its parts are right.

No speed is asserted (the machine is shared): the quick run must exit 0 from any directory and
write the Markdown table, the JSON and the plots, with finite figures for every case and system
that ran; the workloads must be deterministic and the target arithmetic right.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tq_loader.bench import registry
from tq_loader.bench.results import KIND_BASELINE, KIND_PEER, KIND_TQ, make_row
from tq_loader.bench.systems import EMBEDDED, SERVE
from tq_loader.bench.targets import evaluate
from tq_loader.bench.transferqueue import TQ_SYSTEM
from tq_loader.bench.workloads import Workload, build, fingerprint, payload_bytes, same_data

TQ_LOADER_SYSTEMS = {EMBEDDED, "tq_loader embedded over ZMQ", SERVE, "tq_loader serve, shm off"}


@pytest.mark.slow
def test_quick_run_from_another_directory_writes_table_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "tq_loader.bench", "--quick", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("bench-quick.md", "bench-quick.json", "bench-quick.png", "bench-quick-simple.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "bench-quick.json").read_text())
    rows = result["rows"]
    assert result["meta"]["quick"] is True
    assert {r["case"] for r in rows} == {"simple", "complex", "small", "fields", "get_meta", "loader", "memory",
                                          "handover"}  # fmt: skip
    for r in rows:
        where = f"{r['case']}/{r['system']}/{r['metric']}"
        assert all(math.isfinite(v) and v > 0 for v in (r["median"], r["min"], r["max"])), where
        assert r["min"] <= r["median"] <= r["max"], where
    for case in ("simple", "complex", "small"):
        systems = {r["system"] for r in rows if r["case"] == case}
        assert systems >= TQ_LOADER_SYSTEMS, (case, systems)
        kv = [r for r in rows if r["case"] == case and r["kind"] == KIND_TQ]
        assert all(r["n"] == result["plan"]["reps"] * result["plan"]["rounds"] for r in kv)
    baselines = {
        "raw pyzmq PUSH/PULL, 2 processes",
        "torch copy into touched memory",
        "torch clone into fresh memory",
    }
    assert baselines <= {r["system"] for r in rows if r["case"] == "simple" and r["kind"] == KIND_BASELINE}
    # TransferQueue: measured when its venv is there (quick never installs it), else skipped with a reason
    peer = [r for r in rows if r["kind"] == KIND_PEER]
    skipped = [s for s in result["skips"] if s["system"] == TQ_SYSTEM]
    assert bool(peer) != bool(skipped) and all(s["reason"] for s in skipped)
    fingerprints = result["info"]["fingerprints"]
    for case in ("simple", "complex"):
        assert len(set(fingerprints[case].values())) == 1, fingerprints[case]  # every system, the same bytes
    measured = [t for t in result["targets"] if t["met"] is not None]
    assert measured and all(math.isfinite(t["value"]) for t in measured)
    table = (out / "bench-quick.md").read_text()
    assert "## Targets of issue 8" in table and "| tq_loader embedded |" in table


def test_workloads_are_deterministic_and_shaped_like_the_issue() -> None:
    w = Workload("complex", rows=16, regular=3, jagged=3, strings=3, width=64, string_chars=128)
    a, b = build(w), build(w)
    assert fingerprint(a) == fingerprint(b) and same_data(a, b)
    assert fingerprint(build(Workload("complex", rows=16, regular=3, jagged=3, strings=3, width=64,
                                      string_chars=128, seed=1))) != fingerprint(a)  # fmt: skip
    lengths = a.get("jagged_0").offsets().diff()
    assert int(lengths.min()) == 1 and int(lengths.max()) == 64
    assert len(a.get("text_0").tolist()[0]) == 128
    # 3 x 16 x 64 float32 + 3 x (sum of lengths) float32 + 3 x 16 x 128 characters
    assert payload_bytes(a) == 3 * 16 * 64 * 4 + 3 * int(lengths.sum()) * 4 + 3 * 16 * 128
    changed = a.clone()
    changed.get("regular_1")[3, 5] += 1
    assert not same_data(a, changed)


def test_simple_full_size_is_the_perftest_shape() -> None:
    from tq_loader.bench.plans import full

    simple = full().workloads["simple"]
    assert simple.rows * simple.regular * simple.width * 4 == 288 * 2**20
    complex_ = full().workloads["complex"]
    assert (complex_.regular, complex_.jagged, complex_.strings, complex_.string_chars) == (3, 3, 3, 32768)


def _rows(tq_put: float, peer_put: float) -> list:
    return [
        make_row("simple", SERVE, "put", "GB/s", [tq_put]),
        make_row("simple", TQ_SYSTEM, "put", "GB/s", [peer_put], kind=KIND_PEER),
        make_row("get_meta", EMBEDDED, "p50", "us", [150.0, 80.0, 90.0]),
    ]


def test_targets_say_met_not_met_and_by_how_much() -> None:
    outcomes = {o.what: o for o in evaluate(_rows(6.0, 1.0), {"simple", "get_meta"})}
    cross = outcomes[f"simple put: {SERVE} / {TQ_SYSTEM}"]
    assert cross.met is True and cross.value == pytest.approx(6.0) and cross.margin == pytest.approx(1.2)
    meta = outcomes[f"get_meta p50, {EMBEDDED}"]
    assert meta.met is True and meta.value == pytest.approx(90.0)  # the median of the repetitions
    embedded_put = outcomes[f"simple put: {EMBEDDED} / {TQ_SYSTEM}"]
    assert (
        embedded_put.met is None and "not measured" in embedded_put.verdict()
    )  # no embedded row: never "met"
    slow = {o.what: o for o in evaluate(_rows(2.0, 1.0), {"simple"})}[f"simple put: {SERVE} / {TQ_SYSTEM}"]
    assert slow.met is False and "needs 2.5x more" in slow.verdict()


def test_registry_refuses_a_second_case_of_the_same_name() -> None:
    registry.load()
    with pytest.raises(ValueError, match="registered twice"):
        registry.case("fields", "again")(lambda ctx: None)


def test_unknown_case_is_refused_with_the_choices() -> None:
    from tq_loader.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["--only", "nonsense"])
    assert exc.value.code == 2


def test_torch_baseline_tensors_are_the_columns_bytes() -> None:
    from tq_loader.bench.workloads import column_bytes

    td = build(Workload("simple", rows=4, regular=2, width=8))
    cols = column_bytes(td)
    assert [c.dtype for c in cols] == [torch.uint8, torch.uint8]
    assert torch.equal(cols[0].view(torch.float32).view(4, 8), td.get("regular_0"))


def test_a_missing_transferqueue_venv_is_a_reasoned_skip_in_quick_mode(tmp_path: Path) -> None:
    from tq_loader.bench.transferqueue import ensure_venv

    python, why = ensure_venv(tmp_path / "no-venv", install=False, log=tmp_path / "log", status=print)
    assert python is None and "--quick does not install it" in why
    assert not (tmp_path / "no-venv").exists()  # quick mode creates nothing
