"""Group 1: put/get throughput of the embedded cluster against the transport floor and a pickle path.

One batch shaped like TransferQueue's perftest (``rows`` x ``fields`` x ``width`` float32; 256 x 9 x
8192 is 72 MiB), dense or with every field jagged (row lengths uniform in [width/2, 3*width/2), so
about the same bytes). Each round times, in rotating order, three blocks on the same bytes:

* floor:  the columns as raw zero-copy frames, DEALER -> ROUTER thread and back;
* pickle: ``pickle.dumps`` of the TensorDict -> one frame -> ``pickle.loads`` (and back);
* tq:     ``client.put`` (PrepareWrite + PutRows to every unit + NotifyProduced), ``get_meta``
          (timed separately, not part of the get), ``client.get_data``.

Round 0 is a warm-up and checks that tq_loader returned exactly what was put. Between rounds the
partition is cleared, as a training loop clears consumed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tensordict import TensorDict

from benchmarks.harness import (
    WireBaseline,
    column_buffers,
    gib_per_s,
    median,
    payload_bytes,
    timed,
    tq_cluster,
)

__all__ = ["TransferSpec", "make_batch", "run_transfer"]

METHODS = ("floor_put", "floor_get", "pickle_put", "pickle_get", "tq_put", "tq_get_meta", "tq_get")


@dataclass(frozen=True)
class TransferSpec:
    rows: int = 256
    fields: int = 9
    width: int = 8192
    jagged: bool = False
    num_units: int = 2
    reps: int = 7

    @property
    def name(self) -> str:
        return f"{'jagged' if self.jagged else 'dense'}_{self.num_units}u"


def make_batch(spec: TransferSpec, seed: int = 0) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    columns: dict[str, torch.Tensor] = {}
    for f in range(spec.fields):
        if spec.jagged:
            lengths = torch.randint(spec.width // 2, spec.width * 3 // 2, (spec.rows,), generator=gen)
            values = torch.randn(int(lengths.sum()), generator=gen)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            columns[f"field_{f}"] = torch.nested.nested_tensor_from_jagged(values, offsets)
        else:
            columns[f"field_{f}"] = torch.randn(spec.rows, spec.width, generator=gen)
    return TensorDict(columns, batch_size=[spec.rows])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_nested:
        return b.is_nested and torch.equal(a.values(), b.values()) and torch.equal(a.offsets(), b.offsets())
    return torch.equal(a, b)


def run_transfer(spec: TransferSpec) -> dict[str, Any]:
    """Median seconds per method, GiB/s and the tq/floor and tq/pickle ratios for ``spec``."""
    td = make_batch(spec)
    nbytes = payload_bytes(td)
    names = list(td.keys())
    buffers = column_buffers(td)
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    with tq_cluster(spec.num_units) as client, WireBaseline() as wire:
        wire.held_frames, wire.held_object = buffers, td

        def floor() -> dict[str, float]:
            put = timed(lambda: wire.put_raw(buffers))
            wire.received = None
            return {"floor_put": put, "floor_get": timed(wire.get_raw)}

        def pickled() -> dict[str, float]:
            put = timed(lambda: wire.put_pickle(td))
            wire.received = None
            return {"pickle_put": put, "pickle_get": timed(wire.get_pickle)}

        def tq_round(pid: str, check: bool) -> dict[str, float]:
            put = timed(lambda: client.put(td, partition_id=pid))
            box: list[Any] = []
            meta_s = timed(lambda: box.append(client.get_meta(names, spec.rows, pid, task_name="bench")))
            get = timed(lambda: box.append(client.get_data(box[0])))
            if check and not all(_same(td[n], box[1][n]) for n in names):
                raise AssertionError(f"{spec.name}: tq_loader returned different data than was put")
            box.clear()
            client.clear_partition(pid)
            return {"tq_put": put, "tq_get_meta": meta_s, "tq_get": get}

        for r in range(spec.reps + 1):  # round 0: warm-up and correctness check
            blocks: list[Callable[[], dict[str, float]]] = [
                floor,
                pickled,
                lambda r=r: tq_round(f"xfer-{r}", check=r == 0),
            ]
            shift = r % len(blocks)
            times: dict[str, float] = {}
            for block in blocks[shift:] + blocks[:shift]:
                times.update(block())
            if r:
                for m, s in times.items():
                    samples[m].append(s)

    med = {m: median(v) for m, v in samples.items()}
    out: dict[str, Any] = {"spec": asdict(spec), "bytes": nbytes, "median_s": med, "samples_s": samples}
    for op in ("put", "get"):
        tq_s, floor_s, pickle_s = med[f"tq_{op}"], med[f"floor_{op}"], med[f"pickle_{op}"]
        out[op] = {
            "tq_gibs": gib_per_s(nbytes, tq_s),
            "floor_gibs": gib_per_s(nbytes, floor_s),
            "pickle_gibs": gib_per_s(nbytes, pickle_s),
            "tq_over_floor": floor_s / tq_s,  # throughput ratio: 1.0 = as fast as raw frames
            "tq_over_pickle": pickle_s / tq_s,  # > 1: faster than pickling the batch
            # the same ratios from each method's fastest round: steadier when other jobs load the machine
            "best_tq_over_floor": min(samples[f"floor_{op}"]) / min(samples[f"tq_{op}"]),
            "best_tq_over_pickle": min(samples[f"pickle_{op}"]) / min(samples[f"tq_{op}"]),
        }
    out["get_meta_ms"] = med["tq_get_meta"] * 1e3
    return out
