"""Hydra/OmegaConf glue: build loaders by ``_target_`` and split the cluster tree off an app config.

A ``loader`` config node whose ``_target_`` is :func:`build_loader` becomes rank ``r``'s
:class:`~tq_loader.loader.StreamingDataLoader` with ``hydra.utils.instantiate(cfg.loader, dp_rank=r)``;
:func:`cluster_config` gives ``tq.init`` only the part of an app config it understands. The demo
app's YAML and schemas live in :mod:`tq_loader.app.config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tq_loader.config import LoaderConfig, TQConfig, resolve_config
from tq_loader.loader import StreamingDataLoader, StreamingDataset

__all__ = ["build_loader", "cluster_config", "loader_kwargs"]

_APP_KEYS = ("demo", "hydra")  # keys of the app root that are not part of the cluster tree


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (the loader stores them; Hydra may pass either)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_loader(
    batch_size: int = 8,
    micro_batch_size: int | None = None,
    data_fields: Sequence[str] | str = (),
    partition_id: str = "train",
    task_name: str = "train",
    dp_rank: int = 0,
    dp_size: int = 1,
    sampler: str | None = None,
    sampling_config: Mapping[str, Any] | None = None,
    drop_last: bool = True,
    timeout: float | None = None,
    num_workers: int = 1,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    collate: str | None = None,
    config: Any = None,
    **dataset_kwargs: Any,
) -> StreamingDataLoader:
    """One rank's StreamingDataLoader from :class:`~tq_loader.config.LoaderConfig` fields.

    The ``_target_`` of the ``loader`` config node; the rank (``dp_rank``) is the one argument
    the config cannot know, so callers pass it to ``instantiate``. ``config`` (a cluster config,
    default: the cluster this process is attached to) and extra keyword arguments go to
    :class:`~tq_loader.loader.StreamingDataset`.
    """
    fields = data_fields if isinstance(data_fields, str) else list(_plain(data_fields))
    dataset = StreamingDataset(
        _plain(config),
        int(batch_size),
        micro_batch_size,
        fields,
        partition_id,
        task_name,
        int(dp_rank),
        dp_size=int(dp_size),
        sampler=sampler,
        sampling_config=_plain(sampling_config) or {},
        drop_last=drop_last,
        timeout=timeout,
        **dataset_kwargs,
    )
    return StreamingDataLoader(
        dataset,
        num_workers=int(num_workers),
        prefetch_factor=int(prefetch_factor),
        pin_memory=pin_memory,
        collate=collate,
    )


def loader_kwargs(cfg: LoaderConfig | Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """Validated :func:`build_loader` keyword arguments from a loader config (unknown keys raise)."""
    base = OmegaConf.structured(LoaderConfig)
    if cfg is not None:
        node = OmegaConf.structured(cfg) if isinstance(cfg, LoaderConfig) else OmegaConf.create(_plain(cfg))
        node = _plain(node)
        node.pop("_target_", None)
        base = OmegaConf.merge(base, node)
    return dict(OmegaConf.to_container(base, resolve=True))  # type: ignore[arg-type]


def cluster_config(cfg: Any) -> TQConfig:
    """The :class:`~tq_loader.config.TQConfig` part of an app config (what ``tq.init`` takes)."""
    tree = _plain(cfg) if not isinstance(cfg, TQConfig) else cfg.to_dict()
    tree = {k: v for k, v in dict(tree).items() if k not in _APP_KEYS}
    if isinstance(tree.get("loader"), dict):
        tree["loader"] = {k: v for k, v in tree["loader"].items() if k != "_target_"}
    return resolve_config(tree)
