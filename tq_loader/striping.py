"""Which storage unit holds a row: the one striping rule, shared by the manager and the controller.

Rows go to units in blocks of ``stripe_rows`` consecutive global indexes, round robin: row ``i``
lives on unit ``(i // stripe_rows) % num_units``. Blocks (rather than ``i % num_units``) keep a
batch of consecutive ids in a few contiguous runs per unit, which the data path moves as slices
instead of gathering row by row. Every party must use the same ``stripe_rows`` for a cluster: the
manager reads it from the cluster config and sends it along when it reports a dead unit, so the
controller drops exactly the rows that unit held -- and from then on allocates new ids only in the
stripes of the live units (:func:`ids_on_units`), so new rows never go to the dead one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEFAULT_STRIPE_ROWS", "check_stripe_rows", "ids_on_units", "unit_of"]

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


def ids_on_units(
    start: int, n: int, units: Any, num_units: int, stripe_rows: int = DEFAULT_STRIPE_ROWS
) -> np.ndarray:
    """The first ``n`` ids ``>= start`` (ascending ``int64``) that :func:`unit_of` maps into ``units``.

    Vectorised over whole striping cycles (``num_units * stripe_rows`` ids), so the cost is O(n).
    """
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    stripe_rows = check_stripe_rows(stripe_rows)
    keep = np.unique(np.asarray(list(units), dtype=np.int64))
    keep = keep[(keep >= 0) & (keep < num_units)]
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if keep.size == 0:
        raise ValueError("no units to place ids on")
    cycle = num_units * stripe_rows
    offsets = (keep[:, None] * stripe_rows + np.arange(stripe_rows, dtype=np.int64)).ravel()  # ascending
    first = start // cycle
    cycles = (n + offsets.size - 1) // offsets.size + 1  # the first cycle may be partly behind ``start``
    ids = (np.arange(first, first + cycles, dtype=np.int64)[:, None] * cycle + offsets).ravel()
    return ids[ids >= start][:n]
