"""Tables of a run, built once and rendered twice: Markdown (the file) and rich (the terminal).

Every figure is shown as ``median (min-max)``; ratios divide medians of the same run. The KV
tables carry the ratios the issue asks for: vs TransferQueue, vs raw pyzmq, vs torch clone/copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from tq_loader.bench.baselines import TORCH_CLONE, TORCH_COPY, ZMQ
from tq_loader.bench.results import Row, Skip, find
from tq_loader.bench.scaling import FIELD_COUNTS
from tq_loader.bench.targets import Outcome
from tq_loader.bench.transferqueue import TQ_SYSTEM
from tq_loader.bench.workloads import Workload

__all__ = ["Table", "build_tables", "print_tables", "to_markdown"]


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fig(row: Row | None, digits: int | None = None) -> str:
    if row is None:
        return "-"
    d = digits if digits is not None else (0 if row.median >= 100 else 2)
    if row.n == 1:
        return f"{row.median:.{d}f}"
    return f"{row.median:.{d}f} ({row.min:.{d}f}-{row.max:.{d}f})"


def ratio(num: Row | None, den: Row | None) -> str:
    if num is None or den is None or den.median <= 0 or num is den:
        return ""
    return f"{num.median / den.median:.2f}x"


def _systems(rows: Iterable[Row], case: str) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if row.case == case:
            seen.setdefault(row.system, None)
    return list(seen)


def _batch_table(rows: list[Row], case: str, w: Workload) -> Table:
    mib = next((r.bytes for r in rows if r.case == case and r.bytes), 0) / 2**20
    t = Table(
        f"{case}: {w.describe()} = {mib:.{0 if mib >= 10 else 2}f} MiB; GB/s, median (min-max)",
        ["system", "put GB/s", "get GB/s", "put vs TQ", "get vs TQ", "put vs pyzmq", "get vs pyzmq",
         "put vs clone", "get vs clone", "put vs copy", "get vs copy", "get copy=False GB/s"],
    )  # fmt: skip
    ref = {name: find(rows, case, "get", name) for name in (TQ_SYSTEM, ZMQ)}
    refp = {name: find(rows, case, "put", name) for name in (TQ_SYSTEM, ZMQ)}
    clone, copy = find(rows, case, "clone", TORCH_CLONE), find(rows, case, "copy", TORCH_COPY)
    for system in _systems(rows, case):
        put = (
            find(rows, case, "put", system)
            or find(rows, case, "clone", system)
            or find(rows, case, "copy", system)
        )
        get = find(rows, case, "get", system) or put
        view = find(rows, case, "get_view", system)
        t.rows.append([
            system, fig(put), fig(get), ratio(put, refp[TQ_SYSTEM]), ratio(get, ref[TQ_SYSTEM]),
            ratio(put, refp[ZMQ]), ratio(get, ref[ZMQ]), ratio(put, clone), ratio(get, clone),
            ratio(put, copy), ratio(get, copy), fig(view),
        ])  # fmt: skip
    t.notes = sorted({f"{r.system}: {r.note}" for r in rows if r.case == case and r.note})
    return t


def _small_table(rows: list[Row], w: Workload) -> Table:
    t = Table(f"small: {w.describe()}; operations/s, median (min-max)",
              ["system", "kv_put /s", "kv_batch_get /s", "kv_put vs TQ", "kv_batch_get vs TQ"])  # fmt: skip
    peer = {m: find(rows, "small", m, TQ_SYSTEM) for m in ("kv_put", "kv_batch_get")}
    for system in _systems(rows, "small"):
        put, get = find(rows, "small", "kv_put", system), find(rows, "small", "kv_batch_get", system)
        t.rows.append(
            [system, fig(put, 0), fig(get, 0), ratio(put, peer["kv_put"]), ratio(get, peer["kv_batch_get"])]
        )
    return t


def _fields_table(rows: list[Row]) -> Table:
    counts = FIELD_COUNTS
    header = ["placement", *[f"{op} {c}f GB/s" for op in ("put", "get") for c in counts]]
    header += [f"{op} {counts[-1]}f / {counts[0]}f" for op in ("put", "get")]
    t = Table("fields: the same bytes as 1, 8 and 32 fields", header)
    for system in _systems(rows, "fields"):
        cells = [fig(find(rows, "fields", f"{op} {c}", system)) for op in ("put", "get") for c in counts]
        cells += [ratio(find(rows, "fields", f"{op} {counts[-1]}", system), find(rows, "fields", f"{op} {counts[0]}", system))
                  for op in ("put", "get")]  # fmt: skip
        t.rows.append([system, *cells])
    t.notes = sorted(
        {r.note for r in rows if r.case == "fields" and r.note and r.metric.endswith(f" {counts[0]}")}
    )
    return t


def _simple_metric_table(rows: list[Row], case: str, title: str, ref_metric: str | None = None) -> Table:
    t = Table(
        title, ["system", "figure", "median (min-max)", "unit", f"vs {ref_metric}" if ref_metric else ""]
    )
    ref = find(rows, case, ref_metric) if ref_metric else None
    for row in rows:
        if row.case == case:
            t.rows.append([row.system, row.metric, fig(row), row.unit, ratio(row, ref) if ref_metric else ""])
    mine = [r for r in rows if r.case == case and r.note]
    shared = len({r.note for r in mine}) == 1
    t.notes = sorted({r.note if shared else f"{r.system}, {r.metric}: {r.note}" for r in mine})
    return t


def _targets_table(outcomes: list[Outcome]) -> Table:
    t = Table("Targets of issue 8 (ratios of this run)", ["target", "figure", "measured", "asked", "verdict"])
    for o in outcomes:
        value = "-" if o.met is None else (f"{o.value:.2f}x" if o.unit == "x" else f"{o.value:.0f} {o.unit}")
        asked = f">= {o.required:g}x" if o.kind == "ratio >=" else f"<= {o.required:g} {o.unit}"
        t.rows.append([o.target, o.what, value, asked, o.verdict()])
    return t


def build_tables(
    rows: list[Row], workloads: dict[str, Workload], outcomes: list[Outcome], skips: list[Skip]
) -> list[Table]:
    cases = {r.case for r in rows}
    tables = [_batch_table(rows, c, workloads[c]) for c in ("simple", "complex") if c in cases]
    if "small" in cases:
        tables.append(_small_table(rows, workloads["small"]))
    if "fields" in cases:
        tables.append(_fields_table(rows))
    if "get_meta" in cases:
        tables.append(_simple_metric_table(rows, "get_meta", "get_meta latency, microseconds"))
    if "loader" in cases:
        tables.append(
            _simple_metric_table(rows, "loader", "loader vs raw get_data", "raw get_meta + get_data")
        )
    if "memory" in cases:
        tables.append(
            _simple_metric_table(rows, "memory", "memory: RSS after the last cycle / after the first")
        )
    if "handover" in cases:
        tables.append(
            _simple_metric_table(
                rows, "handover", "hand-over latency, put -> waiting consumer", "blocking get_meta"
            )
        )
    known = {"simple", "complex", "small", "fields", "get_meta", "loader", "memory", "handover"}
    for other in sorted(cases - known):  # cases added by other modules
        tables.append(_simple_metric_table(rows, other, other))
    if outcomes:
        tables.append(_targets_table(outcomes))
    if skips:
        tables.append(Table("Not measured in this run", ["case", "system", "why"],
                            [[s.case, s.system, s.reason] for s in skips]))  # fmt: skip
    return tables


def _cells(values: list[str]) -> str:
    return "| " + " | ".join(v.replace("|", "/") for v in values) + " |"


def to_markdown(tables: list[Table], meta: dict[str, Any]) -> str:
    lines = [f"# tq_loader benchmarks{' (quick)' if meta.get('quick') else ''}", ""]
    lines.append(f"{meta['when']} on {meta['machine']}. Each figure: median of {meta['reps']} repetitions x "
                 f"{meta['rounds']} rounds (min-max). Ratios divide medians of this run; absolute figures move "
                 "with the machine's load.")  # fmt: skip
    for t in tables:
        lines += ["", f"## {t.title}", "", _cells(t.header), _cells(["---"] * len(t.header))]
        lines += [_cells(r) for r in t.rows]
        if t.notes:
            lines += [""] + [f"- {n}" for n in t.notes]
    for extra in meta.get("remarks", []):
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def print_tables(tables: list[Table], console: Console) -> None:
    for t in tables:
        rich = RichTable(title=t.title, title_justify="left")
        for i, h in enumerate(t.header):
            rich.add_column(h, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i == 0)
        for r in t.rows:
            rich.add_row(*r)
        console.print(rich)
