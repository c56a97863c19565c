"""Checks of public call arguments, applied by the client before anything is sent.

A wrong type used to be encoded happily, refused by the server's typed decoder and answered to
nobody, so the caller waited for its whole timeout. Every check here raises an
:class:`~tq_loader.errors.ArgumentError` that names the argument and says what it must be.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from tq_loader.codec_objects import numpy_enc_hook
from tq_loader.errors import ArgumentError

__all__ = [
    "callable_or_none", "choice", "count", "device", "flag", "instance", "integer", "key", "mapping", "mappings", "name",
    "names", "number", "optional_count", "optional_name", "path", "plain_mapping", "sequence", "timeout",
]  # fmt: skip

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


def integer(arg: str, value: Any) -> int:
    """An integer of any value (numpy integers too, never ``bool``): the type check only."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{arg} must be an int, got {value!r} ({_type(value)})")
    return int(value)


def number(arg: str, value: Any, *, optional: bool = False) -> float | None:
    """A real number (``None`` too with ``optional``): the type check only."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(
            f"{arg} must be a number{' or None' if optional else ''}, got {value!r} ({_type(value)})"
        )
    return float(value)


def optional_count(arg: str, value: Any, *, minimum: int = 0) -> int | None:
    return None if value is None else count(arg, value, minimum=minimum)


def flag(arg: str, value: Any) -> bool:
    """A ``bool`` (numpy's too, and the ints 0 and 1 that C-style callers pass)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ArgumentError(f"{arg} must be True or False, got {value!r} ({_type(value)})")


def key(arg: str, value: Any) -> str:
    """A ``str`` dictionary key (may be empty)."""
    if not isinstance(value, str):
        raise ArgumentError(f"{arg} must be a str, got {value!r} ({_type(value)})")
    return value


def path(arg: str, value: Any) -> str | os.PathLike[str]:
    """A filesystem path: a non-empty ``str`` or an ``os.PathLike``."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return value
    raise ArgumentError(
        f"{arg} must be a path (a non-empty str or os.PathLike), got {value!r} ({_type(value)})"
    )


def callable_or_none(arg: str, value: Any) -> Callable[..., Any] | None:
    if value is not None and not callable(value):
        raise ArgumentError(f"{arg} must be callable or None, got {value!r} ({_type(value)})")
    return value


def instance(
    arg: str, value: Any, types: type | tuple[type, ...], what: str, *, optional: bool = False
) -> Any:
    """``value`` when it is an instance of ``types`` (or ``None`` with ``optional``); ``what`` names them."""
    if (optional and value is None) or isinstance(value, types):
        return value
    raise ArgumentError(f"{arg} must be {what}{' or None' if optional else ''}, got {_type(value)}")


def mapping(arg: str, value: Any, *, optional: bool = False) -> Mapping[str, Any]:
    """A mapping with ``str`` keys (``None`` -> ``{}`` with ``optional``); values are not inspected."""
    if optional and value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{arg} must be a dict, got {_type(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ArgumentError(f"{arg}: keys must be str, got {bad[0]!r} ({_type(bad[0])})")
    return value


def sequence(arg: str, value: Any, what: str = "a list") -> list[Any]:
    """A list, tuple or other sized iterable (not a str, bytes or dict) as a list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ArgumentError(f"{arg} must be {what}, got {_type(value)}")
    return list(value)


def mappings(arg: str, value: Any) -> list[Mapping[str, Any]]:
    """A list of dicts (one per row)."""
    out = sequence(arg, value, "a list of dicts (one per row)")
    for i, item in enumerate(out):
        mapping(f"{arg}[{i}]", item)
    return out


def device(arg: str, value: Any) -> Any:
    """``None`` or what ``torch.device`` accepts (a str, an int, a ``torch.device``)."""
    if value is None:
        return None
    import torch  # only here: the rest of this module is torch-free

    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ArgumentError(
            f"{arg} must be a device (e.g. 'cpu', 'cuda:0', torch.device) or None, got {_type(value)}"
        )
    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ArgumentError(f"{arg}: {value!r} is not a device ({exc})") from None


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
