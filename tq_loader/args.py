"""Checks of public call arguments, applied by the client before anything is sent.

A wrong type used to be encoded happily, refused by the server's typed decoder and answered to
nobody, so the caller waited for its whole timeout. Every check here raises an
:class:`~tq_loader.errors.ArgumentError` that names the argument and says what it must be.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from tq_loader.codec_objects import numpy_enc_hook
from tq_loader.errors import ArgumentError

__all__ = ["choice", "count", "name", "names", "optional_name", "plain_mapping", "timeout"]

_MAX_DEPTH = 32


def _type(value: Any) -> str:
    return type(value).__name__


def name(arg: str, value: Any) -> str:
    """A non-empty ``str`` (a partition id, task or field name)."""
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"{arg} must be a non-empty str, got {value!r} ({_type(value)})")
    return value


def optional_name(arg: str, value: Any) -> str | None:
    return None if value is None else name(arg, value)


def names(arg: str, value: Any, *, allow_empty: bool = True) -> list[str]:
    """A ``str`` or a sequence of ``str`` as a list."""
    if isinstance(value, str):
        return [name(arg, value)]
    if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):
        raise ArgumentError(f"{arg} must be a str or a list of str, got {_type(value)}")
    out = list(value)
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise ArgumentError(f"{arg} must hold non-empty str values only, got {bad[0]!r} ({_type(bad[0])})")
    if not out and not allow_empty:
        raise ArgumentError(f"{arg} must name at least one entry")
    return out


def count(arg: str, value: Any, *, minimum: int = 0) -> int:
    """An integer (numpy integers too, never ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{arg} must be an int, got {value!r} ({_type(value)})")
    if value < minimum:
        raise ArgumentError(f"{arg} must be >= {minimum}, got {value}")
    return int(value)


def choice(arg: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise ArgumentError(f"{arg} must be one of {list(options)}, got {value!r}")
    return str(value)


def timeout(arg: str, value: Any) -> float | None:
    """Seconds (>= 0) or ``None`` (wait without bound)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{arg} must be a number of seconds or None, got {value!r} ({_type(value)})")
    if value < 0 or value != value:
        raise ArgumentError(f"{arg} must be >= 0 seconds, got {value}")
    return float(value)


def _plain(arg: str, value: Any, depth: int) -> Any:
    """``value`` as msgpack-able plain data: numpy arrays become lists, numpy scalars Python values."""
    if depth > _MAX_DEPTH:
        raise ArgumentError(f"{arg} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":  # strings travel as lists
            return value.tolist()
        if value.dtype.kind not in "biuf" or not value.dtype.isnative:
            raise ArgumentError(
                f"{arg}: numpy arrays of dtype {value.dtype} cannot be sent; use numbers or str"
            )
        return np.ascontiguousarray(value)  # arrives as an array (a validated msgpack extension)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ArgumentError(f"{arg}: keys must be str, got {bad[0]!r} ({_type(bad[0])})")
        return {k: _plain(f"{arg}[{k!r}]", v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(f"{arg}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if hasattr(value, "tolist") and callable(value.tolist):  # a torch tensor
        return _plain(arg, value.tolist(), depth)
    raise ArgumentError(
        f"{arg}: a {_type(value)} cannot be sent; use numbers, str, bytes, lists, dicts or numpy arrays"
    )


def plain_mapping(arg: str, value: Any) -> dict[str, Any]:
    """A mapping with ``str`` keys whose values are plain data (see :func:`_plain`); ``None`` -> ``{}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{arg} must be a dict, got {_type(value)}")
    out = _plain(arg, value, 0)
    try:
        msgspec.msgpack.encode(out, enc_hook=numpy_enc_hook)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ArgumentError(f"{arg} cannot be sent: {exc}") from None
    return out
