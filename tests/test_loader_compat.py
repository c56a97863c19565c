"""The loader as a drop-in for TransferQueue's and for ``torch.utils.data.DataLoader``.

One embedded cluster in ``controller.polling_mode`` (what TransferQueue's streaming tutorial asks
for): the controller answers an empty batch at once when rows are not ready, and the dataset must
retry. Also here: datasets without ``dp_size`` (TransferQueue's signature), the DataLoader subclass
and torch's arguments, ``len()``, ``drop_last`` and ``pin_memory`` warnings, TransferQueue's
``step``/``reset``/``get_buffer``, ``chunk_batch_fn``, and a close that ends a pending fetch quietly
while real errors keep their type and message. Rows carry their id in field ``x``.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import in_thread, start_cluster, stop_cluster, wait_until
from tensordict import TensorDict
from torch.utils.data import DataLoader

import tq_loader as tq
from tq_loader import _meta_util
from tq_loader.errors import ArgumentError
from tq_loader.loader import BatchBuffer, chunk_batch_fn

JOIN = 30.0


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    handle = start_cluster("local", controller={"polling_mode": True})
    try:
        yield handle.client
    finally:
        stop_cluster()


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which one-time warnings this process has already shown."""
    monkeypatch.setattr(_meta_util, "_WARNED", set())


def put_rows(client: Any, pid: str, start: int, n: int) -> None:
    client.put(TensorDict({"x": torch.arange(start, start + n)}, batch_size=[n]), partition_id=pid)


def ids(td: TensorDict) -> list[int]:
    return [int(v) for v in td["x"].reshape(-1).tolist()]


def drain(loader: Any, limit: int | None = None) -> list[list[int]]:
    out: list[list[int]] = []
    for td, _ in loader:
        out.append(ids(td))
        if limit is not None and len(out) >= limit:
            break
    return out


def dataset(
    pid: str, batch: int = 4, micro: int | None = None, rank: int = 0, **kw: Any
) -> tq.StreamingDataset:
    return tq.StreamingDataset(None, batch, micro, ["x"], pid, kw.pop("task", "t"), rank, **kw)


def get_meta_calls(client: Any) -> int:
    return int(client.statistics()["controller"]["get_meta"])


# ----------------------------------------------------------------------------- polling mode
@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_polling_mode_retries_until_rows_come_then_ends_at_seal(client: Any, pid: str, workers: int) -> None:
    loader = tq.StreamingDataLoader(dataset(pid, 4, 2, dp_size=1), num_workers=workers)
    before = get_meta_calls(client)
    got = in_thread(drain, loader)
    wait_until(lambda: get_meta_calls(client) >= before + 3, "the loader polled an empty partition")
    assert not got.done(), "an empty answer in polling mode must not end the stream"
    for start in range(0, 12, 3):
        put_rows(client, pid, start, 3)
    client.seal(pid)
    assert got.result(JOIN) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert loader.statistics()["end_of_stream"] is True


@pytest.mark.timeout(60)
def test_polling_mode_plain_dataset_and_custom_fetch_fn_retry(client: Any, pid: str) -> None:
    """The plain IterableDataset path and a TransferQueue-style fetch_batch_fn (``(None, meta)``
    while nothing is ready) retry as well."""
    calls: list[int] = []

    def fetch_batch_fn(
        tq_client, data_fields, batch_size, partition_id, task_name, sampling_config, batch_index
    ):
        calls.append(batch_index)
        cfg = {**sampling_config, "batch_index": batch_index}
        meta = tq_client.get_meta(data_fields, batch_size, partition_id, "fetch", task_name, cfg)
        return (None, meta) if meta.size == 0 else (tq_client.get_data(meta), meta)

    plain = in_thread(lambda: [ids(td) for td, _ in dataset(pid, 4, 4, dp_size=1)])
    custom = in_thread(drain, tq.StreamingDataLoader(dataset(pid, 4, 4, dp_size=1, task="c",
                                                              fetch_batch_fn=fetch_batch_fn)))  # fmt: skip
    wait_until(lambda: len(calls) >= 3, "the custom fetch_batch_fn was retried")
    put_rows(client, pid, 0, 8)
    client.seal(pid)
    assert plain.result(JOIN) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert custom.result(JOIN) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert set(calls) == {0, 1, 2}, "retries ask for the same batch index again"


@pytest.mark.timeout(60)
def test_polling_wait_is_bounded_by_the_timeout(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 2)
    loader = tq.StreamingDataLoader(dataset(pid, 4, timeout=0.3, dp_size=1))
    with pytest.raises(tq.TQTimeoutError, match="polling mode") as caught:
        drain(loader)
    message = str(caught.value)
    assert repr(pid) in message and "2 rows ready" in message and "4 wanted" in message
    assert "open" in message and "Original Traceback" not in message


@pytest.mark.timeout(60)
def test_close_wakes_a_polling_pause(client: Any, pid: str) -> None:
    loader = tq.StreamingDataLoader(dataset(pid, 4, dp_size=1), num_workers=1)
    before = get_meta_calls(client)
    done = in_thread(drain, loader)
    wait_until(lambda: get_meta_calls(client) >= before + 2, "the loader is polling")
    loader.close()
    assert done.result(JOIN) == [], "the consumer's loop ends quietly when the loader is closed"


# ----------------------------------------------------------------------------- no dp_size (TransferQueue)
@pytest.mark.timeout(90)
def test_ranks_without_dp_size_share_batches_like_transferqueue(
    client: Any, pid: str, fresh_warnings: None
) -> None:
    """TransferQueue's tutorial 06: dp ranks [0, 0, 1, 1], no dp_size, polling mode, one row per put,
    each consumer breaks after 3 batches: peers of a dp rank see the same rows, ranks disjoint ones."""
    with pytest.warns(UserWarning, match=r"dp_rank=1\) without dp_size.*Pass dp_size="):
        datasets = [dataset(pid, 2, 2, rank=r, task="update") for r in (0, 0, 1, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not per dataset
        dataset(pid, 2, rank=1)
    consumers = [
        in_thread(drain, tq.StreamingDataLoader(ds, num_workers=2, prefetch_factor=2), 3) for ds in datasets
    ]
    for i in range(24):
        put_rows(client, pid, i, 1)
    got = [c.result(JOIN) for c in consumers]
    assert got[0] == got[1] and got[2] == got[3]
    assert all(len(g) == 3 and all(len(b) == 2 for b in g) for g in got)
    rank0, rank1 = {i for b in got[0] for i in b}, {i for b in got[2] for i in b}
    assert not rank0 & rank1 and len(rank0) == len(rank1) == 6


def test_dp_rank_zero_without_dp_size_is_quiet(fresh_warnings: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = dataset("p", 4)
    assert ds.dp_size is None and ds.dp_rank == 0
    with pytest.raises(ValueError, match="dp_rank"):
        dataset("p", 4, rank=2, dp_size=2)


# ----------------------------------------------------------------------------- the DataLoader subclass
TQ_POSITIONAL = ["dataset", "num_workers", "collate_fn", "pin_memory", "worker_init_fn",
                 "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device"]  # fmt: skip
TORCH_KEYWORDS = [
    "batch_size",
    "shuffle",
    "sampler",
    "batch_sampler",
    "drop_last",
    "timeout",
    "generator",
    "in_order",
]


def test_is_a_torch_dataloader_with_transferqueues_signature() -> None:
    loader = tq.StreamingDataLoader(dataset("p", 4, 2))
    assert isinstance(loader, DataLoader)
    params = inspect.signature(tq.StreamingDataLoader).parameters
    assert list(params)[: len(TQ_POSITIONAL)] == TQ_POSITIONAL
    assert all(params[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for n in TQ_POSITIONAL)
    torch_params = inspect.signature(DataLoader).parameters
    for name in TORCH_KEYWORDS:
        assert name in torch_params and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert loader.drop_last is True and loader.batch_size is None  # what it does: the dataset batches
    for method in ("step", "reset", "get_buffer", "state_dict", "load_state_dict"):
        assert callable(getattr(loader, method))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 8}, ArgumentError, r"StreamingDataset\(batch_size"),
        ({"shuffle": True}, ArgumentError, r"StreamingDataset\(sampler="),
        ({"sampler": [0, 1]}, ArgumentError, r"controller's sampler"),
        ({"batch_sampler": [[0]]}, ArgumentError, r"controller's sampler"),
        ({"drop_last": False}, ArgumentError, r"StreamingDataset\(\.\.\., drop_last="),
        ({"in_order": False}, ArgumentError, r"exact resume point"),
        ({"timeout": -1}, ValueError, r"non-negative"),
        ({"persistent_workers": True}, ValueError, r"num_workers > 0"),
        ({"num_workers": -1}, ValueError, r"num_workers"),
    ],
)
def test_torch_arguments_that_cannot_apply_are_refused_saying_why(
    kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tq.StreamingDataLoader(dataset("p", 4, 2), **kwargs)


def test_torch_arguments_that_apply_are_accepted(fresh_warnings: None) -> None:
    ds = dataset("p", 4, 2)
    tq.StreamingDataLoader(
        ds, batch_size=2, shuffle=False, drop_last=True, sampler=None, timeout=0, in_order=True
    )
    tq.StreamingDataLoader(ds, batch_size=None, num_workers=0, prefetch_factor=4)
    with pytest.warns(UserWarning, match="generator.*no effect"):
        tq.StreamingDataLoader(ds, generator=torch.Generator())
    with pytest.warns(UserWarning, match="multiprocessing_context.*threads"):
        tq.StreamingDataLoader(ds, 2, None, False, None, "spawn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA warning")
def test_pin_memory_without_cuda_warns_once(fresh_warnings: None) -> None:
    with pytest.warns(UserWarning, match=r"pin_memory=True\): CUDA is not available"):
        tq.StreamingDataLoader(dataset("p", 4), pin_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq.StreamingDataLoader(dataset("p", 4), pin_memory=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("persistent", [False, True])
def test_transferqueue_positional_call_runs_worker_init_fn_per_worker(
    client: Any, pid: str, persistent: bool
) -> None:
    put_rows(client, pid, 0, 32)
    client.seal(pid)
    both = threading.Barrier(2, timeout=20)  # each worker thread must start before either fetches
    calls: list[tuple[int, str]] = []

    def worker_init_fn(worker_id: int) -> None:
        calls.append((worker_id, threading.current_thread().name))
        both.wait()

    seen: list[Any] = []

    def collate_fn(item: Any) -> Any:
        seen.append(item)
        return item

    loader = tq.StreamingDataLoader(dataset(pid, 4, 2, dp_size=1), 2, collate_fn, False, worker_init_fn, None, 2,
                                    persistent, "")  # fmt: skip
    first = drain(loader, limit=4)
    assert sorted(w for w, _ in calls) == [0, 1] and len({t for _, t in calls}) == 2
    both.reset()
    drain(loader, limit=2)
    assert len(calls) == (2 if persistent else 4)
    assert first == [[0, 1], [2, 3], [4, 5], [6, 7]]
    td, meta = seen[0]
    assert isinstance(td, TensorDict) and isinstance(meta, tq.BatchMeta), (
        "collate_fn receives the (td, meta) pair"
    )


@pytest.mark.timeout(60)
def test_torch_timeout_bounds_the_wait_for_a_batch(client: Any, pid: str) -> None:
    loader = tq.StreamingDataLoader(dataset(pid, 4, dp_size=1), timeout=0.2)
    with pytest.raises(tq.TQTimeoutError):
        drain(loader)


# ----------------------------------------------------------------------------- len()
LENGTHS = [  # rows, batch, micro, dp_size, drop_last, sampler
    (30, 4, 4, 2, True, None),
    (30, 4, 3, 2, False, None),
    (31, 4, 2, 2, False, None),
    (25, 4, 4, 2, False, None),  # a tail of one row for two ranks: dropped
    (24, 8, 4, 1, True, "grpo_group_n"),
    (36, 4, 4, 2, False, "grpo_group_n"),  # tail of one group of 4
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("rows", "batch", "micro", "dp", "drop_last", "sampler"), LENGTHS)
def test_len_of_a_sealed_partition_is_what_each_rank_gets(
    client: Any, pid: str, rows: int, batch: int, micro: int, dp: int, drop_last: bool, sampler: str | None
) -> None:
    cfg = {"n_samples_per_prompt": 4} if sampler else {}
    loaders = [
        tq.StreamingDataLoader(
            dataset(
                pid,
                batch,
                micro,
                rank=r,
                dp_size=dp,
                drop_last=drop_last,
                sampler=sampler,
                sampling_config=cfg,
            )
        )
        for r in range(dp)
    ]
    put_rows(client, pid, 0, rows)
    with pytest.raises(TypeError, match="not sealed"):
        len(loaders[0])
    client.seal(pid)
    lengths = [len(loader) for loader in loaders]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped-tail warning (tested below)
        delivered = [len(drain(loader)) for loader in loaders]
    assert lengths == delivered
    assert len(loaders[0]) == lengths[0], "the whole stream's length, also after it was consumed"


def test_len_is_unknown_without_dp_size_or_with_custom_pieces(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 8)
    client.seal(pid)
    with pytest.raises(TypeError, match="dp_size"):
        len(tq.StreamingDataLoader(dataset(pid, 4)))
    with pytest.raises(TypeError, match="process_batch_fn"):
        len(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1, process_batch_fn=lambda td, m, **k: [(td, m)])))
    with pytest.raises(TypeError, match="nodes="):
        len(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1), nodes=[lambda node: node]))
    with pytest.raises(TypeError, match="does not exist"):
        len(tq.StreamingDataLoader(dataset(f"{pid}-missing", 4, dp_size=1)))
    client.clear_samples(client.get_meta(["x"], 2, pid, "force_fetch").select_samples([0, 1]))
    with pytest.raises(TypeError, match="cleared"):
        len(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1)))


@pytest.mark.timeout(60)
def test_dropped_tail_warns_once_naming_count_and_reason(client: Any, pid: str, fresh_warnings: None) -> None:
    put_rows(client, pid, 0, 10)
    client.seal(pid)
    with pytest.warns(
        UserWarning, match=r"ended with 2 rows never delivered to task 't'.*drop_last=False"
    ) as seen:
        assert drain(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len([w for w in seen if "never delivered" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drain(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1)))  # the same stream again: already said
        drain(
            tq.StreamingDataLoader(dataset(pid, 4, dp_size=1, drop_last=False, task="all"))
        )  # nothing dropped


# ----------------------------------------------------------------------------- step / reset / get_buffer
@pytest.mark.timeout(60)
def test_reset_replays_and_get_buffer_holds_the_delivered_batches(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 12)
    client.seal(pid)
    loader = tq.StreamingDataLoader(dataset(pid, 4, 2, dp_size=1), num_workers=2)
    first = drain(loader)
    assert first == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    buffer = loader.get_buffer()
    assert isinstance(buffer, BatchBuffer) and len(buffer) == 3
    assert [ids(td) for td, _ in buffer] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [(ids(td), m.size) for td, m in buffer[1:]] == [([4, 5, 6, 7], 4), ([8, 9, 10, 11], 4)]
    assert drain(loader) == [], "without reset() the drained stream stays ended"
    loader.reset()
    assert drain(loader) == first, "reset() replays the same batches (the controller's ledger)"
    assert len(loader.get_buffer()) == 3, "replayed batches are not buffered twice"


@pytest.mark.timeout(60)
def test_step_switches_partition_and_empties_the_buffer(client: Any, pid: str) -> None:
    nxt = f"{pid}-next"
    put_rows(client, pid, 0, 4)
    put_rows(client, nxt, 100, 8)
    for p in (pid, nxt):
        client.seal(p)
    loader = tq.StreamingDataLoader(dataset(pid, 4, dp_size=1))
    assert drain(loader) == [[0, 1, 2, 3]] and len(loader.get_buffer()) == 1
    loader.step(nxt)
    assert len(loader.get_buffer()) == 0
    assert drain(loader) == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert loader.state_dict()["partition_id"] == nxt and len(loader.get_buffer()) == 2


@pytest.mark.timeout(60)
def test_plain_dataset_iteration_continues_and_reset_rewinds(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 12)
    client.seal(pid)
    ds = dataset(pid, 4, 2, dp_size=1)
    it = iter(ds)
    assert [ids(next(it)[0]) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
    it.close()
    assert [ids(td) for td, _ in ds] == [[6, 7], [8, 9], [10, 11]], (
        "continues where it stopped (TransferQueue)"
    )
    ds.reset()
    assert [ids(td) for td, _ in ds][:2] == [[0, 1], [2, 3]]
    assert [ids(td) for td, _ in ds.buffer] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# ----------------------------------------------------------------------------- chunk_batch_fn
def meta_of(n: int) -> tq.BatchMeta:
    return tq.BatchMeta(global_indexes=list(range(n)), partition_ids=["p"] * n)


def test_chunk_batch_fn_returns_a_list_and_slices_every_column_kind() -> None:
    rows = [torch.full((i + 1, i + 2), float(i)) for i in range(5)]  # ragged in two dims
    td = TensorDict(
        {
            "dense": torch.arange(10).reshape(5, 2),
            "jagged": torch.nested.as_nested_tensor(
                [torch.arange(i + 1) for i in range(5)], layout=torch.jagged
            ),
            "strided": torch.nested.as_nested_tensor(rows, layout=torch.strided),
            "inner": TensorDict({"y": torch.arange(5)}, batch_size=[5]),
        },
        batch_size=[5],
    )
    chunks = chunk_batch_fn(td, meta_of(5), micro_batch_size=2)
    assert isinstance(chunks, list) and [len(c) for c, _ in chunks] == [2, 2, 1]
    assert [m.global_indexes for _, m in chunks] == [[0, 1], [2, 3], [4]]
    last, _ = chunks[2]
    assert last["strided"].is_nested and last["strided"].layout == torch.strided
    assert torch.equal(last["strided"][0], rows[4])
    assert torch.equal(chunks[1][0]["strided"][1], rows[3])
    assert torch.equal(chunks[1][0]["jagged"][1], torch.arange(4))
    assert torch.equal(last["dense"], torch.tensor([[8, 9]])) and last["inner", "y"].tolist() == [4]
    assert len(chunk_batch_fn(td, meta_of(5), micro_batch_size=8)) == 1


def test_chunk_batch_fn_refuses_bad_input() -> None:
    td = TensorDict({"x": torch.arange(3)}, batch_size=[3])
    with pytest.raises(TypeError, match="TensorDict"):
        chunk_batch_fn({"x": torch.arange(3)}, meta_of(3))
    with pytest.raises(ValueError, match="micro_batch_size"):
        chunk_batch_fn(td, meta_of(3), micro_batch_size=0)
    with pytest.raises(ValueError, match="BatchMeta"):
        chunk_batch_fn(td, meta_of(2))


@pytest.mark.timeout(60)
def test_loader_cuts_a_column_with_two_ragged_dims(client: Any, pid: str) -> None:
    rows = [torch.full((i + 1, 5 - i), float(i)) for i in range(4)]
    nested = torch.nested.as_nested_tensor(rows, layout=torch.strided)
    client.put(TensorDict({"x": torch.arange(4), "grid": nested}, batch_size=[4]), partition_id=pid)
    client.seal(pid)
    ds = tq.StreamingDataset(None, 4, 1, ["x", "grid"], pid, "t", 0, dp_size=1)
    out = list(tq.StreamingDataLoader(ds, num_workers=1))
    assert [ids(td) for td, _ in out] == [[0], [1], [2], [3]]
    assert all(torch.equal(td["grid"][0], rows[i]) for i, (td, _) in enumerate(out))


# ----------------------------------------------------------------------------- close is quiet, errors are not
@pytest.mark.timeout(60)
def test_break_and_close_while_a_fetch_is_pending_print_nothing(client: Any, pid: str, capfd: Any) -> None:
    put_rows(client, pid, 0, 4)
    loader = tq.StreamingDataLoader(dataset(pid, 4, 2, dp_size=1), num_workers=2)
    assert drain(loader, limit=2) == [[0, 1], [2, 3]]  # break: batch 1 is being polled for
    loader.close()
    blocked = tq.StreamingDataLoader(dataset(f"{pid}-empty", 4, 2, dp_size=1), num_workers=0)
    before = get_meta_calls(client)
    done = in_thread(drain, blocked)
    wait_until(lambda: get_meta_calls(client) >= before + 2, "the second consumer waits for rows")
    blocked.close()  # from another thread while the consumer waits in next()
    assert done.result(JOIN) == []
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "ClosedError" not in captured.err, captured.err


@pytest.mark.timeout(60)
def test_real_errors_keep_their_type_and_message(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 4)
    loader = tq.StreamingDataLoader(dataset(pid, 4, 4, dp_size=1), num_workers=2)
    it = iter(loader)
    next(it)
    client.abort(pid, "producer crashed")
    with pytest.raises(tq.ClosedError, match="producer crashed") as caught:
        next(it)
    assert "_populate_queue" not in str(caught.value)

    def broken(**_: Any) -> Any:
        raise RuntimeError("fetch exploded")

    with pytest.raises(RuntimeError, match=r"^fetch exploded$"):
        drain(tq.StreamingDataLoader(dataset(pid, 4, dp_size=1, fetch_batch_fn=broken), num_workers=2))


@pytest.mark.timeout(60)
def test_exhausted_probes_the_end_without_losing_a_batch(client: Any, pid: str) -> None:
    put_rows(client, pid, 0, 8)
    loader = tq.StreamingDataLoader(dataset(pid, 4, 2, dp_size=1))
    assert drain(loader, limit=1) == [[0, 1]]
    assert not loader.exhausted(), "mid-batch"
    assert drain(loader, limit=1) == [[2, 3]]
    assert not loader.exhausted(), "batch 1 is ready: the probe cuts it, the next iteration delivers it"
    assert drain(loader, limit=2) == [[4, 5], [6, 7]]
    assert not loader.exhausted(), "open partition: more rows may come"
    client.seal(pid)
    assert loader.exhausted()
    assert drain(loader) == [] and loader.statistics()["end_of_stream"] is True


def test_transferqueues_retry_interval_variable_is_said_to_have_no_effect(
    monkeypatch: pytest.MonkeyPatch, fresh_warnings: None
) -> None:
    monkeypatch.setenv("TQ_STREAMING_DATASET_EMPTY_BATCH_SLEEP_INTERVAL", "5")
    with pytest.warns(UserWarning, match=r"no effect.*StreamingDataset\(timeout="):
        dataset("p", 4)


def test_micro_batch_larger_than_batch_warns_once() -> None:
    """TransferQueue raises; tq_loader yields the whole batch as one micro-batch and says so."""
    from tq_loader.loader.dataset import StreamingDataset

    with pytest.warns(UserWarning, match="micro_batch_size=8 is larger than batch_size=4"):
        StreamingDataset(batch_size=4, micro_batch_size=8, data_fields=["x"], partition_id="p")


def test_concat_joining_extra_info_warns() -> None:
    from tq_loader.metadata import BatchMeta

    a = BatchMeta([0], "p", extra_info={"steps": [1]})
    b = BatchMeta([1], "p", extra_info={"steps": [2]})
    with pytest.warns(UserWarning, match=r"extra_info\['steps'\] differs"):
        joined = BatchMeta.concat([a, b])
    assert joined.extra_info["steps"] == [1, 2]
