"""A verl-style single-controller GRPO loop on the KV API.

In the single-controller style one driver program owns the training loop and calls *worker
groups* (rollout, reward, actor) step by step; the workers exchange data through tq_loader
instead of through the driver. Every step:

1. the driver puts the step's prompts into a fresh partition ``step_<k>``, one key per
   (prompt, sample) pair -- GRPO samples ``n`` responses per prompt -- tagged ``status=prompt``;
2. the rollout workers read prompts by key, generate responses and their log-probabilities,
   write them back to the same keys and tag them ``status=rolled_out``;
3. the reward worker scores the responses (``status=rewarded``);
4. the driver computes group-relative advantages (each response's reward minus its prompt
   group's mean, divided by the group's std) from the ``reward`` column alone (``status=ready``);
5. the actor update reads the columns it needs, takes a policy-gradient step;
6. the driver checks every key's status with ``kv_list`` and drops the step with ``kv_clear``.

The policy is deliberately tiny (a table of next-token logits over an 8-token vocabulary) and
the reward counts how often the response says the "right" token, so the mean reward visibly
rises over the steps. Workers are plain functions here; in verl they are Ray actor groups that
call ``tq.init()`` (attaching to the same cluster) and the same ``kv_*`` functions.

    python examples/single_controller.py --steps 5 --prompts 8 --n 4

Exits non-zero if a step leaves a key with the wrong status or rows behind after ``kv_clear``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tensordict import TensorDict

import tq_loader as tq

VOCAB, PROMPT_LEN, RESPONSE_LEN, TARGET = 8, 4, 6, 3


class Policy(torch.nn.Module):
    """Next-token logits that ignore the context: small enough to learn in a few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(VOCAB))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.logits.detach(), 0)
        tokens = torch.multinomial(probs, n * RESPONSE_LEN, replacement=True, generator=generator)
        tokens = tokens.view(n, RESPONSE_LEN)
        return tokens, self.log_prob(tokens).detach()

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits, 0)[tokens].sum(1)


# ------------------------------------------------------------------------------------ worker groups
def rollout_worker(policy: Policy, keys: list[str], partition: str, generator: torch.Generator) -> None:
    tq.kv_batch_get(keys, partition, select_fields=["prompts"])  # what a real model conditions on
    responses, log_prob = policy.sample(len(keys), generator)
    tq.kv_batch_put(
        keys, partition,
        fields=TensorDict({"responses": responses, "old_log_prob": log_prob}, batch_size=[len(keys)]),
        tags=[{"status": "rolled_out"}] * len(keys),
    )  # fmt: skip


def reward_worker(keys: list[str], partition: str) -> None:
    data = tq.kv_batch_get(keys, partition, select_fields=["responses"])
    reward = (data["responses"] == TARGET).float().mean(1)
    tq.kv_batch_put(
        keys, partition, fields=TensorDict({"reward": reward}, batch_size=[len(keys)]),
        tags=[{"status": "rewarded"}] * len(keys),
    )  # fmt: skip


def actor_update(policy: Policy, optimizer: torch.optim.Optimizer, keys: list[str], partition: str) -> float:
    data = tq.kv_batch_get(keys, partition, select_fields=["responses", "old_log_prob", "advantage"])
    ratio = torch.exp(policy.log_prob(data["responses"]) - data["old_log_prob"])
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.min(ratio * data["advantage"], clipped * data["advantage"]).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------ the driver
def grpo_advantages(keys: list[str], partition: str, n: int) -> None:
    reward = tq.kv_batch_get(keys, partition, select_fields=["reward"])["reward"].view(-1, n)
    advantage = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)
    tq.kv_batch_put(
        keys, partition, fields=TensorDict({"advantage": advantage.flatten()}, batch_size=[len(keys)]),
        tags=[{"status": "ready"}] * len(keys),
    )  # fmt: skip


def run(steps: int, prompts: int, n: int, rollout_workers: int, seed: int = 0) -> list[float]:
    """The training loop; returns the mean reward of every step."""
    generator = torch.Generator().manual_seed(seed)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.3)
    rewards: list[float] = []
    for step in range(steps):
        partition = f"step_{step}"
        keys = [f"p{p}_s{s}" for p in range(prompts) for s in range(n)]  # a group = n adjacent keys
        prompt_ids = torch.randint(0, VOCAB, (prompts, PROMPT_LEN), generator=generator)
        tq.kv_batch_put(
            keys, partition,
            fields=TensorDict({"prompts": prompt_ids.repeat_interleave(n, 0)}, batch_size=[len(keys)]),
            tags=[{"status": "prompt", "step": step}] * len(keys),
        )  # fmt: skip

        shards = [keys[w::rollout_workers] for w in range(rollout_workers)]  # the worker group's split
        for shard in shards:
            rollout_worker(policy, shard, partition, generator)
        reward_worker(keys, partition)
        grpo_advantages(keys, partition, n)
        loss = actor_update(policy, optimizer, keys, partition)

        # Status check through tags alone (no tensors move): every key must be "ready".
        tags = tq.kv_list(partition)[partition]
        wrong = {k: t.get("status") for k, t in tags.items() if t.get("status") != "ready"}
        if len(tags) != len(keys) or wrong:
            raise RuntimeError(f"step {step}: keys not ready: {wrong}, {len(tags)} of {len(keys)} listed")
        mean_reward = float(tq.kv_batch_get(keys, partition, select_fields=["reward"])["reward"].mean())
        rewards.append(mean_reward)
        tq.kv_clear(keys, partition)  # the step's rows are gone; the next step starts clean
        left = tq.kv_list(partition).get(partition, {})
        if left:
            raise RuntimeError(f"step {step}: kv_clear left {len(left)} keys behind")
        print(f"step {step}: {len(keys)} samples, mean reward {mean_reward:.3f}, loss {loss:+.4f}")
    return rewards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="responses per prompt (the GRPO group size)")
    parser.add_argument("--rollout-workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tq.init()
    try:
        rewards = run(args.steps, args.prompts, args.n, args.rollout_workers)
    finally:
        tq.close()
    print(f"mean reward: first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
