"""The sampler contract, shared helpers and the name registry.

A sampler decides *which* ready rows a consumer gets next; the controller owns *readiness*. The
contract follows TransferQueue's ``BaseSampler`` so user samplers written for it keep working:

* ``sample(ready_indexes, batch_size, **sampling_config) -> (sampled, consumed)`` -- global indexes.
  ``ready_indexes`` are ascending. Too few ready rows gives ``([], [])`` (the controller waits and
  asks again) unless ``allow_partial=True`` is in the config, which returns what can be served.
  Unknown config keys are ignored: they come straight from users.
* ``sample_round(ready_indexes, batch_size, dp_size, **sampling_config)`` picks one *round*: a
  batch of ``batch_size`` rows for each of ``dp_size`` data-parallel ranks, disjoint. The
  controller records rounds in a :class:`~tq_loader.samplers.rounds.RoundLedger`, so every caller
  with the same ``(partition, task, batch_index)`` sees the same round whatever the sampler.
* State travels only through ``state_dict()`` / ``load_state_dict()``; built-ins are stateless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from tq_loader.errors import NotFoundError

__all__ = [
    "BaseSampler",
    "IndexLike",
    "allow_partial",
    "as_index_array",
    "available_samplers",
    "check_positive",
    "get_sampler_class",
    "make_sampler",
    "register_sampler",
    "split_even",
]

IndexLike = Sequence[int] | np.ndarray
S = TypeVar("S", bound=type["BaseSampler"])


def as_index_array(indexes: IndexLike) -> np.ndarray:
    """``indexes`` as a 1-D int64 array (no copy when it already is one)."""
    arr = np.asarray(indexes)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"ready_indexes must be a 1-D sequence of integer global indexes, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


def check_positive(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a ValueError naming ``name`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def allow_partial(sampling_config: Mapping[str, Any]) -> bool:
    """Whether the request accepts fewer rows than asked (end of a sealed stream)."""
    return bool(sampling_config.get("allow_partial", False))


def split_even(rows: np.ndarray, parts: int, unit: int = 1) -> list[np.ndarray] | None:
    """Split ``rows`` into ``parts`` contiguous slices of whole ``unit``-row blocks.

    Sizes differ by at most one block (earlier parts get the extra ones), so a full round splits
    exactly and a short tail splits as evenly as possible. ``None`` when there are fewer blocks
    than parts: some rank would get nothing, so the caller drops the tail instead.
    """
    if len(rows) % unit:
        raise ValueError(f"{len(rows)} sampled rows are not whole groups of {unit}")
    blocks = len(rows) // unit
    if blocks < parts:
        return None
    base, extra = divmod(blocks, parts)
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.concatenate(([0], np.cumsum(sizes))) * unit
    return [rows[bounds[i] : bounds[i + 1]] for i in range(parts)]


class BaseSampler(ABC):
    """Chooses which ready rows to serve next; see the module docstring for the contract.

    Subclasses implement :meth:`sample`; group samplers also override :meth:`round_unit` so that
    :meth:`sample_round` never splits a group across ranks.
    """

    def __init__(self) -> None:
        # TransferQueue user samplers keep per-partition caches here; clear_cache() drops them.
        self._states: dict[Any, Any] = {}

    @abstractmethod
    def sample(
        self, ready_indexes: IndexLike, batch_size: int, *args: Any, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        """Return ``(sampled, consumed)`` global indexes, or ``([], [])`` if not enough are ready."""

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[list[int], list[int]]:
        return self.sample(*args, **kwargs)

    def round_unit(self, **sampling_config: Any) -> int:
        """Rows that must stay together on one rank (1 here; the group size for group samplers)."""
        return 1

    def sample_round(
        self, ready_indexes: IndexLike, batch_size: int, dp_size: int, **sampling_config: Any
    ) -> tuple[list[list[int]], list[int]]:
        """Pick one round: ``batch_size`` rows for each of ``dp_size`` ranks, disjoint.

        Returns ``(per_rank, consumed)``. The default samples ``batch_size * dp_size`` rows with
        :meth:`sample` and hands out contiguous slices. A partial tail (``allow_partial``) is split
        so sizes differ by at most one row (one group for group samplers); a tail with fewer rows
        (groups) than ranks gives ``([], [])``, i.e. it is dropped so all ranks stay in step.
        """
        batch_size = check_positive("batch_size", batch_size)
        dp_size = check_positive("dp_size", dp_size)
        unit = self.round_unit(**sampling_config)
        if batch_size % unit:
            raise ValueError(
                f"per-rank batch_size ({batch_size}) must be a multiple of the group size ({unit}) so "
                f"every rank gets whole groups; use a batch_size of k*{unit}"
            )
        sampled, consumed = self.sample(ready_indexes, batch_size * dp_size, **sampling_config)
        if len(sampled) == 0:
            return [], []
        parts = split_even(as_index_array(sampled), dp_size, unit)
        if parts is None:
            return [], []
        return [p.tolist() for p in parts], list(consumed)

    def state_dict(self) -> dict[str, Any]:
        """Mutable sampler state for checkpoints (built-in samplers have none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a stateless sampler refuses non-empty state (wrong sampler?)."""
        if state:
            raise ValueError(
                f"{type(self).__name__} is stateless but got state keys {sorted(state)}; the checkpoint "
                "was written by a different sampler -- configure the same sampler as when it was saved"
            )

    def clear_cache(self, partition_id: str) -> None:
        """Forget anything cached for ``partition_id`` (TransferQueue API; built-ins cache nothing)."""
        self._states.pop(partition_id, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[BaseSampler]] = {}


def register_sampler(name: str, cls: S | None = None, *, replace: bool = False) -> Any:
    """Register ``cls`` under ``name``; without ``cls`` returns a class decorator.

    Re-registering a name with a different class needs ``replace=True`` so that two plugins cannot
    silently shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")

    def _register(klass: S) -> S:
        if not (isinstance(klass, type) and issubclass(klass, BaseSampler)):
            raise TypeError(f"sampler {name!r} must be a subclass of BaseSampler, got {klass!r}")
        current = _REGISTRY.get(name)
        if current is not None and current is not klass and not replace:
            raise ValueError(
                f"sampler name {name!r} is already registered to {current.__qualname__}; pick another "
                "name or pass replace=True"
            )
        _REGISTRY[name] = klass
        return klass

    if cls is None:
        return _register
    return _register(cls)


def available_samplers() -> list[str]:
    """Registered sampler names, sorted."""
    return sorted(_REGISTRY)


def get_sampler_class(name: str) -> type[BaseSampler]:
    """The class registered as ``name``; :class:`NotFoundError` lists the known names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise NotFoundError(
            f"unknown sampler {name!r}; registered samplers: {', '.join(available_samplers())}. "
            "Register your own with tq_loader.samplers.register_sampler(name, cls)"
        ) from None


def make_sampler(name_or_instance: str | BaseSampler | type[BaseSampler], **init_kwargs: Any) -> BaseSampler:
    """A sampler from a registered name, a sampler class, or an instance (returned as is)."""
    if isinstance(name_or_instance, BaseSampler):
        if init_kwargs:
            raise ValueError(
                f"got a ready {type(name_or_instance).__name__} instance and init kwargs "
                f"{sorted(init_kwargs)}; pass the name or class instead to construct one"
            )
        return name_or_instance
    if isinstance(name_or_instance, str):
        return get_sampler_class(name_or_instance)(**init_kwargs)
    if isinstance(name_or_instance, type) and issubclass(name_or_instance, BaseSampler):
        return name_or_instance(**init_kwargs)
    raise TypeError(
        f"expected a sampler name, BaseSampler subclass or instance, got {type(name_or_instance).__name__}"
    )
