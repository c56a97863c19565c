"""The two sizes of a run: the full suite (issue 8's shapes) and ``--quick`` (tiny, well under a minute)."""

from __future__ import annotations

from tq_loader.bench.registry import Plan
from tq_loader.bench.workloads import Workload

__all__ = ["full", "quick"]


def full(reps: int | None = None, rounds: int | None = None) -> Plan:
    return Plan(
        quick=False,
        reps=reps or 3,
        rounds=rounds or 3,
        workloads={
            "simple": Workload("simple", rows=1024, regular=9, width=8192),  # 288 MiB
            "complex": Workload("complex", rows=1024, regular=3, jagged=3, strings=3, string_chars=32768),
            "small": Workload("small", kind="small", ops=300, rows=1, regular=0),
            "fields": Workload("fields", rows=512, regular=8, width=8192),  # 128 MiB as 1, 8 or 32 fields
        },
        meta_rows=1_000_000,
        meta_calls=200,
        meta_batch=256,
        loader_rows=4096,
        memory_cycles=100,
        memory_workload=Workload("memory", rows=1024, regular=9, width=1024),
        handover_n=30,
    )


def quick(reps: int | None = None, rounds: int | None = None) -> Plan:
    return Plan(
        quick=True,
        reps=reps or 1,
        rounds=rounds or 2,
        workloads={
            "simple": Workload("simple", rows=64, regular=9, width=256),
            "complex": Workload(
                "complex", rows=64, regular=3, jagged=3, strings=3, width=256, string_chars=512
            ),
            "small": Workload("small", kind="small", ops=20, rows=1, regular=0),
            "fields": Workload("fields", rows=64, regular=8, width=256),
        },
        meta_rows=20_000,
        meta_calls=20,
        meta_batch=64,
        loader_rows=512,
        memory_cycles=5,
        memory_workload=Workload("memory", rows=64, regular=9, width=256),
        handover_n=5,
    )
