"""A readable view of ``tq.statistics()``: partitions, consumption per task, storage units."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["render_statistics"]


def render_statistics(stats: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    parts = stats["controller"]["partitions"]["partitions"]
    table = Table(title="partitions")
    for col in ("partition", "rows", "cleared", "fields (produced)", "tasks (consumed)", "sealed"):
        table.add_column(col)
    for pid, p in parts.items():
        fields = ", ".join(f"{k}:{v}" for k, v in p["fields"].items())
        tasks = ", ".join(f"{k}:{v}" for k, v in p["tasks"].items())
        table.add_row(pid, str(p["rows_live"]), str(p["rows_cleared"]), fields, tasks, str(p["sealed"]))
    console.print(table)
    units = Table(title="storage units")
    for col in ("unit", "rows", "bytes held", "requests", "bytes in", "bytes out"):
        units.add_column(col)
    for address, unit in stats.get("storage", {}).get("units", {}).items():
        if "error" in unit:
            units.add_row(address, "[red]" + unit["error"], "", "", "", "")
            continue
        requests = sum(unit.get("requests", {}).values())
        units.add_row(
            address, str(unit["rows"]), _size(unit["bytes"]), str(requests),
            _size(unit["bytes_in"]), _size(unit["bytes_out"]),
        )  # fmt: skip
    console.print(units)
    ctl = stats["controller"]
    console.print(
        f"controller: get_meta={ctl['get_meta']} rows_out={ctl['rows_out']} waiting={ctl['waiting_requests']} "
        f"end_of_stream={ctl['eos']} timeouts={ctl['timeouts']}"
    )


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
