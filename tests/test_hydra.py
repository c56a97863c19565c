"""Hydra/OmegaConf: the YAML under tq_loader/configs/ composes the structured PipelineConfig; loaders are
built with ``hydra.utils.instantiate``; ``examples/grpo_pipeline.py`` runs as a Hydra app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RAY_ENV
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensordict import TensorDict

import tq_loader.app.config as app_config
import tq_loader.hydra_conf as hc
from tq_loader.app.config import LoaderNode, PipelineConfig, register_configs
from tq_loader.config import TQConfig
from tq_loader.loader import StreamingDataLoader

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "grpo_pipeline.py"
SMALL = ["demo.prompts=16", "loader.batch_size=8", "loader.micro_batch_size=4", "demo.rollout_chunk=4",
         "demo.reward_batch_size=16", "demo.workers=thread", "demo.progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def client(local_client: Any) -> Any:
    return local_client


def test_defaults_compose_the_structured_tree() -> None:
    cfg = app_config.compose()
    assert OmegaConf.get_type(cfg) is PipelineConfig
    assert cfg.placement == "local" and cfg.storage.backend == "simple" and cfg.storage.num_units == 2
    assert cfg.loader._target_ == "tq_loader.hydra_conf.build_loader"
    assert cfg.loader.sampler == "grpo_group_n"
    assert cfg.loader.sampling_config.n_samples_per_prompt == cfg.demo.n_samples  # interpolated
    assert cfg.demo.model._target_ == "tq_loader.app.demo_stages.tiny_policy"
    assert "hydra" not in cfg


def test_group_and_key_overrides() -> None:
    cfg = app_config.compose(
        ["placement=ray", "loader.batch_size=64", "sampler=seqlen_balanced", "demo.n_samples=8"]
    )
    assert cfg.placement == "ray" and cfg.ray.name == "tq_loader_demo" and cfg.ray.num_cpus == 0.0
    assert cfg.loader.batch_size == 64
    assert cfg.loader.sampler == "seqlen_balanced"
    assert cfg.loader.sampling_config.n_samples_per_prompt == 8
    assert app_config.compose(["sampler=sequential"]).loader.sampler == "sequential"


@pytest.mark.parametrize(
    "override", ["loader.batchsize=3", "loader.batch_size=many", "storage=no_such_backend"]
)
def test_bad_overrides_are_rejected(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        app_config.compose([override])


def test_schemas_are_registered() -> None:
    register_configs()
    cs = ConfigStore.instance()
    assert cs.load("tq_pipeline_schema.yaml").node is not None
    assert cs.load("tq_loader_schema.yaml").node is not None
    assert "loader_schema.yaml" in cs.list("loader") and "demo_schema.yaml" in cs.list("demo")


def test_structured_defaults_equal_the_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without configs/ (an installed wheel) the app composes the same tree from the dataclasses."""
    from_yaml = OmegaConf.to_container(app_config.compose(["loader.batch_size=16"]), resolve=True)
    monkeypatch.setattr(app_config, "CONFIG_DIR", tmp_path)
    structured = OmegaConf.to_container(app_config.compose(["loader.batch_size=16"]), resolve=True)
    assert structured == from_yaml


def test_cluster_config_keeps_only_the_cluster_tree() -> None:
    conf = hc.cluster_config(app_config.compose(["storage.num_units=3", "placement=ray"]))
    assert isinstance(conf, TQConfig) and not isinstance(conf, PipelineConfig)
    assert conf.storage.num_units == 3 and conf.placement == "ray"
    assert conf.loader.batch_size == 32 and not hasattr(conf.loader, "_target_")


def test_loader_kwargs_validates_keys() -> None:
    assert hc.loader_kwargs(LoaderNode(batch_size=3))["batch_size"] == 3
    assert hc.loader_kwargs(None)["batch_size"] == 8
    with pytest.raises(Exception, match="batchsize"):
        hc.loader_kwargs({"batchsize": 3})


def test_instantiate_builds_disjoint_rank_loaders(client: Any, pid: str) -> None:
    cfg = app_config.compose(["sampler=sequential", "loader.data_fields=[x]", "loader.collate=null",
                      "loader.batch_size=4", "loader.micro_batch_size=2", "loader.dp_size=2"])  # fmt: skip
    client.put(TensorDict({"x": torch.arange(16)}, batch_size=[16]), partition_id=pid)
    client.seal(pid)
    seen = []
    for rank in (0, 1):
        loader = instantiate(cfg.loader, dp_rank=rank, partition_id=pid)
        assert isinstance(loader, StreamingDataLoader)
        assert (loader.dataset.dp_rank, loader.dataset.dp_size, loader.dataset.batch_size) == (rank, 2, 4)
        seen.append([int(v) for td, _ in loader for v in td["x"]])
    assert sorted(seen[0] + seen[1]) == list(range(16)) and not set(seen[0]) & set(seen[1])


def test_instantiate_from_a_plain_dict(client: Any, pid: str) -> None:
    client.put(TensorDict({"x": torch.arange(6)}, batch_size=[6]), partition_id=pid)
    client.seal(pid)
    node = {"_target_": "tq_loader.hydra_conf.build_loader", "batch_size": 3, "data_fields": ["x"],
            "partition_id": pid, "task_name": "t", "sampling_config": {}}  # fmt: skip
    loader = instantiate(node)
    assert [td["x"].tolist() for td, _ in loader] == [[0, 1, 2], [3, 4, 5]]


def run_script(*overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run([sys.executable, str(SCRIPT), *overrides], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def clean_env() -> dict[str, str]:
    """No cluster address inherited from this test process: the app starts its own."""
    return {k: v for k, v in os.environ.items() if k not in ("TQ_LOADER_ADDRESS", "TQ_LOADER_AUTH_TOKEN")}


def test_grpo_pipeline_app_runs_local(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = run_script(*SMALL, f"demo.report={report}", cwd=tmp_path, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["ok"] and all(c["ok"] for c in result["checks"])
    assert result["stages"]["rollout"]["rows"] == 64 and result["stages"]["train-dp1"]["rows"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no outputs/ or .hydra/


def test_grpo_pipeline_app_rejects_uneven_sizes(tmp_path: Path) -> None:
    done = run_script("demo.prompts=5", "demo.progress=false", cwd=tmp_path, env=clean_env())
    assert done.returncode == 2
    assert "must divide by loader.batch_size*dp_size" in done.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_grpo_pipeline_app_runs_on_ray(tmp_path: Path) -> None:
    """``placement=ray loader.batch_size=64``: the services are Ray actors of a private Ray instance."""
    report = tmp_path / "report.json"
    overrides = ["placement=ray", "loader.batch_size=64", "demo.prompts=32", "demo.workers=thread",
                 "demo.progress=false", f"demo.report={report}"]  # fmt: skip
    done = run_script(*overrides, cwd=tmp_path, env={**clean_env(), **RAY_ENV}, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["ok"] and result["stages"]["reward"]["rows"] == 128
