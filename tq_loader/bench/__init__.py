"""The benchmark suite (``tq-loader bench``, ``make bench``): ratios against baselines of the same run.

Everything tq_loader is measured with is measured in the same run, on the same TensorDicts, through
the same calls: TransferQueue 0.1.11 (in its own venv), raw pyzmq between two processes, torch
copies, Ray's object store. The suite prints ratios and checks issue 8's targets (met or not, by
how much) -- never an absolute pass/fail. Modules, one job each:

``workloads`` (batches + the KV loop, standalone), ``registry`` (cases and systems), ``plans``
(sizes), ``baselines``, ``systems`` (tq_loader placements), ``transferqueue`` (its venv and driver),
``kv_cases``, ``scaling``, ``memory``, ``handover``, ``targets``, ``report``, ``plots``, ``cli``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``tq-loader bench ARGS``; see :mod:`tq_loader.bench.cli`."""
    from tq_loader.bench.cli import main as _main

    return _main(argv)
