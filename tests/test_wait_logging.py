"""A waiting get_meta says what it waits for (issue 12: no silent, unbounded waits)."""

from __future__ import annotations

import logging

import pytest
import torch
from tensordict import TensorDict

import tq_loader as tq


@pytest.fixture
def quick_logging_client():
    tq.close()
    tq.init({"client": {"wait_log_after": 0.2}})
    yield tq.get_client()
    tq.close()


def test_a_wait_is_logged_and_a_misspelled_field_warned(quick_logging_client, caplog):
    client = quick_logging_client
    client.put(TensorDict({"x": torch.arange(2)}, batch_size=[2]), partition_id="p")
    with caplog.at_level(logging.INFO, logger="tq_loader.client"), pytest.raises(tq.TQTimeoutError):
        client.get_meta(["x", "tpyo"], 4, "p", task_name="t", timeout=1.0)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert infos and "4 rows" in infos[0] and "'p'" in infos[0] and "not sealed" in infos[0]
    assert len(warnings) == 1 and "tpyo" in warnings[0] and "['x']" in warnings[0]


def test_a_partition_nobody_wrote_is_warned(quick_logging_client, caplog):
    client = quick_logging_client
    client.put(TensorDict({"x": torch.arange(2)}, batch_size=[2]), partition_id="real")
    with caplog.at_level(logging.INFO, logger="tq_loader.client"), pytest.raises(tq.TQTimeoutError):
        client.get_meta(["x"], 1, "raal", task_name="t", timeout=1.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'raal'" in warnings[0] and "nobody has written" in warnings[0]
    assert "real" in warnings[0]


def test_a_quick_answer_logs_nothing(quick_logging_client, caplog):
    client = quick_logging_client
    client.put(TensorDict({"x": torch.arange(2)}, batch_size=[2]), partition_id="p")
    with caplog.at_level(logging.INFO, logger="tq_loader.client"):
        assert client.get_meta(["x"], 2, "p", task_name="t", timeout=10).size == 2
    assert not [r for r in caplog.records if "waited" in r.getMessage()]
