"""Groups 2-4: per-sample vs columnar puts, get_meta wake-up latency, StreamingDataLoader throughput.

* ``run_per_sample``: ``rows`` small rows (3 fields of 16 float32 + a string) as ONE columnar put,
  versus the same rows as ``rows`` separate one-row puts (what per-sample serialization costs).
  The one-row dicts are built before the clock starts, so only the put calls are timed.
* ``run_latency``: from the start of a one-row put in the producer thread to a ``get_meta`` that
  was already blocked (server-side wait) returning in a consumer thread with its own client;
  versus a *measured* client-polling loop (controller in ``polling_mode``: an empty reply at once,
  then ``sleep(poll_interval)``, as TransferQueue's StreamingDataset does with 1 s). The 1 s
  poller is not run: its expected latency is computed as ``interval / 2 + one empty poll``. A raw
  1 KiB DEALER/ROUTER round trip (``zmq_rtt_ms``) gives the scale of one control message.
* ``run_loader``: a sealed partition read by ``StreamingDataLoader`` with ``num_workers`` 0 and
  2, without and with a simulated training step (``sleep``: releases the GIL like a GPU step).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tensordict import TensorDict

import tq_loader as tq
from benchmarks.harness import WireBaseline, median, timed, tq_cluster

__all__ = ["LatencySpec", "LoaderSpec", "PerSampleSpec", "run_latency", "run_loader", "run_per_sample"]


# --------------------------------------------------------------------------- per-sample vs columnar


@dataclass(frozen=True)
class PerSampleSpec:
    rows: int = 4096
    width: int = 16
    reps: int = 3


def run_per_sample(spec: PerSampleSpec) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    cols: dict[str, Any] = {f: torch.randn(spec.rows, spec.width, generator=gen) for f in ("a", "b", "c")}
    cols["text"] = [f"sample {i}: the quick brown fox" for i in range(spec.rows)]
    rows = [{**{f: cols[f][i : i + 1] for f in ("a", "b", "c")}, "text": [cols["text"][i]]}
            for i in range(spec.rows)]  # fmt: skip
    fields = ["a", "b", "c", "text"]
    columnar: list[float] = []
    per_sample: list[float] = []
    with tq_cluster(2) as client:

        def put_rows(pid: str, n: int) -> None:
            for row in rows[:n]:
                client.put(row, partition_id=pid)

        for r in range(spec.reps + 1):  # round 0: warm-up and check, on a few rows (one-row puts are slow)
            n = spec.rows if r else min(spec.rows, 64)
            part = {f: v[:n] for f, v in cols.items()}
            col_s = timed(lambda r=r, part=part: client.put(part, partition_id=f"col-{r}"))
            row_s = timed(lambda r=r, n=n: put_rows(f"row-{r}", n))
            if r == 0:
                for pid in ("col-0", "row-0"):
                    got = client.get_data(client.get_meta(fields, n, pid, task_name="check"))
                    if got.batch_size[0] != n or not torch.allclose(got["a"].sum(0), part["a"].sum(0)):
                        raise AssertionError(f"per-sample bench: partition {pid} lost or changed rows")
            else:
                columnar.append(col_s)
                per_sample.append(row_s)
            client.clear_partition(f"col-{r}")
            client.clear_partition(f"row-{r}")
    col_med, row_med = median(columnar), median(per_sample)
    return {
        "spec": asdict(spec),
        "columnar_s": col_med,
        "per_sample_s": row_med,
        "columnar_rows_per_s": spec.rows / col_med,
        "per_sample_rows_per_s": spec.rows / row_med,
        "per_sample_us_per_row": row_med / spec.rows * 1e6,
        "columnar_speedup": row_med / col_med,  # how many times faster one columnar put is
        "samples_s": {"columnar": columnar, "per_sample": per_sample},
    }


# --------------------------------------------------------------------------- get_meta latency


@dataclass(frozen=True)
class LatencySpec:
    n: int = 30
    poll_interval: float = 0.010  # the polling loop that is measured
    analytic_interval: float = 1.0  # TransferQueue's StreamingDataset sleep, computed not measured


def _wait_until_blocked(client: tq.Client, deadline: float = 10.0) -> None:
    """Until the controller holds one waiting get_meta (so the put surely lands after it)."""
    end = time.monotonic() + deadline
    while client.statistics()["controller"]["waiting_requests"] < 1:
        if time.monotonic() > end:
            raise TimeoutError("the consumer's get_meta never reached the controller")
        time.sleep(0.001)


def _measure(producer: tq.Client, spec: LatencySpec, *, polling: bool) -> dict[str, list[float]]:
    """One consumer thread with its own client; ``spec.n`` put -> get_meta hand-overs."""
    consumer = tq.Client(producer.controller_address)
    arrived: queue.Queue[float | BaseException] = queue.Queue()
    ready = threading.Event()
    row = {"x": torch.zeros(1, 4)}
    polls = [0]

    def consume() -> None:
        try:
            for _ in range(spec.n):
                ready.set()
                while True:
                    meta = consumer.get_meta(["x"], 1, "lat", task_name="lat", timeout=30)
                    if meta.size:
                        break
                    polls[0] += 1
                    time.sleep(spec.poll_interval)
                arrived.put(time.perf_counter())
        except BaseException as exc:  # handed to the producer thread, which re-raises it
            arrived.put(exc)

    rng = random.Random(2)
    from_start: list[float] = []
    from_return: list[float] = []
    thread = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    thread.start()
    try:
        for _ in range(spec.n):
            ready.wait(30)
            ready.clear()
            if polling:  # land the put at a random phase of the poll cycle
                time.sleep(rng.uniform(0, 2 * spec.poll_interval))
            else:
                _wait_until_blocked(producer)
            t0 = time.perf_counter()
            producer.put(row, partition_id="lat")
            t1 = time.perf_counter()
            got = arrived.get(timeout=30)
            if isinstance(got, BaseException):
                raise got
            from_start.append(got - t0)
            from_return.append(got - t1)
    finally:
        thread.join(30)
        consumer.close()
    return {"from_put_start": from_start, "from_put_return": from_return, "empty_polls": [float(polls[0])]}


def run_latency(spec: LatencySpec) -> dict[str, Any]:
    with tq_cluster(2) as client:
        blocking = _measure(client, spec, polling=False)
    with tq_cluster(2, polling_mode=True) as client:
        polled = _measure(client, spec, polling=True)
        client.put({"x": torch.zeros(1, 4)}, partition_id="empty")
        client.get_meta(["x"], 1, "empty", task_name="drain")
        empty_poll = median([timed(lambda: client.get_meta(["x"], 1, "empty", task_name="drain"))
                             for _ in range(max(5, spec.n // 2))])  # fmt: skip
    with WireBaseline() as wire:  # the transport floor of one control round trip, for scale
        ping = [memoryview(bytes(1024))]
        zmq_rtt = median([timed(lambda: wire.put_raw(ping)) for _ in range(200)])
    blocking_ms = median(blocking["from_put_start"]) * 1e3
    polled_ms = median(polled["from_put_start"]) * 1e3
    analytic_ms = (spec.analytic_interval / 2 + empty_poll) * 1e3
    return {
        "spec": asdict(spec),
        "blocking_ms": blocking_ms,
        "blocking_from_put_return_ms": median(blocking["from_put_return"]) * 1e3,
        "blocking_p90_ms": sorted(blocking["from_put_start"])[int(0.9 * (spec.n - 1))] * 1e3,
        "poll_10ms_measured_ms": polled_ms,
        "empty_poll_ms": empty_poll * 1e3,
        "zmq_rtt_ms": zmq_rtt * 1e3,
        "poll_1s_analytic_ms": analytic_ms,
        "poll_10ms_over_blocking": polled_ms / blocking_ms,
        "poll_1s_analytic_over_blocking": analytic_ms / blocking_ms,
        "samples_s": {"blocking": blocking["from_put_start"], "poll_10ms": polled["from_put_start"]},
    }


# --------------------------------------------------------------------------- loader throughput


@dataclass(frozen=True)
class LoaderSpec:
    rows: int = 2048
    width: int = 2048  # dense float32 "obs" per row
    max_tokens: int = 512  # jagged int64 "response" per row, length in [max_tokens/8, max_tokens)
    batch_size: int = 64
    micro_batch_size: int = 16
    step_ms: float = 5.0  # the simulated training step of the second configuration
    reps: int = 3


def _fill(client: tq.Client, spec: LoaderSpec, pid: str) -> None:
    gen = torch.Generator().manual_seed(3)
    chunk = spec.batch_size * 4
    for start in range(0, spec.rows, chunk):
        n = min(chunk, spec.rows - start)
        lengths = torch.randint(spec.max_tokens // 8, spec.max_tokens, (n,), generator=gen)
        values = torch.randint(0, 32000, (int(lengths.sum()),), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        td = TensorDict(
            {"obs": torch.randn(n, spec.width, generator=gen),
             "response": torch.nested.nested_tensor_from_jagged(values, offsets)},
            batch_size=[n],
        )  # fmt: skip
        client.put(td, partition_id=pid)
    client.seal(pid)


def _iterate(spec: LoaderSpec, pid: str, task: str, workers: int, step_s: float) -> dict[str, Any]:
    dataset = tq.StreamingDataset(
        batch_size=spec.batch_size, micro_batch_size=spec.micro_batch_size,
        data_fields=["obs", "response"], partition_id=pid, task_name=task,
    )  # fmt: skip
    loader = tq.StreamingDataLoader(dataset, num_workers=workers)
    micro = rows = 0
    start = time.perf_counter()
    for td, meta in loader:
        micro += 1
        rows += meta.size
        if td.batch_size[0] != meta.size:
            raise AssertionError(f"loader bench: a micro-batch of {meta.size} rows came with {td.batch_size}")
        if step_s:
            time.sleep(step_s)
    elapsed = time.perf_counter() - start
    expected = spec.rows // spec.batch_size * spec.batch_size
    if rows != expected:
        raise AssertionError(f"loader bench: read {rows} rows of a sealed partition of {expected}")
    stats = loader.statistics()
    return {"seconds": elapsed, "micro_batches": micro, "rows": rows, "wait_fraction": stats["wait_fraction"]}


def run_loader(spec: LoaderSpec) -> dict[str, Any]:
    configs = [(w, s) for s in (0.0, spec.step_ms) for w in (0, 2)]
    runs: dict[str, list[dict[str, Any]]] = {f"w{w}_step{s:g}ms": [] for w, s in configs}
    with tq_cluster(2) as client:
        _fill(client, spec, "loader")
        for r in range(spec.reps + 1):  # round 0: warm-up
            for w, s in configs:
                run = _iterate(spec, "loader", f"bench-{r}-{w}-{s:g}", w, s / 1e3)
                if r:
                    runs[f"w{w}_step{s:g}ms"].append(run)
    out: dict[str, Any] = {"spec": asdict(spec), "configs": {}}
    for key, results in runs.items():
        secs = median([x["seconds"] for x in results])
        out["configs"][key] = {
            "micro_batches_per_s": results[0]["micro_batches"] / secs,
            "rows_per_s": results[0]["rows"] / secs,
            "seconds": secs,
            "wait_fraction": median([x["wait_fraction"] for x in results]),
        }
    c = out["configs"]
    out["w2_over_w0"] = c["w2_step0ms"]["rows_per_s"] / c["w0_step0ms"]["rows_per_s"]
    step = f"{spec.step_ms:g}ms"
    out["w2_over_w0_with_step"] = c[f"w2_step{step}"]["rows_per_s"] / c[f"w0_step{step}"]["rows_per_s"]
    return out
