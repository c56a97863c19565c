"""Issue 8's targets, each checked against rows of the same run: met or not, and by how much.

A throughput target is a ratio ``tq_loader median / reference median >= required``; a latency or
memory target is a bound ``value <= required``. ``margin`` is how far from the line the figure is
(>= 1: met with that much to spare; < 1: the factor still missing). Targets whose rows are missing
(a system skipped, a case not selected) are listed as not measured, never as met. The ``copy=False``
reads are reported beside the copying ones (the targets hold for the copying default).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tq_loader.bench.baselines import TORCH_CLONE, ZMQ
from tq_loader.bench.results import Row, find
from tq_loader.bench.scaling import FIELD_COUNTS
from tq_loader.bench.systems import EMBEDDED, EMBEDDED_ZMQ, SERVE, SERVE_TCP
from tq_loader.bench.transferqueue import TQ_SYSTEM

__all__ = ["Outcome", "evaluate"]


@dataclass
class Outcome:
    target: str  # the wording, shortened
    what: str  # the figure compared, e.g. "simple put: tq_loader serve / TransferQueue 0.1.11"
    value: float  # the ratio (throughput targets) or the figure (bounds)
    required: float
    kind: str  # "ratio >=" or "value <="
    met: bool | None  # None: not measured
    margin: float  # value / required (ratio) or required / value (bound); nan if not measured
    unit: str = "x"
    why_missing: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self) -> str:
        if self.met is None:
            return f"not measured ({self.why_missing})"
        if self.met:
            return f"met ({self.margin:.2f}x the line)"
        return f"NOT met (needs {1 / self.margin:.1f}x more)" if self.margin > 0 else "NOT met"


def _ratio(target: str, what: str, num: Row | None, den: Row | None, required: float) -> Outcome:
    if num is None or den is None or den.median <= 0:
        missing = "tq_loader row" if num is None else "reference row"
        return Outcome(
            target, what, float("nan"), required, "ratio >=", None, float("nan"), why_missing=missing
        )
    ratio = num.median / den.median
    return Outcome(target, what, ratio, required, "ratio >=", ratio >= required, ratio / required)


def _bound(target: str, what: str, row: Row | None, required: float, unit: str) -> Outcome:
    if row is None:
        return Outcome(
            target, what, float("nan"), required, "value <=", None, float("nan"), unit, "row missing"
        )
    margin = required / row.median if row.median > 0 else float("inf")
    return Outcome(target, what, row.median, required, "value <=", row.median <= required, margin, unit)


def _throughput(rows: list[Row]) -> Iterator[Outcome]:
    ops = (("put", "put"), ("get", "get"), ("get copy=False", "get_view"))
    for case in ("simple", "complex"):
        for label, metric in ops:
            peer = find(rows, case, "get" if metric == "get_view" else metric, TQ_SYSTEM)
            for system, required, where in ((SERVE, 5.0, "cross-process"), (EMBEDDED, 10.0, "embedded")):
                mine = find(rows, case, metric, system)
                if metric == "get_view" and mine is None:
                    continue  # copy=False does not exist yet: nothing to report beside
                yield _ratio(f">= {required:g}x TransferQueue, {where}", f"{case} {label}: {system} / {TQ_SYSTEM}",
                             mine, peer, required)  # fmt: skip
        for label, metric in ops:
            wire = find(rows, case, "get" if metric == "get_view" else metric, ZMQ)
            for system, required, where in (
                (SERVE, 3.0, "same host, cross-process"),
                (SERVE_TCP, 0.8, "shm off"),
            ):
                mine = find(rows, case, metric, system)
                if metric == "get_view" and mine is None:
                    continue
                yield _ratio(f">= {required:g}x raw pyzmq, {where}", f"{case} {label}: {system} / raw pyzmq",
                             mine, wire, required)  # fmt: skip
        clone = find(rows, case, "clone", TORCH_CLONE)
        for label, metric in ops:
            mine = find(rows, case, metric, EMBEDDED)
            if metric == "get_view" and mine is None:
                continue
            yield _ratio(
                ">= 0.5x torch clone, embedded", f"{case} {label}: {EMBEDDED} / torch clone", mine, clone, 0.5
            )


def _small(rows: list[Row]) -> Iterator[Outcome]:
    for metric in ("kv_put", "kv_batch_get"):
        peer = find(rows, "small", metric, TQ_SYSTEM)
        for system in (EMBEDDED, SERVE):
            yield _ratio(">= 10x TransferQueue ops/s", f"small {metric}: {system} / {TQ_SYSTEM}",
                         find(rows, "small", metric, system), peer, 10.0)  # fmt: skip


def _scaling(rows: list[Row]) -> Iterator[Outcome]:
    one, many = FIELD_COUNTS[0], FIELD_COUNTS[-1]
    for system in (EMBEDDED, SERVE):
        for op in ("put", "get"):
            yield _ratio(f"{many} fields >= 0.8x {one} field, equal bytes", f"{op}: {system}, {many} / {one}",
                         find(rows, "fields", f"{op} {many}", system), find(rows, "fields", f"{op} {one}", system),
                         0.8)  # fmt: skip
    yield _bound("get_meta p50 <= 100 us in-process", f"get_meta p50, {EMBEDDED}",
                 find(rows, "get_meta", "p50", EMBEDDED), 100.0, "us")  # fmt: skip
    yield _bound("get_meta p50 <= 300 us over ZMQ", f"get_meta p50, {EMBEDDED_ZMQ}",
                 find(rows, "get_meta", "p50", EMBEDDED_ZMQ), 300.0, "us")  # fmt: skip
    raw = find(rows, "loader", "raw get_meta + get_data")
    for workers in (0, 2):
        name = f"StreamingDataLoader, num_workers={workers}"
        yield _ratio("loader >= 0.9x raw get_data", f"{name} / raw", find(rows, "loader", name), raw, 0.9)
    for system in (EMBEDDED, SERVE):
        yield _bound("RSS within 10 % after put/clear cycles", f"RSS last/first, {system}",
                     find(rows, "memory", "RSS last/first", system), 1.10, "x")  # fmt: skip


def evaluate(rows: list[Row], cases: set[str]) -> list[Outcome]:
    """Every target whose case ran (or was selected) in this run."""
    out: list[Outcome] = []
    if cases & {"simple", "complex"}:
        out += [o for o in _throughput(rows) if o.what.split(" ", 1)[0] in cases]
    if "small" in cases:
        out += list(_small(rows))
    out += [o for o in _scaling(rows) if _scaling_case(o) in cases]
    return out


def _scaling_case(o: Outcome) -> str:
    if o.target.startswith("get_meta"):
        return "get_meta"
    if o.target.startswith("loader"):
        return "loader"
    if o.target.startswith("RSS"):
        return "memory"
    return "fields"
