"""The KV cases -- simple, complex, small -- driven over every registered system, in one stage.

Each system is started once and runs every selected workload (TransferQueue's Ray start-up is
paid once). Systems run in registration order: the baselines, then tq_loader's placements, then
TransferQueue. A system that fails is recorded as a failure (the run's exit status says so) and
the others still run; one that cannot run here is a skip with its reason.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from tq_loader.bench.registry import KV_CASES, SYSTEMS, Context, case
from tq_loader.bench.results import KIND_TQ, make_row

__all__ = ["run_kv"]


def _rows(ctx: Context, system: Any, name: str, result: dict[str, Any]) -> None:
    unit = "ops/s" if name == "small" else "GB/s"
    note = "; ".join(n for n in (system.note, result.get("note", "")) if n)
    for metric, samples in result["samples"].items():
        if metric.endswith("_s") or not samples:
            continue  # clear times are kept in the samples only
        ctx.rows.append(
            make_row(
                name, system.name, metric, unit, samples, kind=system.kind, note=note, nbytes=result["bytes"]
            )
        )
    ctx.info.setdefault("fingerprints", {}).setdefault(name, {})[system.name] = result.get("fingerprint")


@case("kv", "simple / complex / small through the same KV calls on every system")
def run_kv(ctx: Context) -> None:
    selected = [n for n in ctx.options.get("kv_workloads", KV_CASES) if n in KV_CASES]
    workloads = [ctx.plan.workloads[n] for n in selected]
    for system in SYSTEMS.values():
        mine = [w for w in workloads if w.name in system.workloads]
        if not mine:
            continue
        if ctx.plan.quick and not system.quick:
            for w in mine:
                ctx.skip(w.name, system.name, "not run in --quick (start-up cost)")
            continue
        began = time.perf_counter()
        try:
            results = system.run(ctx, mine)
        except Exception as exc:  # recorded as a failure with its traceback; the run goes on
            (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
            with open(ctx.out / "logs" / "failures.log", "a") as log:
                log.write(f"--- {system.name}\n{traceback.format_exc()}\n")
            for w in mine:
                ctx.skip(w.name, system.name, f"FAILED: {type(exc).__name__}: {exc}")
            if system.kind == KIND_TQ:
                ctx.info.setdefault("failures", []).append(f"{system.name}: {type(exc).__name__}: {exc}")
            continue
        finally:
            ctx.info.setdefault("system_s", {})[system.name] = round(time.perf_counter() - began, 1)
        for name, result in results.items():
            _rows(ctx, system, name, result)
