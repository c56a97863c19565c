"""TransferQueue's configuration tree is accepted whole: translated where it has a meaning here,
dropped quietly at its defaults, dropped with one warning where it asks for what tq_loader does not do."""

from __future__ import annotations

import copy
import warnings

import pytest

import tq_loader as tq
from tq_loader import config_tq
from tq_loader.config import resolve_config

# The shape of TransferQueue 0.1.11's default config.yaml (its keys at their default values).
TQ_DEFAULTS = {
    "metrics": {"enabled": False, "port": 0},
    "controller": {"sampler": "SequentialSampler", "polling_mode": False, "zmq_info": None},
    "backend": {
        "storage_backend": "SimpleStorage",
        "SimpleStorage": {
            "total_storage_size": None,
            "num_data_storage_units": 2,
            "required_node_resource": None,
            "zmq_info": None,
            "ssd_offload": {
                "enabled": False,
                "path": None,
                "threshold_bytes": 1048576,
                "glibc_mmap_threshold_bytes": 1048576,
            },
        },
        "MooncakeStore": {
            "auto_init": True,
            "metadata_server": "localhost:50050",
            "master_server_address": "localhost:50051",
            "local_hostname": "",
            "protocol": "tcp",
            "global_segment_size": 4294967296,
            "local_buffer_size": 1073741824,
            "device_name": "",
            "hard_pin": None,
            "offload": {"enabled": False},
            "use_gdr": False,
            "gdr_staging_buffer_mb": 1024,
        },
        "Yuanrong": {"auto_init": True, "worker_port": 31501, "metastore_port": 2379, "ucx_env_vars": {}},
        "RayStore": {},
    },
}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(config_tq, "_warned", set())


def test_the_default_file_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resolve_config(copy.deepcopy(TQ_DEFAULTS))
    assert cfg.storage.backend == "simple"
    assert cfg.storage.num_units == 2
    assert cfg.controller.sampler == "SequentialSampler"
    assert cfg.controller.polling_mode is False
    assert cfg.metrics.enabled is False and cfg.metrics.port == 0


def test_simple_storage_keys_are_honoured():
    conf = copy.deepcopy(TQ_DEFAULTS)
    simple = conf["backend"]["SimpleStorage"]
    simple.update(num_data_storage_units=4, total_storage_size=1000, required_node_resource="storage")
    cfg = resolve_config(conf)
    assert cfg.storage.num_units == 4
    assert cfg.storage.capacity_rows == 250  # TransferQueue's total over all units, per unit here
    assert cfg.ray.unit_resource == "storage"


def test_total_storage_size_is_enforced():
    tq.init({"backend": {"SimpleStorage": {"num_data_storage_units": 1, "total_storage_size": 4}}})
    try:
        import torch

        tq.kv_batch_put(["a", "b", "c", "d"], "p", {"x": torch.zeros(4, 2)})
        with pytest.raises(tq.TQError, match="capacity_rows"):
            tq.get_client().put({"x": torch.zeros(2, 2)}, partition_id="p")
    finally:
        tq.close()


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("controller", "zmq_info"), {"ip": "10.0.0.1"}, "controller.port"),
        (("backend", "SimpleStorage", "zmq_info"), {"x": 1}, "storage.ports"),
        (("backend", "SimpleStorage", "ssd_offload", "enabled"), True, "capacity_rows"),
    ],
)
def test_what_cannot_be_honoured_warns_once(path, value, says):
    def conf():
        c = copy.deepcopy(TQ_DEFAULTS)
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return c

    with pytest.warns(UserWarning, match=says):
        resolve_config(conf())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_config(conf())  # once per process


def test_unknown_scalar_backend_key_warns():
    conf = copy.deepcopy(TQ_DEFAULTS)
    conf["backend"]["some_new_switch"] = True
    with pytest.warns(UserWarning, match="backend.some_new_switch"):
        resolve_config(conf)


def test_backend_names_map():
    for theirs, ours in config_tq.BACKEND_NAMES.items():
        conf, _ = config_tq.split_transfer_queue_config({"backend": {"storage_backend": theirs}})
        assert conf["storage"]["backend"] == ours


def test_per_backend_sections_are_handed_back():
    conf, sections = config_tq.split_transfer_queue_config(copy.deepcopy(TQ_DEFAULTS))
    assert set(sections) == {"MooncakeStore", "Yuanrong", "RayStore"}
    assert "backend" not in conf
