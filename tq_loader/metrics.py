"""Prometheus metrics (``metrics.enabled``): an HTTP ``/metrics`` endpoint fed by the statistics.

The process that hosts the cluster (``tq.init`` that started it, or ``tq-loader serve``) starts a
:class:`MetricsServer`. Nothing is sampled in the background: each scrape takes one
:class:`~tq_loader.stats.ClusterStats` snapshot through a client of its own and turns it into
gauges and counters (rows, produced rows per field and consumed rows per task of each partition,
rows/bytes/requests per storage unit, controller requests, lost rows), so the numbers are exactly
what ``tq.statistics()`` says at that moment. The endpoint runs on a private registry (no process
or platform collectors), on ``metrics.host`` and ``metrics.port`` (0: a free port).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tq_loader.config import ClientConfig, MetricsConfig
from tq_loader.stats import ClusterStats, UnitStats

__all__ = ["ENV_METRICS", "MetricsServer", "StatsCollector", "start_metrics"]

# set by the hosting process for the processes it starts (as TQ_LOADER_ADDRESS is), so that
# tq.get_metrics_endpoint() answers in DataLoader workers and subprocesses too
ENV_METRICS = "TQ_LOADER_METRICS_ENDPOINT"


class StatsCollector(Collector):
    """Turns one statistics snapshot per scrape into metric families (prefix ``tq_loader_``)."""

    def __init__(self, snapshot: Callable[[], ClusterStats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tq_loader_up", "1 when the statistics snapshot for this scrape succeeded")
        try:
            stats = self._snapshot()
        except Exception:  # a scrape must answer; an unreachable cluster reads as up 0
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _controller_metrics(stats)
        yield from _partition_metrics(stats)
        yield from _unit_metrics(stats)


def _controller_metrics(stats: ClusterStats) -> Iterator[Metric]:
    ctl = stats.controller
    for name, value, text in (
        ("get_meta", ctl.get_meta, "get_meta requests answered by the controller"),
        ("rows_out", ctl.rows_out, "rows handed out by get_meta"),
        ("notifies", ctl.notifies, "readiness notifications (puts) received by the controller"),
        ("timeouts", ctl.timeouts, "get_meta requests that timed out"),
        ("end_of_stream", ctl.eos, "get_meta replies that ended a stream"),
        ("lost_rows", ctl.lost_rows, "rows lost with a storage unit"),
        ("abandoned_rows", ctl.abandoned_rows, "rows allocated but never produced, dropped after a seal"),
    ):
        counter = CounterMetricFamily(f"tq_loader_controller_{name}", text)
        counter.add_metric([], value)
        yield counter
    for name, value, text in (
        ("waiting_requests", ctl.waiting_requests, "get_meta requests waiting for rows now"),
        ("lost_units", len(ctl.lost_units), "storage units reported lost"),
        ("partitions", ctl.partitions.num_partitions, "partitions the controller holds"),
    ):
        gauge = GaugeMetricFamily(f"tq_loader_{name}", text)
        gauge.add_metric([], value)
        yield gauge


def _partition_metrics(stats: ClusterStats) -> Iterator[Metric]:
    rows = GaugeMetricFamily("tq_loader_partition_rows", "live rows of a partition", labels=["partition"])
    cleared = GaugeMetricFamily(
        "tq_loader_partition_cleared_rows", "rows cleared from a partition", labels=["partition"]
    )
    sealed = GaugeMetricFamily(
        "tq_loader_partition_sealed", "1 when a partition is sealed", labels=["partition"]
    )
    produced = GaugeMetricFamily(
        "tq_loader_partition_produced_rows",
        "rows of a partition that have a field",
        labels=["partition", "field"],
    )
    consumed = GaugeMetricFamily(
        "tq_loader_partition_consumed_rows",
        "rows of a partition a task consumed",
        labels=["partition", "task"],
    )
    for pid, p in stats.controller.partitions.partitions.items():
        rows.add_metric([pid], p.rows_live)
        cleared.add_metric([pid], p.rows_cleared)
        sealed.add_metric([pid], int(p.sealed))
        for name, n in p.fields.items():
            produced.add_metric([pid, name], n)
        for task, n in p.tasks.items():
            consumed.add_metric([pid, task], n)
    yield from (rows, cleared, sealed, produced, consumed)


def _unit_metrics(stats: ClusterStats) -> Iterator[Metric]:
    rows = GaugeMetricFamily("tq_loader_storage_unit_rows", "rows held by a storage unit", labels=["unit"])
    held = GaugeMetricFamily("tq_loader_storage_unit_bytes", "bytes held by a storage unit", labels=["unit"])
    requests = CounterMetricFamily(
        "tq_loader_storage_unit_requests", "requests served by a storage unit", labels=["unit", "op"]
    )
    moved = CounterMetricFamily(
        "tq_loader_storage_unit_transfer_bytes",
        "bytes into / out of a storage unit",
        labels=["unit", "direction"],
    )
    up = GaugeMetricFamily("tq_loader_storage_unit_up", "1 when a storage unit answered", labels=["unit"])
    for address, unit in stats.storage.units.items():
        if not isinstance(unit, UnitStats):
            up.add_metric([address], 0)
            continue
        up.add_metric([address], 1)
        rows.add_metric([address], unit.rows)
        held.add_metric([address], unit.bytes)
        for op, n in unit.requests.items():
            requests.add_metric([address, op], n)
        moved.add_metric([address, "in"], unit.bytes_in)
        moved.add_metric([address, "out"], unit.bytes_out)
    yield from (up, rows, held, requests, moved)


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`stop` shuts it down and closes its client."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, close: Callable[[], None]) -> None:
        self._server, self._thread, self._close = server, thread, close
        self.endpoint = f"{host}:{server.server_address[1]}"

    def stop(self) -> None:
        try:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        finally:
            self._close()


def start_metrics(
    config: MetricsConfig, controller_address: str, auth_token: str | None = None
) -> MetricsServer:
    """Serve the metrics of the cluster at ``controller_address`` on ``config.host:config.port``."""
    from tq_loader.client import Client

    client = Client(controller_address, config=ClientConfig(), auth_token=auth_token)
    lock = threading.Lock()  # scrapes may overlap; one snapshot at a time is enough

    def snapshot() -> ClusterStats:
        with lock:
            return client.statistics()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    try:
        server, thread = start_http_server(config.port, addr=config.host, registry=registry)
    except BaseException:
        client.close()
        raise
    return MetricsServer(server, thread, config.host, client.close)
