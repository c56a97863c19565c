"""Opt-in: run unchanged TransferQueue code (``import transfer_queue as tq``) on tq_loader.

``alias_transfer_queue()`` makes ``import transfer_queue`` and TransferQueue's public submodule
paths (``transfer_queue.metadata``, ``.sampler[.*]``, ``.dataloader[.*]``, ``.client``,
``.interface``) resolve to their tq_loader counterparts. Setting ``TQ_LOADER_ALIAS_TRANSFER_QUEUE=1``
does the same at interpreter start (a ``.pth`` hook installed with the package), so Ray workers and
subprocesses get it through their environment, e.g. ``ray.init(runtime_env={"env_vars":
{"TQ_LOADER_ALIAS_TRANSFER_QUEUE": "1"}})``.

The alias never shadows a real TransferQueue: if one is importable it raises
:class:`TransferQueueConflictError`. TransferQueue-internal paths (``transfer_queue.utils...``,
``transfer_queue.storage...``) raise ``ModuleNotFoundError`` naming what is aliased. New code should
simply ``import tq_loader as tq``. docs/compat.md lists where the two libraries differ.
"""

from __future__ import annotations

import _tq_loader_alias as _alias
from tq_loader.errors import TransferQueueConflictError, transfer_queue_conflict

__all__ = ["ALIASES", "ENV_VAR", "TransferQueueConflictError", "alias_transfer_queue", "conflict_error"]

ALIASES = _alias.ALIASES
ENV_VAR = _alias.ENV_VAR


def alias_transfer_queue() -> None:
    """Make ``import transfer_queue`` (and its public submodules) resolve to tq_loader; idempotent.

    Raises :class:`TransferQueueConflictError` if a real TransferQueue is importable (installed, or
    already imported) instead of shadowing it.
    """
    origin = _alias.find_real_transfer_queue()
    if origin is not None:
        raise conflict_error(origin)
    _alias.install()


def conflict_error(origin: str) -> TransferQueueConflictError:
    """The error for a real TransferQueue found at ``origin``: what was found and the ways out."""
    return transfer_queue_conflict(origin)
