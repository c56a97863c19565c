"""The sampler contract, shared helpers and the name registry.

A sampler decides *which* ready rows a consumer gets next; the controller owns *readiness*. The
contract follows TransferQueue's ``BaseSampler`` so user samplers written for it keep working:

* ``sample(ready_indexes, batch_size, **sampling_config) -> (sampled, consumed)`` -- global indexes,
  up to ``batch_size`` of them (``batch_size=0`` gives ``([], [])``). What a sampler does with too
  few ready rows is its own rule (TransferQueue's ``SequentialSampler`` returns what is ready; group
  samplers return ``([], [])``): the controller calls :meth:`BaseSampler.sample_batch`, which waits
  (returns ``([], [])``) while fewer than ``batch_size`` rows are ready, unless ``allow_partial=True``
  is in the config (the tail of a sealed stream). Unknown config keys are ignored: they come
  straight from users.
* ``sample_round(ready_indexes, batch_size, dp_size, **sampling_config)`` picks one *round*: a
  batch of ``batch_size`` rows for each of ``dp_size`` data-parallel ranks, disjoint. The
  controller records rounds in a :class:`~tq_loader.samplers.rounds.RoundLedger`, so every caller
  with the same ``(partition, task, batch_index)`` sees the same round whatever the sampler.
* Called directly with ``dp_rank`` / ``batch_index`` (TransferQueue's way), ``RankAwareSampler``
  and ``SeqlenBalancedSampler`` cache each rank's batch in ``_states[partition][task][dp_rank]
  [batch_index]`` as TransferQueue's do; :meth:`has_cached_result`, :meth:`clear_cache`,
  :meth:`save_checkpoint` / :meth:`load_checkpoint` work on that cache. The controller never
  passes those keys (its round ledger does the caching), so its samplers stay stateless.
* Checkpointable state of a user sampler travels through ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from tq_loader.errors import ArgumentError, NotFoundError

__all__ = [
    "BaseSampler",
    "IndexLike",
    "allow_partial",
    "as_index_array",
    "available_samplers",
    "check_batch_size",
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
        raise ArgumentError(
            f"ready_indexes must be a 1-D sequence of integer global indexes, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


def check_positive(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or an ArgumentError (a ValueError) naming ``name`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"{name} must be positive (an integer >= 1), got {value!r}")
    return int(value)


def check_batch_size(value: Any, name: str = "batch_size") -> int:
    """``value`` as an int >= 0 (0 asks for nothing, as in TransferQueue).

    A negative size is refused: TransferQueue slices with it (``ready[:-1]``, every row but the
    last), which no caller means.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ArgumentError(f"{name} must be an integer >= 0, got {value!r}")
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
        raise ArgumentError(f"{len(rows)} sampled rows are not whole groups of {unit}")
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

    def ready_limit(self, rows: int, **sampling_config: Any) -> int | None:
        """How many ready rows (in id order) :meth:`sample` needs to pick ``rows`` -- ``None``: all of
        them. A sampler that only takes the first ready rows says so, and the controller then scans
        a window of the partition instead of the whole of it."""
        return None

    def sample_batch(
        self, ready_indexes: IndexLike, batch_size: int, **sampling_config: Any
    ) -> tuple[list[int], list[int]]:
        """What the controller serves a plain request: ``([], [])`` while too few rows are ready.

        Fewer than ``batch_size`` ready rows (TransferQueue's controller rule) means "wait",
        unless ``allow_partial`` is set (then :meth:`sample` decides what a short batch is).
        """
        batch_size = check_positive("batch_size", batch_size)
        if len(ready_indexes) < batch_size and not allow_partial(sampling_config):
            return [], []
        return self.sample(ready_indexes, batch_size, **sampling_config)

    def sample_round(
        self, ready_indexes: IndexLike, batch_size: int, dp_size: int, **sampling_config: Any
    ) -> tuple[list[list[int]], list[int]]:
        """Pick one round: ``batch_size`` rows for each of ``dp_size`` ranks, disjoint.

        Returns ``(per_rank, consumed)``. The default samples ``batch_size * dp_size`` rows with
        :meth:`sample_batch` and hands out contiguous slices. A partial tail (``allow_partial``) is
        split so sizes differ by at most one row (one group for group samplers); a tail with fewer
        rows (groups) than ranks gives ``([], [])``, i.e. it is dropped so all ranks stay in step.
        """
        batch_size = check_positive("batch_size", batch_size)
        dp_size = check_positive("dp_size", dp_size)
        unit = self.round_unit(**sampling_config)
        if batch_size % unit:
            raise ArgumentError(
                f"per-rank batch_size ({batch_size}) must be a multiple of the group size ({unit}) so "
                f"every rank gets whole groups; use a batch_size of k*{unit}"
            )
        sampled, consumed = self.sample_batch(ready_indexes, batch_size * dp_size, **sampling_config)
        if len(sampled) == 0:
            return [], []
        parts = split_even(as_index_array(sampled), dp_size, unit)
        if parts is None:
            return [], []
        return [p.tolist() for p in parts], list(consumed)

    # ------------------------------------------------ TransferQueue's per-rank cache (direct calls)

    def _cached(self, partition_id: str, task_name: str, dp_rank: Any, batch_index: Any) -> Any:
        """The cached entry for one rank's batch, or None (see the module docstring)."""
        return self._states.get(partition_id, {}).get(task_name, {}).get(dp_rank, {}).get(batch_index)

    def _cache(self, partition_id: str, task_name: str, dp_rank: int, batch_index: int, entry: Any) -> None:
        ranks = self._states.setdefault(partition_id, {}).setdefault(task_name, {})
        ranks.setdefault(dp_rank, {})[batch_index] = entry

    def has_cached_result(
        self, partition_id: str, task_name: str, sampling_config: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether a direct call already cached the batch named by ``sampling_config``'s
        ``dp_rank`` and ``batch_index`` (TransferQueue API)."""
        cfg = sampling_config or {}
        found = self._cached(partition_id, task_name, cfg.get("dp_rank"), cfg.get("batch_index"))
        return found is not None

    def save_checkpoint(self) -> dict[str, Any]:
        """TransferQueue's sampler checkpoint: a copy of the direct-call cache ``_states``."""
        return {"_states": copy.deepcopy(self._states)}

    def load_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`save_checkpoint`."""
        self._states = copy.deepcopy(dict(state.get("_states", {})))

    def state_dict(self) -> dict[str, Any]:
        """Mutable sampler state for checkpoints (built-in samplers have none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a stateless sampler refuses non-empty state (wrong sampler?)."""
        if state:
            raise ArgumentError(
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
        raise ArgumentError(f"sampler name must be a non-empty string, got {name!r}")
    if not isinstance(replace, (bool, np.bool_)):
        raise ArgumentError(f"replace must be True or False, got {replace!r} ({type(replace).__name__})")

    def _register(klass: S) -> S:
        if not (isinstance(klass, type) and issubclass(klass, BaseSampler)):
            raise ArgumentError(f"cls for sampler {name!r} must be a subclass of BaseSampler, got {klass!r}")
        current = _REGISTRY.get(name)
        if current is not None and current is not klass and not replace:
            raise ArgumentError(
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
            raise ArgumentError(
                f"got a ready {type(name_or_instance).__name__} instance and init kwargs "
                f"{sorted(init_kwargs)}; pass the name or class instead to construct one"
            )
        return name_or_instance
    if isinstance(name_or_instance, str):
        return get_sampler_class(name_or_instance)(**init_kwargs)
    if isinstance(name_or_instance, type) and issubclass(name_or_instance, BaseSampler):
        return name_or_instance(**init_kwargs)
    raise ArgumentError(
        f"expected a sampler name, BaseSampler subclass or instance, got {type(name_or_instance).__name__}"
    )
