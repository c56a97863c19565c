"""Hand-over latency: from the start of a one-row put to a consumer's ``get_meta`` returning it.

tq_loader's consumers wait in the controller (a blocked ``get_meta`` returns as soon as the row
is produced); TransferQueue's StreamingDataset polls: an empty reply, then ``sleep(1 s)``. Both are
measured here on the embedded cluster -- blocking, and a client polling every 10 ms against a
controller in ``polling_mode`` -- and the 1 s poller's expected latency is *computed* as half its
interval plus one measured empty poll (labelled as such), not run.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import tq_loader as tq
from tq_loader.bench.registry import Context, case
from tq_loader.bench.results import make_row
from tq_loader.bench.systems import EMBEDDED, reset_runtime

__all__ = ["POLL_S"]

POLL_S = 0.010
ANALYTIC_POLL_S = 1.0


@contextmanager
def _cluster(polling: bool) -> Iterator[tq.Client]:
    reset_runtime()
    tq.init({"controller": {"polling_mode": polling}})
    try:
        yield tq.get_client()
    finally:
        reset_runtime()


def _wait_blocked(client: tq.Client, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while client.statistics()["controller"]["waiting_requests"] < 1:  # bounded wait on a counter
        if time.monotonic() > end:
            raise TimeoutError("the consumer's get_meta never reached the controller")
        time.sleep(0.001)


def _measure(producer: tq.Client, n: int, polling: bool) -> list[float]:
    """``n`` hand-overs to a consumer thread with its own client; seconds from put start."""
    consumer = tq.Client(producer.controller_address)
    arrived: queue.Queue[float | BaseException] = queue.Queue()
    ready = threading.Event()
    row = {"x": torch.zeros(1, 4)}

    def consume() -> None:
        try:
            for _ in range(n):
                ready.set()
                while not consumer.get_meta(["x"], 1, "handover", task_name="handover", timeout=30).size:
                    time.sleep(POLL_S)
                arrived.put(time.perf_counter())
        except BaseException as exc:  # handed to the producer thread, which raises it
            arrived.put(exc)

    rng = random.Random(2)
    out: list[float] = []
    thread = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    thread.start()
    try:
        for _ in range(n):
            if not ready.wait(30):
                raise TimeoutError("the consumer thread stopped asking")
            ready.clear()
            if polling:
                time.sleep(rng.uniform(0, 2 * POLL_S))  # land the put at a random phase of the poll
            else:
                _wait_blocked(producer)
            start = time.perf_counter()
            producer.put(row, partition_id="handover")
            got = arrived.get(timeout=30)
            if isinstance(got, BaseException):
                raise got
            out.append(got - start)
    finally:
        thread.join(30)
        consumer.close()
    return out


@case("handover", "put -> waiting consumer: server-side wait vs client polling")
def run_handover(ctx: Context) -> None:
    n = ctx.plan.handover_n
    ctx.status("handover: blocking get_meta")
    with _cluster(False) as client:
        blocking = _measure(client, n, polling=False)
    ctx.status("handover: polling every 10 ms")
    with _cluster(True) as client:
        polled = _measure(client, n, polling=True)
        client.put({"x": torch.zeros(1, 4)}, partition_id="empty")
        client.get_meta(["x"], 1, "empty", task_name="drain")
        empty = []
        for _ in range(max(5, n // 2)):
            start = time.perf_counter()
            client.get_meta(["x"], 1, "empty", task_name="drain")
            empty.append(time.perf_counter() - start)
    ms = [s * 1e3 for s in blocking]
    ctx.rows.append(make_row("handover", EMBEDDED, "blocking get_meta", "ms", ms, note="server-side wait"))
    ctx.rows.append(
        make_row("handover", EMBEDDED, "poll every 10 ms", "ms", [s * 1e3 for s in polled], note="measured")
    )
    analytic = [(ANALYTIC_POLL_S / 2 + e) * 1e3 for e in empty]
    ctx.rows.append(
        make_row("handover", EMBEDDED, "poll every 1 s (TransferQueue)", "ms", analytic,
                 note="ANALYTIC: half the 1 s interval + one measured empty poll")
    )  # fmt: skip
