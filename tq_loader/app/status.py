"""``tq-loader status``: one picture of a running cluster, built from its typed statistics snapshots.

:func:`build_view` turns one or two :class:`~tq_loader.stats.ClusterStats` snapshots into a
:class:`StatusView` (partitions with rows, the fraction of rows that produced each field and that
each task consumed; storage units with rows and bytes; request rates between the two snapshots;
lost rows and units). :func:`render` prints it with ``rich``; :func:`plot_partition` draws one
partition's production matrix (rows x fields) and consumption per task with matplotlib.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tq_loader.stats import ClusterStats, UnitStats

__all__ = ["PartitionView", "StatusView", "UnitView", "build_view", "plot_partition", "render"]


@dataclass(frozen=True)
class PartitionView:
    partition_id: str
    rows: int  # live rows
    cleared: int
    produced: dict[str, float]  # field -> fraction of live rows that have it
    consumed: dict[str, float]  # task -> fraction of live rows it consumed
    sealed: bool
    aborted: str | None
    abandoned: int


@dataclass(frozen=True)
class UnitView:
    address: str
    rows: int | None
    bytes: int | None
    requests: int | None
    error: str | None = None


@dataclass(frozen=True)
class StatusView:
    partitions: list[PartitionView]
    units: list[UnitView]
    backend: str
    rates: dict[str, float]  # per second between two snapshots; empty with one snapshot
    totals: dict[str, int]  # the counters the rates are computed from
    lost_rows: int
    abandoned_rows: int
    lost_units: dict[str, str]
    waiting_requests: int
    window_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _totals(stats: ClusterStats) -> dict[str, int]:
    ctl = stats.controller
    unit_requests = sum(
        sum(u.requests.values()) for u in stats.storage.units.values() if isinstance(u, UnitStats)
    )
    return {
        "get_meta": ctl.get_meta,
        "rows_out": ctl.rows_out,
        "notifies": ctl.notifies,
        "storage_requests": unit_requests,
        "storage_bytes_in": sum(u.bytes_in for u in stats.storage.units.values() if isinstance(u, UnitStats)),
        "storage_bytes_out": sum(
            u.bytes_out for u in stats.storage.units.values() if isinstance(u, UnitStats)
        ),
    }


def build_view(stats: ClusterStats, earlier: ClusterStats | None = None, window_s: float = 0.0) -> StatusView:
    """The view of ``stats``; with an ``earlier`` snapshot taken ``window_s`` seconds before, the rates."""
    parts = []
    for pid, p in sorted(stats.controller.partitions.partitions.items()):
        parts.append(
            PartitionView(
                partition_id=pid,
                rows=p.rows_live,
                cleared=p.rows_cleared,
                produced={f: _fraction(n, p.rows_live) for f, n in sorted(p.fields.items())},
                consumed={t: _fraction(n, p.rows_live) for t, n in sorted(p.tasks.items())},
                sealed=p.sealed,
                aborted=p.aborted,
                abandoned=p.abandoned_rows,
            )
        )
    units = []
    for address, unit in sorted(stats.storage.units.items()):
        if isinstance(unit, UnitStats):
            units.append(UnitView(address, unit.rows, unit.bytes, sum(unit.requests.values())))
        else:
            units.append(UnitView(address, None, None, None, error=str(unit.get("error", unit))))
    totals = _totals(stats)
    rates: dict[str, float] = {}
    if earlier is not None and window_s > 0:
        before = _totals(earlier)
        rates = {k: round(max(0, v - before[k]) / window_s, 2) for k, v in totals.items()}
    ctl = stats.controller
    return StatusView(
        partitions=parts,
        units=units,
        backend=stats.storage.backend,
        rates=rates,
        totals=totals,
        lost_rows=ctl.lost_rows,
        abandoned_rows=ctl.abandoned_rows,
        lost_units=dict(ctl.lost_units),
        waiting_requests=ctl.waiting_requests,
        window_s=window_s if rates else None,
    )


def _bar(fraction: float, width: int = 10) -> str:
    filled = round(fraction * width)
    colour = "green" if fraction >= 1 else "yellow" if fraction > 0 else "red"
    return f"[{colour}]{'█' * filled}{'·' * (width - filled)}[/{colour}] {fraction:>4.0%}"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def render(view: StatusView, console: Any = None, address: str | None = None) -> None:
    """Print the view: a partitions table, a storage-units table and a line of rates and losses."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"partitions{f' at {address}' if address else ''}")
    for col in ("partition", "rows", "produced (per field)", "consumed (per task)", "state"):
        table.add_column(col, overflow="fold")
    for p in view.partitions:
        state = "aborted: " + p.aborted if p.aborted else ("sealed" if p.sealed else "open")
        if p.abandoned:
            state += f", {p.abandoned} abandoned"
        table.add_row(
            p.partition_id,
            f"{p.rows}" + (f" (+{p.cleared} cleared)" if p.cleared else ""),
            "\n".join(f"{f}: {_bar(v)}" for f, v in p.produced.items()) or "-",
            "\n".join(f"{t}: {_bar(v)}" for t, v in p.consumed.items()) or "-",
            state,
        )
    if not view.partitions:
        table.add_row("(none)", "", "", "", "")
    console.print(table)
    units = Table(title=f"storage units ({view.backend})")
    for col in ("unit", "rows", "bytes", "requests"):
        units.add_column(col)
    for u in view.units:
        if u.error:
            units.add_row(u.address, f"[red]{u.error}", "", "")
        else:
            units.add_row(u.address, str(u.rows), _size(u.bytes), str(u.requests))
    console.print(units)
    if view.rates:
        rates = ", ".join(f"{k} {v:g}/s" for k, v in view.rates.items() if not k.startswith("storage_bytes"))
        rates += f"; storage in {_size(int(view.rates['storage_bytes_in']))}/s"
        rates += f", out {_size(int(view.rates['storage_bytes_out']))}/s"
        console.print(f"requests (over {view.window_s:.1f} s): {rates}")
    else:
        console.print("requests (totals): " + ", ".join(f"{k} {v}" for k, v in view.totals.items()))
    lost = f"lost rows: {view.lost_rows}, abandoned rows: {view.abandoned_rows}"
    if view.lost_units:
        lost += ", lost units: " + ", ".join(f"{a} ({why})" for a, why in view.lost_units.items())
    console.print(f"{lost}; waiting requests: {view.waiting_requests}")


@dataclass
class PartitionPicture:
    """What :func:`plot_partition` draws (fetched by the CLI with the client's status calls)."""

    partition_id: str
    fields: list[str]
    production: Any  # (rows, fields) 0/1 array
    tasks: list[str] = field(default_factory=list)
    consumption: Any = None  # (rows, tasks) 0/1 array


def fetch_picture(client: Any, stats: ClusterStats, partition_id: str | None = None) -> PartitionPicture:
    """One partition's production matrix and consumption per task (default: the one with most rows)."""
    import numpy as np

    from tq_loader.errors import NotFoundError

    parts = stats.controller.partitions.partitions
    if partition_id is None:
        if not parts:
            raise NotFoundError("the cluster has no partition to plot; put some rows first")
        partition_id = max(parts, key=lambda pid: parts[pid].rows_live)
    if partition_id not in parts:
        raise NotFoundError(f"no partition {partition_id!r}; the cluster has {sorted(parts)}")
    p = parts[partition_id]
    fields = sorted(p.fields)
    _ids, status = client.get_production_status(fields, partition_id) if fields else (None, None)
    production = np.zeros((p.rows_live, 0)) if status is None else status.numpy()
    tasks = sorted(p.tasks)
    columns = []
    for task in tasks:
        _, consumed = client.get_consumption_status(task, partition_id)
        columns.append(np.zeros(len(production)) if consumed is None else consumed.numpy())
    consumption = np.stack(columns, axis=1) if columns else np.zeros((len(production), 0))
    return PartitionPicture(partition_id, fields, production, tasks, consumption)


def plot_partition(picture: PartitionPicture, path: str | Path, size: tuple[int, int] = (1000, 600)) -> Path:
    """Write a PNG of ``size`` pixels: production (rows x fields) and consumption (rows x tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, gridspec_kw={"width_ratios": [3, 2]}
    )
    cmap = ListedColormap(["#d9d9d9", "#2b8cbe"])  # grey: not yet, blue: done
    for ax, matrix, names, title in (
        (left, picture.production, picture.fields, "produced"),
        (right, picture.consumption, picture.tasks, "consumed"),
    ):
        data = np.asarray(matrix, dtype=float)
        if data.size == 0:
            data = np.zeros((1, 1))
            ax.text(0, 0, f"nothing {title}", ha="center", va="center")
        ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("row (in the partition's order)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        done = float(np.asarray(matrix).mean()) if np.asarray(matrix).size else 0.0
        ax.set_title(f"{title} ({done:.0%})")
    fig.suptitle(f"partition {picture.partition_id!r}: {len(picture.production)} rows")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
