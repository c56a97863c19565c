"""Issue 7, defect 3: a producer SIGKILLed mid-put does not block the end of a sealed stream.

``tq-loader serve`` runs with ``controller.seal_grace_s=1``. A producer process allocates rows
(an insert ``PrepareWrite``), writes their bytes to a storage unit and is SIGKILLed before it
notifies the controller; another producer writes complete rows; the partition is sealed. A
consumer with ``allow_partial`` then gets the complete rows and end-of-stream within the grace
period plus its request timeout, and the dead producer's rows are reported as abandoned.

This file is also the dead producer: ``python test_dead_producer.py ADDRESS PARTITION ROWS``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from reliability_wire import child_env, describe, request, serve

from tq_loader import protocol as p

GRACE_S = 1.0
DEAD_ROWS, DONE_ROWS = 4, 6


def dead_producer(address: str, pid: str, n: int) -> None:
    """Allocate ``n`` rows, store their bytes on one unit, then die before notifying."""
    from tq_loader.codec import encode_columns
    from tq_loader.metadata import schema_of

    x = torch.full((n, 2), -1.0)
    schemas = {"x": schema_of(x, "x")}
    reply, _ = request(address, p.PrepareWrite(partition_id=pid, schemas=schemas, new_rows=n, insert=True))
    assert reply.error_kind is None, reply
    ids = reply.body.global_indexes
    specs, buffers = encode_columns({"x": x})
    unit = describe(address).storage_units[0]
    put = p.PutRows(partition_id=pid, global_indexes=ids, columns=specs, schemas=schemas)
    stored, _ = request(unit, put, buffers)
    assert stored.error_kind is None, stored
    print(json.dumps(p.ids_from_wire(ids).tolist()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the NotifyProduced that would make the rows ready never comes


@pytest.fixture(scope="module")
def served():
    with serve("storage.num_units=2", f"controller.seal_grace_s={GRACE_S}") as s:
        yield s


def test_sealed_stream_with_a_killed_producer_ends_after_the_grace_period(served) -> None:
    from tq_loader.client import Client

    pid = "killed-producer"
    child = subprocess.run(
        [sys.executable, __file__, served.address, pid, str(DEAD_ROWS)],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    dead = json.loads(child.stdout)
    assert len(dead) == DEAD_ROWS
    client = Client(served.address)
    try:
        done = client.put({"x": torch.arange(2.0 * DONE_ROWS).reshape(DONE_ROWS, 2)}, partition_id=pid)
        client.seal(pid)
        # served as soon as the grace period drops the dead rows; TQTimeoutError here = the defect
        meta = client.get_meta(["x"], 16, pid, task_name="t", allow_partial=True, timeout=GRACE_S + 20)
        assert sorted(meta.global_index_array.tolist()) == sorted(done.global_index_array.tolist())
        data = client.get_data(meta)["x"]
        by_id = dict(zip(meta.global_index_array.tolist(), data.tolist(), strict=True))
        expected = torch.arange(2.0 * DONE_ROWS).reshape(DONE_ROWS, 2).tolist()
        assert [by_id[i] for i in done.global_index_array.tolist()] == expected
        end = client.get_meta(["x"], 16, pid, task_name="t", allow_partial=True, timeout=20)
        assert end.is_end_of_stream and end.size == 0
        stats = client.statistics()["controller"]
        assert stats["abandoned_rows"] == DEAD_ROWS
        assert stats["partitions"]["partitions"][pid]["abandoned_rows"] == DEAD_ROWS
    finally:
        client.close()
    # had the producer only been slow, its late notify gets a typed error that says why
    late = p.NotifyProduced(partition_id=pid, global_indexes=p.ids_to_wire(dead), schemas={})
    reply, _ = request(served.address, late)
    assert reply.error_kind == "ClosedError" and "abandoned" in reply.error_message


if __name__ == "__main__":
    dead_producer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
