"""Tutorial 07 -- a multi-process pipeline around ``tq-loader serve``.

So far the cluster lived inside the process that called ``tq.init()``. In a real pipeline the
data plane should outlive any one stage, so it runs in its own process::

    python -m tq_loader serve storage.num_units=2     # or: tq-loader serve ...
    TQ_LOADER_ADDRESS=tcp://127.0.0.1:PORT            # <- its first line on stdout

Every other process attaches with a plain ``tq.init()``: it finds ``TQ_LOADER_ADDRESS`` (and
``TQ_LOADER_AUTH_TOKEN`` when the cluster needs a token) in its environment. (``tq.connect(address)``
attaches explicitly.) This script plays all the roles:

* the driver starts ``serve`` as a subprocess, reads the address, starts the other processes
  with it in their environment, seals the partition when the producers are done and finally
  stops the server by its pid;
* two *rollout* processes put rows (prompts and responses);
* one *reward* process reads rows as they become ready and writes a ``reward`` column for them;
* one *trainer* process iterates a StreamingDataLoader over rows that have a reward, until the
  sealed stream is drained.

Run: ``python tutorial/07_multiprocess.py``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
from tensordict import TensorDict

import tq_loader as tq

PARTITION, PRODUCERS, ROWS_EACH, CHUNK = "rollouts", 2, 24, 8
TOTAL = PRODUCERS * ROWS_EACH


# ------------------------------------------------------------------------------------ the roles
def rollout(worker: int) -> None:
    tq.init()  # attaches to TQ_LOADER_ADDRESS
    client = tq.get_client()
    for _start in range(0, ROWS_EACH, CHUNK):
        prompt_ids = torch.full((CHUNK, 4), worker)
        responses = torch.randint(0, 100, (CHUNK, 6))
        client.put(
            TensorDict({"prompts": prompt_ids, "responses": responses}, batch_size=[CHUNK]),
            partition_id=PARTITION,
        )
    tq.close()  # detaches only: this process does not own the services


def reward() -> None:
    tq.init()
    client = tq.get_client()
    done = 0
    while done < TOTAL:  # the driver seals only after the rewards are in, so count the rows
        meta = client.get_meta(["responses"], CHUNK, PARTITION, task_name="reward", timeout=60)
        data = client.get_data(meta)
        scores = (data["responses"] % 2 == 0).float().mean(dim=1)  # a toy reward model
        client.put(TensorDict({"reward": scores}, batch_size=[meta.size]), metadata=meta)
        done += meta.size
    tq.close()


def trainer() -> None:
    tq.init()
    dataset = tq.StreamingDataset(
        None, 8, 4, ["prompts", "responses", "reward"], PARTITION, "train", 0, dp_size=1, timeout=60
    )
    rows = 0
    for _td, meta in tq.StreamingDataLoader(dataset, num_workers=2):
        rows += meta.size
    print(f"TRAINED {rows}", flush=True)
    tq.close()


# ------------------------------------------------------------------------------------ the driver
def spawn(role: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, role, *args], env=env, stdout=subprocess.PIPE, text=True
    )


def main() -> None:
    # 1. The server. Its first stdout line is the address (ephemeral ports: it picks free ones).
    #    The auth token is optional on loopback; it is how processes prove they belong, and it is
    #    required as soon as the server listens beyond loopback (host=0.0.0.0 / --host).
    token = "tutorial-secret"
    server = subprocess.Popen(
        [sys.executable, "-m", "tq_loader", "serve", "storage.num_units=2", f"auth_token={token}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        if not line.startswith("TQ_LOADER_ADDRESS="):
            raise SystemExit(f"serve did not start (exit code {server.poll()})")
        address = line.strip().split("=", 1)[1]
        print("server at", address)
        env = {**os.environ, "TQ_LOADER_ADDRESS": address, "TQ_LOADER_AUTH_TOKEN": token}

        # 2. The stages, each its own process.
        producers = [spawn("rollout", str(w), env=env) for w in range(PRODUCERS)]
        rewarder = spawn("reward", env=env)
        training = spawn("trainer", env=env)
        for proc in producers:
            assert proc.wait(timeout=120) == 0, "a rollout process failed"
        assert rewarder.wait(timeout=120) == 0, "the reward process failed"

        # 3. The driver attaches too and seals: no more rows, the trainer's stream can end.
        tq.connect(address, auth_token=token)
        client = tq.get_client()
        print("rows with a reward:", int(client.get_production_status(["reward"], PARTITION)[1].sum()))
        client.seal(PARTITION)
        out, _ = training.communicate(timeout=120)
        assert training.returncode == 0, "the trainer failed"
        trained = int(out.split("TRAINED", 1)[1])
        print(f"trainer consumed {trained} of {TOTAL} rows")
        assert trained == TOTAL
        tq.close()
    finally:
        # 4. Stop the server by its pid (SIGTERM: it shuts its services down and exits).
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        server.stdout.close()
    print("done")


if __name__ == "__main__":
    roles = {"rollout": lambda: rollout(int(sys.argv[2])), "reward": reward, "trainer": trainer}
    if len(sys.argv) > 1:
        roles[sys.argv[1]]()
    else:
        main()
