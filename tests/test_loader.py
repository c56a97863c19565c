"""The streaming loader against one embedded cluster: sharding, rank alignment, seal/drain,
waiting/timeout/abort, exactly-once resume in one process, the Writer sink, pad collate and
TransferQueue's positional signature. The crash-resume test with real processes lives in
``test_loader_resume.py``.

Rows carry their own id in field ``x`` (``x == insertion ordinal``), so every check compares
the ids a consumer received with the ids that were put.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import in_thread, wait_for_waiters
from tensordict import TensorDict
from torch.utils.data import DataLoader
from torchdata.nodes import Mapper

import tq_loader as tq
from tq_loader.loader import chunk_batch_fn, passthrough
from tq_loader.loader.waiting import WaitLog, WaitTarget, describe_wait

JOIN = 30.0  # seconds any background consumer may take before the test fails (never a hang)


@pytest.fixture(scope="module")
def client(local_client: Any) -> Any:
    return local_client


# ----------------------------------------------------------------------------- helpers
def put_rows(client: Any, pid: str, start: int, n: int, **extra: Callable[[torch.Tensor], Any]) -> None:
    """Insert ``n`` rows with ``x = start .. start+n-1`` (plus fields computed from ``x``)."""
    x = torch.arange(start, start + n)
    fields: dict[str, Any] = {"x": x, **{name: fn(x) for name, fn in extra.items()}}
    client.put(TensorDict(fields, batch_size=[n]), partition_id=pid)


def ids(td: TensorDict) -> list[int]:
    return [int(v) for v in td["x"].reshape(-1).tolist()]


def drain(loader: Any, limit: int | None = None) -> list[list[int]]:
    """The ids of each micro-batch, in delivery order (at most ``limit`` micro-batches)."""
    out: list[list[int]] = []
    for td, _meta in loader:
        out.append(ids(td))
        if limit is not None and len(out) >= limit:
            break
    return out


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def loader(pid: str, batch_size: int = 4, micro: int | None = None, *, rank: int = 0, task: str = "t",
           workers: int = 2, prefetch: int = 2, **kw: Any) -> tq.StreamingDataLoader:  # fmt: skip
    ds = tq.StreamingDataset(None, batch_size, micro, ["x"], pid, task, rank, **kw)
    return tq.StreamingDataLoader(ds, num_workers=workers, prefetch_factor=prefetch)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOIN) -> None:
    """Test-side wait on a condition of the system under test, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


def consumed_rows(client: Any, pid: str, task: str) -> int:
    _, consumed = client.get_consumption_status(task, pid)
    return int(consumed.sum())


# ----------------------------------------------------------------------------- plain DataLoader workers
@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_plain_dataloader_workers_shard_batches(client: Any, pid: str, context: str) -> None:
    put_rows(client, pid, 0, 48)
    client.seal(pid)
    assert os.environ["TQ_LOADER_ADDRESS"] == client.controller_address  # set by tq.init for the workers
    ds = tq.StreamingDataset(None, 4, 2, ["x"], pid, "t", 0)  # config=None: attach via TQ_LOADER_ADDRESS
    dl = DataLoader(
        ds, batch_size=None, num_workers=2, multiprocessing_context=context, collate_fn=passthrough
    )
    seen_batches: dict[int, list[int]] = {}
    for td, meta in dl:
        seen_batches.setdefault(meta.extra_info["batch_index"], []).extend(ids(td))
        assert meta.size == len(td) == 2  # data and meta cut at the same rows
    rows = flat(list(seen_batches.values()))
    assert sorted(rows) == list(range(48)), "every row delivered exactly once"
    assert sorted(seen_batches) == list(range(12)), "each batch index delivered by exactly one worker"
    assert all(len(b) == 4 for b in seen_batches.values())
    assert consumed_rows(client, pid, "t") == 48


# ----------------------------------------------------------------------------- rank alignment
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sampler", ["sequential", "grpo_group_n"])
def test_tp_peers_identical_dp_ranks_disjoint(client: Any, pid: str, sampler: str) -> None:
    """2 dp ranks x 2 TP peers start before any data exists; the producer streams, then seals."""
    cfg = {"n_samples_per_prompt": 4} if sampler == "grpo_group_n" else {}
    peers = {
        (dp, tp): in_thread(
            drain, loader(pid, 8, 4, rank=dp, dp_size=2, sampler=sampler, sampling_config=cfg)
        )
        for dp in range(2)
        for tp in range(2)
    }
    wait_for_waiters(client, 1)
    for start in range(0, 96, 16):
        put_rows(client, pid, start, 16)
    client.seal(pid)
    got = {k: f.result(JOIN) for k, f in peers.items()}
    for dp in range(2):
        assert got[(dp, 0)] == got[(dp, 1)], f"TP peers of dp_rank {dp} saw different micro-batches"
    rank0, rank1 = flat(got[(0, 0)]), flat(got[(1, 0)])
    assert not set(rank0) & set(rank1), "dp ranks must get disjoint rows"
    assert sorted(rank0 + rank1) == list(range(96))
    assert len(got[(0, 0)]) == len(got[(1, 0)]) == 12
    if sampler == "grpo_group_n":  # each micro-batch of 4 is one whole prompt group
        assert all(len({i // 4 for i in mb}) == 1 for mb in got[(0, 0)] + got[(1, 0)])


# ----------------------------------------------------------------------------- seal / drain
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("n_rows", "drop_last", "sizes0", "sizes1", "dropped"),
    [
        (30, True, [4, 4, 4], [4, 4, 4], 6),  # 3 full rounds of 2x4; the tail of 6 is dropped
        (30, False, [4, 4, 4, 3], [4, 4, 4, 3], 0),  # tail of 6 split 3 + 3
        (31, False, [4, 4, 4, 4], [4, 4, 4, 3], 0),  # tail of 7 split 4 + 3
        (25, False, [4, 4, 4], [4, 4, 4], 1),  # tail of 1 row < 2 ranks: dropped
    ],
)
def test_seal_drain_uneven_ranks(
    client: Any, pid: str, n_rows: int, drop_last: bool, sizes0: list[int], sizes1: list[int], dropped: int
) -> None:
    """Rank 0 consumes the whole stream while it is produced; rank 1 starts only afterwards."""
    fast = loader(pid, 4, 4, rank=0, dp_size=2, drop_last=drop_last)
    first = in_thread(drain, fast)
    wait_for_waiters(client, 1)
    for start in range(0, n_rows, 10):
        put_rows(client, pid, start, min(10, n_rows - start))
    client.seal(pid)
    rank0 = first.result(JOIN)
    late = loader(pid, 4, 4, rank=1, dp_size=2, drop_last=drop_last)
    rank1 = in_thread(drain, late).result(JOIN)
    assert [len(b) for b in rank0] == sizes0
    assert [len(b) for b in rank1] == sizes1, "every dp rank gets the same number of batches"
    rows = flat(rank0) + flat(rank1)
    assert len(rows) == len(set(rows)) == n_rows - dropped
    assert sorted(rows) == list(range(n_rows - dropped)), "sequential: the dropped rows are the tail"
    for stats in (fast.statistics(), late.statistics()):
        assert stats["end_of_stream"] is True
        assert stats["dropped_rows"] == dropped
        assert stats["batches"] == len(sizes0)


@pytest.mark.timeout(60)
def test_should_check_consumption_status_replays_rounds_for_late_peer(client: Any, pid: str) -> None:
    """TransferQueue's finite mode (no seal): a peer reading after everything was consumed still
    gets the recorded rounds, then stops instead of waiting for rows that never come."""
    put_rows(client, pid, 0, 24)
    first = drain(loader(pid, 4, 2, should_check_consumption_status=True))
    second = drain(loader(pid, 4, 2, should_check_consumption_status=True))
    assert flat(first) == list(range(24))
    assert second == first


# ----------------------------------------------------------------------------- waiting, timeout, abort
@pytest.mark.timeout(60)
def test_iterator_waits_server_side_until_rows_arrive(client: Any, pid: str) -> None:
    dl = loader(pid, 4, 4)
    got: list[list[int]] = []
    done = in_thread(lambda: [got.append(ids(td)) for td, _ in dl])
    wait_for_waiters(client, 1)
    assert got == []
    put_rows(client, pid, 0, 4)
    wait_until(lambda: len(got) == 1, "the first batch was delivered")
    put_rows(client, pid, 4, 6)  # one more full batch and a tail of 2 (dropped)
    client.seal(pid)
    done.result(JOIN)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dl.statistics()["dropped_rows"] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_timeout_bounds_the_wait(client: Any, pid: str, workers: int) -> None:
    put_rows(client, pid, 0, 4)
    dl = loader(pid, 4, 2, workers=workers, timeout=0.3)
    got: list[list[int]] = []
    started = time.monotonic()
    with pytest.raises(tq.TQTimeoutError):
        for td, _ in dl:
            got.append(ids(td))
    assert got == [[0, 1], [2, 3]], "batches before the timeout are delivered"
    assert time.monotonic() - started < 10
    # the plain dataset path raises the same typed error
    ds = tq.StreamingDataset(None, 4, 4, ["x"], pid, "other", 0, timeout=0.2)
    it = iter(ds)
    assert ids(next(it)[0]) == [0, 1, 2, 3]
    with pytest.raises(tq.TQTimeoutError):
        next(it)


@pytest.mark.timeout(60)
def test_abort_stops_a_waiting_loader_with_closed_error(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 4)
    dl = loader(pid, 4, 4)
    got: list[list[int]] = []

    def consume() -> None:
        for td, _ in dl:
            got.append(ids(td))

    done = in_thread(consume)
    wait_until(lambda: len(got) == 1, "the first batch was delivered")
    wait_for_waiters(client, 1)
    client.abort(pid, "producer crashed")
    with pytest.raises(tq.ClosedError, match="producer crashed"):
        done.result(JOIN)
    assert got == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------- resume in one process
@pytest.mark.timeout(60)
def test_early_break_and_reiter_replay_prefetched_batches(client: Any, pid: str) -> None:
    ref_pid = f"{pid}-ref"
    for p in (pid, ref_pid):
        put_rows(client, p, 0, 40)
        client.seal(p)
    reference = drain(loader(ref_pid, 4, 2))
    dl = loader(pid, 4, 2)
    got: list[list[int]] = []
    for td, _ in dl:
        got.append(ids(td))
        if len(got) == 3:  # mid-batch: batch 1, micro-batch 0
            wait_until(lambda: consumed_rows(client, pid, "t") > 8, "the loader fetched ahead")
            break
    assert consumed_rows(client, pid, "t") > len(flat(got)), "batches were prefetched but not delivered"
    assert dl.state_dict()["next_batch_index"] == 1 and dl.state_dict()["skip_micro_batches"] == 1
    got += drain(dl, limit=5)  # re-iter, break again
    got += drain(dl)  # and finish
    assert got == reference
    assert sorted(flat(got)) == list(range(40))


def graph_threads() -> int:
    names = ("_populate_queue", "_apply_udf", "_sort_worker")
    return sum(any(n in t.name for n in names) for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_break_while_waiting_cancels_fetch_ahead_and_resumes(client: Any, pid: str) -> None:
    """Breaking out of an unsealed stream stops the graph's threads at once (the metadata request
    waiting server-side is cancelled); the next iter() continues exactly after the last delivery."""
    baseline = graph_threads()
    put_rows(client, pid, 0, 4)
    dl = loader(pid, 4, 2)
    it = iter(dl)
    assert [ids(next(it)[0]) for _ in range(2)] == [[0, 1], [2, 3]]  # the planner now waits for batch 1
    wait_for_waiters(client, 1)
    assert graph_threads() > baseline
    started = time.monotonic()
    it.close()  # what leaving a for loop with break does
    assert graph_threads() == baseline, "the graph's threads outlived the break"
    assert time.monotonic() - started < 2.0
    put_rows(client, pid, 4, 8)
    client.seal(pid)
    assert drain(dl) == [[4, 5], [6, 7], [8, 9], [10, 11]]
    wait_until(lambda: int(client.statistics()["controller"]["waiting_requests"]) == 0, "no request waits")


@pytest.mark.timeout(60)
def test_user_nodes_are_inserted_into_the_graph(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 8)
    client.seal(pid)

    def add_square(node: Any) -> Any:
        return Mapper(node, lambda item: (item[0].set("sq", item[0]["x"] ** 2), item[1]))

    ds = tq.StreamingDataset(None, 4, 2, ["x"], pid, "t", 0)
    dl = tq.StreamingDataLoader(ds, num_workers=1, nodes=[add_square])
    out = list(dl)
    assert [ids(td) for td, _ in out] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(torch.equal(td["sq"], td["x"] ** 2) for td, _ in out)
    assert dl.state_dict()["next_batch_index"] == 2


SAMPLERS = [
    ("sequential", {}),
    ("grpo_group_n", {"n_samples_per_prompt": 4}),
    ("rank_aware", {}),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sampler", "cfg"), SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_state_dict_resume_exactly_once(client: Any, pid: str, sampler: str, cfg: dict[str, Any]) -> None:
    """A new loader loading a JSON state_dict yields exactly what the first one would have."""
    ref_pid = f"{pid}-ref"
    for p in (pid, ref_pid):
        for start in range(0, 64, 16):
            put_rows(client, p, start, 16)
        client.seal(p)
    kw = {"dp_size": 2, "sampler": sampler, "sampling_config": cfg}
    reference = [drain(loader(ref_pid, 8, 4, rank=r, **kw)) for r in range(2)]

    first = loader(pid, 8, 4, rank=0, **kw)
    before = drain(first, limit=3)
    wait_until(lambda: consumed_rows(client, pid, "t") > 16, "the loader fetched ahead")
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = loader(pid, 8, 4, rank=0, **kw)
    resumed.load_state_dict(state)
    after = drain(resumed)
    assert before + after == reference[0]
    other = drain(loader(pid, 8, 4, rank=1, **kw))
    assert other == reference[1]
    assert sorted(flat(before + after) + flat(other)) == list(range(64))
    if sampler == "grpo_group_n":
        assert all(len({i // 4 for i in mb}) == 1 for mb in before + after + other)


def test_load_state_dict_refuses_another_stream(client: Any, pid: str) -> None:
    state = loader(pid, 4, rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_rank"):
        loader(pid, 4, rank=1, dp_size=2).load_state_dict(state)


# ----------------------------------------------------------------------------- writer
@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_in_flight", [0, 2])
def test_reward_stage_writer_feeds_downstream_trainer(client: Any, pid: str, max_in_flight: int) -> None:
    n = 32
    trainer_ds = tq.StreamingDataset(None, 8, 8, ["prompts", "responses", "rewards"], pid, "trainer", 0)
    trainer = tq.StreamingDataLoader(trainer_ds, num_workers=1)
    got: list[TensorDict] = []
    done = in_thread(lambda: [got.append(td) for td, _ in trainer])
    wait_for_waiters(client, 1)
    x = torch.arange(n)
    responses = torch.nested.nested_tensor(
        [torch.full((int(i) % 5 + 1,), int(i)) for i in x], layout=torch.jagged
    )
    client.put(TensorDict({"prompts": x, "responses": responses}, batch_size=[n]), partition_id=pid)
    client.seal(pid)

    reward_ds = tq.StreamingDataset(None, 8, 4, ["prompts", "responses"], pid, "reward", 0)
    reward_loader = tq.StreamingDataLoader(reward_ds, num_workers=2)
    writer = reward_loader.writer(max_in_flight=max_in_flight)
    written: list[int] = []
    for i, (td, meta) in enumerate(reward_loader):
        assert td["responses"].is_nested
        lengths = td["responses"].offsets().diff()
        writer.write({"rewards": td["prompts"].float() * 10 + lengths}, meta)
        written += [int(v) for v in td["prompts"]]
        if i == 1:  # the first reward batch (2 micro-batches) is written: the trainer gets it, nothing more
            writer.flush()
            wait_until(lambda: len(got) == 1, "the trainer received the first batch")
            assert sorted(int(v) for v in got[0]["prompts"]) == written
            wait_for_waiters(client, 1)  # and waits for the next rewards
            assert len(got) == 1
    writer.flush()
    done.result(JOIN)
    assert writer.rows_written == n and writer.writes == 8
    prompts = torch.cat([td["prompts"] for td in got])
    rewards = torch.cat([td["rewards"] for td in got])
    assert sorted(prompts.tolist()) == list(range(n))
    assert torch.equal(rewards, prompts.float() * 10 + (prompts % 5 + 1))


def test_writer_refuses_rows_of_another_partition(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 4)
    client.seal(pid)
    (td, meta), *_ = list(loader(pid, 4))
    with pytest.raises(ValueError, match="writer for"):
        tq.Writer("elsewhere").write({"y": td["x"]}, meta)


@pytest.mark.timeout(60)
def test_async_writer_flush_reraises_a_failed_write(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 8)
    client.seal(pid)
    dl = loader(pid, 4, 4)
    writer = dl.writer(max_in_flight=1)
    (td0, meta0), (_, meta1) = list(dl)
    writer.write({"y": td0["x"].float()}, meta0)
    writer.write({"y": torch.zeros(4, 3)}, meta1)  # another shape for the same column
    with pytest.raises(tq.SchemaError):
        writer.flush()
    assert writer.rows_written == 4


# ----------------------------------------------------------------------------- collate and statistics
@pytest.mark.timeout(60)
def test_pad_collate_and_statistics(client: Any, pid: str) -> None:
    lengths = [3, 1, 4, 2, 5, 2, 1, 3]
    seqs = [torch.arange(1, n + 1, dtype=torch.float32) for n in lengths]
    td = TensorDict(
        {"x": torch.arange(8), "responses": torch.nested.nested_tensor(seqs, layout=torch.jagged)},
        batch_size=[8],
    )
    client.put(td, partition_id=pid)
    client.seal(pid)
    ds = tq.StreamingDataset(None, 4, 4, ["x", "responses"], pid, "t", 0)
    dl = tq.StreamingDataLoader(ds, num_workers=2, collate="pad")
    out = list(dl)
    assert len(out) == 2
    for td, meta in out:
        rows = ids(td)
        dense, mask = td["responses"], td["responses_mask"]
        assert not dense.is_nested and dense.shape == (4, max(lengths[i] for i in rows))
        assert mask.dtype == torch.bool and mask.shape == dense.shape
        for k, row in enumerate(rows):
            assert mask[k].sum() == lengths[row]
            assert torch.equal(dense[k, : lengths[row]], seqs[row])
            assert (dense[k, lengths[row] :] == 0).all()
        assert isinstance(meta, tq.BatchMeta) and meta.size == 4
    stats = dl.statistics()
    assert stats["batches"] == 2 and stats["micro_batches"] == 2 and stats["rows"] == 8
    assert stats["bytes"] > 0
    assert 0.0 <= stats["wait_fraction"] <= 1.0


# ----------------------------------------------------------------------------- TransferQueue signature
def test_positional_signature_matches_transferqueue() -> None:
    names = list(inspect.signature(tq.StreamingDataset).parameters)[:10]
    assert names == [
        "config", "batch_size", "micro_batch_size", "data_fields", "partition_id", "task_name", "dp_rank",
        "should_check_consumption_status", "fetch_batch_fn", "process_batch_fn",
    ]  # fmt: skip
    params = inspect.signature(tq.StreamingDataset).parameters
    for kw in ("dp_size", "sampler", "sampling_config", "drop_last", "timeout", "device"):
        assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.timeout(60)
def test_custom_fetch_and_process_fns_passed_positionally(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 16)
    client.seal(pid)
    calls: list[dict[str, Any]] = []

    def fetch_batch_fn(
        tq_client, data_fields, batch_size, partition_id, task_name, sampling_config, batch_index
    ):
        """Written for TransferQueue: no extra options."""
        calls.append({"batch_index": batch_index, **sampling_config})
        meta = tq_client.get_meta(
            data_fields=data_fields, batch_size=batch_size, partition_id=partition_id, task_name=task_name,
            sampling_config={**sampling_config, "batch_index": batch_index, "partition_id": partition_id},
        )  # fmt: skip
        if meta.size == 0:
            return None, meta
        return tq_client.get_data(meta), meta

    def process_batch_fn(td, batch_meta, micro_batch_size=1):
        parts = chunk_batch_fn(td, batch_meta, micro_batch_size=micro_batch_size)
        return [(t.set("double", t["x"] * 2), m) for t, m in reversed(list(parts))]

    ds = tq.StreamingDataset(
        None, 8, 4, ["x"], pid, "t", 0, False, fetch_batch_fn, process_batch_fn, dp_size=1
    )
    out = list(tq.StreamingDataLoader(ds, num_workers=2))
    assert [ids(td) for td, _ in out] == [[4, 5, 6, 7], [0, 1, 2, 3], [12, 13, 14, 15], [8, 9, 10, 11]]
    assert all(torch.equal(td["double"], td["x"] * 2) for td, _ in out)
    assert [c["batch_index"] for c in calls] == [0, 1, 2], "called in batch order, stopping at the end"
    assert all(c["dp_rank"] == 0 for c in calls)


# ----------------------------------------------------------------------------- waiting is never silent
def wait_reports(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tq_loader.loader.waiting"]


@pytest.mark.timeout(60)
def test_a_waiting_loader_logs_what_it_waits_for(client: Any, pid: str, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="tq_loader.loader.waiting")
    put_rows(client, pid, 0, 2)  # "x" only: the misspelled or not-yet-written field "y" is missing
    ds = tq.StreamingDataset(None, 4, 4, ["x", "y"], pid, "t", 0, dp_size=2, log_wait_after=0.01)
    done = in_thread(drain, tq.StreamingDataLoader(ds))
    wait_until(lambda: len(wait_reports(caplog)) >= 2, "two reports of the wait")
    first = wait_reports(caplog)[0]
    assert f"batch 0 of partition {pid!r}" in first and "task 't'" in first and "['x', 'y']" in first
    assert "0 rows ready with these fields, 8 wanted, 2 in the partition" in first
    assert "no row has field(s) ['y'] yet" in first and "open" in first
    client.seal(pid)
    assert done.result(JOIN) == []


def test_wait_report_names_unknown_and_sealed_partitions(client: Any, pid: str) -> None:
    target = WaitTarget(pid, ("x",), "t", 4, 0, 0)
    unknown = describe_wait(client, target, 1.0)
    assert "has no rows" in unknown and "known partitions" in unknown
    put_rows(client, pid, 0, 3)
    client.seal(pid)
    sealed = describe_wait(client, target, 2.0)
    assert "3 rows ready with these fields, 4 wanted" in sealed and "sealed" in sealed


def test_wait_reports_come_at_a_growing_interval(client: Any, pid: str, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="tq_loader.loader.waiting")
    now = [1000.0]
    wait = WaitLog(client, WaitTarget(pid, ("x",), "t", 4, 0, 0), first=5.0, clock=lambda: now[0])
    reported_at = []
    for t in range(0, 200):
        now[0] = 1000.0 + t
        before = wait.reports
        wait.tick()
        if wait.reports > before:
            reported_at.append(t)
    assert reported_at == [5, 15, 35, 75, 155]  # 5 s, then 10, 20, 40, 80 s apart
    assert len(wait_reports(caplog)) == 5
    silent = WaitLog(client, WaitTarget(pid, ("x",), "t", 4, 0, 0), first=None)
    silent.tick()
    assert silent.delay() is None and silent.reports == 0
