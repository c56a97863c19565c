"""The pipeline app's config: the cluster tree plus a buildable ``loader`` and the ``demo`` sizes.

The YAML under ``tq_loader/configs/`` (shipped in the wheel) composes a :class:`PipelineConfig`:
the library's :class:`~tq_loader.config.TQConfig` (``placement``, ``storage``, ``controller`` ...),
a ``loader`` node whose ``_target_`` is :func:`tq_loader.hydra_conf.build_loader`, and the ``demo``
sizes. ``examples/grpo_pipeline.py`` and ``tq-loader demo`` both run on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tq_loader.config import LoaderConfig, TQConfig
from tq_loader.config import register_configs as _register_cluster_configs

__all__ = [
    "CONFIG_DIR",
    "DemoConfig",
    "LoaderNode",
    "ModelConfig",
    "PipelineConfig",
    "compose",
    "register_configs",
]

# package data: found the same way in a clone and in an installed wheel
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class LoaderNode(LoaderConfig):
    """A :class:`~tq_loader.config.LoaderConfig` that ``hydra.utils.instantiate`` turns into a loader."""

    _target_: str = "tq_loader.hydra_conf.build_loader"


@dataclass
class ModelConfig:
    """The demo trainer's tiny policy (built with ``hydra.utils.instantiate``)."""

    _target_: str = "tq_loader.app.demo_stages.tiny_policy"
    vocab_size: int = 256
    hidden: int = 32


@dataclass
class DemoConfig:
    """Sizes of the GRPO demo; ``prompts * n_samples`` must divide by ``loader.batch_size * dp_size``."""

    prompts: int = 1024
    n_samples: int = 4  # responses per prompt: the GRPO group size
    prompt_len: int = 16
    min_response_len: int = 8
    max_response_len: int = 128
    rollout_workers: int = 2  # threads of the rollout stage, each putting its own prompts
    rollout_chunk: int = 8  # prompts per put (their n responses are inserted together)
    reward_batch_size: int = 64
    reward_fetch_workers: int = 2
    tp_size: int = 2  # "tensor-parallel" threads per data-parallel trainer rank
    lr: float = 0.01
    seed: int = 0
    workers: str = "process"  # process: one process per stage; thread: every stage in this process
    progress: bool = True
    timeout: float = 110.0  # the whole run; a stage still running then fails the demo
    report: str | None = None  # also write the summary and checks as JSON here
    model: ModelConfig = field(default_factory=ModelConfig)


def _pipeline_loader() -> LoaderNode:
    """The trainer loader: the values of configs/loader/default.yaml + configs/sampler/grpo.yaml."""
    return LoaderNode(
        batch_size=32,
        micro_batch_size=16,
        data_fields=["prompts", "responses", "rewards", "prompt_id"],
        task_name="actor_update",
        dp_size=2,
        sampler="grpo_group_n",
        sampling_config={"n_samples_per_prompt": "${demo.n_samples}"},
        collate="pad",
    )


@dataclass
class PipelineConfig(TQConfig):
    """Root of the Hydra app; its defaults equal what ``configs/config.yaml`` composes."""

    loader: LoaderNode = field(default_factory=_pipeline_loader)
    demo: DemoConfig = field(default_factory=DemoConfig)


def register_configs() -> None:
    """Register the cluster tree and the app's schemas (root, ``loader``, ``demo``) with Hydra."""
    from hydra.core.config_store import ConfigStore

    _register_cluster_configs()
    cs = ConfigStore.instance()
    cs.store(name="tq_pipeline_schema", node=PipelineConfig)
    cs.store(group="loader", name="loader_schema", node=LoaderNode)
    cs.store(group="demo", name="demo_schema", node=DemoConfig)


def compose(
    overrides: Sequence[str] = (), config_name: str = "config", config_dir: Path | None = None
) -> DictConfig:
    """The app config from ``configs/`` with Hydra ``overrides`` (``placement=ray loader.batch_size=64``).

    Without the YAML (``config_dir`` holding no ``<config_name>.yaml``) the structured defaults of
    :class:`PipelineConfig` are used and overrides must be ``key=value`` dotlists.
    """
    register_configs()
    directory = CONFIG_DIR if config_dir is None else Path(config_dir)
    if not (directory / f"{config_name}.yaml").is_file():
        dotlist = [o for o in overrides if not o.startswith(("hydra.", "+hydra"))]
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.from_dotlist(dotlist))
        return merged  # type: ignore[return-value]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or another compose
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))
