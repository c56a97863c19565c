"""Memory held by a cluster over many put/clear cycles of the simple case (target: within 10 %).

The storage process's resident set (``VmRSS`` in ``/proc/PID/status``) after the first cycle is
the reference; after the last it may be at most 1.10x of it. Embedded: this process; served: the
``tq-loader serve`` process. ``tests/test_bench_memory.py`` asserts the same with 100 cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tq_loader as tq
from tq_loader.bench.registry import Context, case
from tq_loader.bench.results import make_row
from tq_loader.bench.systems import EMBEDDED, SERVE, embedded, serve_overrides, served
from tq_loader.bench.workloads import Workload, build

__all__ = ["put_clear_cycles", "rss_bytes"]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of ``pid`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def put_clear_cycles(
    w: Workload, cycles: int, pid: int | str = "self", status: Callable[[str], None] | None = None
) -> list[int]:
    """``cycles`` x (``kv_batch_put`` of ``w``'s batch, then ``kv_clear``) on the attached cluster;
    the RSS of ``pid`` after each cycle."""
    td = build(w)
    keys = [f"mem-{i}" for i in range(w.rows)]
    rss = []
    for i in range(cycles):
        tq.kv_batch_put(keys, "memory", td)
        tq.kv_clear(keys, "memory")
        rss.append(rss_bytes(pid))
        if status and i % 10 == 0:
            status(f"memory: cycle {i + 1}/{cycles}")
    return rss


@case("memory", "RSS of the storage process after N put/clear cycles vs after the first")
def run_memory(ctx: Context) -> None:
    w, cycles = ctx.plan.memory_workload, ctx.plan.memory_cycles
    for label in (EMBEDDED, SERVE):
        ctx.status(f"memory: {label}")
        if label == EMBEDDED:
            with embedded(True):
                rss = put_clear_cycles(w, cycles, "self", ctx.status)
        else:
            with served(serve_overrides(False), ctx.out / "logs" / "serve-memory.log") as pid:
                rss = put_clear_cycles(w, cycles, pid, ctx.status)
        note = (f"{cycles} cycles of {w.describe()}: RSS {rss[0] / 2**20:.0f} MiB after the first, "
                f"{rss[-1] / 2**20:.0f} MiB after the last, peak {max(rss) / 2**20:.0f} MiB")  # fmt: skip
        ctx.rows.append(make_row("memory", label, "RSS last/first", "x", [rss[-1] / rss[0]], note=note))
