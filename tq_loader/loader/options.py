"""``torch.utils.data.DataLoader``'s arguments on a ``StreamingDataLoader``: honoured, or refused with why.

TransferQueue's ``StreamingDataLoader`` has nine arguments; torch's DataLoader has more. Those
TransferQueue lacks are keyword-only here. A StreamingDataLoader's batches are cut by the
controller and its workers are threads of this process, so some of torch's arguments have no
meaning; each is either honoured (the value that means what torch means is accepted) or refused
with an :class:`~tq_loader.errors.ArgumentError` that says what to use instead, or -- when it
changes nothing a user could observe except speed -- accepted with a one-time warning.
"""

from __future__ import annotations

from typing import Any

import torch

from tq_loader._meta_util import warn_once
from tq_loader.errors import ArgumentError

__all__ = ["UNSET", "check_torch_options", "effective_pin_memory"]

UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<unset>"})()

_SAMPLING = (
    "rows are chosen by the controller's sampler, not by the loader: pass StreamingDataset(sampler=...) "
    "(e.g. 'sequential', 'grpo_group_n', 'seqlen_balanced', or a sampler registered with "
    "tq_loader.samplers.register_sampler) and its sampling_config"
)


def check_torch_options(
    dataset: Any,
    *,
    num_workers: int,
    batch_size: Any,
    shuffle: bool | None,
    sampler: Any,
    batch_sampler: Any,
    drop_last: Any,
    timeout: float,
    generator: Any,
    in_order: bool,
    multiprocessing_context: Any,
    prefetch_factor: int | None,
    persistent_workers: bool,
) -> None:
    """Refuse what cannot mean what torch means; warn once about what has no effect here."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if timeout < 0:
        raise ValueError("timeout option should be non-negative")
    if prefetch_factor is not None and prefetch_factor < 0:
        raise ValueError("prefetch_factor option should be non-negative")
    if persistent_workers and num_workers == 0:
        raise ValueError("persistent_workers option needs num_workers > 0")
    if batch_size is not UNSET and batch_size is not None and batch_size != dataset.micro_batch_size:
        raise ArgumentError(
            f"StreamingDataLoader(batch_size={batch_size!r}): batch sizes belong to the dataset -- the "
            f"controller cuts StreamingDataset(batch_size=...) rows per rank and the loader yields "
            f"micro-batches of micro_batch_size rows (this dataset: batch_size={dataset.batch_size}, "
            f"micro_batch_size={dataset.micro_batch_size}). Set them on the dataset (or pass batch_size=None)"
        )
    if shuffle:
        raise ArgumentError(f"StreamingDataLoader(shuffle=True): {_SAMPLING}")
    for name, value in (("sampler", sampler), ("batch_sampler", batch_sampler)):
        if value is not None:
            raise ArgumentError(f"StreamingDataLoader({name}=...): {_SAMPLING}")
    if drop_last is not UNSET and bool(drop_last) != dataset.drop_last:
        raise ArgumentError(
            f"StreamingDataLoader(drop_last={drop_last!r}) but the dataset has drop_last={dataset.drop_last}: "
            "the tail of a stream is cut in the controller for every data-parallel rank at once, so "
            "set it on the dataset: StreamingDataset(..., drop_last=...)"
        )
    if not in_order:
        raise ArgumentError(
            "StreamingDataLoader(in_order=False): micro-batches are delivered in batch order so that "
            "state_dict() is an exact resume point; data transfers already overlap (num_workers threads)"
        )
    if generator is not None:
        warn_once(
            ("StreamingDataLoader", "generator"),
            "StreamingDataLoader(generator=...) has no effect: the loader draws no random numbers (rows "
            "are chosen by the controller's sampler; seed a random sampler through its sampling_config)",
            stacklevel=4,
        )
    if multiprocessing_context is not None:
        warn_once(
            ("StreamingDataLoader", "multiprocessing_context"),
            "StreamingDataLoader(multiprocessing_context=...) has no effect: its num_workers are threads of "
            "this process (data transfers release the GIL), not worker processes",
            stacklevel=4,
        )


def effective_pin_memory(pin_memory: bool) -> bool:
    """``pin_memory`` where CUDA is available; without CUDA warn once (instead of silently off)."""
    if not pin_memory:
        return False
    if torch.cuda.is_available():
        return True
    warn_once(
        ("StreamingDataLoader", "pin_memory"),
        "StreamingDataLoader(pin_memory=True): CUDA is not available, so batches are not pinned "
        "(pinned memory only speeds up host-to-GPU copies); pass pin_memory=False to silence this",
        stacklevel=4,
    )
    return False
