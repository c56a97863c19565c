"""Backend config sections and TransferQueue 0.1.11's backend keys (no services needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from tq_loader import config_tq
from tq_loader.backend_config import MooncakeConfig, YuanrongConfig
from tq_loader.config import resolve_config
from tq_loader.storage.ray_rdt import RayRdtUnavailableError


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each TransferQueue key warns once per process: start every test with none said yet."""
    monkeypatch.setattr(config_tq, "_warned", set())


TQ_YAML = (
    Path(__file__).resolve().parents[2] / ".venv-tq/lib/python3.11/site-packages/transfer_queue/config.yaml"
)


def test_sections_default_to_starting_services_here() -> None:
    storage = resolve_config({"storage": {"backend": "mooncake"}}).storage
    assert storage.backend == "mooncake"
    assert storage.mooncake == MooncakeConfig() and storage.mooncake.auto_start
    assert not storage.mooncake.master_server_address  # empty: the cluster starts one
    assert resolve_config({"storage": {"yuanrong": {"worker_address": "127.0.0.1:9"}}}).storage.yuanrong == (
        YuanrongConfig(worker_address="127.0.0.1:9")
    )


@pytest.mark.parametrize(
    ("tq_name", "ours"),
    [
        ("SimpleStorage", "simple"),
        ("MooncakeStore", "mooncake"),
        ("Yuanrong", "yuanrong"),
        ("RayStore", "ray_rdt"),
    ],
)
def test_storage_backend_names(tq_name: str, ours: str) -> None:
    assert resolve_config({"backend": {"storage_backend": tq_name}}).storage.backend == ours


def test_mooncake_attach_keys() -> None:
    conf = {
        "backend": {
            "storage_backend": "MooncakeStore",
            "MooncakeStore": {
                "auto_init": False, "metadata_server": "10.0.0.1:50050", "master_server_address": "10.0.0.1:50051",
                "protocol": "rdma", "device_name": "mlx5_0", "global_segment_size": 1 << 30,
                "local_buffer_size": 1 << 28,
            },
        }
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key above has a meaning: no warning
        mc = resolve_config(conf).storage.mooncake
    assert (mc.master_server_address, mc.metadata_server) == (
        "10.0.0.1:50051",
        "http://10.0.0.1:50050/metadata",
    )
    assert (mc.client_mode, mc.protocol, mc.device_name, mc.auto_start) == ("real", "rdma", "mlx5_0", False)
    assert (mc.client_segment_size, mc.local_buffer_size) == (1 << 30, 1 << 28)


def test_mooncake_auto_init_ignores_addresses_with_a_warning() -> None:
    conf = {
        "backend": {
            "MooncakeStore": {"auto_init": True, "master_server_address": "10.0.0.9:1", "use_gdr": True}
        }
    }
    with pytest.warns(UserWarning) as seen:
        mc = resolve_config(conf).storage.mooncake
    text = " ".join(str(w.message) for w in seen)
    assert "free" in text and "auto_init: false" in text and "use_gdr" in text
    assert mc.auto_start and not mc.master_server_address


def test_yuanrong_keys() -> None:
    conf = {
        "backend": {
            "Yuanrong": {"auto_init": True, "worker_port": 31999, "metastore_port": 2379,
                         "worker_args": "--shared_memory_size_mb 1024 --enable_huge_tlb true"},
        }
    }  # fmt: skip
    with pytest.warns(UserWarning, match="enable_huge_tlb"):
        yr = resolve_config(conf).storage.yuanrong
    assert (yr.worker_port, yr.metastore_port, yr.shared_memory_size_mb) == (
        31999,
        0,
        1024,
    )  # 2379: a free port
    attach = resolve_config(
        {"backend": {"Yuanrong": {"auto_init": False, "worker_port": 31501}}}
    ).storage.yuanrong
    assert attach.worker_address == "127.0.0.1:31501" and not attach.auto_start


def test_unknown_backend_keys_are_accepted_with_one_warning() -> None:
    with pytest.warns(UserWarning, match="not known") as seen:
        resolve_config({"backend": {"MooncakeStore": {"brand_new_key": 1}}})
    assert len([w for w in seen if "brand_new_key" in str(w.message)]) == 1


@pytest.mark.skipif(
    not TQ_YAML.exists(), reason="TransferQueue 0.1.11 is not in .venv-tq (make setup installs it)"
)
def test_transfer_queues_own_backend_section_maps_quietly() -> None:
    backend = yaml.safe_load(TQ_YAML.read_text())["backend"]
    backend.pop("SimpleStorage")  # its keys belong to the SimpleStorage mapping
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        storage = resolve_config({"backend": backend}).storage
    assert storage.backend == "simple" and storage.yuanrong.shared_memory_size_mb == 8192


def test_ray_rdt_is_a_typed_error_saying_why() -> None:
    from tq_loader.cluster import start_cluster

    with pytest.raises(RayRdtUnavailableError, match=r"gloo.*Use storage\.backend=simple"):
        start_cluster(resolve_config({"storage": {"backend": "ray_rdt"}}))
