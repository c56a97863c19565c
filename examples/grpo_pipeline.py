"""The GRPO-style pipeline as a Hydra app: rollout -> reward -> data-parallel trainers on one cluster.

    python examples/grpo_pipeline.py                                  # embedded cluster (placement=local)
    python examples/grpo_pipeline.py placement=ray loader.batch_size=64
    python examples/grpo_pipeline.py sampler=seqlen_balanced demo.prompts=128 demo.workers=thread

The config is composed from ``tq_loader/configs/config.yaml`` (groups: placement, storage, loader, sampler,
demo) over the structured schema ``tq_loader.app.config.PipelineConfig``; unknown keys are errors.
Every stage builds its objects with ``hydra.utils.instantiate``: each trainer rank calls
``instantiate(cfg.loader, dp_rank=r)`` (``_target_: tq_loader.hydra_conf.build_loader``) and
``instantiate(cfg.demo.model)``. ``tq-loader demo`` runs the same pipeline.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from tq_loader.app.config import register_configs
from tq_loader.app.demo import run_pipeline

register_configs()  # the structured schemas the YAML defaults list starts from


@hydra.main(config_path="pkg://tq_loader.configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run_pipeline(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
