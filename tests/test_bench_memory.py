"""100 put/clear cycles of the simple case leave the storage's RSS within 10 % of after the first (issue 8).

Smaller rows than the benchmark (1024 x 9 x 1024 float32 = 36 MiB per put) keep it quick. The
embedded cluster's storage lives in this process; the served one in the ``tq-loader serve`` process,
whose RSS is read from ``/proc/PID/status``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tq_loader.bench.memory import put_clear_cycles, rss_bytes
from tq_loader.bench.systems import embedded, served
from tq_loader.bench.workloads import Workload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")

WORKLOAD = Workload("memory", rows=1024, regular=9, width=1024)
CYCLES = 100


def _check(rss: list[int]) -> None:
    assert len(rss) == CYCLES
    first, last = rss[0], rss[-1]
    assert last <= 1.10 * first, (
        f"RSS grew from {first / 2**20:.0f} MiB after the first cycle to {last / 2**20:.0f} MiB after "
        f"{CYCLES} (limit +10 %); peak {max(rss) / 2**20:.0f} MiB"
    )


@pytest.fixture
def embedded_cluster() -> Iterator[None]:
    with embedded(True):
        yield


def test_rss_reads_this_process() -> None:
    before = rss_bytes()
    ballast = np.ones(64 << 18, dtype=np.float32)  # 64 MiB allocated and written after the first reading
    assert rss_bytes() - before > 32 << 20
    del ballast


def test_embedded_put_clear_cycles_hold_memory(embedded_cluster: None) -> None:
    _check(put_clear_cycles(WORKLOAD, CYCLES))


@pytest.mark.slow
def test_served_put_clear_cycles_hold_the_server_memory(tmp_path: Path) -> None:
    with served([], tmp_path / "serve.log") as pid:
        _check(put_clear_cycles(WORKLOAD, CYCLES, pid))
