"""The ``transfer_queue`` -> tq_loader import alias: a lazy meta-path finder.

This module sits outside the ``tq_loader`` package on purpose: the ``tq_loader_alias.pth`` start-up
hook (shipped by setup.py) imports it when ``TQ_LOADER_ALIAS_TRANSFER_QUEUE=1``, and importing
``tq_loader`` there would load torch into every interpreter. Installing the finder imports nothing
heavy; tq_loader is imported when ``transfer_queue`` is. The public entry point is
:func:`tq_loader.compat.alias_transfer_queue`.

Each aliased name is its own module object (an :class:`AliasModule`) that forwards attribute reads
to its tq_loader counterpart, so ``transfer_queue.BatchMeta is tq_loader.BatchMeta`` while the
import system's bookkeeping (``__spec__``, child-module attributes) never touches tq_loader's modules.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from importlib.machinery import ModuleSpec

__all__ = ["ALIASES", "ENV_VAR", "AliasModule", "TransferQueueAliasFinder", "install", "install_from_env"]

ENV_VAR = "TQ_LOADER_ALIAS_TRANSFER_QUEUE"
ROOT = "transfer_queue"

# TransferQueue 0.1.11's public import paths (what its README, tutorials, recipes and public-API tests
# import) -> the tq_loader module that offers the same names.
ALIASES: dict[str, str] = {
    "transfer_queue": "tq_loader",
    "transfer_queue.interface": "tq_loader",  # init, close, get_client, kv_*, checkpoints: the top level
    "transfer_queue.client": "tq_loader.client",
    "transfer_queue.metadata": "tq_loader.metadata",
    "transfer_queue.sampler": "tq_loader.samplers",
    "transfer_queue.sampler.base": "tq_loader.samplers.base",
    "transfer_queue.sampler.sequential_sampler": "tq_loader.samplers.builtin",
    "transfer_queue.sampler.grpo_group_n_sampler": "tq_loader.samplers.builtin",
    "transfer_queue.sampler.rank_aware_sampler": "tq_loader.samplers.builtin",
    "transfer_queue.sampler.seqlen_balanced_sampler": "tq_loader.samplers.seqlen",
    "transfer_queue.dataloader": "tq_loader.loader",
    "transfer_queue.dataloader.streaming_dataset": "tq_loader.loader",  # StreamingDataset, chunk_batch_fn
    "transfer_queue.dataloader.streaming_dataloader": "tq_loader.loader.dataloader",
}

# Dunder names an alias answers itself; every other attribute read is forwarded.
_FORWARDED_DUNDERS = frozenset({"__all__", "__version__"})


class AliasModule(types.ModuleType):
    """``transfer_queue[.x]``: a module whose attributes are those of its tq_loader counterpart."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, target.__doc__)
        self.__alias_of__ = target
        self.__path__: list[str] = []  # a package: its submodules resolve through the finder only

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__") and name not in _FORWARDED_DUNDERS:
            raise AttributeError(name)
        target = self.__alias_of__
        try:
            return getattr(target, name)
        except AttributeError:
            raise AttributeError(
                f"module {self.__name__!r} (an alias of {target.__name__!r}) has no attribute {name!r}; "
                "docs/compat.md lists what tq_loader offers in its place"
            ) from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.__alias_of__)))

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # By reference, as pickle/cloudpickle treat modules: a Ray task that uses ``tq`` imports
        # ``transfer_queue`` again in the worker (aliased there by TQ_LOADER_ALIAS_TRANSFER_QUEUE).
        import importlib

        return importlib.import_module, (self.__name__,)


class _AliasLoader:
    """Creates the :class:`AliasModule` of one name; there is no code to execute."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        import importlib

        return AliasModule(spec.name, importlib.import_module(self.target))

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module forwards to an already imported tq_loader module."""


class TransferQueueAliasFinder:
    """A meta-path finder that answers every ``transfer_queue`` import with tq_loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != ROOT and not fullname.startswith(ROOT + "."):
            return None
        if fullname == ROOT:
            origin = find_real_transfer_queue()
            if origin is not None:
                _raise_conflict(origin)
        counterpart = ALIASES.get(fullname)
        if counterpart is None:
            raise ModuleNotFoundError(
                f"{fullname} is part of TransferQueue's internals and has no tq_loader counterpart "
                f"(transfer_queue is aliased to tq_loader; aliased paths: {', '.join(sorted(ALIASES))}). "
                "docs/compat.md says what to use instead.",
                name=fullname,
            )
        return ModuleSpec(
            fullname, _AliasLoader(counterpart), origin=f"alias of {counterpart}", is_package=True
        )


def find_real_transfer_queue() -> str | None:
    """Where a TransferQueue that is not this alias would be imported from, or None if there is none."""
    loaded = sys.modules.get(ROOT)
    if loaded is not None and not isinstance(loaded, AliasModule):
        return str(getattr(loaded, "__file__", None) or loaded)
    for finder in sys.meta_path:
        if isinstance(finder, TransferQueueAliasFinder) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(ROOT, None)
        if spec is not None:
            return str(spec.origin or list(spec.submodule_search_locations or []) or spec.name)
    return None


def _raise_conflict(origin: str) -> None:
    from tq_loader.errors import transfer_queue_conflict  # tq_loader is imported only on this error path

    raise transfer_queue_conflict(origin)


def install() -> TransferQueueAliasFinder:
    """Put the finder first on ``sys.meta_path`` (once); return the installed finder."""
    for finder in sys.meta_path:
        if isinstance(finder, TransferQueueAliasFinder):
            return finder
    finder = TransferQueueAliasFinder()
    sys.meta_path.insert(0, finder)
    return finder


def install_from_env() -> None:
    """The start-up hook: install the finder when ``TQ_LOADER_ALIAS_TRANSFER_QUEUE=1``."""
    value = os.environ.get(ENV_VAR, "")
    if value == "1":
        install()
    elif value not in ("", "0"):
        import warnings

        warnings.warn(
            f"{ENV_VAR}={value!r} is not understood: set it to 1 to alias transfer_queue to tq_loader, "
            "or to 0 (or unset it) for no alias. No alias is installed.",
            RuntimeWarning,
            stacklevel=1,
        )
