"""Which storage unit holds a row: the one striping rule, shared by the manager and the controller.

Rows go to units in blocks of ``stripe_rows`` consecutive global indexes, round robin: row ``i``
lives on unit ``(i // stripe_rows) % num_units``. Blocks (rather than ``i % num_units``) keep a
batch of consecutive ids in a few contiguous runs per unit, which the data path moves as slices
instead of gathering row by row. Every party must use the same ``stripe_rows`` for a cluster: the
manager reads it from the cluster config and sends it along when it reports a dead unit, so the
controller drops exactly the rows that unit held.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_STRIPE_ROWS", "check_stripe_rows", "unit_of"]

DEFAULT_STRIPE_ROWS = 64  # = StorageConfig.stripe_rows


def check_stripe_rows(stripe_rows: Any) -> int:
    """``stripe_rows`` as an int >= 1, or ``ValueError`` naming the config key."""
    if isinstance(stripe_rows, bool) or not isinstance(stripe_rows, (int, np.integer)) or stripe_rows < 1:
        raise ValueError(f"storage.stripe_rows must be an integer >= 1, got {stripe_rows!r}")
    return int(stripe_rows)


def unit_of(ids: Any, num_units: int, stripe_rows: int = DEFAULT_STRIPE_ROWS) -> np.ndarray:
    """The unit (``int64`` array, one per id) that holds each global index in ``ids``."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    stripe_rows = check_stripe_rows(stripe_rows)
    ids = np.asarray(ids, dtype=np.int64)
    if stripe_rows == 1:
        return np.mod(ids, num_units)
    return np.mod(np.floor_divide(ids, stripe_rows), num_units)
