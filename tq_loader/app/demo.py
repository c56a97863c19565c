"""``tq-loader demo`` / ``make demo``: a GRPO-style post-training pipeline on one cluster.

Stages (one process each by default; ``demo.workers=thread`` runs them as threads of this process):

* **rollout** -- ``rollout_workers`` threads put prompts with ``n_samples`` variable-length
  responses each (a prompt's responses in one put: one GRPO group), then seal the partition;
* **reward** -- streams ``prompts, responses`` (task ``reward``) and writes a ``rewards`` column
  with a :class:`~tq_loader.loader.Writer` (sealed means no new *rows*; columns still arrive);
* **train-dpR** -- per data-parallel rank, ``tp_size`` threads ("tensor-parallel ranks") iterate
  the same rank-aware stream (``loader`` config: GRPO groups, ``collate="pad"``) and take a tiny
  policy-gradient step per micro-batch. TP peers must see identical micro-batches.

This process hosts the cluster, shows a progress bar per stage, then prints the summary and the
checks -- every row consumed exactly once per task (collected ids and the controller's
consumption status), identical TP batches, whole groups, rewards aligned with their rows -- and
returns non-zero if any fails. The stages live in :mod:`tq_loader.app.demo_stages`; stage processes
talk to this one over stdout as JSON lines (no pickle).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tq_loader.app.demo_stages import PREFIX, STAGES

__all__ = ["make_plan", "run_demo", "run_pipeline"]


# ---------------------------------------------------------------------------------------- runners
class _Runner:
    """Starts stages as processes (JSON lines on stdout) or threads; every event lands in ``events``."""

    def __init__(self, plan: dict[str, Any], events: queue.Queue[dict[str, Any]]) -> None:
        self.plan, self.events = plan, events
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, kind: str, rank: int) -> None:
        if self.plan["demo"]["workers"] == "thread":
            threading.Thread(target=self._in_thread, args=(name, kind, rank), daemon=True, name=name).start()
            return
        cmd = [sys.executable, "-m", "tq_loader.app.demo_stages", kind, str(rank)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(self.plan))
        proc.stdin.close()
        self.procs.append(proc)
        threading.Thread(target=self._read, args=(name, proc), daemon=True).start()

    def _in_thread(self, name: str, kind: str, rank: int) -> None:
        def emit(kind_: str, **data: Any) -> None:
            self.events.put({"kind": kind_, "stage": name, "time": time.time(), **data})

        try:
            emit("done", **STAGES[kind](self.plan, emit, rank))
        except BaseException as exc:
            emit("failed", error=f"{type(exc).__name__}: {exc}")

    def _read(self, name: str, proc: subprocess.Popen[str]) -> None:
        tail: deque[str] = deque(maxlen=30)
        drain = threading.Thread(target=lambda: tail.extend(proc.stderr or ()), daemon=True)
        drain.start()
        finished = False
        for line in proc.stdout or ():
            if line.startswith(PREFIX):
                event = json.loads(line[len(PREFIX) :])
                finished |= event["kind"] in ("done", "failed")
                self.events.put({**event, "stage": name})
        code = proc.wait()
        drain.join()
        if not finished:
            error = f"process exited with code {code}: " + "".join(tail)[-2000:]
            self.events.put({"kind": "failed", "stage": name, "error": error})

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------- driver
def make_plan(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain, validated settings for every stage; ValueError says which size to change."""
    conf = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d, loader = dict(conf["demo"]), dict(conf["loader"])
    n, rows = d["n_samples"], d["prompts"] * d["n_samples"]
    batch, dp = loader["batch_size"], loader["dp_size"]
    grouped = loader.get("sampler") in ("grpo_group_n", "seqlen_balanced")
    missing = sorted({"prompts", "responses", "rewards", "prompt_id"} - set(loader["data_fields"]))
    problems: list[str] = []

    def need(ok: Any, message: str) -> None:
        if not ok:
            problems.append(message)

    need(
        rows % (batch * dp) == 0,
        f"prompts*n_samples={rows} must divide by loader.batch_size*dp_size={batch * dp}",
    )
    need(not grouped or batch % n == 0, f"loader.batch_size={batch} must be a multiple of demo.n_samples={n}")
    need(
        not grouped or loader["sampling_config"].get("n_samples_per_prompt", n) == n,
        "loader.sampling_config.n_samples_per_prompt must equal demo.n_samples",
    )
    need(not missing, f"loader.data_fields lacks {missing}")
    need(loader.get("collate") == "pad", "loader.collate must be 'pad' (the trainer takes padded responses)")
    need(
        2 <= d["min_response_len"] <= d["max_response_len"], "need 2 <= min_response_len <= max_response_len"
    )
    need(
        d["workers"] in ("process", "thread"), f"demo.workers must be process or thread, not {d['workers']!r}"
    )
    sizes = ("prompts", "rollout_chunk", "rollout_workers", "tp_size", "reward_batch_size")
    need(min(d[k] for k in sizes) >= 1, f"demo.{'/'.join(sizes)} must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    partition = f"{loader['partition_id']}-{uuid.uuid4().hex[:8]}"  # unique: a served cluster may be shared
    placement = conf.get("placement", "local")
    return {"demo": d, "loader": loader, "rows": rows, "placement": placement, "partition": partition}


def _say(message: str) -> None:
    """A plain progress line on stderr (above the bars on a terminal): the demo says what it starts."""
    from tqdm import tqdm

    tqdm.write(f"demo: {message}", file=sys.stderr)
    sys.stderr.flush()


def _drive(plan: dict[str, Any], client: Any) -> tuple[dict[str, Any], dict[str, str], float]:
    """Start every stage, follow their events with progress bars; (results, failures, seconds)."""
    from tqdm import tqdm

    d, pid, rows, dp = plan["demo"], plan["partition"], plan["rows"], plan["loader"]["dp_size"]
    stages = [("rollout", "rollout", 0, rows), ("reward", "reward", 0, rows)]
    stages += [(f"train-dp{r}", "train", r, rows // dp) for r in range(dp)]
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    runner = _Runner(plan, events)
    bars = {
        name: tqdm(
            total=total, desc=f"{name:<10}", unit="row", position=i, disable=None if d["progress"] else True
        )
        for i, (name, _, _, total) in enumerate(stages)
    }
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    ready: dict[str, float] = {}
    started, deadline = time.time(), time.monotonic() + d["timeout"]
    how = "threads of this process" if d["workers"] == "thread" else "processes (each imports torch first)"
    _say(f"starting {len(stages)} stages as {how}: {', '.join(n for n, *_ in stages)}")
    try:
        for name, kind, rank, _ in stages:
            runner.start(name, kind, rank)
        while len(results) + len(failures) < len(stages):
            try:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                for name, *_ in stages:
                    if name not in results:
                        failures.setdefault(name, f"still running after demo.timeout={d['timeout']}s")
                client.abort(pid, "demo timed out")
                break
            name, kind = event["stage"], event["kind"]
            if kind == "progress":
                bars[name].update(event["rows"])
            elif kind == "ready":
                ready[name] = event["time"] - started
                _say(f"{name} attached after {ready[name]:.1f} s")
            elif kind == "done":
                results[name] = event
            elif kind == "failed":
                failures[name] = event["error"]
                client.abort(pid, f"stage {name} failed: {event['error'][:200]}")  # the others stop fast
    finally:
        runner.stop()
        for bar in bars.values():
            bar.close()
    return {**results, "_ready": ready}, failures, time.time() - started


def _checks(plan: dict[str, Any], client: Any, res: dict[str, Any], failures: dict[str, str]) -> list[Any]:
    """``(name, ok, detail)`` per check; exactly-once uses collected ids *and* the controller's view."""
    pid, rows, dp, d = plan["partition"], plan["rows"], plan["loader"]["dp_size"], plan["demo"]
    out = [
        ("every stage finished", not failures, "; ".join(f"{k}: {v}" for k, v in failures.items()) or "ok")
    ]
    produced = sorted(res.get("rollout", {}).get("ids", []))
    out.append(
        (
            "rollout put every row once",
            produced == list(np.unique(produced)) and len(produced) == rows,
            f"{len(produced)}/{rows} rows",
        )
    )
    trainers = [res.get(f"train-dp{r}") for r in range(dp)]
    collected = {
        "reward": res.get("reward", {}).get("ids"),
        plan["loader"]["task_name"]: None if None in trainers else [i for t in trainers for i in t["ids"]],
    }
    for task, ids in collected.items():
        status_ids, consumed = client.get_consumption_status(task, pid)
        ok = ids is not None and sorted(ids) == produced and len(produced) == rows
        ok = ok and sorted(status_ids.tolist()) == produced and bool(consumed.all())
        detail = f"{len(ids or [])} rows collected, {int(consumed.sum())}/{len(consumed)} marked consumed"
        out.append((f"{task}: every row consumed exactly once", ok, detail))
    if None not in trainers:
        batches, bad = [t["batches"] for t in trainers], sum(t["mismatched_rewards"] for t in trainers)
        out += [
            (
                "dp ranks got the same number of batches",
                len(set(batches)) == 1,
                f"batches per rank {batches}",
            ),
            (
                "tp peers saw identical micro-batches",
                all(t["tp_identical"] for t in trainers),
                f"tp_size={d['tp_size']}",
            ),
            (
                "tp peers took identical steps (losses)",
                all(t["tp_same_losses"] for t in trainers),
                f"{trainers[0]['micro_batches']} steps per rank",
            ),
            (
                "batches hold whole GRPO groups",
                all(t["whole_groups"] for t in trainers),
                f"n={d['n_samples']}",
            ),
            ("rewards aligned with their rows", bad == 0, f"{bad} mismatched"),
            (
                "losses finite",
                all(t["losses_finite"] for t in trainers),
                " ".join(f"{t['mean_loss']:.4f}" for t in trainers),
            ),
        ]
    return out


def _summary(plan: dict[str, Any], res: dict[str, Any], checks: list[Any], wall: float) -> dict[str, Any]:
    """Print the stage and check tables (rich); the same as a JSON-able report."""
    from rich.console import Console
    from rich.table import Table

    d = plan["demo"]
    table = Table(
        title=f"GRPO pipeline: {d['prompts']} prompts x {d['n_samples']} responses, "
        f"dp={plan['loader']['dp_size']} x tp={d['tp_size']}, {plan['placement']}"
    )
    for col in ("stage", "rows", "MiB", "active s", "rows/s", "MiB/s", "wait"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    stages = {
        k: {f: r[f] for f in ("rows", "bytes", "seconds", "wait_fraction")}
        for k, r in res.items()
        if k[0] != "_"
    }
    for name, r in stages.items():
        mib, secs = r["bytes"] / 2**20, max(r["seconds"], 1e-9)
        table.add_row(
            name,
            str(r["rows"]),
            f"{mib:.2f}",
            f"{secs:.2f}",
            f"{r['rows'] / secs:,.0f}",
            f"{mib / secs:.2f}",
            f"{r['wait_fraction']:.0%}",
        )
    checks_table = Table(title="checks")
    for col in ("", "check", "detail"):
        checks_table.add_column(col)
    for name, ok, detail in checks:
        checks_table.add_row("[green]PASS" if ok else "[red]FAIL", name, detail)
    console, ready = Console(), res.get("_ready", {})
    console.print(table, checks_table)
    console.print(
        f"wall time {wall:.1f} s (all stages attached after {max(ready.values(), default=0):.1f} s)"
    )
    return {
        "wall_s": wall,
        "ready_s": ready,
        "stages": stages,
        "ok": all(ok for _, ok, _ in checks),
        "checks": [{"name": n, "ok": ok, "detail": det} for n, ok, det in checks],
    }


def run_pipeline(cfg: DictConfig | dict[str, Any]) -> int:
    """Run the pipeline for a composed app config; 0 if every check passed, 1 if not, 2 for bad sizes."""
    import tq_loader as tq
    from tq_loader.hydra_conf import cluster_config

    try:
        plan = make_plan(cfg)
    except ValueError as exc:
        print(f"demo: invalid sizes: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    owned = not tq.is_initialized()  # close only what this run attached to or started
    ray_started = False
    try:
        if plan["placement"] == "ray" and owned and not os.environ.get(tq.api.ENV_ADDRESS):
            import ray

            if not ray.is_initialized():  # a private local instance, never a cluster left running
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
                ray_started = True
        cluster = cluster_config(cfg)
        _say(
            f"starting the cluster (placement={cluster.placement}, {cluster.storage.num_units} "
            f"{cluster.storage.backend} storage units) for {plan['rows']} rows"
        )
        tq.init(cluster)
        client = tq.get_client()
        results, failures, wall = _drive(plan, client)
        checks = _checks(plan, client, results, failures)
        report = _summary(plan, results, checks, wall)
        client.clear_partition(plan["partition"])
    finally:
        if owned:
            tq.close()
        if ray_started:
            import ray

            ray.shutdown()
    if plan["demo"]["report"]:
        with open(plan["demo"]["report"], "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


def run_demo(overrides: Sequence[str] = ()) -> int:
    """``tq-loader demo [overrides]``: compose ``configs/`` with Hydra overrides and run the pipeline."""
    from tq_loader.app.config import compose

    return run_pipeline(compose(list(overrides)))
