"""Global row ids for all partitions of one controller: monotonic, and only on live storage units.

Split from :mod:`tq_loader.controller.state` (which keeps the per-partition bookkeeping): once a
storage unit is reported lost (``ReportLost``), the allocator skips the id stripes that
:func:`tq_loader.striping.unit_of` maps to it, so a put after the loss goes to the live units at
once instead of failing after the connect timeout.
"""

from __future__ import annotations

import numpy as np

from tq_loader.errors import SchemaError, TQConnectionError
from tq_loader.striping import ids_on_units

__all__ = ["RowIdAllocator"]


class RowIdAllocator:
    """Hands out global row ids for all partitions of one controller.

    Monotonic, so ids are never reused (a stale id can never alias a new row) and never shared between
    partitions, and each partition's ids ascend, which lets it look them up with ``np.searchsorted``.
    """

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise SchemaError(f"row id allocator start must be >= 0, got {start}")
        self._next = int(start)
        self._lost: set[int] = set()  # units reported lost: their stripes get no new ids
        self._layout: tuple[int, int] | None = None  # (num_units, stripe_rows) of those reports

    @property
    def next_id(self) -> int:
        """The id the next allocation starts at (for statistics and checkpoints)."""
        return self._next

    def allocate(self, n: int) -> int:
        """Reserve ``n`` ids and return the first (contiguous ``[start, start + n)`` while every unit
        lives; see :meth:`allocate_ids` for the ids themselves)."""
        ids = self.allocate_ids(n)
        return int(ids[0]) if n else self._next

    def allocate_ids(self, n: int) -> np.ndarray:
        """Reserve ``n`` ids (ascending ``int64``): ``[next, next + n)`` while every unit lives, else the
        next ``n`` ids in stripes of live units (see :meth:`avoid_unit`)."""
        if n < 0:
            raise SchemaError(f"cannot allocate a negative number of rows ({n})")
        if not self._lost or n == 0:
            ids = np.arange(self._next, self._next + n, dtype=np.int64)
        else:
            num_units, stripe_rows = self._layout
            live = [u for u in range(num_units) if u not in self._lost]
            if not live:
                raise TQConnectionError(
                    f"every storage unit is lost ({sorted(self._lost)}); no new rows can be stored. "
                    "Restart the cluster (tq.close(); tq.init(...)) and reload the last checkpoint"
                )
            ids = ids_on_units(self._next, n, live, num_units, stripe_rows)
        self._next = int(ids[-1]) + 1 if n else self._next
        return ids

    @property
    def lost_units(self) -> tuple[int, ...]:
        return tuple(sorted(self._lost))

    @property
    def layout(self) -> tuple[int, int] | None:
        """``(num_units, stripe_rows)`` once a unit was reported lost, else ``None``."""
        return self._layout

    def avoid_unit(self, unit: int, num_units: int, stripe_rows: int) -> None:
        """From now on allocate no id that ``unit_of(id, num_units, stripe_rows)`` maps to ``unit``.

        Called when a storage unit is reported lost: a put striped onto it could only fail (after
        the connect timeout), so new rows go to the live units instead.
        """
        if self._layout is not None and self._layout != (num_units, stripe_rows):
            raise SchemaError(
                f"unit {unit} reported lost with num_units={num_units}, stripe_rows={stripe_rows}, but an "
                f"earlier report said num_units={self._layout[0]}, stripe_rows={self._layout[1]}; "
                "every client of a cluster must use the cluster's storage config"
            )
        self._layout = (int(num_units), int(stripe_rows))
        self._lost.add(int(unit))

    def resumed_at(self, start: int) -> RowIdAllocator:
        """A new allocator from ``start`` that still avoids the lost units (checkpoint load)."""
        out = RowIdAllocator(start)
        out._lost, out._layout = set(self._lost), self._layout
        return out
