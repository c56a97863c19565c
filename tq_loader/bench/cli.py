"""``tq-loader bench [--quick] [--only NAME ...] [--out DIR]``: run, print, save, plot.

Cases: simple, complex, small (the same KV calls on every system: baselines, tq_loader's
placements, TransferQueue 0.1.11), fields, get_meta, loader, memory, handover. Results go to
``DIR/bench.{md,json,png}`` and ``DIR/bench-<case>.png`` (``bench-quick.*`` with ``--quick``);
DIR defaults to ``benchmarks/results`` under the current directory. Read the ratios, not the
absolute figures: every baseline is measured in the same run, and the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tq_loader.bench import machine, plans
from tq_loader.bench.registry import KV_CASES, Context, load
from tq_loader.bench.report import build_tables, print_tables, to_markdown
from tq_loader.bench.targets import evaluate

__all__ = ["main"]


def _parser(names: list[str]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tq-loader bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, well under a minute (a smoke run)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"cases to run, of: {' '.join(names)}")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: ./benchmarks/results)")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 3; --quick 1)")
    ap.add_argument("--rounds", type=int, help="rounds per repetition (default 3; --quick 2)")
    ap.add_argument("--tq-venv", type=Path, help="venv holding TransferQueue 0.1.11 (default: .venv-tq)")
    ap.add_argument("--no-transferqueue", action="store_true", help="do not run TransferQueue")
    ap.add_argument("--with", dest="extra", action="append", default=[], metavar="MODULE",
                    help="also import MODULE, which registers more cases or systems")  # fmt: skip
    return ap


def _selected(args: argparse.Namespace, names: list[str], quick_ok: dict[str, bool], ap: Any) -> list[str]:
    wanted = [n for item in (args.only or []) for n in item.split(",") if n]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {names}")
    if wanted:
        return [n for n in names if n in wanted]
    return [n for n in names if quick_ok.get(n, True) or not args.quick]


def _fingerprint_remarks(info: dict[str, Any]) -> list[str]:
    out = []
    for case, by_system in info.get("fingerprints", {}).items():
        prints = {fp for fp in by_system.values() if fp}
        if len(prints) > 1:
            out.append(f"WARNING: {case}: the systems did not all move the same data: {by_system}")
        elif prints:
            out.append(f"{case}: every system moved the same data (fingerprint {prints.pop()}).")
    return out


def run(args: argparse.Namespace, selected: list[str], console: Console) -> tuple[Context, dict[str, Any]]:
    plan = (plans.quick if args.quick else plans.full)(args.reps, args.rounds)
    out = (args.out or Path.cwd() / "benchmarks" / "results").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for old in (out / "logs").glob("*"):  # this run's logs only: the suite's own files of an earlier run
        if old.is_file() and old.suffix in (".log", ".json"):
            old.unlink()
    cases = load()
    stages = (["kv"] if set(selected) & set(KV_CASES) else []) + [n for n in selected if n not in KV_CASES]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task("benchmarks", total=len(stages))
        ctx = Context(
            plan=plan,
            out=out,
            options={"kv_workloads": [n for n in selected if n in KV_CASES], "tq_venv": args.tq_venv,
                     "no_transferqueue": args.no_transferqueue},
            status=lambda text: progress.update(task, description=text),
        )  # fmt: skip
        for name in stages:
            progress.update(task, description=cases[name].title)
            began = time.perf_counter()
            try:
                cases[name].run(ctx)
            except Exception as exc:  # recorded as a failure with its traceback; the run goes on
                with open(out / "logs" / "failures.log", "a") as log:
                    log.write(f"--- {name}\n{traceback.format_exc()}\n")
                ctx.skip(name, "tq_loader", f"FAILED: {type(exc).__name__}: {exc}")
                ctx.info.setdefault("failures", []).append(f"{name}: {type(exc).__name__}: {exc}")
            ctx.info.setdefault("stage_s", {})[name] = round(time.perf_counter() - began, 1)
            progress.advance(task)
    return ctx, {"out": out}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tq-loader bench`` (and ``python -m tq_loader.bench``); returns the exit status:
    0, or 1 if a tq_loader case or system failed (skips of other systems are not failures)."""
    cases = load()
    names = [*KV_CASES, *(n for n in cases if n != "kv")]
    quick_ok = {n: c.quick for n, c in cases.items()}
    ap = _parser(names)
    args = ap.parse_args(argv)
    for module in args.extra:
        load([module])
        names = [*KV_CASES, *(n for n in cases if n != "kv")]
    selected = _selected(args, names, quick_ok, ap)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if os.environ.pop("TQ_LOADER_ADDRESS", None):
        console.print(
            "[yellow]TQ_LOADER_ADDRESS is ignored: the suite starts the clusters it measures[/yellow]"
        )
    meta = machine.describe()
    started = time.perf_counter()
    ctx, where = run(args, selected, console)
    out: Path = where["out"]
    rows, plan = ctx.rows, ctx.plan
    outcomes = evaluate(rows, set(selected))
    meta.update(quick=plan.quick, reps=plan.reps, rounds=plan.rounds, selected=selected,
                duration_s=round(time.perf_counter() - started, 1), machine=machine.summary(meta))  # fmt: skip
    meta["remarks"] = _fingerprint_remarks(ctx.info) + [f"TransferQueue venv: {v}" for v in
                                                        [ctx.info.get("transferqueue_venv")] if v]  # fmt: skip
    tables = build_tables(rows, plan.workloads, outcomes, ctx.skips)
    print_tables(tables, console)
    stem = "bench-quick" if plan.quick else "bench"
    (out / f"{stem}.md").write_text(to_markdown(tables, meta))
    (out / f"{stem}.json").write_text(json.dumps({
        "meta": meta,
        "plan": {"reps": plan.reps, "rounds": plan.rounds,
                 "workloads": {k: w.to_dict() for k, w in plan.workloads.items()}},
        "rows": [r.to_dict() for r in rows],
        "targets": [o.to_dict() for o in outcomes],
        "skips": [s.__dict__ for s in ctx.skips],
        "info": ctx.info,
    }, indent=1, default=str))  # fmt: skip
    from tq_loader.bench.plots import plot_all

    titles = {t.title.split(":")[0]: t.title for t in tables}
    pngs = plot_all(rows, out, stem, titles)
    console.print(
        f"wrote {out / (stem + '.md')}, {stem}.json and {len(pngs)} PNG(s) in {meta['duration_s']:.0f} s"
    )
    failures = ctx.info.get("failures", [])
    for failure in failures:
        console.print(f"[red]FAILED[/red] {failure} (traceback in {out / 'logs' / 'failures.log'})")
    return 1 if failures else 0
