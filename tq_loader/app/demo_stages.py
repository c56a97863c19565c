"""The stages of the GRPO demo (see :mod:`tq_loader.app.demo`): rollout, reward and trainer ranks.

Each stage is a function ``stage(plan, emit, rank) -> result`` that runs the same way on a thread of
the driver or in its own process (``python -m tq_loader.app.demo_stages <stage> <rank>``, the plan as
JSON on stdin, events as JSON lines on stdout: no pickle). Every stage attaches to the cluster of
the driver through ``TQ_LOADER_ADDRESS`` and reports plain data: the global indexes it handled,
rows, bytes, active seconds and the share of them it waited on the data plane.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

__all__ = [
    "PREFIX",
    "STAGES",
    "grpo_loss",
    "reward_fn",
    "reward_stage",
    "rollout_stage",
    "tiny_policy",
    "trainer_stage",
]

# torch logs a deprecation notice from inside nested_tensor_from_jagged once per process; the demo's
# own output stays readable without it (it is torch's internal call, nothing the demo can change)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

_INIT_LOCK = threading.Lock()
PREFIX = "@@tq-demo "  # marks the event lines a stage process prints on stdout
Emit = Callable[..., None]


def tiny_policy(vocab_size: int = 256, hidden: int = 32) -> torch.nn.Module:
    """Next-token policy: embedding -> tanh -> vocabulary logits (enough to take real steps)."""
    return torch.nn.Sequential(
        torch.nn.Embedding(vocab_size, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, vocab_size)
    )


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


def _threads(fn: Callable[[int], Any], n: int) -> list[Any]:
    """``fn(0..n-1)`` on ``n`` concurrent threads; results in order; re-raises the first failure."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


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
    return TensorDict(
        {"prompts": prompts, "responses": responses, "prompt_id": prompt_id}, batch_size=[k * n]
    )


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
            ids += meta.global_index_array.tolist()
            nbytes += _nbytes(td)
            emit("progress", rows=len(meta))
        return ids, nbytes, wait

    parts = _threads(worker, workers)
    client.seal(pid)  # no new rows: consumers drain and their streams end
    seconds = time.perf_counter() - started
    wait = sum(p[2] for p in parts) / workers
    return {
        "ids": [i for p in parts for i in p[0]],
        "rows": sum(len(p[0]) for p in parts),
        "bytes": sum(p[1] for p in parts),
        "seconds": seconds,
        "wait_fraction": wait / seconds,
    }


def reward_stage(plan: dict[str, Any], emit: Emit, rank: int = 0) -> dict[str, Any]:
    import tq_loader as tq
    from tq_loader.hydra_conf import build_loader

    d, pid = plan["demo"], plan["partition"]
    tq.get_client()
    loader = build_loader(
        batch_size=d["reward_batch_size"],
        data_fields=["prompts", "responses"],
        partition_id=pid,
        task_name="reward",
        drop_last=False,
        num_workers=d["reward_fetch_workers"],
        collate="pad",
    )
    writer = loader.writer(max_in_flight=4)
    emit("ready")
    ids: list[int] = []
    nbytes, write_wait, started = 0, 0.0, time.perf_counter()
    for td, meta in loader:
        rewards = reward_fn(td["prompts"], td["responses"], td["responses_mask"])
        t = time.perf_counter()
        writer.write(TensorDict({"rewards": rewards}, batch_size=[meta.size]), meta)
        write_wait += time.perf_counter() - t
        ids += meta.global_index_array.tolist()
        nbytes += _nbytes(td) + rewards.numel() * rewards.element_size()
        emit("progress", rows=meta.size)
    t = time.perf_counter()
    writer.flush()
    write_wait += time.perf_counter() - t
    seconds = time.perf_counter() - started
    wait = loader.statistics()["wait_s"] + write_wait
    return {
        "ids": ids,
        "rows": len(ids),
        "bytes": nbytes,
        "seconds": seconds,
        "wait_fraction": wait / seconds,
    }


def trainer_stage(plan: dict[str, Any], emit: Emit, rank: int = 0) -> dict[str, Any]:
    """Data-parallel rank ``rank``: ``tp_size`` threads, one loader and one model replica each."""
    from hydra.utils import instantiate

    import tq_loader as tq

    d, pid = plan["demo"], plan["partition"]
    tq.get_client()
    barrier = threading.Barrier(d["tp_size"])
    started = [0.0]

    def tp_rank(t: int) -> dict[str, Any]:
        try:
            with _INIT_LOCK:  # the global RNG: seed and build together, so every replica starts equal
                torch.manual_seed(d["seed"])
                model = instantiate(d["model"])
            opt = torch.optim.SGD(model.parameters(), lr=d["lr"])
            loader = instantiate(plan["loader"], dp_rank=rank, partition_id=pid)
        except BaseException:
            barrier.abort()  # the peers must not wait for a rank that will never come
            raise
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
            record.append((batch, meta.global_index_array.tolist(), _digest(td)))
            groups.setdefault(batch, []).extend(td["prompt_id"].tolist())
            losses.append(loss.item())
            nbytes += _nbytes(td)
            if t == 0:
                emit("progress", rows=meta.size)
        stats = loader.statistics()
        return {
            "record": record,
            "groups": groups,
            "losses": losses,
            "mismatched": mismatched,
            "bytes": nbytes,
            "wait_s": stats["wait_s"],
        }

    peers = _threads(tp_rank, d["tp_size"])
    seconds = time.perf_counter() - started[0]
    lead = peers[0]
    n = d["n_samples"]
    whole = all(np.all(np.unique(g, return_counts=True)[1] == n) for g in lead["groups"].values())
    return {
        "ids": [i for _, ids, _ in lead["record"] for i in ids],
        "rows": sum(len(r[1]) for r in lead["record"]),
        "bytes": lead["bytes"],
        "seconds": seconds,
        "wait_fraction": lead["wait_s"] / seconds,
        "batches": len(lead["groups"]),
        "micro_batches": len(lead["record"]),
        "tp_identical": all(p["record"] == lead["record"] for p in peers),
        "tp_same_losses": all(p["losses"] == lead["losses"] for p in peers),
        "whole_groups": bool(whole),
        "mismatched_rewards": sum(p["mismatched"] for p in peers),
        "losses_finite": all(math.isfinite(x) for p in peers for x in p["losses"]),
        "mean_loss": float(np.mean(lead["losses"])) if lead["losses"] else float("nan"),
    }


STAGES: dict[str, Callable[[dict[str, Any], Emit, int], dict[str, Any]]] = {
    "rollout": rollout_stage,
    "reward": reward_stage,
    "train": trainer_stage,
}


def _child(argv: Sequence[str]) -> int:
    """A stage process: ``python -m tq_loader.app.demo_stages <stage> <rank>``, the plan as JSON on stdin."""
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


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
