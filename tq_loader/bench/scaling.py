"""How tq_loader scales: field count at equal bytes, get_meta on a big partition, the loader's cost.

* ``fields``: the same bytes as 1, 8 and 32 float32 fields, put/get through the KV calls, embedded
  and served (target: 32 fields >= 0.8x 1 field).
* ``get_meta``: p50/p99 of one ``get_meta`` of all 32 fields (``meta_batch`` rows) on a partition
  holding ``meta_rows`` rows x 32 fields, in-process and over ZMQ (targets: 100 / 300 us).
* ``loader``: ``StreamingDataLoader`` over a sealed partition against the raw loop it replaces
  (``get_meta`` + ``get_data`` of the same batches), num_workers 0 and 2 (target: >= 0.9x).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.bench.registry import Context, case
from tq_loader.bench.results import make_row
from tq_loader.bench.systems import EMBEDDED, EMBEDDED_ZMQ, SERVE, embedded, serve_overrides, served
from tq_loader.bench.workloads import Workload, build, drive_kv, payload_bytes

__all__ = ["FIELD_COUNTS", "fields_workload"]

FIELD_COUNTS = (1, 8, 32)


def fields_workload(base: Workload, count: int) -> Workload:
    """``base``'s bytes (rows x regular x width float32) as ``count`` fields."""
    total = base.regular * base.width
    return Workload(name=f"fields-{count}", rows=base.rows, regular=count, width=max(1, total // count))


@case("fields", "the same bytes as 1, 8 and 32 fields")
def run_fields(ctx: Context) -> None:
    base = ctx.plan.workloads["fields"]
    placements: list[tuple[str, Any]] = [
        (EMBEDDED, lambda: embedded(True)),
        (SERVE, lambda: served(serve_overrides(False), ctx.out / "logs" / "serve-fields.log")),
    ]
    for label, start in placements:
        with start():
            for count in FIELD_COUNTS:
                w = fields_workload(base, count)
                ctx.status(f"fields: {label}, {count} field(s)")
                result = drive_kv(tq, w, build(w), ctx.plan.reps, ctx.plan.rounds)
                for op in ("put", "get"):
                    ctx.rows.append(
                        make_row("fields", label, f"{op} {count}", "GB/s", result["samples"][op],
                                 note=w.describe(), nbytes=result["bytes"])
                    )  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _fill(client: tq.Client, pid: str, rows: int, fields: list[str], status: Any) -> None:
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        status(f"get_meta: producing rows {start + n:,}/{rows:,}")
        client.put(TensorDict({f: torch.zeros(n) for f in fields}, batch_size=[n]), partition_id=pid)


@case("get_meta", "get_meta p50/p99 on a partition of many rows x 32 fields")
def run_get_meta(ctx: Context) -> None:
    plan = ctx.plan
    fields = [f"f{i:02d}" for i in range(32)]
    for label, in_process in ((EMBEDDED, True), (EMBEDDED_ZMQ, False)):
        with embedded(in_process):
            client = tq.get_client()
            _fill(client, "meta", plan.meta_rows, fields, ctx.status)
            p50: list[float] = []
            p99: list[float] = []
            for rep in range(plan.reps):
                ctx.status(f"get_meta: {label}, repetition {rep + 1}/{plan.reps}")
                lat = []
                for _ in range(plan.meta_calls):
                    start = time.perf_counter()
                    meta = client.get_meta(fields, plan.meta_batch, "meta", task_name=f"meta-{rep}")
                    lat.append((time.perf_counter() - start) * 1e6)
                    if meta.size != plan.meta_batch:
                        raise AssertionError(
                            f"get_meta returned {meta.size} rows, asked for {plan.meta_batch}"
                        )
                p50.append(_percentile(lat, 0.5))
                p99.append(_percentile(lat, 0.99))
            note = (f"{plan.meta_rows:,} rows x 32 fields in the partition; {plan.meta_batch} rows per call; "
                    f"p50/p99 of {plan.meta_calls} calls per repetition")  # fmt: skip
            ctx.rows.append(make_row("get_meta", label, "p50", "us", p50, note=note))
            ctx.rows.append(make_row("get_meta", label, "p99", "us", p99, note=note))


def _loader_data(rows: int, seed: int = 3) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(16, 1024, rows).round().to(torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(0, 32000, (int(offsets[-1]),), generator=gen)
    return TensorDict(
        {"obs": torch.randn(rows, 2048, generator=gen),
         "response": torch.nested.nested_tensor_from_jagged(values, offsets)},
        batch_size=[rows],
    )  # fmt: skip


def _raw_pass(client: tq.Client, pid: str, task: str, batches: int, batch: int) -> int:
    rows = 0
    for _ in range(batches):
        td = client.get_data(client.get_meta(["obs", "response"], batch, pid, task_name=task))
        rows += td.batch_size[0]
    return rows


def _loader_pass(pid: str, task: str, batch: int, workers: int) -> int:
    dataset = tq.StreamingDataset(
        batch_size=batch,
        micro_batch_size=batch,
        data_fields=["obs", "response"],
        partition_id=pid,
        task_name=task,
    )
    rows = 0
    for td, _meta in tq.StreamingDataLoader(dataset, num_workers=workers):
        rows += td.batch_size[0]
    return rows


@case("loader", "StreamingDataLoader against raw get_meta + get_data of the same batches")
def run_loader(ctx: Context) -> None:
    plan = ctx.plan
    batch = 64
    data = _loader_data(plan.loader_rows)
    nbytes = payload_bytes(data)
    batches = plan.loader_rows // batch
    expected = batches * batch
    with embedded(True):
        client = tq.get_client()
        client.put(data, partition_id="loader")
        client.seal("loader")
        paths = {
            "raw get_meta + get_data": lambda t: _raw_pass(client, "loader", t, batches, batch),
            "StreamingDataLoader, num_workers=0": lambda t: _loader_pass("loader", t, batch, 0),
            "StreamingDataLoader, num_workers=2": lambda t: _loader_pass("loader", t, batch, 2),
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(plan.reps + 1):  # repetition 0 warms up
            for name, run in paths.items():
                ctx.status(f"loader: {name}, pass {rep}/{plan.reps}")
                start = time.perf_counter()
                rows = run(f"{name}-{rep}")
                seconds = time.perf_counter() - start
                if rows != expected:
                    raise AssertionError(
                        f"loader: {name} read {rows} rows of a sealed partition of {expected}"
                    )
                if rep:
                    samples[name].append(nbytes * rows / plan.loader_rows / seconds / 1e9)
    note = (
        f"{plan.loader_rows} rows (obs float32 [2048] + jagged int64 response 16..1024), batches of {batch}"
    )
    for name, values in samples.items():
        ctx.rows.append(make_row("loader", EMBEDDED, name, "GB/s", values, note=note, nbytes=nbytes))
