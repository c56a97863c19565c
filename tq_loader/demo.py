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
returns non-zero if any fails. Stage processes talk to it over stdout as JSON lines (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict

__all__ = ["TinyPolicy", "grpo_loss", "reward_fn", "run_demo", "run_pipeline"]

PREFIX = "@@tq-demo "  # marks the event lines a stage process prints on stdout
Emit = Callable[..., None]


class TinyPolicy(torch.nn.Module):
    """Next-token policy: embedding -> tanh -> vocabulary logits (enough to take real steps)."""

    def __init__(self, vocab_size: int = 256, hidden: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def reward_fn(prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of response tokens congruent (mod 4) to the prompt's first token: deterministic, vectorised."""
    hits = ((responses % 4) == (prompts[:, :1] % 4)) & mask
    return hits.sum(1).float() / mask.sum(1).clamp(min=1).float()


def grpo_loss(model: torch.nn.Module, td: TensorDict) -> torch.Tensor:
    """Policy gradient with group-normalised advantages (groups = ``prompt_id``) on padded responses."""
    tokens, mask = td["responses"], td["responses_mask"]
    logp = torch.log_softmax(model(tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].float()
    rewards = td["rewards"].float()
    _, group = torch.unique(td["prompt_id"], return_inverse=True)
    k = int(group.max()) + 1
    count = torch.zeros(k).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(k).index_add_(0, group, rewards) / count
    var = torch.zeros(k).index_add_(0, group, (rewards - mean[group]) ** 2) / count
    adv = (rewards - mean[group]) / (var[group].sqrt() + 1e-4)
    return -(adv[:, None] * logp * valid).sum() / valid.sum().clamp(min=1)


def _nbytes(td: TensorDict) -> int:
    total = 0
    for value in td.values():
        if isinstance(value, torch.Tensor):
            parts = (value.values(), value.offsets()) if value.is_nested else (value,)
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def _digest(td: TensorDict) -> str:
    h = hashlib.blake2b(digest_size=12)
    for key in sorted(td.keys()):
        h.update(key.encode())
        h.update(td[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _threads(fn: Callable[[int], Any], n: int, name: str) -> list[Any]:
    """Run ``fn(0..n-1)`` on ``n`` threads; results in order; re-raise the first failure."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def main(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(i,), name=f"{name}-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------- stages
def _rollout_batch(d: dict[str, Any], chunk: int) -> TensorDict:
    """Prompts ``chunk*rollout_chunk ...`` with ``n_samples`` jagged responses each (seeded by chunk)."""
    n, vocab = d["n_samples"], d["model"]["vocab_size"]
    first = chunk * d["rollout_chunk"]
    k = min(d["rollout_chunk"], d["prompts"] - first)
    g = torch.Generator().manual_seed(d["seed"] * 1_000_003 + chunk)
    prompts = torch.randint(vocab, (k, d["prompt_len"]), generator=g).repeat_interleave(n, 0)
    lengths = torch.randint(d["min_response_len"], d["max_response_len"] + 1, (k * n,), generator=g)
    values = torch.randint(vocab, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    responses = torch.nested.nested_tensor_from_jagged(values, offsets)
    prompt_id = torch.arange(first, first + k).repeat_interleave(n)
    return TensorDict({"prompts": prompts, "responses": responses, "prompt_id": prompt_id}, batch_size=[k * n])


def rollout_stage(plan: dict[str, Any], emit: Emit, rank: int = 0) -> dict[str, Any]:
    import tq_loader as tq

    d, pid = plan["demo"], plan["partition"]
    client = tq.get_client()
    emit("ready")
    chunks, workers = math.ceil(d["prompts"] / d["rollout_chunk"]), d["rollout_workers"]
    tag_lengths = plan["loader"].get("sampler") == "seqlen_balanced"
    started = time.perf_counter()

    def worker(w: int) -> tuple[list[int], int, float]:
        ids, nbytes, wait = [], 0, 0.0
        for chunk in range(w, chunks, workers):
            td = _rollout_batch(d, chunk)
            t = time.perf_counter()
            meta = client.put(td, partition_id=pid)
            if tag_lengths:  # the seqlen-balanced sampler reads per-row token counts from tags
                total = (td["responses"].offsets().diff() + d["prompt_len"]).tolist()
                meta.update_custom_meta([{"total_lengths": int(x)} for x in total])
                client.set_custom_meta(meta)
            wait += time.perf_counter() - t
            ids += meta.global_indexes.tolist()
            nbytes += _nbytes(td)
            emit("progress", rows=len(meta))
        return ids, nbytes, wait

    parts = _threads(worker, workers, "rollout")
    client.seal(pid)  # no new rows: consumers drain and their streams end
    seconds = time.perf_counter() - started
    wait = sum(p[2] for p in parts) / workers
    return {"ids": [i for p in parts for i in p[0]], "rows": sum(len(p[0]) for p in parts),
            "bytes": sum(p[1] for p in parts), "seconds": seconds, "wait_fraction": wait / seconds}  # fmt: skip


def reward_stage(plan: dict[str, Any], emit: Emit, rank: int = 0) -> dict[str, Any]:
    import tq_loader as tq
    from tq_loader.hydra_conf import build_loader

    d, pid = plan["demo"], plan["partition"]
    tq.get_client()
    loader = build_loader(
        batch_size=d["reward_batch_size"], data_fields=["prompts", "responses"], partition_id=pid,
        task_name="reward", drop_last=False, num_workers=d["reward_fetch_workers"], collate="pad",
    )  # fmt: skip
    writer = loader.writer(max_in_flight=4)
    emit("ready")
    ids: list[int] = []
    nbytes, write_wait, started = 0, 0.0, time.perf_counter()
    for td, meta in loader:
        rewards = reward_fn(td["prompts"], td["responses"], td["responses_mask"])
        t = time.perf_counter()
        writer.write(TensorDict({"rewards": rewards}, batch_size=[meta.size]), meta)
        write_wait += time.perf_counter() - t
        ids += meta.global_indexes.tolist()
        nbytes += _nbytes(td) + rewards.numel() * rewards.element_size()
        emit("progress", rows=meta.size)
    t = time.perf_counter()
    writer.flush()
    write_wait += time.perf_counter() - t
    seconds = time.perf_counter() - started
    wait = loader.statistics()["wait_s"] + write_wait
    return {"ids": ids, "rows": len(ids), "bytes": nbytes, "seconds": seconds, "wait_fraction": wait / seconds}


def trainer_stage(plan: dict[str, Any], emit: Emit, rank: int = 0) -> dict[str, Any]:
    """Data-parallel rank ``rank``: ``tp_size`` threads, one loader and one model replica each."""
    import tq_loader as tq
    from hydra.utils import instantiate

    d, pid = plan["demo"], plan["partition"]
    tq.get_client()
    barrier = threading.Barrier(d["tp_size"])
    started = [0.0]

    def tp_rank(t: int) -> dict[str, Any]:
        torch.manual_seed(d["seed"])  # identical replicas: identical batches give identical losses
        model = instantiate(d["model"])
        opt = torch.optim.SGD(model.parameters(), lr=d["lr"])
        loader = instantiate(plan["loader"], dp_rank=rank, partition_id=pid)
        record: list[tuple[int, list[int], str]] = []
        groups: dict[int, list[int]] = {}
        losses, mismatched, nbytes = [], 0, 0
        if barrier.wait() == 0:
            emit("ready")
            started[0] = time.perf_counter()
        for td, meta in loader:
            loss = grpo_loss(model, td)
            opt.zero_grad()
            loss.backward()
            opt.step()
            expected = reward_fn(td["prompts"], td["responses"], td["responses_mask"])
            mismatched += int((~torch.isclose(expected, td["rewards"])).sum())
            batch = int(meta.extra_info["batch_index"])
            record.append((batch, meta.global_indexes.tolist(), _digest(td)))
            groups.setdefault(batch, []).extend(td["prompt_id"].tolist())
            losses.append(loss.item())
            nbytes += _nbytes(td)
            if t == 0:
                emit("progress", rows=meta.size)
        stats = loader.statistics()
        return {"record": record, "groups": groups, "losses": losses, "mismatched": mismatched,
                "bytes": nbytes, "wait_s": stats["wait_s"]}  # fmt: skip

    peers = _threads(tp_rank, d["tp_size"], f"dp{rank}-tp")
    seconds = time.perf_counter() - started[0]
    lead = peers[0]
    n = d["n_samples"]
    whole = all(np.all(np.unique(g, return_counts=True)[1] == n) for g in lead["groups"].values())
    return {
        "ids": [i for _, ids, _ in lead["record"] for i in ids], "rows": sum(len(r[1]) for r in lead["record"]),
        "bytes": lead["bytes"], "seconds": seconds, "wait_fraction": lead["wait_s"] / seconds,
        "batches": len(lead["groups"]), "micro_batches": len(lead["record"]),
        "tp_identical": all(p["record"] == lead["record"] for p in peers),
        "whole_groups": bool(whole), "mismatched_rewards": sum(p["mismatched"] for p in peers),
        "losses_finite": all(math.isfinite(x) for p in peers for x in p["losses"]),
        "mean_loss": float(np.mean(lead["losses"])) if lead["losses"] else float("nan"),
    }  # fmt: skip


STAGES: dict[str, Callable[[dict[str, Any], Emit, int], dict[str, Any]]] = {
    "rollout": rollout_stage, "reward": reward_stage, "train": trainer_stage,
}  # fmt: skip


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
        cmd = [sys.executable, "-m", "tq_loader.demo", kind, str(rank)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=os.environ.copy())  # fmt: skip
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


def _child(argv: Sequence[str]) -> int:
    """Entry of a stage process: ``python -m tq_loader.demo <stage> <rank>``, the plan as JSON on stdin."""
    import tq_loader as tq

    kind, rank = argv[0], int(argv[1])
    plan = json.loads(sys.stdin.read())
    torch.set_num_threads(1)
    lock = threading.Lock()

    def emit(kind_: str, **data: Any) -> None:
        line = PREFIX + json.dumps({"kind": kind_, "time": time.time(), **data})
        with lock:
            print(line, flush=True)

    try:
        emit("done", **STAGES[kind](plan, emit, rank))
        return 0
    except BaseException as exc:
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        tq.close()


# ---------------------------------------------------------------------------------------- driver
def make_plan(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain, validated settings for every stage; ValueError says which size to change."""
    conf = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d, loader = dict(conf["demo"]), dict(conf["loader"])
    n, rows = d["n_samples"], d["prompts"] * d["n_samples"]
    batch, dp = loader["batch_size"], loader["dp_size"]
    problems = []
    if rows % (batch * dp):
        problems.append(f"prompts*n_samples={rows} must be a multiple of loader.batch_size*loader.dp_size={batch * dp}")
    if loader.get("sampler") in ("grpo_group_n", "seqlen_balanced"):
        if batch % n:
            problems.append(f"loader.batch_size={batch} must be a multiple of demo.n_samples={n} (whole groups)")
        if loader["sampling_config"].get("n_samples_per_prompt", n) != n:
            problems.append("loader.sampling_config.n_samples_per_prompt must equal demo.n_samples")
    missing = {"prompts", "responses", "rewards", "prompt_id"} - set(loader["data_fields"])
    if missing:
        problems.append(f"loader.data_fields lacks {sorted(missing)}")
    if loader.get("collate") != "pad":
        problems.append("loader.collate must be 'pad' (the trainer takes dense, padded responses)")
    if not 2 <= d["min_response_len"] <= d["max_response_len"]:
        problems.append("need 2 <= demo.min_response_len <= demo.max_response_len")
    if d["workers"] not in ("process", "thread"):
        problems.append(f"demo.workers must be 'process' or 'thread', not {d['workers']!r}")
    if min(d["prompts"], d["rollout_chunk"], d["rollout_workers"], d["tp_size"], d["reward_batch_size"]) < 1:
        problems.append("demo sizes must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    return {"demo": d, "loader": loader, "rows": rows, "placement": conf.get("placement", "local"),
            "partition": f"{loader['partition_id']}-{uuid.uuid4().hex[:8]}"}  # fmt: skip


def _drive(plan: dict[str, Any], client: Any) -> tuple[dict[str, Any], dict[str, str], float]:
    """Start every stage, follow their events with progress bars; (results, failures, seconds)."""
    from tqdm import tqdm

    d, pid, rows = plan["demo"], plan["partition"], plan["rows"]
    dp = plan["loader"]["dp_size"]
    stages = [("rollout", "rollout", 0), ("reward", "reward", 0)]
    stages += [(f"train-dp{r}", "train", r) for r in range(dp)]
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    runner = _Runner(plan, events)
    totals = {"rollout": rows, "reward": rows, **{f"train-dp{r}": rows // dp for r in range(dp)}}
    bars = {name: tqdm(total=totals[name], desc=f"{name:<10}", unit="row", position=i, disable=not d["progress"],
                       dynamic_ncols=True) for i, (name, _, _) in enumerate(stages)}  # fmt: skip
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    ready: dict[str, float] = {}
    started = time.time()
    deadline = time.monotonic() + d["timeout"]
    try:
        for name, kind, rank in stages:
            runner.start(name, kind, rank)
        while len(results) + len(failures) < len(stages):
            try:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                for name, _, _ in stages:
                    if name not in results and name not in failures:
                        failures[name] = f"still running after demo.timeout={d['timeout']}s"
                client.abort(pid, "demo timed out")
                break
            name, kind = event["stage"], event["kind"]
            if kind == "progress":
                bars[name].update(event["rows"])
            elif kind == "ready":
                ready[name] = event["time"] - started
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


def _checks(plan: dict[str, Any], client: Any, results: dict[str, Any], failures: dict[str, str]) -> list[tuple[str, bool, str]]:
    pid, rows, dp = plan["partition"], plan["rows"], plan["loader"]["dp_size"]
    out: list[tuple[str, bool, str]] = [("every stage finished", not failures, "; ".join(f"{k}: {v}" for k, v in failures.items()) or "ok")]
    produced = sorted(results.get("rollout", {}).get("ids", []))
    out.append(("rollout put every row once", produced == sorted(set(produced)) and len(produced) == rows, f"{len(produced)}/{rows} rows"))
    trainers = [results.get(f"train-dp{r}") for r in range(dp)]
    for task, ids in (("reward", results.get("reward", {}).get("ids")),
                      ("actor_update", None if None in trainers else [i for t in trainers for i in t["ids"]])):  # fmt: skip
        same = ids is not None and sorted(ids) == produced and len(produced) == rows
        status_ids, consumed = client.get_consumption_status(plan["loader"]["task_name"] if task != "reward" else task, pid)
        marked = sorted(status_ids.tolist()) == produced and bool(consumed.all())
        detail = f"{len(ids) if ids is not None else 0} rows collected, {int(consumed.sum())}/{len(consumed)} marked consumed"
        out.append((f"{task}: every row consumed exactly once", same and marked, detail))
    if None not in trainers:
        batches = [t["batches"] for t in trainers]
        out.append(("dp ranks got the same number of batches", len(set(batches)) == 1, f"batches per rank {batches}"))
        out.append(("tp peers saw identical micro-batches", all(t["tp_identical"] for t in trainers), f"tp_size={plan['demo']['tp_size']}"))
        out.append(("batches hold whole GRPO groups", all(t["whole_groups"] for t in trainers), f"n={plan['demo']['n_samples']}"))
        bad = sum(t["mismatched_rewards"] for t in trainers)
        out.append(("rewards aligned with their rows", bad == 0, f"{bad} mismatched"))
        out.append(("losses finite", all(t["losses_finite"] for t in trainers), ", ".join(f"{t['mean_loss']:.4f}" for t in trainers)))
    return out  # fmt: skip


def _summary(plan: dict[str, Any], results: dict[str, Any], checks: list[tuple[str, bool, str]], wall: float) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GRPO pipeline: {plan['demo']['prompts']} prompts x {plan['demo']['n_samples']} responses, "
                        f"dp={plan['loader']['dp_size']} x tp={plan['demo']['tp_size']}, {plan['placement']}")  # fmt: skip
    for col in ("stage", "rows", "MiB", "active s", "rows/s", "MiB/s", "wait"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    stages = {}
    for name, r in results.items():
        if name.startswith("_"):
            continue
        mib, secs = r["bytes"] / 2**20, max(r["seconds"], 1e-9)
        stages[name] = {k: r[k] for k in ("rows", "bytes", "seconds", "wait_fraction")}
        table.add_row(name, str(r["rows"]), f"{mib:.2f}", f"{secs:.2f}", f"{r['rows'] / secs:,.0f}", f"{mib / secs:.1f}", f"{r['wait_fraction']:.0%}")
    console = Console()
    console.print(table)
    checks_table = Table(title="checks")
    for col in ("", "check", "detail"):
        checks_table.add_column(col)
    for name, ok, detail in checks:
        checks_table.add_row("[green]PASS" if ok else "[red]FAIL", name, detail)
    console.print(checks_table)
    ready = results.get("_ready", {})
    console.print(f"wall time {wall:.1f} s (stages ready after {max(ready.values(), default=0):.1f} s)")
    return {"wall_s": wall, "ready_s": ready, "stages": stages, "ok": all(ok for _, ok, _ in checks),
            "checks": [{"name": n, "ok": ok, "detail": det} for n, ok, det in checks]}  # fmt: skip


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
    ray_started = False
    if plan["placement"] == "ray" and not os.environ.get(tq.api.ENV_ADDRESS):
        import ray

        if not ray.is_initialized():  # a private local instance, never some cluster left running
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            ray_started = True
    tq.init(cluster_config(cfg))
    try:
        client = tq.get_client()
        results, failures, wall = _drive(plan, client)
        checks = _checks(plan, client, results, failures)
        report = _summary(plan, results, checks, wall)
        client.clear_partition(plan["partition"])
    finally:
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
    from tq_loader.hydra_conf import compose

    return run_pipeline(compose(list(overrides)))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
