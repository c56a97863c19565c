"""The status view: partitions (rows, produced fraction per field, consumed fraction per task),
storage units (rows, bytes), request rates and lost rows, from the typed statistics snapshots;
``--plot`` draws a partition's production matrix and consumption per task into a real PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from tensordict import TensorDict

from tq_loader.app.status import build_view, fetch_picture, plot_partition, render
from tq_loader.errors import NotFoundError


@pytest.fixture(scope="module")
def client(local_client: Any) -> Any:
    return local_client


def fill(client: Any, pid: str) -> None:
    """10 rows with x, 6 of them also with y (a second put on the same rows); task a took 4 rows."""
    meta = client.put(TensorDict({"x": torch.arange(10.0)}, batch_size=[10]), partition_id=pid)
    client.put(
        TensorDict({"y": torch.ones(6, 2)}, batch_size=[6]), metadata=meta.select_samples(list(range(6)))
    )
    client.get_data(client.get_meta(["x"], 4, pid, task_name="a", timeout=10))


def test_view_fractions_units_and_rates(client: Any, pid: str) -> None:
    fill(client, pid)
    client.seal(pid)
    earlier = client.statistics()
    client.get_data(client.get_meta(["x"], 2, pid, task_name="b", timeout=10))
    view = build_view(client.statistics(), earlier, window_s=2.0)
    part = {p.partition_id: p for p in view.partitions}[pid]
    assert part.rows == 10 and part.sealed
    assert part.produced == {"x": 1.0, "y": 0.6}
    assert part.consumed == {"a": 0.4, "b": 0.2}
    assert len(view.units) == 2 and all(u.error is None for u in view.units)
    stats = client.statistics()
    assert sum(u.rows for u in view.units) == stats.storage.rows
    assert sum(u.bytes for u in view.units) == sum(u.bytes for u in stats.storage.units.values()) > 0
    assert view.rates["get_meta"] == 0.5  # one get_meta in the 2 s between the snapshots
    assert view.rates["rows_out"] == 1.0 and view.rates["storage_requests"] > 0
    assert view.lost_rows == 0 and view.lost_units == {}
    assert view.to_dict()["partitions"]  # plain data for --json


def test_render_shows_every_part(client: Any, pid: str) -> None:
    fill(client, pid)
    buf = io.StringIO()
    render(build_view(client.statistics()), Console(file=buf, width=200), address="tcp://here:1")
    text = buf.getvalue()
    for expected in (pid, "x:", "y:", " 60%", "a:", " 40%", "storage units (simple)", "lost rows: 0",
                     "requests (totals)", "open"):  # fmt: skip
        assert expected in text, expected


def test_plot_is_a_real_picture(client: Any, pid: str, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    fill(client, pid)
    picture = fetch_picture(client, client.statistics(), pid)
    assert picture.fields == ["x", "y"] and picture.tasks == ["a"]
    assert picture.production.shape == (10, 2) and int(picture.production.sum()) == 16
    assert picture.consumption.shape == (10, 1) and int(picture.consumption.sum()) == 4
    out = plot_partition(picture, tmp_path / "p.png", size=(800, 500))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(out)
    assert image.shape[:2] == (500, 800)
    rgb = (image[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20  # text, axes and both cell colours, not a blank canvas
    blue = np.all(np.abs(rgb.astype(int) - (0x2B, 0x8C, 0xBE)) < 8, axis=1).mean()
    grey = np.all(np.abs(rgb.astype(int) - (0xD9, 0xD9, 0xD9)) < 4, axis=1).mean()
    assert blue > 0.1 and grey > 0.05  # done cells and pending cells (4 of 10 y rows, 6 of 10 consumed)


def test_plot_of_an_unknown_partition_names_the_known_ones(client: Any, pid: str) -> None:
    fill(client, pid)
    with pytest.raises(NotFoundError, match=pid):
        fetch_picture(client, client.statistics(), "no-such-partition")
