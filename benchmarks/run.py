"""``python -m benchmarks.run [--quick] [--out DIR] [--only GROUPS]``: run, print, save, plot.

Groups: ``transfer`` (put/get GiB/s vs the ZMQ floor and a pickle path), ``per_sample`` (one
columnar put vs one put per row), ``latency`` (blocking get_meta vs client polling), ``loader``
(StreamingDataLoader, num_workers 0 vs 2). Each group starts and closes its own embedded cluster.
Results go to ``DIR/bench.json`` and ``DIR/bench.png`` (``bench-quick.*`` with ``--quick``).

Read the ratios, not the absolute numbers: this machine is small and shared, and every baseline is
measured in the same run, interleaved with what it is compared to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import tq_loader
from benchmarks.streaming import (
    LatencySpec,
    LoaderSpec,
    PerSampleSpec,
    run_latency,
    run_loader,
    run_per_sample,
)
from benchmarks.transfer import TransferSpec, run_transfer

GROUPS = ("transfer", "per_sample", "latency", "loader")


@dataclass(frozen=True)
class Plan:
    transfer: list[TransferSpec] = field(default_factory=list)
    per_sample: PerSampleSpec = field(default_factory=PerSampleSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    loader: LoaderSpec = field(default_factory=LoaderSpec)


FULL = Plan(
    transfer=[TransferSpec(), TransferSpec(jagged=True), TransferSpec(num_units=1)],
)
QUICK = Plan(
    transfer=[
        TransferSpec(rows=32, width=1024, reps=2),
        TransferSpec(rows=32, width=1024, jagged=True, reps=2),
    ],
    per_sample=PerSampleSpec(rows=128, reps=1),
    latency=LatencySpec(n=5),
    loader=LoaderSpec(
        rows=256, width=256, max_tokens=64, batch_size=32, micro_batch_size=8, step_ms=1.0, reps=1
    ),
)


# --------------------------------------------------------------------------- running


def run(plan: Plan, groups: list[str], console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {}
    steps = [(g, spec) for g in groups for spec in (plan.transfer if g == "transfer" else [getattr(plan, g)])]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=len(steps))
        for group, spec in steps:
            label = f"{group} {spec.name}" if isinstance(spec, TransferSpec) else group
            progress.update(task, description=label)
            if group == "transfer":
                results.setdefault("transfer", {})[spec.name] = run_transfer(spec)
            else:
                results[group] = {"per_sample": run_per_sample, "latency": run_latency, "loader": run_loader}[
                    group
                ](spec)
            progress.advance(task)
    return results


# --------------------------------------------------------------------------- reporting


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def print_tables(results: dict[str, Any], console: Console) -> None:
    if "transfer" in results:
        t = Table(title="put / get throughput, GiB/s (median) and ratios; floor = raw ZMQ frames, "
                  "pickle = pickle.dumps/loads over the same socket")  # fmt: skip
        for col in (
            "batch",
            "op",
            "MiB",
            "tq",
            "floor",
            "pickle",
            "tq/floor",
            "tq/pickle",
            "best tq/floor",
        ):
            t.add_column(col, justify="left" if col in ("batch", "op") else "right")
        for name, r in results["transfer"].items():
            for op in ("put", "get"):
                x = r[op]
                t.add_row(name, op, _f(r["bytes"] / 2**20, 1), _f(x["tq_gibs"]), _f(x["floor_gibs"]),
                          _f(x["pickle_gibs"]), _f(x["tq_over_floor"]), _f(x["tq_over_pickle"]),
                          _f(x["best_tq_over_floor"]))  # fmt: skip
        console.print(t)
        console.print(
            "get_meta before each get (ms, median): "
            + ", ".join(f"{n} {_f(r['get_meta_ms'])}" for n, r in results["transfer"].items())
        )
    if "per_sample" in results:
        r = results["per_sample"]
        t = Table(title=f"{r['spec']['rows']} small rows: one columnar put vs one put per row")
        for col in ("path", "seconds", "rows/s", "us/row"):
            t.add_column(col, justify="right")
        t.add_row("columnar (1 put)", _f(r["columnar_s"], 4), f"{r['columnar_rows_per_s']:,.0f}",
                  _f(r["columnar_s"] / r["spec"]["rows"] * 1e6, 1))  # fmt: skip
        t.add_row("per-sample (B puts)", _f(r["per_sample_s"], 3), f"{r['per_sample_rows_per_s']:,.0f}",
                  _f(r["per_sample_us_per_row"], 1))  # fmt: skip
        console.print(t)
        console.print(f"columnar speed-up: [bold]{_f(r['columnar_speedup'], 1)}x[/bold]")
    if "latency" in results:
        r = results["latency"]
        t = Table(title=f"put -> get_meta hand-over latency, ms (median of {r['spec']['n']})")
        t.add_column("consumer")
        t.add_column("ms", justify="right")
        t.add_column("x blocking", justify="right")
        t.add_row("blocking get_meta (server-side wait), measured", _f(r["blocking_ms"], 3), "1.00")
        t.add_row("  same, from put() return", _f(r["blocking_from_put_return_ms"], 3), "")
        t.add_row("poll + sleep(10 ms), measured", _f(r["poll_10ms_measured_ms"], 3),
                  _f(r["poll_10ms_over_blocking"], 1))  # fmt: skip
        t.add_row("poll + sleep(1 s) (TransferQueue), ANALYTIC: 0.5 s + one empty poll",
                  _f(r["poll_1s_analytic_ms"], 1), _f(r["poll_1s_analytic_over_blocking"], 0))  # fmt: skip
        console.print(t)
        console.print(f"one empty get_meta (polling mode): {_f(r['empty_poll_ms'], 3)} ms; raw ZMQ 1 KiB "
                      f"round trip: {_f(r['zmq_rtt_ms'], 3)} ms")  # fmt: skip
    if "loader" in results:
        r = results["loader"]
        s = r["spec"]
        t = Table(title=f"StreamingDataLoader over a sealed partition of {s['rows']} rows, batch "
                  f"{s['batch_size']} / micro-batch {s['micro_batch_size']}")  # fmt: skip
        for col in ("config", "micro-batches/s", "rows/s", "wait_fraction"):
            t.add_column(col, justify="right")
        for key, x in r["configs"].items():
            t.add_row(key, _f(x["micro_batches_per_s"], 1), f"{x['rows_per_s']:,.0f}", _f(x["wait_fraction"]))
        console.print(t)
        console.print(f"num_workers 2 / 0 (rows/s): {_f(r['w2_over_w0'])} without a step, "
                      f"{_f(r['w2_over_w0_with_step'])} with a {s['step_ms']:g} ms step")  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    if "transfer" in results:
        labels, width = [], 0.27
        rows = [(n, op, r[op]) for n, r in results["transfer"].items() for op in ("put", "get")]
        for i, key in enumerate(("tq_gibs", "floor_gibs", "pickle_gibs")):
            ax.bar([j + (i - 1) * width for j in range(len(rows))], [x[key] for _, _, x in rows], width,
                   label=key.removesuffix("_gibs"))  # fmt: skip
        labels = [f"{n}\n{op}" for n, op, _ in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("GiB/s (median)")
        ax.set_title("put/get throughput vs ZMQ floor and pickle path")
        ax.legend()
    ax = axes[0][1]
    if "per_sample" in results:
        r = results["per_sample"]
        ax.bar(["columnar\n(1 put)", "per-sample\n(B puts)"],
               [r["columnar_rows_per_s"], r["per_sample_rows_per_s"]], color=["C0", "C3"])  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("rows/s (log)")
        ax.set_title(f"{r['spec']['rows']} small rows: {r['columnar_speedup']:.0f}x")
    ax = axes[1][0]
    if "latency" in results:
        r = results["latency"]
        bars = ax.bar(["blocking\nget_meta", "poll+sleep\n10 ms", "poll+sleep 1 s\n(analytic)"],
                      [r["blocking_ms"], r["poll_10ms_measured_ms"], r["poll_1s_analytic_ms"]],
                      color=["C0", "C1", "C7"])  # fmt: skip
        bars[2].set_hatch("//")
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title("put -> consumer sees the row")
    ax = axes[1][1]
    if "loader" in results:
        cfgs = results["loader"]["configs"]
        bars = ax.bar(list(cfgs), [x["rows_per_s"] for x in cfgs.values()], color="C2")
        for bar, x in zip(bars, cfgs.values(), strict=True):
            ax.annotate(f"wait {x['wait_fraction']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_ylabel("rows/s (median)")
        ax.set_title("StreamingDataLoader")
    fig.suptitle(
        "tq_loader benchmarks (ratios within one run; absolute numbers are machine- and load-dependent)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny version (smoke test, well under 30 s)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    args = ap.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
    console = Console() if sys.stdout.isatty() else Console(width=130)  # logs: keep tables unwrapped
    started = time.perf_counter()
    results = run(QUICK if args.quick else FULL, groups, console)
    results["meta"] = {
        "quick": args.quick,
        "groups": groups,
        "duration_s": time.perf_counter() - started,
        "unix_time": time.time(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tq_loader": tq_loader.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print_tables(results, console)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench-quick" if args.quick else "bench"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{stem}.png")
    console.print(
        f"wrote {args.out / (stem + '.json')} and {stem}.png in {results['meta']['duration_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
