"""``collate="pad"``: jagged fields become dense, padded tensors plus an attention mask.

Most trainers want rectangular batches; a jagged field ``f`` (ragged along each row's first dim)
becomes ``f`` of shape ``(B, max_len, ...)`` padded with ``pad_value`` and ``f_mask`` (bool,
``(B, max_len)``, True on real positions). Regular and non-tensor fields pass through.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict

from tq_loader.metadata import BatchMeta

__all__ = ["pad_collate", "pad_jagged", "passthrough"]


def passthrough(item: Any) -> Any:
    """``collate_fn`` for a plain ``torch.utils.data.DataLoader(dataset, batch_size=None, ...)``.

    torch's default conversion treats a TensorDict as a ``Mapping`` and iterates it -- which walks
    its rows, not its keys -- so it fails on ``(TensorDict, BatchMeta)`` items. Items are already
    batches; pass them through unchanged (module-level, so ``spawn`` workers can pickle it).
    """
    return item


def pad_jagged(nt: torch.Tensor, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded dense tensor and mask of a jagged nested tensor (ragged dim 1 of the batch)."""
    offsets = nt.offsets()
    lengths = offsets.diff()
    padded = nt.to_padded_tensor(pad_value)
    width = padded.shape[1] if padded.dim() > 1 else 0
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


def pad_collate(item: tuple[TensorDict, BatchMeta], pad_value: float = 0.0) -> tuple[TensorDict, BatchMeta]:
    td, meta = item
    out: dict[str, Any] = {}
    for key, value in td.items():
        if isinstance(value, torch.Tensor) and value.is_nested and value.layout == torch.jagged:
            if getattr(value, "_ragged_idx", 1) != 1:
                raise ValueError(
                    f"collate='pad' pads along each row's first dim; field {key!r} is ragged elsewhere"
                )
            out[key], out[f"{key}_mask"] = pad_jagged(value, pad_value)
        else:
            out[key] = value
    return TensorDict(out, batch_size=td.batch_size), meta
