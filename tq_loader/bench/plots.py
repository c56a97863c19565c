"""PNG plots of a run: bars per system per case with min-max whiskers and ratio annotations.

One figure per case (``<stem>-<case>.png``) and one overview with all of them (``<stem>.png``).
tq_loader bars are annotated with their ratio to TransferQueue when it ran, else to raw pyzmq.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from tq_loader.bench.baselines import ZMQ
from tq_loader.bench.results import KIND_BASELINE, KIND_PEER, KIND_TQ, Row, find
from tq_loader.bench.transferqueue import TQ_SYSTEM

__all__ = ["plot_all"]

_COLORS = {KIND_TQ: "#1f77b4", KIND_PEER: "#d62728", KIND_BASELINE: "#7f7f7f"}
_HATCHES = ("", "//", "..", "xx", "--", "\\\\")
_ORDER = ("simple", "complex", "small", "fields", "get_meta", "loader", "memory", "handover")


def _bars(ax: Any, rows: list[Row], case: str, title: str) -> None:
    mine = [r for r in rows if r.case == case]
    if not mine:
        return
    metrics = list(dict.fromkeys(r.metric for r in mine))
    systems = list(dict.fromkeys(r.system for r in mine))
    width = 0.8 / max(1, len(metrics))
    for m_i, metric in enumerate(metrics):
        for s_i, system in enumerate(systems):
            row = find(mine, case, metric, system)
            if row is None:
                continue
            x = s_i + (m_i - (len(metrics) - 1) / 2) * width
            hatch = _HATCHES[m_i % 6]
            ax.bar(x, row.median, width, color=_COLORS.get(row.kind, "#2ca02c"), hatch=hatch, edgecolor="white",
                   yerr=[[row.median - row.min], [row.max - row.median]], capsize=2)  # fmt: skip
            ref = find(mine, case, metric, TQ_SYSTEM) or find(mine, case, metric, ZMQ)
            if row.kind == KIND_TQ and ref is not None and ref.median > 0:
                tag = "TQ" if ref.system == TQ_SYSTEM else "zmq"
                ax.annotate(f"{row.median / ref.median:.2f}x {tag}", (x, row.max), ha="center", va="bottom",
                            fontsize=6, rotation=90)  # fmt: skip
    ax.set_xticks(range(len(systems)), [s.replace(", ", ",\n").replace(" over ", "\nover ") for s in systems],
                  fontsize=6, rotation=30, ha="right")  # fmt: skip
    units = {r.unit for r in mine}
    ax.set_ylabel(" / ".join(sorted(units)))
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="#dddddd", edgecolor="#333333", hatch=_HATCHES[i % 6], label=m)
                       for i, m in enumerate(metrics)], fontsize=6)  # fmt: skip
    values = [r.min for r in mine if r.min > 0]
    if values and max(r.max for r in mine) / min(values) > 30:
        ax.set_yscale("log")  # baselines an order of magnitude apart: keep every bar readable


def plot_all(rows: list[Row], out: Path, stem: str, titles: dict[str, str]) -> list[Path]:
    """Write the per-case figures and the overview; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in _ORDER if any(r.case == c for r in rows)]
    cases += sorted({r.case for r in rows} - set(cases))
    written: list[Path] = []
    for case in cases:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        _bars(ax, rows, case, titles.get(case, case))
        fig.tight_layout()
        path = out / f"{stem}-{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if cases:
        cols = 2
        nrows = (len(cases) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(14, 4.6 * nrows), squeeze=False)
        for ax, case in zip(axes.flat, cases):
            _bars(ax, rows, case, titles.get(case, case))
        for ax in list(axes.flat)[len(cases) :]:
            ax.set_visible(False)
        fig.suptitle("tq_loader benchmarks: medians with min-max; blue tq_loader, red TransferQueue, grey baselines",
                     fontsize=10)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
