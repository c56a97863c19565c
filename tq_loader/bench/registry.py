"""The registries a run is assembled from: cases (what is measured) and KV systems (who is measured).

A *case* is a named job that appends rows to the run: ``@case("fields", "...")``. The KV cases
(``simple``, ``complex``, ``small``) are driven over every registered *system*: a function that
takes the selected workloads and returns, per workload, the samples of ``workloads.drive_kv`` /
``drive_small``. A new storage backend adds itself with one module that calls
:func:`register_system` (a tq_loader cluster with ``storage.backend=...``, or the backend's own
client as a baseline) and is listed in :data:`CASE_MODULES` (or passed with ``--with MODULE``);
nothing else in the suite changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tq_loader.bench.results import Row, Skip
from tq_loader.bench.workloads import Workload

__all__ = [
    "CASES",
    "CASE_MODULES",
    "KV_CASES",
    "SYSTEMS",
    "Case",
    "Context",
    "Plan",
    "System",
    "SystemRun",
    "case",
    "load",
    "register_system",
]

# Modules whose import registers cases and systems, in report order.
CASE_MODULES = (
    "tq_loader.bench.baselines",
    "tq_loader.bench.systems",
    "tq_loader.bench.backends",  # the KV storage backends (mooncake, yuanrong) and their own clients
    "tq_loader.bench.transferqueue",
    "tq_loader.bench.kv_cases",
    "tq_loader.bench.scaling",
    "tq_loader.bench.memory",
    "tq_loader.bench.handover",
)
KV_CASES = ("simple", "complex", "small")


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions. Each figure is the median of ``reps`` x ``rounds`` samples."""

    quick: bool
    reps: int
    rounds: int
    workloads: dict[str, Workload]
    meta_rows: int  # rows x 32 fields in the partition get_meta is timed on
    meta_calls: int
    meta_batch: int
    loader_rows: int
    memory_cycles: int
    memory_workload: Workload
    handover_n: int


@dataclass
class Context:
    """What a case gets: the plan, where to write logs, progress hooks, and the run's rows."""

    plan: Plan
    out: Path
    options: dict[str, Any]
    status: Callable[[str], None]
    rows: list[Row] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # per-case facts for the report (fingerprints, ...)

    def skip(self, case: str, system: str, reason: str) -> None:
        self.skips.append(Skip(case, system, reason))
        self.status(f"skipped {system} ({case}): {reason}")


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    run: Callable[[Context], None]
    quick: bool = True  # runs in --quick too


SystemRun = Callable[[Context, list[Workload]], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class System:
    """One system a KV workload is driven through. ``run`` returns ``{workload name: result}`` where
    a result is what ``drive_kv`` / ``drive_small`` return; it may also return ``{}`` after calling
    ``ctx.skip`` (not installed, ...). ``workloads``: the KV cases it supports."""

    name: str
    kind: str
    run: SystemRun
    workloads: frozenset[str] = frozenset(KV_CASES)
    note: str = ""
    quick: bool = True


CASES: dict[str, Case] = {}
SYSTEMS: dict[str, System] = {}


def case(
    name: str, title: str, *, quick: bool = True
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Register ``fn(ctx)`` as the case ``name`` (``--only name``)."""

    def deco(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if name in CASES:
            raise ValueError(f"benchmark case {name!r} is registered twice")
        CASES[name] = Case(name, title, fn, quick)
        return fn

    return deco


def register_system(system: System) -> System:
    if system.name in SYSTEMS:
        raise ValueError(f"benchmark system {system.name!r} is registered twice")
    SYSTEMS[system.name] = system
    return system


def load(extra: Iterable[str] = ()) -> dict[str, Case]:
    """Import the built-in case modules and ``extra`` ones; the registered cases, in order."""
    for module in (*CASE_MODULES, *extra):
        importlib.import_module(module)
    return CASES
