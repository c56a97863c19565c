"""Row ids and other integer vectors from user or wire input: the one place that normalises them.

Lists, tuples, numpy arrays and tensors (duck-typed: this module imports no torch, so the
controller does not either) become a 1-D integer array; floats, bools and nested shapes are
refused with a :class:`~tq_loader.errors.SchemaError` that names what was wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tq_loader.errors import SchemaError

__all__ = ["as_ids", "int_vector"]


def int_vector(
    values: Any, what: str, dtype: Any = np.int64, kinds: str = "iu", *, copy: bool = False
) -> np.ndarray:
    """``values`` as a 1-D array of ``dtype`` (``kinds``: the numpy dtype kinds accepted)."""
    if hasattr(values, "detach") and hasattr(values, "numpy"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.array(values) if copy else np.asarray(values)
    if arr.size == 0:
        return np.empty(0, dtype=dtype)
    if arr.ndim != 1:
        raise SchemaError(f"{what} must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.dtype.kind not in kinds:
        raise SchemaError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def as_ids(values: Any, what: str = "global indexes") -> np.ndarray:
    """Global row ids as a 1-D ``int64`` array (no copy when it already is one)."""
    return int_vector(values, what)
