"""The KV clients against the real services: Mooncake (master + store process) and Yuanrong (worker).

One service per backend for the whole module, started on free loopback ports and stopped by pid
(the module's last test kills it on purpose). A backend is skipped only when its package cannot be
imported here; the skip message says what to install.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tq_loader.errors import (
    CapacityError,
    ClosedError,
    NotFoundError,
    SchemaError,
    TQConnectionError,
    TQError,
)
from tq_loader.storage.kv_client import KVClient, pid_alive
from tq_loader.storage.mooncake import MooncakeConfig, MooncakeKVClient, MooncakeMaster, mooncake_available
from tq_loader.storage.yuanrong import (
    YuanrongConfig,
    YuanrongKVClient,
    YuanrongWorker,
    encode_key,
    yuanrong_available,
)

BIG = 256 << 20  # the big-value test's size; the services below are sized for it
PEER = Path(__file__).with_name("kv_peer.py")


@dataclass
class Backend:
    name: str
    service: Any  # MooncakeMaster | YuanrongWorker
    make: Callable[..., KVClient]  # a new client of the service (config overrides as keywords)
    client: KVClient
    peer_config: dict[str, Any]  # what a client in another process needs (small staging)


def _start(name: str) -> Backend:
    if name == "mooncake":
        missing = mooncake_available()
        if missing:
            pytest.skip(missing)
        service = MooncakeMaster.start(
            MooncakeConfig(
                global_segment_size=1 << 30, local_buffer_size=BIG + (16 << 20), startup_timeout=60
            )
        )

        def make(**kw: Any) -> KVClient:
            return MooncakeKVClient(dataclasses.replace(service.config, **kw))

        peer = dataclasses.asdict(service.config) | {"local_buffer_size": 32 << 20}
    else:
        missing = yuanrong_available()
        if missing:
            pytest.skip(missing)
        service = YuanrongWorker.start(YuanrongConfig(shared_memory_size_mb=1024, request_timeout=3))

        def make(**kw: Any) -> KVClient:
            return YuanrongKVClient(dataclasses.replace(service.config, **kw))

        peer = dataclasses.asdict(service.config)
    return Backend(name, service, make, make(), peer)


@pytest.fixture(scope="module", params=["mooncake", "yuanrong"])
def kv(request: pytest.FixtureRequest) -> Iterator[Backend]:
    backend = _start(request.param)
    try:
        yield backend
    finally:
        backend.client.close()
        backend.service.close()
        assert not backend.service.alive()


def _arr(n: int, seed: int, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


# --------------------------------------------------------------------------- round trips


def test_round_trip_of_several_buffers(kv: Backend) -> None:
    values = [b"hello", _arr(1000, 1), _arr(4096, 2, np.float64), bytearray(b"x" * 70_000)]
    keys = [f"rt/{i}" for i in range(len(values))]
    kv.client.put(keys, values)
    got = kv.client.get(keys)
    assert [bytes(g) for g in got] == [bytes(memoryview(v).cast("B")) for v in values]
    np.testing.assert_array_equal(np.frombuffer(got[1], dtype=np.float32), values[1])
    kv.client.delete(keys)
    with pytest.raises(NotFoundError):
        kv.client.get(keys[:1])


def test_put_overwrites_and_delete_ignores_missing(kv: Backend) -> None:
    kv.client.put(["ow"], [b"first value"])
    kv.client.put(["ow"], [b"second"])
    assert bytes(kv.client.get(["ow"])[0]) == b"second"
    kv.client.delete(["ow", "ow/never-written"])
    with pytest.raises(NotFoundError):
        kv.client.get(["ow"])


def test_keys_with_any_characters(kv: Backend) -> None:
    keys = ["part/1 block.0:field", "p%41", "pA", "ümlaut/键", "k" * 400, "k" * 401]
    kv.client.put(keys, [str(i).encode() * (i + 1) for i in range(len(keys))])
    assert [bytes(v) for v in kv.client.get(keys)] == [str(i).encode() * (i + 1) for i in range(len(keys))]
    kv.client.delete(keys)


def test_big_value_round_trip(kv: Backend) -> None:
    big = np.arange(BIG // 4, dtype=np.int32)
    kv.client.put(["big"], [big])
    out = np.empty_like(big)
    kv.client.get_into(["big"], [out])
    np.testing.assert_array_equal(out, big)
    del out
    view = kv.client.get(["big"])[0]
    assert view.nbytes == BIG
    np.testing.assert_array_equal(np.frombuffer(view, dtype=np.int32)[-1000:], big[-1000:])
    del view
    kv.client.delete(["big"])


def test_missing_keys_are_named(kv: Backend) -> None:
    kv.client.put(["present"], [b"1"])
    with pytest.raises(NotFoundError, match="absent-1"):
        kv.client.get(["present", "absent-1"])
    with pytest.raises(NotFoundError, match="absent-2"):
        kv.client.get_into(["absent-2"], [bytearray(4)])
    kv.client.delete(["present"])


def test_bad_input_is_a_schema_error(kv: Backend) -> None:
    c = kv.client
    with pytest.raises(SchemaError, match="zero-length"):
        c.put(["empty"], [b""])
    with pytest.raises(SchemaError, match="more than once"):
        c.put(["dup", "dup"], [b"1", b"2"])
    with pytest.raises(SchemaError, match="keys but"):
        c.put(["a", "b"], [b"1"])
    with pytest.raises(SchemaError, match="non-empty strings"):
        c.get([""])
    with pytest.raises(SchemaError, match="buffer protocol"):
        c.put(["obj"], [object()])
    c.put(["sized"], [b"12345678"])
    with pytest.raises(SchemaError, match="holds 8 bytes"):
        c.get_into(["sized"], [bytearray(4)])
    with pytest.raises(SchemaError, match="writable"):
        c.get_into(["sized"], [b"12345678"])
    assert bytes(c.get(["sized"])[0]) == b"12345678"  # the client still serves
    c.delete(["sized"])


def test_closed_client_raises_closed_error(kv: Backend) -> None:
    client = kv.make()
    client.put(["closed/k"], [b"v"])
    client.close()
    client.close()  # idempotent
    with pytest.raises(ClosedError):
        client.get(["closed/k"])
    assert bytes(kv.client.get(["closed/k"])[0]) == b"v"  # the value outlives the writer's client
    kv.client.delete(["closed/k"])


def test_statistics_count_calls_keys_and_bytes(kv: Backend) -> None:
    client = kv.make()
    try:
        client.put(["st/a", "st/b"], [b"1234", b"56"])
        client.get(["st/a"])
        with pytest.raises(NotFoundError):
            client.get(["st/missing"])
        client.delete(["st/a", "st/b"])
        s = client.statistics()
        assert (s.backend, s.puts, s.keys_put, s.bytes_put) == (kv.name, 1, 2, 6)
        assert (s.gets, s.keys_got, s.bytes_got, s.errors) == (1, 1, 4, 1)
        assert (s.deletes, s.keys_deleted) == (1, 2)
        assert s.services and all(s.services.values())
        assert s.as_dict()["backend"] == kv.name
    finally:
        client.close()


# --------------------------------------------------------------------------- zero copy


def test_reserve_writes_in_place_and_publishes_on_commit(kv: Backend) -> None:
    c = kv.client
    assert c.zero_copy_put
    pending = c.reserve(["zc/a", "zc/b"], [8, 3 << 20])
    pending.buffers[0][:] = b"abcdefgh"
    np.frombuffer(pending.buffers[1], dtype=np.uint8)[:] = 7
    with pytest.raises(NotFoundError):
        c.get(["zc/a"])  # not visible before commit
    pending.commit()
    a, b = c.get(["zc/a", "zc/b"])
    assert bytes(a) == b"abcdefgh" and b.nbytes == 3 << 20 and np.all(np.frombuffer(b, np.uint8) == 7)
    del a, b
    with pytest.raises(ClosedError):
        pending.commit()
    with pytest.raises(RuntimeError), c.reserve(["zc/aborted"], [4]) as p:
        p.buffers[0][:] = b"nope"
        raise RuntimeError("the caller failed while filling")
    with pytest.raises(NotFoundError):
        c.get(["zc/aborted"])
    c.delete(["zc/a", "zc/b"])


def test_yuanrong_get_returns_views_of_shared_memory(kv: Backend) -> None:
    if kv.name != "yuanrong":
        pytest.skip("only Yuanrong reads zero-copy (Mooncake copies out of its staging arena)")
    c = kv.client
    assert c.zero_copy_get
    c.put(["view"], [b"old value"])
    held = c.get(["view"])[0]
    assert held.readonly
    c.put(["view"], [b"new value"])
    assert bytes(held) == b"old value"  # a held view keeps the version it saw
    assert bytes(c.get(["view"])[0]) == b"new value"
    c.delete(["view"])


def test_mooncake_batches_bigger_than_the_staging_arena_move_in_rounds(kv: Backend) -> None:
    if kv.name != "mooncake":
        pytest.skip("Mooncake-specific: its staging arena bounds one call's bytes")
    client = kv.make(local_buffer_size=8 << 20)
    try:
        values = [np.full(3 << 20, i, dtype=np.uint8) for i in range(6)]  # 18 MiB through an 8 MiB arena
        keys = [f"rounds/{i}" for i in range(6)]
        client.put(keys, values)
        out = [np.empty(3 << 20, dtype=np.uint8) for _ in keys]
        client.get_into(keys, out)
        assert all(np.all(o == i) for i, o in enumerate(out))
        with pytest.raises(CapacityError, match="local_buffer_size"):
            client.put(["rounds/too-big"], [np.zeros(9 << 20, dtype=np.uint8)])
        with pytest.raises(CapacityError, match="local_buffer_size"):
            client.reserve(keys, [3 << 20] * len(keys))
        client.delete(keys)
    finally:
        client.close()


# --------------------------------------------------------------------------- capacity


def test_a_full_store_raises_capacity_error(kv: Backend) -> None:
    if kv.name == "yuanrong":
        client = kv.make(request_timeout=1)  # the worker waits up to the request timeout for memory
        try:
            # The worker waits for memory as long as the client's request timeout and then answers
            # "out of memory"; on a loaded machine the client's own timeout can come first. Either
            # way the put fails with a typed error and the store keeps serving (checked below).
            with pytest.raises((CapacityError, TQConnectionError)) as failed:
                client.put(["huge"], [np.zeros((1024 + 16) << 20, dtype=np.uint8)])
            if isinstance(failed.value, CapacityError):
                assert "shared_memory_size_mb" in str(failed.value)
            client.put(["cap/ok"], [b"still serving"])
            assert bytes(client.get(["cap/ok"])[0]) == b"still serving"
            client.delete(["cap/ok"])
        finally:
            client.close()
        return
    # A small Mooncake of its own (starts in about a second): 64 MiB of segment.
    with MooncakeMaster.start(
        MooncakeConfig(global_segment_size=64 << 20, local_buffer_size=32 << 20)
    ) as small:
        client = MooncakeKVClient(small.config)
        try:
            chunk = np.ones(24 << 20, dtype=np.uint8)
            with pytest.raises(CapacityError, match="global_segment_size"):
                for i in range(4):
                    client.put([f"fill/{i}"], [chunk])
            assert bytes(client.get(["fill/0"])[0][:4]) == b"\x01" * 4  # nothing stored was evicted
            client.delete([f"fill/{i}" for i in range(4)])
            client.put(["fill/after"], [chunk])  # space is back after the delete
        finally:
            client.close()


# --------------------------------------------------------------------------- services


def test_attach_to_the_running_service_leaves_it_running(kv: Backend) -> None:
    kv.client.put(["attach/k"], [b"shared"])
    if kv.name == "mooncake":
        attached = MooncakeMaster.open(kv.service.config)
        other = MooncakeKVClient(dataclasses.replace(attached.config, local_buffer_size=8 << 20))
    else:
        attached = YuanrongWorker.open(kv.service.config)
        other = YuanrongKVClient(attached.config)
    try:
        assert attached.alive()
        assert bytes(other.get(["attach/k"])[0]) == b"shared"
    finally:
        other.close()
        attached.close()
    assert kv.service.alive()
    kv.client.delete(["attach/k"])


def test_attach_to_nothing_is_a_connection_error() -> None:
    from tq_loader.storage.kv_client import free_port

    port = free_port()
    with pytest.raises(TQConnectionError, match="no Mooncake master"):
        MooncakeMaster.open(MooncakeConfig(master_server_address=f"127.0.0.1:{port}"))
    with pytest.raises(TQConnectionError, match="no Yuanrong worker"):
        YuanrongWorker.open(YuanrongConfig(worker_address=f"127.0.0.1:{port}"))
    with pytest.raises(TQConnectionError, match="auto_start"):
        YuanrongWorker.open(YuanrongConfig(auto_start=False))


def test_encode_key_is_injective_and_in_yuanrongs_alphabet() -> None:
    keys = ["a/b", "a%2Fb", "a_b", "ä", "%", "%25", "x" * 300, "x" * 301]
    encoded = [encode_key(k) for k in keys]
    assert len(set(encoded)) == len(keys)
    assert all(len(e) <= 255 for e in encoded)
    assert encode_key("Plain-Key_1:2") == "Plain-Key_1:2"


def test_two_processes_share_the_store(kv: Backend) -> None:
    """Two OS processes write at once and each reads what the other wrote."""
    cfg = json.dumps(kv.peer_config)
    count, nbytes = 8, 1 << 20
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(PEER), kv.name, cfg, mine, theirs, str(count), str(nbytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for mine, theirs in (("peer-a", "peer-b"), ("peer-b", "peer-a"))
    ]
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results.append((proc.returncode, err.decode("utf-8", "replace")[-800:]))
    assert [rc for rc, _ in results] == [0, 0], results
    sys.path.insert(0, str(PEER.parent))
    try:
        from kv_peer import value
    finally:
        sys.path.remove(str(PEER.parent))
    keys = [f"peer-{w}/{i}" for w in "ab" for i in range(count)]
    got = kv.client.get(keys)  # the values outlive both writer processes
    for key, view in zip(keys, got):
        prefix, i = key.rsplit("/", 1)
        np.testing.assert_array_equal(np.frombuffer(view, dtype=np.uint8), value(prefix, int(i), nbytes))
    del got
    kv.client.delete(keys)


# --------------------------------------------------------------------------- must stay last


def test_zz_killed_service_gives_typed_errors_without_hanging(kv: Backend) -> None:
    """Runs last for its backend: it kills the module's service (the fixture then cleans up)."""
    # Yuanrong gives up after the request timeout: a short one keeps the test short.
    client = kv.make(request_timeout=1) if kv.name == "yuanrong" else kv.client
    if client is not kv.client:
        kv.client.close()  # a Yuanrong client of a dead worker takes seconds to close: only one does
    client.put(["doomed"], [b"value"])
    pids = kv.service.pids if kv.name == "mooncake" else [kv.service.pid]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    outcome: dict[str, BaseException | None] = {}

    def calls() -> None:
        for name, fn in (
            ("get", lambda: client.get(["doomed"])),
            ("put", lambda: client.put(["doomed/2"], [b"x"])),
            ("delete", lambda: client.delete(["doomed"])),
        ):
            try:
                fn()
                outcome[name] = None
            except TQError as exc:
                outcome[name] = exc

    worker = threading.Thread(target=calls, daemon=True)
    worker.start()
    worker.join(timeout=90)
    assert not worker.is_alive(), "a call to a dead service did not return"
    assert all(isinstance(outcome[n], TQConnectionError) for n in ("get", "put", "delete")), outcome
    assert not any(pid_alive(p) for p in pids)
    if client is not kv.client:
        client.close()
