"""End-to-end lifecycle of a cluster, on both placements: put/get, readiness, consumption, streams.

Every test uses its own partition, so the module shares one cluster per placement.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import in_thread, wait_for_waiters, wait_until, waiting_requests
from tensordict import NonTensorStack, TensorDict

from tq_loader.errors import ClosedError, NotFoundError, SchemaError, TQError, TQTimeoutError

B = 6


def _ids(meta) -> list[int]:
    return [int(i) for i in meta.global_index_array]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (bit-exact comparison, NaN payloads and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _put_rows(client, pid: str, n: int = B, start: int = 0, field: str = "x"):
    td = TensorDict({field: torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1)}, batch_size=[n])
    return client.put(td, partition_id=pid)


# ---------------------------------------------------------------------- data round trips
def _all_columns(n: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    cols: dict[str, object] = {
        "bool": torch.rand(n, 3, generator=g) > 0.5,
        "uint8": torch.randint(0, 256, (n, 3), generator=g, dtype=torch.uint8),
        "int8": torch.randint(-128, 128, (n, 3), generator=g, dtype=torch.int8),
        "int16": torch.randint(-(2**15), 2**15, (n, 3), generator=g, dtype=torch.int16),
        "int32": torch.randint(-(2**31), 2**31 - 1, (n, 3), generator=g, dtype=torch.int32),
        "int64": torch.randint(-(2**62), 2**62, (n, 3), generator=g, dtype=torch.int64),
        "float16": torch.randn(n, 3, generator=g).half(),
        "bfloat16": torch.randn(n, 3, generator=g).bfloat16(),
        "float32": torch.randn(n, 2, 2, generator=g),
        "float64": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "complex64": torch.randn(n, 3, generator=g, dtype=torch.complex64),
        # NaN with a payload, signed zero and infinities must come back bit for bit
        "special": torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0]] * n, dtype=torch.float32)
        .view(torch.int32)
        .add(torch.tensor([1, 0, 0, 0], dtype=torch.int32))
        .view(torch.float32),
        "transposed": torch.randn(4, n, generator=g).t(),  # non-contiguous input
        "strided": torch.randn(n * 2, 5, generator=g)[::2, 1:4],
        "scalar_rows": torch.arange(n, dtype=torch.int64),
        "jagged": torch.nested.nested_tensor(
            [torch.randn(i % 3 + 1, 4, generator=g) for i in range(n)], layout=torch.jagged
        ),
        "text": NonTensorStack(*[f"row {i} " + "é" * i for i in range(n)]),
        "info": NonTensorStack(*[{"i": i, "tags": ["a", i], "score": i / 2, "none": None} for i in range(n)]),
    }
    return cols


def test_roundtrip_every_kind_of_field(client, pid):
    cols = _all_columns(B)
    meta = client.put(TensorDict(cols, batch_size=[B]), partition_id=pid)
    assert meta.size == B and set(meta.field_names) == set(cols)

    got_meta = client.get_meta(list(cols), B, pid, task_name="t", timeout=30)
    assert _ids(got_meta) == _ids(meta)
    out = client.get_data(got_meta)
    assert out.batch_size == torch.Size([B])
    for name, value in cols.items():
        if isinstance(value, NonTensorStack):
            assert list(out[name]) == value.tolist(), name
        elif value.is_nested:
            got = out[name]
            assert got.is_nested and got.layout == torch.jagged, name
            for a, b in zip(got.unbind(), value.unbind()):
                assert a.dtype == b.dtype and torch.equal(a, b), name
        else:
            got = out[name]
            assert got.dtype == value.dtype and got.shape == value.shape, name
            assert torch.equal(_bits(got), _bits(value)), name


def test_roundtrip_of_a_plain_dict_with_ragged_rows_and_lists(client, pid):
    rows = [torch.randn(i + 1, i + 2) for i in range(3)]  # ragged in two dimensions
    meta = client.put(
        {"r": rows, "plain": [1, "two", None], "arr": np.arange(6).reshape(3, 2)}, partition_id=pid
    )
    out = client.get_data(client.get_meta(["r", "plain", "arr"], 3, pid, task_name="t", timeout=30))
    assert [torch.equal(a, b) for a, b in zip(out["r"].unbind(), rows)] == [True] * 3
    assert list(out["plain"]) == [1, "two", None]
    assert torch.equal(out["arr"], torch.arange(6).reshape(3, 2))
    assert meta.size == 3


def test_empty_batches_are_not_errors(client, pid):
    empty = client.put(TensorDict({"x": torch.ones(0, 1)}, batch_size=[0]), partition_id=pid)
    assert empty.size == 0 and pid in client.get_partition_list()
    meta = _put_rows(client, pid, n=1)
    client.seal(pid)
    assert _ids(client.get_meta(["x"], 1, pid, task_name="t", timeout=30)) == _ids(meta)
    end = client.get_meta(["x"], 1, pid, task_name="t", timeout=30)
    assert end.is_end_of_stream
    out = client.get_data(end)  # a loop may fetch the end-of-stream batch like any other
    assert out.batch_size == torch.Size([0])


def test_put_into_cleared_rows_is_refused_without_storing(client, pid):
    meta = _put_rows(client, pid, n=3)
    client.clear_samples(meta.select_samples([1]))
    with pytest.raises(NotFoundError, match=str(_ids(meta)[1])):
        client.put(TensorDict({"y": torch.ones(3, 1)}, batch_size=[3]), metadata=meta)
    _, status = client.get_production_status(["x", "y"], pid)
    assert status[:, 1].sum() == 0


def test_get_data_follows_metadata_row_order(client, pid):
    meta = _put_rows(client, pid)
    got = client.get_meta(["x"], B, pid, task_name="t", timeout=30)
    reversed_meta = got.select_samples(list(range(B - 1, -1, -1)))
    out = client.get_data(reversed_meta)
    assert out["x"].squeeze(1).tolist() == list(range(B - 1, -1, -1))
    sub = client.get_data(got.select_samples([4, 1]))
    assert sub["x"].squeeze(1).tolist() == [4.0, 1.0]
    assert _ids(got) == _ids(meta)


def test_returned_tensors_are_writable_and_independent_of_storage(client, pid):
    src = torch.arange(B * 3, dtype=torch.float32).reshape(B, 3)
    jag = torch.nested.nested_tensor([torch.ones(i + 1) for i in range(B)], layout=torch.jagged)
    client.put(TensorDict({"x": src, "j": jag}, batch_size=[B]), partition_id=pid)
    src.mul_(-1)  # the caller's tensor after the put is the caller's business
    meta = client.get_meta(["x", "j"], B, pid, task_name="t", timeout=30)
    first = client.get_data(meta)
    first["x"].add_(1000)
    first["j"].values().fill_(-7)
    again = client.get_data(meta)
    assert torch.equal(again["x"], torch.arange(B * 3, dtype=torch.float32).reshape(B, 3))
    assert all(torch.equal(t, torch.ones(i + 1)) for i, t in enumerate(again["j"].unbind()))
    assert again["x"].data_ptr() != first["x"].data_ptr()


# ---------------------------------------------------------------------- readiness and status
def test_partial_field_update_across_units(client, pid):
    n = 8  # striped over both storage units
    meta = client.put(TensorDict({"prompt": torch.arange(n).unsqueeze(1)}, batch_size=[n]), partition_id=pid)
    ids, status = client.get_production_status(["prompt", "response"], pid)
    assert ids.tolist() == _ids(meta)
    assert status[:, 0].all() and not status[:, 1].any()
    assert not client.check_production_status(["prompt", "response"], pid)
    with pytest.raises(TQTimeoutError):
        client.get_meta(["prompt", "response"], 1, pid, task_name="both", timeout=0.2)

    half = meta.select_samples([1, 2, 5, 6])  # rows on both units
    client.put(TensorDict({"response": torch.arange(4).unsqueeze(1) * 10}, batch_size=[4]), metadata=half)
    _, status = client.get_production_status(["prompt", "response"], pid)
    assert status[:, 1].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]

    got = client.get_meta(["prompt", "response"], 4, pid, task_name="both", timeout=30)
    assert sorted(_ids(got)) == sorted(_ids(half))
    out = client.get_data(got)
    assert out["prompt"].squeeze(1).tolist() == [1, 2, 5, 6]
    assert out["response"].squeeze(1).tolist() == [0, 10, 20, 30]
    # a task needing only the first column saw every row all along
    only_prompt = client.get_meta(["prompt"], n, pid, task_name="prompt-only", timeout=30)
    assert sorted(_ids(only_prompt)) == sorted(_ids(meta))
    with pytest.raises(TQTimeoutError):
        client.get_meta(["prompt", "response"], 1, pid, task_name="both", timeout=0.2)

    rest = meta.select_samples([0, 3, 4, 7])
    client.put(TensorDict({"response": torch.zeros(4, 1, dtype=torch.int64)}, batch_size=[4]), metadata=rest)
    assert client.check_production_status(["prompt", "response"], pid)
    tail = client.get_meta(["prompt", "response"], 4, pid, task_name="both", timeout=30)
    assert sorted(_ids(tail)) == sorted(_ids(rest))


def test_consumption_status_transitions(client, pid):
    meta = _put_rows(client, pid)
    ids, consumed = client.get_consumption_status("t", pid)
    assert ids.tolist() == _ids(meta) and not consumed.any()
    assert not client.check_consumption_status("t", pid)
    first = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    _, consumed = client.get_consumption_status("t", pid)
    assert consumed.tolist() == [1, 1, 0, 0, 0, 0]
    assert _ids(first) == _ids(meta)[:2]
    client.get_meta(["x"], 4, pid, task_name="t", timeout=30)
    assert client.check_consumption_status("t", pid)
    assert not client.check_consumption_status("other", pid)


def test_tasks_consume_independently(client, pid):
    meta = _put_rows(client, pid)
    a = client.get_meta(["x"], B, pid, task_name="actor", timeout=30)
    b = client.get_meta(["x"], B, pid, task_name="ref", timeout=30)
    assert _ids(a) == _ids(b) == _ids(meta)
    with pytest.raises(TQTimeoutError):
        client.get_meta(["x"], 1, pid, task_name="actor", timeout=0.2)
    c = client.get_meta(["x"], 3, pid, task_name="critic", timeout=30)
    assert _ids(c) == _ids(meta)[:3]


def test_unknown_partition_status_calls_answer_like_transfer_queue(client, pid):
    # a consumer started before its producer asks before every batch: no error, "not yet"
    assert client.get_production_status(["x"], pid) == (None, None)
    assert client.check_production_status(["x"], pid) is False
    assert client.get_consumption_status("t", pid) == (None, None)
    assert client.check_consumption_status("t", pid) is False
    with pytest.raises(NotFoundError) as info:  # a write to what is not there stays an error
        client.reset_consumption(pid)
    assert pid in str(info.value) and isinstance(info.value, KeyError)
    client.clear_partition(pid)  # clearing what is not there is not an error
    assert pid not in client.get_partition_list()


# ---------------------------------------------------------------------- waiting
def test_blocking_get_meta_is_woken_by_a_put(client, pid):
    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["x"], 3, pid, task_name="t", timeout=60)
    wait_for_waiters(client, base + 1)
    assert not waiter.done()
    meta = _put_rows(client, pid, n=3)
    got = waiter.result(timeout=30)
    assert _ids(got) == _ids(meta)
    assert client.get_data(got)["x"].squeeze(1).tolist() == [0.0, 1.0, 2.0]


def test_timeout_raises_and_consumes_nothing(client, pid):
    meta = _put_rows(client, pid, n=3)
    with pytest.raises(TQTimeoutError) as info:
        client.get_meta(["x"], 5, pid, task_name="t", timeout=0.3)
    assert isinstance(info.value, TimeoutError) and pid in str(info.value)
    _, consumed = client.get_consumption_status("t", pid)
    assert not consumed.any()
    got = client.get_meta(["x"], 3, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(meta)


# ---------------------------------------------------------------------- streams: seal and abort
def test_seal_drains_then_ends_the_stream(client, pid):
    meta = _put_rows(client, pid, n=5)
    client.seal(pid)
    with pytest.raises(ClosedError):
        _put_rows(client, pid, n=1)
    a = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    b = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert _ids(a) + _ids(b) == _ids(meta)[:4]
    assert not a.is_end_of_stream
    end = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)  # 1 row left < batch: dropped
    assert end.is_end_of_stream and end.size == 0
    # allow_partial: another task gets the short tail before the end
    batches = []
    while True:
        m = client.get_meta(["x"], 2, pid, task_name="partial", timeout=30, allow_partial=True)
        if m.is_end_of_stream:
            break
        batches.append(_ids(m))
    assert batches == [_ids(meta)[0:2], _ids(meta)[2:4], _ids(meta)[4:5]]


def test_seal_wakes_a_waiting_consumer_with_end_of_stream(client, pid):
    _put_rows(client, pid, n=1)
    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["x"], 4, pid, task_name="t", timeout=60)
    wait_for_waiters(client, base + 1)
    client.seal(pid)
    assert waiter.result(timeout=30).is_end_of_stream


def test_sealed_stream_waits_for_columns_still_being_written(client, pid):
    meta = _put_rows(client, pid, n=2, field="a")
    client.seal(pid)  # rows exist, but their "b" column is not written yet: not the end
    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["a", "b"], 2, pid, task_name="t", timeout=60)
    wait_for_waiters(client, base + 1)
    client.put(TensorDict({"b": torch.ones(2, 1)}, batch_size=[2]), metadata=meta)
    got = waiter.result(timeout=30)
    assert _ids(got) == _ids(meta) and not got.is_end_of_stream
    assert client.get_meta(["a", "b"], 2, pid, task_name="t", timeout=30).is_end_of_stream


def test_abort_fails_waiting_and_later_consumers(client, pid):
    base = waiting_requests(client)
    waiter = in_thread(client.get_meta, ["x"], 2, pid, task_name="t", timeout=60)
    wait_for_waiters(client, base + 1)
    client.abort(pid, reason="rollout worker crashed")
    with pytest.raises(ClosedError, match="rollout worker crashed"):
        waiter.result(timeout=30)
    with pytest.raises(ClosedError):
        client.get_meta(["x"], 1, pid, task_name="t", timeout=5)
    with pytest.raises(ClosedError):
        client.get_meta(["x"], 1, pid, task_name="another", timeout=5)
    with pytest.raises(ClosedError):
        _put_rows(client, pid, n=1)


# ---------------------------------------------------------------------- clearing and resetting
def test_clear_samples_removes_rows_everywhere(client, pid):
    meta = _put_rows(client, pid, n=4)
    client.clear_samples(meta.select_samples([0, 3]))
    ids, _ = client.get_production_status(["x"], pid)
    assert ids.tolist() == [_ids(meta)[1], _ids(meta)[2]]
    got = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert _ids(got) == [_ids(meta)[1], _ids(meta)[2]]
    assert client.get_data(got)["x"].squeeze(1).tolist() == [1.0, 2.0]
    with pytest.raises(TQError):
        client.get_data(meta.select_samples([0]))
    client.clear_samples(meta.select_samples([0]))  # idempotent


def test_clear_partition_drops_data_and_state(client, pid):
    before = client.statistics()["storage"]["rows"]
    _put_rows(client, pid, n=4)
    assert client.statistics()["storage"]["rows"] == before + 4
    assert pid in client.get_partition_list()
    client.clear_partition(pid)
    assert pid not in client.get_partition_list()
    assert client.statistics()["storage"]["rows"] == before
    assert client.get_production_status(["x"], pid) == (None, None)
    fresh = _put_rows(client, pid, n=2, start=50)  # the id can be used again, from scratch
    got = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(fresh)
    assert client.get_data(got)["x"].squeeze(1).tolist() == [50.0, 51.0]


def test_reset_consumption(client, pid):
    meta = _put_rows(client, pid, n=3)
    for task in ("a", "b"):
        client.get_meta(["x"], 3, pid, task_name=task, timeout=30)
    client.reset_consumption(pid, "a")
    assert _ids(client.get_meta(["x"], 3, pid, task_name="a", timeout=30)) == _ids(meta)
    with pytest.raises(TQTimeoutError):
        client.get_meta(["x"], 1, pid, task_name="b", timeout=0.2)
    client.reset_consumption(pid)  # every task
    for task in ("a", "b"):
        assert _ids(client.get_meta(["x"], 3, pid, task_name=task, timeout=30)) == _ids(meta)


def test_partitions_are_isolated(client, pid):
    other = pid + "-other"
    mine = _put_rows(client, pid, n=3, start=0)
    theirs = _put_rows(client, other, n=3, start=100)
    assert not set(_ids(mine)) & set(_ids(theirs))
    got = client.get_meta(["x"], 3, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(mine)
    with pytest.raises(TQTimeoutError):
        client.get_meta(["x"], 1, pid, task_name="t", timeout=0.2)
    client.clear_partition(pid)
    got = client.get_meta(["x"], 3, other, task_name="t", timeout=30)
    assert client.get_data(got)["x"].squeeze(1).tolist() == [100.0, 101.0, 102.0]
    client.clear_partition(other)


def test_schema_conflict_is_refused_and_data_kept(client, pid):
    meta = _put_rows(client, pid, n=3)
    with pytest.raises(SchemaError) as info:  # complex values cannot become the column's float32
        client.put(
            TensorDict({"x": torch.ones(2, 1, dtype=torch.complex64)}, batch_size=[2]), partition_id=pid
        )
    assert "x" in str(info.value) and pid in str(info.value)
    with pytest.raises(SchemaError):  # the same through an update of existing rows
        client.put(TensorDict({"x": NonTensorStack("a", "b", "c")}, batch_size=[3]), metadata=meta)
    ids, _ = client.get_production_status(["x"], pid)
    assert ids.tolist() == _ids(meta)  # the refused insert created no rows
    got = client.get_meta(["x"], 3, pid, task_name="t", timeout=30)
    out = client.get_data(got)
    assert out["x"].dtype == torch.float32 and out["x"].squeeze(1).tolist() == [0.0, 1.0, 2.0]


def test_a_safely_castable_dtype_is_converted_to_the_column_with_a_warning(client, pid):
    """TransferQueue stores mixed dtypes per row (its tutorial writes a float32 then an int64 mask);
    a column has one dtype: ints into a float column are converted, loudly."""
    _put_rows(client, pid, n=3)
    with pytest.warns(UserWarning, match="converted to float32"):
        client.put(
            TensorDict({"x": torch.full((2, 1), 7, dtype=torch.int64)}, batch_size=[2]), partition_id=pid
        )
    got = client.get_data(client.get_meta(["x"], 5, pid, task_name="t", timeout=30))
    assert got["x"].dtype == torch.float32 and got["x"].squeeze(1).tolist() == [0.0, 1.0, 2.0, 7.0, 7.0]


# ---------------------------------------------------------------------- rank-aware and groups
def _rank_batch(client, pid, rank, index, **kw):
    return client.get_meta(
        ["x"], 2, pid, task_name="train", dp_rank=rank, dp_size=2, batch_index=index, timeout=30, **kw
    )


def test_rank_aware_batches(client, pid):
    meta = _put_rows(client, pid, n=13)
    client.seal(pid)
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    index = 0
    while True:
        metas = {rank: _rank_batch(client, pid, rank, index) for rank in (1, 0)}
        again = _rank_batch(client, pid, 1, index)  # another caller of rank 1 (a TP peer)
        assert _ids(again) == _ids(metas[1])
        ends = {rank: m.is_end_of_stream for rank, m in metas.items()}
        assert ends[0] == ends[1], "ranks must end on the same batch"
        if ends[0]:
            break
        assert not set(_ids(metas[0])) & set(_ids(metas[1]))
        for rank, m in metas.items():
            assert m.size == 2
            seen[rank].append(_ids(m))
        index += 1
    assert len(seen[0]) == len(seen[1]) == 3  # 13 rows, rounds of 2 x 2: the 1-row tail is dropped
    flat = [i for rank in seen.values() for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 12 and set(flat) <= set(_ids(meta))


def test_rank_aware_request_waits_for_data(client, pid):
    base = waiting_requests(client)
    waiter = in_thread(_rank_batch, client, pid, 1, 0)
    wait_for_waiters(client, base + 1)
    meta = _put_rows(client, pid, n=4)
    got1 = waiter.result(timeout=30)
    got0 = _rank_batch(client, pid, 0, 0)
    assert sorted(_ids(got0) + _ids(got1)) == _ids(meta)


def test_grpo_groups_are_served_whole(client, pid):
    n = 4  # responses per prompt; the 4 rows of a prompt are inserted together
    meta = client.put(
        TensorDict({"prompt": torch.arange(16).unsqueeze(1) // n}, batch_size=[16]), partition_id=pid
    )
    cfg = {"n_samples_per_prompt": n}
    kw = {"task_name": "grpo", "sampler": "grpo_group_n", "sampling_config": cfg, "timeout": 30}
    # responses for group 1 complete, group 0 missing one row
    done = [0, 1, 2, 4, 5, 6, 7]
    client.put(
        TensorDict({"resp": torch.tensor(done).unsqueeze(1)}, batch_size=[len(done)]),
        metadata=meta.select_samples(done),
    )
    first = client.get_meta(["resp"], 4, pid, **kw)
    assert _ids(first) == _ids(meta)[4:8]
    with pytest.raises(TQTimeoutError):
        client.get_meta(["resp"], 4, pid, **{**kw, "timeout": 0.2})
    rest = [3, *range(8, 16)]
    client.put(
        TensorDict({"resp": torch.tensor(rest).unsqueeze(1)}, batch_size=[len(rest)]),
        metadata=meta.select_samples(rest),
    )
    second = client.get_meta(["resp"], 4, pid, **kw)
    assert sorted(_ids(second)) == _ids(meta)[0:4]
    # rank-aware rounds never split a group across ranks
    rounds = [client.get_meta(["resp"], 4, pid, **kw, dp_rank=r, dp_size=2, batch_index=0) for r in (0, 1)]
    groups = [{gid // n for gid in (np.asarray(_ids(m)) - _ids(meta)[0]).tolist()} for m in rounds]
    assert all(len(g) == 1 for g in groups) and groups[0] != groups[1]
    assert sorted(_ids(rounds[0]) + _ids(rounds[1])) == _ids(meta)[8:16]


# ---------------------------------------------------------------------- garbage on the wire
def _raw_request(address: str, frames: list[bytes], timeout: float = 10.0):
    """Send ``frames`` from a bare DEALER socket; the decoded reply envelope."""
    import zmq

    from tq_loader.protocol import decode_reply

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), f"{address} did not answer {frames[:1]!r}"
        return decode_reply(sock.recv_multipart()[0])
    finally:
        sock.close()


def _garbage() -> list[list[bytes]]:
    import msgspec

    from tq_loader import protocol as p

    return [
        [b"not msgpack"],
        [b""],
        [b"\xff" * 64],
        [b"\x93\x01", b"second frame"],  # truncated msgpack array
        [msgspec.msgpack.encode([1, {"type": "NoSuchMessage"}])],
        [msgspec.msgpack.encode([2, {"type": "GetMeta", "partition_id": 3}])],
        [p.encode(p.RequestEnvelope(3, p.Stats(), version=999))],
    ]


def _unit_garbage() -> list[list[bytes]]:
    from tq_loader import protocol as p
    from tq_loader.codec import ColumnSpec

    spec = ColumnSpec("a", "dense", "float32", (1, 4), 1, nbytes=16)
    blob = ColumnSpec("b", "object", "object", (1,), 1, nbytes=3)
    one = p.ids_to_wire([0])

    def put(columns, *buffers):
        body = p.PutRows(partition_id="junk", global_indexes=one, columns=columns, schemas={})
        return [p.encode(p.RequestEnvelope(9, body)), *buffers]

    return [
        put([spec]),  # a buffer announced but missing
        put([spec], b"abc"),  # too short
        put([blob], b"\xc1\xc1\xc1"),  # malformed msgpack blob
        [
            p.encode(
                p.RequestEnvelope(
                    9, p.GetRows(partition_id="junk", global_indexes=b"\x01\x02\x03", fields=["a"])
                )
            )
        ],
        [p.encode(p.RequestEnvelope(9, p.Seal(partition_id="junk")))],  # a controller message
    ]


def test_garbage_frames_get_protocol_errors_and_the_cluster_keeps_serving(client, pid):
    info = client.describe()
    for address in (info.controller, *info.storage_units):
        for frames in _garbage():
            reply = _raw_request(address, frames)
            assert reply.body is None and reply.error_kind == "ProtocolError", (address, frames, reply)
    for frames in _unit_garbage():
        reply = _raw_request(info.storage_units[0], frames)
        assert reply.error_kind == "ProtocolError", (frames, reply)
    meta = _put_rows(client, pid, n=4)
    got = client.get_meta(["x"], 4, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(meta)
    assert client.get_data(got)["x"].squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------------- more stream shapes
def test_concurrent_waiters_never_share_a_row(client, pid):
    base = waiting_requests(client)
    waiters = [in_thread(client.get_meta, ["x"], 3, pid, task_name="t", timeout=60) for _ in range(2)]
    wait_for_waiters(client, base + 2)
    meta = _put_rows(client, pid, n=6)
    got = [w.result(timeout=30) for w in waiters]
    assert sorted(_ids(got[0]) + _ids(got[1])) == _ids(meta)
    assert not set(_ids(got[0])) & set(_ids(got[1]))


def test_insert_mode_then_put_by_metadata(client, pid):
    meta = client.get_meta(["x"], 3, pid, mode="insert")  # TransferQueue's producer pattern
    assert meta.size == 3
    with pytest.raises(TQTimeoutError):  # allocated rows are not ready before their data is stored
        client.get_meta(["x"], 1, pid, task_name="t", timeout=0.2)
    client.put({"x": torch.tensor([[7.0], [8.0], [9.0]])}, metadata=meta)
    got = client.get_meta(["x"], 3, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(meta)
    assert client.get_data(got)["x"].squeeze(1).tolist() == [7.0, 8.0, 9.0]


def test_force_fetch_sees_everything_and_consumes_nothing(client, pid):
    meta = _put_rows(client, pid, n=3)
    seen = client.get_meta(["x"], 1, pid, mode="force_fetch", task_name="t")
    assert _ids(seen) == _ids(meta)
    _, consumed = client.get_consumption_status("t", pid)
    assert not consumed.any()


def test_custom_meta_travels_with_rows(client, pid):
    meta = _put_rows(client, pid, n=2)
    meta.update_custom_meta([{"reward": 1.0}, {"reward": 0.0, "note": "x"}])
    client.set_custom_meta(meta)
    got = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert got.get_all_custom_meta() == [{"reward": 1.0}, {"reward": 0.0, "note": "x"}]


def test_reset_consumption_restarts_an_ended_stream(client, pid):
    meta = _put_rows(client, pid, n=2)
    client.seal(pid)
    assert _ids(client.get_meta(["x"], 2, pid, task_name="t", timeout=30)) == _ids(meta)
    assert client.get_meta(["x"], 2, pid, task_name="t", timeout=30).is_end_of_stream
    client.reset_consumption(pid, "t")  # a new epoch over the same rows
    assert _ids(client.get_meta(["x"], 2, pid, task_name="t", timeout=30)) == _ids(meta)
    assert client.get_meta(["x"], 2, pid, task_name="t", timeout=30).is_end_of_stream


def test_rank_aware_peers_waiting_on_one_batch_get_the_same_rows(client, pid):
    base = waiting_requests(client)
    peers = [in_thread(_rank_batch, client, pid, 0, 0) for _ in range(2)]  # e.g. two TP ranks of DP rank 0
    wait_for_waiters(client, base + 2)
    _put_rows(client, pid, n=4)
    a, b = (p.result(timeout=30) for p in peers)
    assert _ids(a) == _ids(b) and a.size == 2
    other = _rank_batch(client, pid, 1, 0)
    assert not set(_ids(other)) & set(_ids(a))


# ---------------------------------------------------------------------- clients coming and going
def test_a_closed_client_fails_fast_and_others_keep_working(client, pid):
    from tq_loader.client import Client

    other = Client(client.controller_address)
    meta = other.put(TensorDict({"x": torch.ones(2, 1)}, batch_size=[2]), partition_id=pid)
    other.close()
    with pytest.raises(ClosedError):
        other.get_partition_list()
    got = client.get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(meta)


def test_closing_a_client_wakes_its_own_blocked_get_meta(client, pid):
    from tq_loader.client import Client

    gone = Client(client.controller_address)
    base = waiting_requests(client)
    waiter = in_thread(gone.get_meta, ["x"], 2, pid, task_name="t")  # no timeout: would wait forever
    wait_for_waiters(client, base + 1)
    gone.close()
    with pytest.raises(ClosedError):
        waiter.result(timeout=30)
    client.seal(pid)  # ends the request the controller still holds for the closed client


def test_rows_are_not_lost_to_a_waiter_whose_client_closed(client, pid):
    from tq_loader.client import Client

    gone = Client(client.controller_address)
    base = waiting_requests(client)
    waiter = in_thread(gone.get_meta, ["x"], 2, pid, task_name="t", timeout=60)
    wait_for_waiters(client, base + 1)
    gone.close()  # sends a Cancel for the parked request before the socket goes
    with pytest.raises(ClosedError):
        waiter.result(timeout=30)
    wait_until(lambda: waiting_requests(client) == base, "the controller to drop the closed client's wait")
    meta = _put_rows(client, pid, n=2)
    got = client.get_meta(["x"], 2, pid, task_name="t", timeout=1)
    assert _ids(got) == _ids(meta)


# ---------------------------------------------------------------------- the async facade
async def _async_wait_for_waiters(client, n: int, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await client.async_statistics())["controller"]["waiting_requests"] < n:
        assert loop.time() < deadline, f"fewer than {n} get_meta requests were waiting after {timeout}s"
        await asyncio.sleep(0.005)  # test-side polling of a counter, bounded by the deadline


async def test_async_get_meta_is_woken_by_an_async_put(client, pid):
    base = (await client.async_statistics())["controller"]["waiting_requests"]
    waiter = asyncio.ensure_future(client.async_get_meta(["x"], 2, pid, task_name="t", timeout=60))
    await _async_wait_for_waiters(client, base + 1)
    meta = await client.async_put(TensorDict({"x": torch.ones(2, 1)}, batch_size=[2]), partition_id=pid)
    got = await asyncio.wait_for(waiter, 30)
    assert _ids(got) == _ids(meta)
    assert (await client.async_get_data(got))["x"].shape == (2, 1)


async def test_a_cancelled_async_get_meta_consumes_nothing(client, pid):
    base = (await client.async_statistics())["controller"]["waiting_requests"]
    waiter = asyncio.ensure_future(client.async_get_meta(["x"], 2, pid, task_name="t", timeout=60))
    await _async_wait_for_waiters(client, base + 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    meta = await client.async_put(TensorDict({"x": torch.ones(2, 1)}, batch_size=[2]), partition_id=pid)
    got = await client.async_get_meta(["x"], 2, pid, task_name="t", timeout=30)
    assert _ids(got) == _ids(meta)
