"""The same-host shared-memory data path against a real ``tq-loader serve`` in another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader import shm

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from reliability_wire import child_env, serve

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs Linux memfd and /proc")


def _unit_shm(stats: dict) -> list[dict]:
    return [u["shared_memory"] for u in stats["storage"]["units"].values()]


def _batch(n: int = 512, width: int = 1024, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 64, (n,), generator=g)
    return TensorDict(
        {
            "x": torch.randn(n, width, generator=g),
            "ids": torch.arange(n, dtype=torch.int64),
            "tokens": torch.nested.nested_tensor_from_jagged(
                torch.randn(int(lens.sum()), generator=g),
                torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
            ),
            "text": [f"row {i}" for i in range(n)],
        },
        batch_size=[n],
    )


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    tq.close()
    with serve("storage.num_units=2") as server:
        tq.connect(server.address)
        try:
            yield server.address
        finally:
            tq.close()


def test_big_batches_go_through_shared_memory_and_come_back_exactly(served: str) -> None:
    client = tq.get_client()
    td = _batch()
    meta = client.put(td, partition_id="shm")
    got = client.get_data(meta)
    assert torch.equal(got["x"], td["x"]) and torch.equal(got["ids"], td["ids"])
    assert all(torch.equal(a, b) for a, b in zip(got["tokens"].unbind(), td["tokens"].unbind(), strict=True))
    assert got["text"] == td["text"] if isinstance(got["text"], list) else got["text"].tolist() == td["text"]
    maps = _unit_shm(client.statistics())
    assert all(m["segments"] >= 1 for m in maps)  # both units mapped this client's arena
    got["x"].mul_(0)  # the result is the caller's own memory: writing it changes nothing stored
    assert torch.equal(client.get_data(meta)["x"], td["x"])


def test_results_stay_valid_while_the_arena_is_reused(served: str) -> None:
    client = tq.get_client()
    first = client.put(_batch(seed=1), partition_id="reuse")
    kept = client.get_data(first)["x"].clone(), client.get_data(first)["x"]
    for seed in range(2, 6):  # later gets reuse arena regions -- never one a live tensor views
        meta = client.put(_batch(seed=seed), partition_id="reuse")
        assert torch.equal(client.get_data(meta)["x"], _batch(seed=seed)["x"])
    assert torch.equal(kept[0], kept[1])


def test_shared_memory_off_uses_the_socket() -> None:
    tq.close()
    with serve("storage.num_units=1", "storage.shared_memory=false") as server:
        tq.connect(server.address)
        try:
            client = tq.get_client()
            meta = client.put(_batch(), partition_id="tcp")
            assert torch.equal(client.get_data(meta)["x"], _batch()["x"])
            assert all(m["segments"] == 0 for m in _unit_shm(client.statistics()))
        finally:
            tq.close()


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    import tq_loader as tq
    from tensordict import TensorDict
    tq.connect(sys.argv[1])
    c = tq.get_client()
    m = c.put(TensorDict({"x": torch.randn(512, 1024)}, batch_size=[512]), partition_id="killed")
    c.get_data(m)
    print("READY", flush=True)
    sys.stdin.readline()
    """
)


def test_a_sigkilled_client_leaves_no_segment_behind(served: str, tmp_path: Path) -> None:
    tq.close()
    tq.connect(served)
    tq.get_client().put(_batch(seed=8), partition_id="after")  # this client's arena is mapped too
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, served], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=child_env(),
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        client = tq.get_client()
        mapped = sum(m["segments"] for m in _unit_shm(client.statistics()))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    # the next client that offers memory makes each unit drop the dead client's mappings
    client = tq.get_client()
    client.put(_batch(seed=9), partition_id="after")
    after = sum(m["segments"] for m in _unit_shm(client.statistics()))
    assert after < mapped
    # memfd segments have no name: nothing is left in /dev/shm to clean up
    now = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert now - before == set()
